"""aekt_plugin.timm: the AEKTStudent wrapper and AEKTDistillationTask, on real timm models (CPU, tiny)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.task import DistillationTeacher, TrainingTask  # noqa: E402

import aekt_plugin  # noqa: E402
from aekt_plugin import AEKTLoss, DKDLoss, KDLoss, aekt_loss, dkd_loss, kd_loss  # noqa: E402
from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent, DKDDistillationTask, create_student  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 7

# Tiny configurations of each family: (timm name, kwargs, image size).
_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
FAMILIES = {
    "resnet": ("resnet10t", dict(channels=(4, 8, 16, 32)), 32),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),
    "convnext": ("convnext_atto", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)), 32),
    "vit": ("vit_tiny_patch16_224", _VIT, 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", _VIT, 32),
}
ORDERS = ["cls_kd", "kd_cls"]


def make_model(family: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, in_chans=1, **kwargs)


def images(family: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_serial(student: AEKTStudent, seed: int = 2) -> None:
    """Move S away from the identity so the tests can tell z_cls from z_kd."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        student.serial.weight.add_(0.2 * torch.randn(student.serial.weight.shape, generator=gen))
        student.serial.bias.add_(0.2 * torch.randn(student.serial.bias.shape, generator=gen))


# --- import hygiene ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_aekt_plugin_does_not_import_timm():
    code = "import sys, aekt_plugin; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_module_imports_the_real_timm_not_itself():
    import aekt_plugin.timm as adapter

    assert adapter.timm is timm
    assert Path(adapter.timm.__file__).parent.name == "timm"
    assert "aekt_plugin" not in adapter.timm.__file__


# --- AEKTStudent over the families ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_output_equals_wrapped_model_for_cls_kd(family):
    model = make_model(family)
    student = AEKTStudent(model, order="cls_kd")
    perturb_serial(student)  # S must not matter at inference in this order
    x = images(family)
    student.eval()
    out = student(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fold_matches_eval_output(family, order):
    model = make_model(family)
    student = AEKTStudent(model, order=order)
    perturb_serial(student)
    x = images(family)
    student.eval()
    expected = student(x)
    folded = student.fold()
    assert type(folded) is type(model)
    assert set(folded.state_dict()) == set(model.state_dict())
    assert not folded.training
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    if order == "kd_cls":  # S really is in there: the plain model disagrees
        assert not torch.allclose(model(x), expected, atol=1e-3)
    # folding copies: the wrapper is unchanged
    torch.testing.assert_close(student(x), expected)


@pytest.mark.parametrize("order", ORDERS + [None])
@pytest.mark.parametrize("family", ["resnet", "vit", "deit_distilled"])
def test_distilled_training_returns_cls_and_kd_logits(family, order):
    model = make_model(family)
    student = AEKTStudent(model, order=order)
    if order is not None:
        perturb_serial(student)
    x = images(family, batch=4)
    student.train()
    assert isinstance(student(x), torch.Tensor)  # switch off: one tensor, as DeiT
    student.set_distilled_training(True)
    z_cls, z_kd = student(x)
    torch.manual_seed(0)
    head = model.forward_head(model.forward_features(x))
    if order == "cls_kd":
        torch.testing.assert_close(z_kd, student.serial.transform(z_cls))
    elif order == "kd_cls":
        torch.testing.assert_close(z_cls, student.serial.transform(z_kd))
    else:
        assert z_cls is z_kd
    assert z_cls.shape == z_kd.shape == head.shape == (4, NUM_CLASSES)
    student.eval()
    out = student(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, NUM_CLASSES)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_keeps_timm_model_api(family):
    model = make_model(family)
    student = AEKTStudent(model, order="kd_cls")
    x = images(family)
    student.eval()
    assert student.num_classes == model.num_classes == NUM_CLASSES
    assert student.num_features == model.num_features
    assert student.in_chans == 1
    assert student.pretrained_cfg is model.pretrained_cfg
    assert student.default_cfg is model.pretrained_cfg
    assert student.get_classifier() == model.get_classifier()  # the same module (DeiT: the same pair)
    for name in ("head_hidden_size", "forward_intermediates"):
        assert hasattr(student, name) == hasattr(model, name)
    if hasattr(model, "head_hidden_size"):
        assert student.head_hidden_size == model.head_hidden_size
    feats = student.forward_features(x)
    torch.testing.assert_close(feats, model.forward_features(x))
    pooled = student.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, model.forward_head(feats, pre_logits=True))
    torch.testing.assert_close(student.forward_head(feats), student(x))
    if hasattr(model, "forward_intermediates"):
        final, inter = student.forward_intermediates(x)
        ref_final, ref_inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, ref_final)
        assert len(inter) == len(ref_inter)
    student.set_grad_checkpointing(True)
    assert getattr(model, "grad_checkpointing", True)
    assert student.no_weight_decay() == {f"model.{n}" for n in getattr(model, "no_weight_decay", set)()}
    data_cfg = timm.data.resolve_data_config({}, model=student)
    assert data_cfg["mean"] == tuple(model.pretrained_cfg["mean"])


def test_in_chans_is_inferred_when_the_model_does_not_store_it():
    model = make_model("resnet")
    in_chans = model.__dict__.pop("in_chans", None)  # older timm ResNets have no attribute
    assert in_chans in (None, 1)
    assert AEKTStudent(model, order=None).in_chans == 1


def test_relation_matrix_is_the_serial_weight():
    student = AEKTStudent(make_model("resnet"), order="kd_cls")
    assert torch.equal(student.relation_matrix(), torch.eye(NUM_CLASSES))
    perturb_serial(student)
    assert torch.equal(student.relation_matrix(), student.serial.weight.detach())
    residual = AEKTStudent(make_model("resnet"), order="kd_cls", residual=True)
    assert torch.equal(residual.relation_matrix(), torch.eye(NUM_CLASSES))


@pytest.mark.parametrize("family", ["resnet", "convnext", "deit_distilled"])
def test_reset_classifier_resets_serial_layer_to_new_identity(family):
    student = AEKTStudent(make_model(family), order="kd_cls")
    perturb_serial(student)
    student.reset_classifier(3)
    assert student.num_classes == 3
    assert torch.equal(student.relation_matrix(), torch.eye(3))
    assert torch.equal(student.serial.bias, torch.zeros(3))
    student.eval()
    assert student(images(family)).shape == (3, 3)
    with pytest.raises(ValueError, match="num_classes"):
        student.reset_classifier(0)


@pytest.mark.parametrize("order", ORDERS + [None])
def test_state_dict_round_trip(order, tmp_path):
    student = AEKTStudent(make_model("convnext"), order=order)
    if order is not None:
        perturb_serial(student)
    path = tmp_path / "student.pth"
    torch.save(student.state_dict(), path)
    fresh = AEKTStudent(make_model("convnext", seed=5), order=order)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = images("convnext")
    student.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), student(x))
    # and the folded model loads into a plain timm model of the same architecture
    plain = make_model("convnext", seed=6)
    plain.load_state_dict(student.fold().state_dict())
    torch.testing.assert_close(plain.eval()(x), student(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("serial_weight_decay", [True, False])
def test_timm_optimizer_factory_covers_every_parameter(serial_weight_decay):
    student = AEKTStudent(make_model("vit"), order="kd_cls", serial_weight_decay=serial_weight_decay)
    optimizer = create_optimizer_v2(student, "adamw", lr=1e-3, weight_decay=0.05)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in student.parameters())
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(student.serial.weight)] == (0.05 if serial_weight_decay else 0.0)
    assert decay_of[id(student.model.pos_embed)] == 0.0  # the ViT's own no_weight_decay survives the prefix


def test_layer_decay_puts_serial_layer_with_the_head():
    student = AEKTStudent(make_model("vit"), order="kd_cls")
    optimizer = create_optimizer_v2(student, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert scale_of[id(student.serial.weight)] == 1.0
    assert scale_of[id(student.model.head.weight)] == 1.0
    assert scale_of[id(student.model.patch_embed.proj.weight)] < 1.0


def test_create_student_builds_and_wraps():
    student = create_student("resnet10t", order="kd_cls", num_classes=4, in_chans=1, channels=(4, 8, 16, 32))
    assert isinstance(student, AEKTStudent) and isinstance(student.model, timm.models.ResNet)
    assert student.order == "kd_cls" and student.num_classes == 4 and student.in_chans == 1
    # one default everywhere: the wrapper, create_student, torchdistill's student, mdistiller's ORDER
    assert AEKTStudent(make_model("resnet")).order == aekt_plugin.DEFAULTS.order
    assert (
        create_student("resnet10t", num_classes=3, channels=(4, 8, 16, 32)).order
        == aekt_plugin.DEFAULTS.order
    )


# --- distilled (DeiT) models ---------------------------------------------------------------------------
def test_deit_distilled_with_its_own_distillation_on_is_refused():
    model = make_model("deit_distilled")
    model.set_distilled_training(True)
    with pytest.raises(ValueError, match="distilled_training"):
        AEKTStudent(model, order="cls_kd")


def test_deit_distilled_switched_on_after_wrapping_is_caught_at_forward():
    model = make_model("deit_distilled")
    student = AEKTStudent(model, order="cls_kd").train()
    model.set_distilled_training(True)
    with pytest.raises(TypeError, match="set_distilled_training"):
        student(images("deit_distilled"))


# --- bad input -----------------------------------------------------------------------------------------
def test_model_without_classifier_is_refused():
    with pytest.raises(ValueError, match="no classifier"):
        AEKTStudent(make_model("resnet", num_classes=0))
    with pytest.raises(TypeError, match="classifier API"):
        AEKTStudent(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    with pytest.raises(TypeError, match="already an AEKTStudent"):
        AEKTStudent(AEKTStudent(make_model("resnet")))


@pytest.mark.parametrize("order", ["kd", "CLS_KD", 1])
def test_unknown_order_is_refused(order):
    with pytest.raises(ValueError, match="order"):
        AEKTStudent(make_model("resnet"), order=order)
    with pytest.raises(ValueError, match="order"):
        create_student("resnet10t", order=order, num_classes=3)


def test_relation_matrix_without_serial_layer_says_so():
    with pytest.raises(RuntimeError, match="order=None"):
        AEKTStudent(make_model("resnet"), order=None).relation_matrix()


def test_kd_cls_refuses_a_classifier_that_is_not_linear_when_the_wrapper_is_built():
    model = make_model("resnet")
    model.fc = nn.Sequential(nn.Linear(model.num_features, NUM_CLASSES), nn.Tanh())
    with pytest.raises(TypeError, match="nn.Linear"):
        AEKTStudent(model, order="kd_cls")
    conv_head = timm.create_model("dla46_c", num_classes=3, pretrained=False)  # a Conv2d classifier
    with pytest.raises(TypeError, match="order='cls_kd'"):
        AEKTStudent(conv_head, order="kd_cls")
    # cls_kd needs no folding: S is simply dropped
    cls_kd = AEKTStudent(model, order="cls_kd").eval()
    x = images("resnet")
    torch.testing.assert_close(cls_kd.fold().eval()(x), cls_kd(x))


def test_model_that_does_not_return_logits_is_refused():
    model = make_model("resnet")
    model.fc = nn.Identity()  # num_classes still says 7, but the output is features
    model.num_features = 32
    with pytest.raises(ValueError, match="classes"):
        AEKTStudent(model, order="cls_kd").eval()(images("resnet"))


def test_mismatched_teacher_and_student_classes_are_refused():
    with pytest.raises(ValueError, match="classes"):
        AEKTDistillationTask(
            AEKTStudent(make_model("resnet")), make_model("resnet", num_classes=5), verbose=False
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(beta=-1.0), "beta"),
        (dict(task_loss_weight=-1.0), "task_loss_weight"),
        (dict(distill_loss_weight=-0.5), "distill_loss_weight"),
        (dict(task_loss_weight=1.5), "distill_loss_weight too"),
        (dict(warmup_epochs=float("nan")), "warmup_epochs"),
        (dict(updates_per_epoch=0), "updates_per_epoch"),
    ],
)
def test_bad_task_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AEKTDistillationTask(AEKTStudent(make_model("resnet")), make_model("resnet"), verbose=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task_loss_weight="1"), "task_loss_weight"),
        (dict(distill_loss=AEKTLoss(), beta=2.0), "go to the loss module"),
        (dict(warmup_epochs=None), "warmup_epochs"),
        (dict(updates_per_epoch=2.5), "updates_per_epoch"),
    ],
)
def test_wrongly_typed_task_options_are_refused(kwargs, match):
    with pytest.raises(TypeError, match=match):
        AEKTDistillationTask(AEKTStudent(make_model("resnet")), make_model("resnet"), verbose=False, **kwargs)


def test_bad_teacher_type_is_refused():
    with pytest.raises(TypeError, match="teacher_model"):
        AEKTDistillationTask(AEKTStudent(make_model("resnet")), 42, verbose=False)


# --- AEKTDistillationTask ------------------------------------------------------------------------------
TASK_LOSSES = [(AEKTDistillationTask, aekt_loss), (DKDDistillationTask, dkd_loss)]


def make_task(order="kd_cls", task_class=AEKTDistillationTask, **kwargs):
    student = AEKTStudent(make_model("resnet", seed=0), order=order)
    teacher = make_model("resnet", seed=1)
    kwargs.setdefault("warmup_epochs", 0)
    task = task_class(student, teacher, verbose=False, **kwargs)
    return task, student, teacher


def batch(n=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def test_task_is_a_timm_training_task_with_timm_keys():
    task, student, _ = make_task()
    assert isinstance(task, TrainingTask) and isinstance(task.teacher, DistillationTeacher)
    assert task.get_trainable_module() is student
    x, y = batch()
    result = task(x, y)
    assert set(result) == {"loss", "output", "task_loss", "kd_loss"}
    assert result["output"].shape == (6, NUM_CLASSES)


@pytest.mark.parametrize("task_class, loss_function", TASK_LOSSES)
@pytest.mark.parametrize("order", ORDERS + [None])
def test_task_losses_follow_the_spec_with_hard_targets(order, task_class, loss_function):
    task, student, teacher = make_task(
        order=order, task_class=task_class, task_loss_weight=0.7, distill_loss_weight=1.0, beta=2.0
    )
    if order is not None:
        perturb_serial(student)
    x, y = batch()
    torch.manual_seed(0)
    result = task(x, y)
    z_cls = result["output"]
    z_kd = z_cls if order != "kd_cls" else None
    if order == "cls_kd":
        z_kd = student.serial.transform(z_cls)
    elif order == "kd_cls":
        torch.manual_seed(0)
        z_kd = student.model(x)  # the head's output, BN in the same train mode
    with torch.no_grad():
        v = teacher.eval()(x)
    torch.testing.assert_close(result["task_loss"], F.cross_entropy(z_cls, y))
    torch.testing.assert_close(result["kd_loss"], loss_function(z_kd, v, y, beta=2.0))
    torch.testing.assert_close(result["loss"], 0.7 * result["task_loss"] + result["kd_loss"])


def test_dkd_task_differs_from_the_aekt_task_only_by_the_ratio_weight():
    x, y = batch()
    aekt_task, _, _ = make_task(order=None, max_weight=math.inf, normalize_weight=False)
    dkd_task, _, teacher = make_task(order=None, task_class=DKDDistillationTask)
    with torch.no_grad():
        v = teacher.eval()(x)
        aekt_result, dkd_result = aekt_task(x, y), dkd_task(x, y)
    torch.testing.assert_close(aekt_result["task_loss"], dkd_result["task_loss"])
    assert not torch.allclose(aekt_result["kd_loss"], dkd_result["kd_loss"])
    z = dkd_result["output"]
    assert isinstance(dkd_task.distill_loss, DKDLoss) and dkd_task.distill_loss.options() == DKDLoss().options()
    torch.testing.assert_close(dkd_result["kd_loss"], dkd_loss(z, v, y))


@pytest.mark.parametrize("option", ["max_weight", "normalize_weight"])
def test_dkd_task_has_no_aekt_weight_options(option):
    with pytest.raises(TypeError, match=option):
        make_task(task_class=DKDDistillationTask, **{option: 1.0})


def test_dkd_task_refuses_bad_options_and_names_itself_without_a_clock():
    with pytest.raises(ValueError, match="beta"):
        make_task(task_class=DKDDistillationTask, beta=-1.0)
    task, _, _ = make_task(task_class=DKDDistillationTask, warmup_epochs=2)
    with pytest.raises(RuntimeError, match="DKDDistillationTask has no warm-up clock"):
        task(*batch())


@pytest.mark.parametrize(
    "distill_loss, loss_function",
    [
        (KDLoss(temperature=2.0), lambda z, v, y: kd_loss(z, v, temperature=2.0)),
        (DKDLoss(beta=3.0, standardize=True), lambda z, v, y: dkd_loss(z, v, y, beta=3.0, standardize=True)),
        (AEKTLoss(max_weight=2.0), lambda z, v, y: aekt_loss(z, v, y, max_weight=2.0)),
    ],
)
def test_the_task_takes_its_distillation_loss_as_a_value(distill_loss, loss_function):
    task, student, teacher = make_task(order=None, distill_loss=distill_loss)
    assert task.distill_loss is distill_loss
    x, y = batch()
    result = task(x, y)
    with torch.no_grad():
        v = teacher.eval()(x)
    torch.testing.assert_close(result["kd_loss"], loss_function(result["output"], v, y))


def test_the_task_weights_its_terms_as_timms_logit_distillation_does():
    x, y = batch()
    for kwargs, weights in (
        ({}, (1.0, 1.0)),
        ({"task_loss_weight": 0.3}, (0.3, 0.7)),  # complementary, as timm's train.py --task-loss-weight
        ({"distill_loss_weight": 2.0}, (1.0, 2.0)),
        ({"task_loss_weight": 0.5, "distill_loss_weight": 4.0}, (0.5, 4.0)),
    ):
        task, _, _ = make_task(order=None, **kwargs)
        assert (task.task_loss_weight, task.distill_loss_weight) == weights
        result = task(x, y)
        torch.testing.assert_close(result["loss"], weights[0] * result["task_loss"] + weights[1] * result["kd_loss"])
    with pytest.warns(FutureWarning, match="task_loss_weight"):
        task, _, _ = make_task(order=None, ce_weight=0.7)
    assert (task.task_loss_weight, task.distill_loss_weight) == (0.7, 1.0)


def test_task_passes_standardize_and_a_learnable_temperature_to_the_loss():
    temperature = nn.Parameter(torch.tensor(3.0))
    task, student, teacher = make_task(order=None, standardize=True, temperature=temperature, beta=2.0)
    x, y = batch()
    result = task(x, y)
    with torch.no_grad():
        v = teacher.eval()(x)
    expected = aekt_loss(result["output"], v, y, beta=2.0, standardize=True, temperature=temperature)
    torch.testing.assert_close(result["kd_loss"], expected)
    result["loss"].backward()
    assert temperature.grad is not None and temperature.grad != 0 and torch.isfinite(temperature.grad)


def test_task_takes_mixup_soft_targets():
    task, student, teacher = make_task()
    x, y = batch(n=8)
    mixup = timm.data.Mixup(mixup_alpha=0.8, num_classes=NUM_CLASSES, label_smoothing=0.1)
    torch.manual_seed(0)
    x_mix, soft = mixup(x, y)
    assert soft.shape == (8, NUM_CLASSES) and soft.is_floating_point()
    result = task(x_mix, soft)
    torch.testing.assert_close(result["task_loss"], SoftTargetCrossEntropy()(result["output"], soft))
    with torch.no_grad():
        v = teacher.eval()(x_mix)
        z_kd = student.model(x_mix)
    torch.testing.assert_close(result["kd_loss"], aekt_loss(z_kd, v, soft.argmax(1)), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(result["loss"])


def test_backward_reaches_student_and_serial_layer_never_teacher():
    task, student, teacher = make_task(order="cls_kd", warmup_epochs=0)
    task.train()
    assert not task.teacher.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x, y = batch()
    task(x, y)["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.serial.weight.grad.abs().sum() > 0  # only kd_loss flows through S here
    assert student.model.conv1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_warmup_counts_optimizer_updates_linearly_from_zero():
    task, _, _ = make_task(warmup_epochs=2, updates_per_epoch=3)
    x, y = batch()
    unscaled = AEKTDistillationTask(task.trainable_module, task.teacher, warmup_epochs=0, verbose=False)
    factors = []
    for _ in range(8):
        reference = unscaled(x, y)["kd_loss"].detach()
        factors.append((task(x, y)["kd_loss"].detach() / reference).item())
    assert factors == pytest.approx([min(k / 6, 1.0) for k in range(8)], abs=1e-6)
    with torch.no_grad():  # evaluation forwards do not advance the clock
        task(x, y)
    assert task.num_updates == 8


def test_warmup_follows_timms_update_hook_and_set_epoch():
    task, _, _ = make_task(warmup_epochs=2, updates_per_epoch=10)
    task.update_ema(step=5)  # what timm's train.py calls after each optimizer step
    assert task.kd_warmup == pytest.approx(5 / 20)
    x, y = batch()
    task(x, y)  # the loop reports updates now: no per-forward counting on top
    assert task.num_updates == 5
    task.step_update(30)
    assert task.kd_warmup == 1.0
    task.set_epoch(1)
    assert task.num_updates == 10 and task.kd_warmup == pytest.approx(0.5)

    by_epoch, _, _ = make_task(warmup_epochs=4)
    with pytest.raises(RuntimeError, match="warm-up clock"):
        by_epoch(x, y)
    by_epoch.set_epoch(0)  # timm epochs start at 0; mdistiller's min(epoch / warmup, 1) at 1
    assert by_epoch.kd_warmup == pytest.approx(0.25)
    by_epoch.set_epoch(5)
    assert by_epoch.kd_warmup == 1.0


def test_checkpoint_state_keeps_the_warmup_clock():
    task, student, _ = make_task(warmup_epochs=2, updates_per_epoch=10)
    task.step_update(7)
    state = task.get_checkpoint_state()
    assert set(state["state_dict"]) == set(student.state_dict())
    resumed, _, _ = make_task(warmup_epochs=2, updates_per_epoch=10)
    resumed.load_checkpoint_state(state["state_dict"], state["task_state"])
    assert resumed.num_updates == 7
    x, _ = batch()
    student.eval(), resumed.get_eval_model().eval()
    torch.testing.assert_close(resumed.get_eval_model()(x), student(x))


def test_ema_follows_the_student():
    task, student, _ = make_task(order="kd_cls")
    ema = task.setup_ema(decay=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    task.update_ema(step=5)  # timm's EMA copies outright at step 1, then averages with the decay
    assert task.num_updates == 5
    torch.testing.assert_close(ema.module.serial.weight, student.serial.weight - 0.5)


def test_teacher_given_by_name_loads_local_weights(tmp_path):
    torch.manual_seed(4)
    teacher = timm.create_model("resnet10t", num_classes=NUM_CLASSES, in_chans=1).eval()
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    student = AEKTStudent(make_model("resnet"), order="cls_kd")
    task = AEKTDistillationTask(
        student, "resnet10t", teacher_pretrained_path=str(path), warmup_epochs=0, verbose=False
    )
    x, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(task.teacher(x), teacher(x))
    assert set(task(x, y)) == {"loss", "output", "task_loss", "kd_loss"}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_teacher_input_is_renormalised_between_pretrained_cfgs(in_chans):
    """ViT student (mean = std = 0.5) and ResNet teacher (ImageNet stats), as in timm's tasks."""
    student = AEKTStudent(timm.create_model("vit_tiny_patch16_224", num_classes=3, in_chans=in_chans, **_VIT))
    teacher = timm.create_model("resnet10t", num_classes=3, in_chans=in_chans, channels=(4, 8, 16, 32))
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    task = AEKTDistillationTask(student, teacher, warmup_epochs=0, verbose=False)
    x = torch.randn(2, in_chans, 32, 32)
    task(x, torch.tensor([0, 2]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    if in_chans == 1:  # grey images: the stats averaged over channels
        mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
    assert seen[0].shape == x.shape
    torch.testing.assert_close(seen[0], (x * 0.5 + 0.5 - mean) / std)


def test_plain_timm_student_distils_without_serial_layer():
    model = make_model("vit")
    task = AEKTDistillationTask(model, make_model("vit", seed=1), warmup_epochs=0, verbose=False)
    x = torch.randn(4, 1, 32, 32)
    y = torch.arange(4)
    result = task(x, y)
    with torch.no_grad():
        v = task.teacher(x)
    torch.testing.assert_close(result["kd_loss"], aekt_loss(result["output"], v, y))


def test_eval_mode_task_uses_distillation_logits():
    task, student, teacher = make_task(order="kd_cls")
    perturb_serial(student)
    student.eval()
    x, y = batch()
    with torch.no_grad():
        result = task(x, y)
        z_kd = student.model(x)
        v = teacher.eval()(x)
    torch.testing.assert_close(result["output"], student(x))
    torch.testing.assert_close(result["kd_loss"], aekt_loss(z_kd, v, y))


@pytest.mark.slow
def test_compile_keeps_the_losses():
    task, _, _ = make_task(order="cls_kd")
    x, y = batch()
    torch.manual_seed(0)
    before = task(x, y)
    eval_model = task.compile(backend="eager")
    assert task.get_eval_model() is eval_model
    torch.manual_seed(0)
    after = task(x, y)
    for key in ("loss", "task_loss", "kd_loss"):
        torch.testing.assert_close(after[key], before[key])
    after["loss"].backward()


@pytest.mark.slow
def test_a_two_process_gloo_ddp_step_gives_the_gradient_of_the_whole_batch(tmp_path):
    worker = Path(__file__).with_name("timm_ddp_worker.py")
    # ROOT after any PYTHONPATH already set, so a timm pinned there stays first
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(tmp_path), str(rank)], env=env, stderr=subprocess.PIPE
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["is_ddp"] == "DistributedDataParallel" and ranks[0]["global_batch"] is True
    assert set(ranks[0]["synced"]) == set(ranks[0]["whole"])
    assert any(name.startswith("serial.") for name in ranks[0]["synced"])
    for name in ranks[0]["synced"]:  # DDP's average is one process's gradient on both batches
        for r in range(2):
            torch.testing.assert_close(ranks[r]["synced"][name], ranks[0]["whole"][name], atol=1e-6, rtol=1e-5)
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
    assert all(g is None for g in ranks[0]["teacher_grads"])


# --- a short real training run -------------------------------------------------------------------------
def _digits(size: int = 16):
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    x = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(bunch.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_short_training_run_learns_real_data():
    """Teacher (CE) then AEKT student on scikit-learn digits: loss falls, accuracy far above chance."""
    x_tr, y_tr, x_te, y_te = _digits()
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(8, 16, 32, 64))
    opt = create_optimizer_v2(teacher, "adamw", lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(120):
        idx = torch.randint(0, len(y_tr), (64,), generator=gen)
        loss = F.cross_entropy(teacher.train()(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_acc = _accuracy(teacher, x_te, y_te)
    assert teacher_acc > 0.8

    student = create_student("resnet10t", order="kd_cls", num_classes=10, in_chans=1, channels=(4, 8, 16, 32))
    steps, batch_size = 200, 32
    task = AEKTDistillationTask(
        student, teacher, beta=2.0, warmup_epochs=1, updates_per_epoch=len(y_tr) // batch_size, verbose=False
    )
    optimizer = create_optimizer_v2(task.get_trainable_module(), "adamw", lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(y_tr), (batch_size,), generator=gen)
        student.train()
        result = task(x_tr[idx], y_tr[idx])
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step=step + 1)
        losses.append(result["task_loss"].item())
        assert math.isfinite(result["loss"].item())
    assert task.kd_warmup == 1.0
    assert sum(losses[-30:]) / 30 < 0.5 * sum(losses[:30]) / 30
    student_acc = _accuracy(student, x_te, y_te)
    assert student_acc > 0.7, (student_acc, teacher_acc)  # chance is 0.1
    assert _accuracy(student.fold(), x_te, y_te) == pytest.approx(student_acc, abs=1e-9)


@pytest.mark.slow
def test_a_compiled_task_does_not_recompile_as_the_warmup_advances():
    """The warm-up clock is a tensor: compiling the whole task step guards on no Python counter."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    task, _, _ = make_task(order=None, warmup_epochs=1, updates_per_epoch=10, validate_args=False)
    task.train()
    counter = CompileCounter()
    compiled = torch.compile(task, backend=counter)
    x, y = batch()
    factors, frames = [], []
    for step in range(6):
        frames.append(counter.frame_count)
        result = compiled(x, y)
        result["loss"].backward()
        task.update_ema(step=step + 1)
        factors.append(
            float(result["kd_loss"].detach())
            / float(aekt_plugin.aekt_loss(result["output"].detach(), task.teacher(x), y, **task.distill_loss.options()))
        )
    # Two one-time switches (the first update_ema, the first teacher check) may compile once each; after
    # them the steps reuse the compiled code while the warm-up factor keeps rising.
    assert frames[2] == frames[-1] == counter.frame_count
    # The compiled step runs the row-statistics formulation, the eager check the single-block kernel: in
    # float32 their losses agree to rounding, a few parts in a million (4e-6 on an AVX2 CPU).
    assert factors == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], rel=2e-5, abs=1e-6)


def test_kd_cls_refuses_a_head_whose_output_is_not_its_classifiers():
    # VOLO's forward_head adds 0.5 * max(aux_head(tokens)) to head(cls token): folding S into `head`
    # alone would change the output, so the wrapper refuses it when it is built.
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    volo = VOLO(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), num_classes=7,
                in_chans=1, img_size=32, stem_hidden_dim=8)
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"VOLO's output is not its classifier's \(head\).*order='cls_kd'"):
        AEKTStudent(volo, order="kd_cls", example_input=x)
    # without an input it accepts (no pretrained_cfg: a 224-pixel guess) the check says what to pass
    with pytest.raises(ValueError, match="pass an input it accepts as example_input="):
        AEKTStudent(volo, order="kd_cls")
    # the check restores the model's mode, and cls_kd (S dropped at inference) is exact for VOLO
    volo.train()
    student = AEKTStudent(volo, order="cls_kd")
    assert volo.training
    torch.testing.assert_close(student.fold().eval()(x), volo.eval()(x))


@pytest.mark.parametrize("family", ["resnet", "vit", "deit_distilled"])
def test_kd_cls_check_accepts_every_folding_head(family):
    # one head, a ViT with a fixed 32-pixel patch embedding, and DeiT's two averaged heads
    student = AEKTStudent(make_model(family), order="kd_cls")
    perturb_serial(student)
    x = images(family)
    torch.testing.assert_close(student.fold().eval()(x), student.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("poolformerv2_s12", {}), ("pit_ti_distilled_224", dict(img_size=32)),
                                          ("vit_tiny_patch16_224", _VIT)])
def test_layer_decay_groups_are_the_plain_models(name, kwargs):
    # poolformerv2 and PiT have no group_matcher: timm groups them by pretrained_cfg["classifier"], and the
    # wrapper must give that grouping, not one group ("Layer-wise lr decay has no effect").
    model = timm.create_model(name, num_classes=NUM_CLASSES, in_chans=1, **kwargs)
    plain = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    student = AEKTStudent(model, order="cls_kd")
    wrapped = create_optimizer_v2(student, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in wrapped.param_groups for p in g["params"]}
    plain_scale = {id(p): g["lr_scale"] for g in plain.param_groups for p in g["params"]}
    assert len({*plain_scale.values()}) > 2
    assert {i: scale[i] for i in plain_scale} == plain_scale
    assert scale[id(student.serial.weight)] == 1.0 == max(plain_scale.values())


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    # timm's own checkpoint path (CheckpointSaver, resume_task_checkpoint, load_task_ema_checkpoint):
    # the warm-up clock, the learnable temperature, the serial layer and the EMA must all come back.
    import signal
    import time

    worker = [sys.executable, str(ROOT / "tests" / "timm_task_resume_worker.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    subprocess.run(worker + [str(whole)], check=True, env=env, timeout=300)
    marker = tmp_path / "paused"
    process = subprocess.Popen(worker + [str(killed), "--pause-at", "2:1", str(marker)], env=env)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker never reached the pause"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final.pt").exists()
    checkpoint = killed / "checkpoint-1.pth.tar"  # the last one saved: after epoch 1
    subprocess.run(worker + [str(killed), "--resume", str(checkpoint)], check=True, env=env, timeout=300)
    expected, resumed = (torch.load(d / "final.pt", weights_only=True) for d in (whole, killed))
    assert expected["task_state"]["kd_warmup"]["steps"] == 12
    assert float(expected["task_state"]["distill_loss"]["temperature"]) != 3.0  # it was trained
    for part in ("student", "ema", "task_state"):
        flat_expected, flat_resumed = _flatten(expected[part]), _flatten(resumed[part])
        assert flat_expected.keys() == flat_resumed.keys()
        for key, value in flat_expected.items():
            assert torch.equal(value, flat_resumed[key]), f"{part}: {key} differs after the resume"


def _flatten(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = torch.as_tensor(value)
    return flat
