"""Task separation: the serial layer (identity start, both orders, exact folding (S1)), the student that
carries it, the classifier finder, and the warm-up schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aekt_plugin import SerialLayer
from aekt_plugin.serial import SerialStudent, find_classifier, fold_serial


@pytest.mark.parametrize("order", ["cls_kd", "kd_cls"])
@pytest.mark.parametrize("residual", [False, True])
def test_starts_as_the_identity_map(order, residual):
    serial = SerialLayer(7, order=order, residual=residual)
    logits = torch.randn(3, 7)
    z_cls, z_kd = serial(logits)
    torch.testing.assert_close(z_cls, logits)
    torch.testing.assert_close(z_kd, logits)
    torch.testing.assert_close(serial.relation_matrix(), torch.eye(7))


def _trained(order, residual=False, classes=6):
    torch.manual_seed(0)
    serial = SerialLayer(classes, order=order, residual=residual)
    with torch.no_grad():
        serial.weight.add_(torch.randn_like(serial.weight) * 0.3)
        serial.bias.add_(torch.randn_like(serial.bias))
    return serial


def test_orders_route_the_serial_layer_to_the_right_head():
    head = torch.randn(4, 6)
    cls_kd, kd_cls = _trained("cls_kd"), _trained("kd_cls")
    z_cls, z_kd = cls_kd(head)
    assert torch.equal(z_cls, head) and torch.allclose(z_kd, cls_kd.transform(head))
    z_cls, z_kd = kd_cls(head)
    assert torch.equal(z_kd, head) and torch.allclose(z_cls, kd_cls.transform(head))


@pytest.mark.parametrize("order", ["cls_kd", "kd_cls"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_gives_the_classification_logits_exactly_S1(order, residual, bias):
    serial = _trained(order, residual)
    classifier = nn.Linear(11, 6, bias=bias)
    features = torch.randn(5, 11)
    expected, _ = serial(classifier(features))
    folded = serial.fold(classifier)
    torch.testing.assert_close(folded(features), expected, rtol=1e-5, atol=1e-5)
    assert folded is not classifier


def test_relation_matrix_of_the_residual_form_is_identity_plus_W():
    serial = _trained("kd_cls", residual=True)
    torch.testing.assert_close(serial.relation_matrix(), torch.eye(6) + serial.weight.detach())


def test_reset_restores_the_identity_at_a_new_size():
    serial = _trained("kd_cls")
    serial.reset(9)
    assert serial.num_classes == 9
    torch.testing.assert_close(serial.relation_matrix(), torch.eye(9))


def test_fold_of_a_float64_layer_into_a_float32_classifier_without_bias():
    serial = _trained("kd_cls").double()
    classifier = nn.Linear(11, 6, bias=False)
    features = torch.randn(5, 11)
    folded = serial.fold(classifier)
    assert folded.weight.dtype == torch.float32 and folded.bias is not None
    expected, _ = serial(classifier(features).double())
    torch.testing.assert_close(folded(features).double(), expected, rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("order", [None, "cls_kd", "kd_cls"])
def test_serial_student_splits_and_folds_into_the_plain_model(order):
    torch.manual_seed(0)
    student = SerialStudent(_Net(nn.Linear(8, 5)), order=order)
    if student.serial is not None:
        with torch.no_grad():
            student.serial.weight.add_(torch.randn(5, 5) * 0.3)
    x = torch.randn(4, 3, 4)
    z_cls, z_kd = student.split(x)
    head = student.model(x)
    if order is None:
        assert torch.equal(z_cls, head) and torch.equal(z_kd, head)
    elif order == "cls_kd":
        assert torch.equal(z_cls, head) and not torch.allclose(z_kd, head)
    else:
        assert torch.equal(z_kd, head) and not torch.allclose(z_cls, head)
    torch.testing.assert_close(student(x), z_cls)
    deployed = student.fold()
    assert type(deployed) is _Net and deployed is not student.model
    torch.testing.assert_close(deployed(x), z_cls, rtol=1e-5, atol=1e-5)


def test_find_classifier_names_the_linear_that_makes_the_logits():
    assert find_classifier(_Net(nn.Linear(8, 5))) == ["head"]
    assert find_classifier(_Net(nn.Sequential(nn.Dropout(), nn.Linear(8, 5)))) == ["head.1"]

    class TwoHeads(_Net):  # DeiT-distilled: the model averages two heads
        def get_classifier(self):
            return self.head, self.head_dist

    two = TwoHeads(nn.Linear(8, 5))
    two.head_dist = nn.Linear(8, 5)
    assert find_classifier(two) == ["head", "head_dist"]
    serial = _trained("kd_cls", classes=5)
    folded = fold_serial(two, serial)
    x = torch.randn(3, 12)
    features = two.body(x)
    expected = serial((two.head(features) + two.head_dist(features)) / 2)[0]
    torch.testing.assert_close((folded.head(features) + folded.head_dist(features)) / 2, expected)


def test_a_model_that_cannot_be_folded_is_refused_when_the_student_is_built():
    conv_head = _Net(nn.Identity())
    conv_head.head = nn.Conv2d(8, 5, 1)
    with pytest.raises(TypeError, match="order='cls_kd'"):
        SerialStudent(conv_head, order="kd_cls")
    assert SerialStudent(copy.deepcopy(conv_head), order="cls_kd", num_classes=5).serial is not None


def test_serial_student_refuses_a_model_that_does_not_return_logits():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError, match="logits"):
        SerialStudent(Pair(), order="cls_kd").split(torch.randn(1, 2))


def test_gradients_flow_to_the_serial_layer():
    serial = SerialLayer(5, order="cls_kd")
    _, z_kd = serial(torch.randn(3, 5))
    z_kd.sum().backward()
    assert serial.weight.grad is not None and bool(serial.weight.grad.abs().sum() > 0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="order"):
        SerialLayer(5, order="kd")
    with pytest.raises(ValueError, match="order"):
        SerialLayer(5, order=None)
    with pytest.raises(ValueError, match="num_classes"):
        SerialLayer(0)
    with pytest.raises(ValueError, match="order"):
        SerialStudent(_Net(nn.Linear(8, 5)), order="both")
    with pytest.raises(ValueError, match="5 classes"):
        SerialLayer(5).transform(torch.randn(2, 4))
    with pytest.raises(TypeError, match="nn.Linear"):
        SerialLayer(5, order="kd_cls").fold(nn.Conv2d(3, 5, 1))
    with pytest.raises(ValueError, match="outputs"):
        SerialLayer(5, order="kd_cls").fold(nn.Linear(3, 4))
