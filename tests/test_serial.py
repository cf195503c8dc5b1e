"""The serial layer of SPEC §3: identity start, both orders, exact folding (S1), warm-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aekt_plugin import SerialLayer, check_order, split_logits, warmup_factor


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


def test_split_logits_without_a_serial_layer_returns_the_head_twice():
    head = torch.randn(2, 3)
    z_cls, z_kd = split_logits(head, None)
    assert z_cls is head and z_kd is head


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
        check_order("both")
    with pytest.raises(ValueError, match="5 classes"):
        SerialLayer(5).transform(torch.randn(2, 4))
    with pytest.raises(TypeError, match="nn.Linear"):
        SerialLayer(5, order="kd_cls").fold(nn.Conv2d(3, 5, 1))
    with pytest.raises(ValueError, match="outputs"):
        SerialLayer(5, order="kd_cls").fold(nn.Linear(3, 4))


@pytest.mark.parametrize(
    ("progress", "warmup", "expected"),
    [(0, 20, 0.0), (5, 20, 0.25), (20, 20, 1.0), (100, 20, 1.0), (3, 0, 1.0), (-1, 10, 0.0)],
)
def test_warmup_factor_is_linear_from_zero(progress, warmup, expected):
    assert warmup_factor(progress, warmup) == pytest.approx(expected)
