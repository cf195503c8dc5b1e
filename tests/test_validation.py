"""Every bad input raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

import aekt_plugin
from aekt_plugin import reference

STUDENT = torch.randn(4, 5)
TEACHER = torch.randn(4, 5)
TARGET = torch.tensor([0, 1, 2, 4])
LOSSES = [aekt_plugin.aekt_loss, aekt_plugin.dkd_loss, reference.aekt_loss, reference.dkd_loss]


@pytest.mark.parametrize("loss", LOSSES + [aekt_plugin.kd_loss, reference.kd_loss])
@pytest.mark.parametrize(
    ("student", "teacher", "target", "options", "error", "names"),
    [
        (STUDENT, torch.randn(4, 6), TARGET, {}, ValueError, "same shape"),
        (STUDENT, torch.randn(3, 5), TARGET, {}, ValueError, "same shape"),
        (STUDENT, torch.randn(5), TARGET, {}, ValueError, "teacher_logits"),
        (STUDENT.tolist(), TEACHER, TARGET, {}, TypeError, "student_logits"),
        (STUDENT.long(), TEACHER, TARGET, {}, TypeError, "student_logits"),
        (torch.randn(4, 1), torch.randn(4, 1), TARGET.clamp(max=0), {}, ValueError, "at least 2 classes"),
        (STUDENT, TEACHER, torch.tensor([0, 1, 2, 5]), {}, ValueError, "target"),
        (STUDENT, TEACHER, torch.tensor([0, -1, 2, 3]), {}, ValueError, "target"),
        (STUDENT, TEACHER, torch.tensor([0, 1, 2]), {}, ValueError, "target"),
        (STUDENT, TEACHER, TARGET.bool(), {}, TypeError, "target"),
        (STUDENT, TEACHER, torch.rand(4), {}, ValueError, "target"),
        (STUDENT, TEACHER, TARGET.tolist(), {}, TypeError, "target"),
        (STUDENT.clone().fill_(math.nan), TEACHER, TARGET, {}, ValueError, "student_logits"),
        (STUDENT, TEACHER.clone().fill_(math.inf), TARGET, {}, ValueError, "teacher_logits"),
        (STUDENT, TEACHER, TARGET, {"temperature": 0.0}, ValueError, "temperature"),
        (STUDENT, TEACHER, TARGET, {"temperature": -1.0}, ValueError, "temperature"),
        (STUDENT, TEACHER, TARGET, {"temperature": math.nan}, ValueError, "temperature"),
        (STUDENT, TEACHER, TARGET, {"temperature": "4"}, TypeError, "temperature"),
        (STUDENT, TEACHER, TARGET, {"reduction": "batchmean"}, ValueError, "reduction"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(loss, student, teacher, target, options, error, names):
    with pytest.raises(error, match=names):
        loss(student, teacher, target, **options)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": -0.5}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"alpha": True}, "alpha"),
    ],
)
def test_negative_or_non_numeric_weights_are_refused(loss, options, names):
    with pytest.raises((ValueError, TypeError), match=names):
        loss(STUDENT, TEACHER, TARGET, **options)


@pytest.mark.parametrize("loss", [aekt_plugin.aekt_loss, reference.aekt_loss])
@pytest.mark.parametrize("max_weight", [0.0, -2.0, math.nan])
def test_max_weight_must_be_positive(loss, max_weight):
    with pytest.raises(ValueError, match="max_weight"):
        loss(STUDENT, TEACHER, TARGET, max_weight=max_weight)


def test_normalize_weight_must_be_a_bool():
    with pytest.raises(TypeError, match="normalize_weight"):
        aekt_plugin.aekt_loss(STUDENT, TEACHER, TARGET, normalize_weight="yes")
    with pytest.raises(TypeError, match="normalize_weight"):
        aekt_plugin.AEKTLoss(normalize_weight=1)


def test_modules_check_their_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        aekt_plugin.AEKTLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        aekt_plugin.DKDLoss(reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        aekt_plugin.DKDLoss(beta=-1)


def test_a_module_takes_exactly_its_functions_options():
    """A module's options are its function's keyword-only parameters, read from the signature: same
    names, same defaults, and a misspelt option is refused by name."""
    import inspect

    for module, function in (
        (aekt_plugin.KDLoss, aekt_plugin.kd_loss),
        (aekt_plugin.DKDLoss, aekt_plugin.dkd_loss),
        (aekt_plugin.AEKTLoss, aekt_plugin.aekt_loss),
    ):
        options = {
            p.name: p.default
            for p in inspect.signature(function).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        }
        assert list(inspect.signature(module).parameters) == list(options)
        assert module().options() == options
    with pytest.raises(TypeError, match="'betta'"):
        aekt_plugin.AEKTLoss(betta=2.0)
    with pytest.raises(TypeError, match="'max_weight'"):
        aekt_plugin.DKDLoss(max_weight=2.0)


def test_the_reference_has_the_signature_of_the_fused_loss():
    import inspect

    for name in ("kd_loss", "dkd_loss", "aekt_loss"):
        assert inspect.signature(getattr(reference, name)) == inspect.signature(getattr(aekt_plugin, name))


def test_numpy_bools_are_bools():
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(
        aekt_plugin.aekt_loss(STUDENT, TEACHER, TARGET, validate_args=np.True_, normalize_weight=np.bool_(False)),
        aekt_plugin.aekt_loss(STUDENT, TEACHER, TARGET, validate_args=True, normalize_weight=False),
    )
    assert aekt_plugin.AEKTLoss(standardize=np.False_).standardize is False
    with pytest.raises(TypeError, match=r"validate_args must be a bool, got numpy\.int64"):
        aekt_plugin.kd_loss(STUDENT, TEACHER, validate_args=np.int64(1))


@pytest.mark.parametrize("loss", LOSSES + [aekt_plugin.kd_loss])
def test_a_float64_teacher_with_a_float32_student_is_refused(loss):
    """Mixing float64 with a lower precision is refused (it would silently compute in float64);
    half precision, bfloat16 and float32 mix freely and are computed in float32."""
    with pytest.raises(TypeError, match=r"float64 or neither.*teacher_logits\.float\(\)"):
        loss(STUDENT, TEACHER.double(), TARGET)
    with pytest.raises(TypeError, match="float64 or neither"):
        loss(STUDENT.double(), TEACHER, TARGET)
    mixed = loss(STUDENT.half(), TEACHER.bfloat16(), TARGET)
    assert mixed.dtype == torch.float32


def test_validate_args_false_lets_non_finite_values_through_for_amp():
    """GradScaler needs a non-finite loss to reach it, so value checks can be switched off."""
    student = STUDENT.clone()
    student[0, 0] = math.inf
    loss = aekt_plugin.aekt_loss(student, TEACHER, TARGET, validate_args=False)
    assert not bool(torch.isfinite(loss))
    with pytest.raises(ValueError, match="student_logits"):
        aekt_plugin.aekt_loss(student, TEACHER, TARGET)


def test_shape_checks_run_even_without_validate_args():
    with pytest.raises(ValueError, match="same shape"):
        aekt_plugin.aekt_loss(STUDENT, torch.randn(4, 6), TARGET, validate_args=False)
    with pytest.raises(ValueError, match="target"):
        aekt_plugin.aekt_loss(STUDENT, TEACHER, torch.tensor([0, 1]), validate_args=False)


def test_no_silent_broadcasting_of_a_single_teacher_row():
    with pytest.raises(ValueError, match="same shape"):
        aekt_plugin.kd_loss(STUDENT, TEACHER[:1])


def test_probability_targets_must_be_non_negative_and_shaped_like_the_logits():
    with pytest.raises(ValueError, match="target"):
        aekt_plugin.aekt_loss(STUDENT, TEACHER, -torch.rand(4, 5))
    with pytest.raises(ValueError, match="target"):
        aekt_plugin.aekt_loss(STUDENT, TEACHER, torch.rand(4, 6))
