"""The three options beyond the anchors -- ``ignore_index``, temperature tensors (learnable or per sample)
and logit standardization -- against the reference and against independent implementations written here,
and the promise that they cost nothing when unused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import LOSS_NAMES, logit_batches, loss_options
from torch.utils._python_dispatch import TorchDispatchMode

import aekt_plugin
from aekt_plugin import reference


def _derivatives(fn, student, teacher, target, temperature, **options):
    """Loss, dL/dz and (for a temperature tensor) dL/dT of ``fn``, on fresh leaves."""
    student = student.detach().clone().requires_grad_(True)
    leaves = [student]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_(True)
        leaves.append(temperature)
    loss = fn(student, teacher, target, temperature=temperature, **options)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves))


def _close(actual, expected, rtol=1e-9, atol=1e-11):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# --- independent implementations ----------------------------------------------------------------------


def _by_definition(student, teacher, target, temperature, *, name, options):
    """Per-sample loss written from the definitions with probabilities (moderate float64 logits only):
    TCKD and NCKD from softmaxes, KD as T²·KL(q‖p) with ``kl_div``."""
    if isinstance(temperature, torch.Tensor) and temperature.dim():
        temperature = temperature[:, None]
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher.detach() / temperature, dim=1)
    square = temperature**2
    square = square.reshape(-1) if isinstance(square, torch.Tensor) else square
    if name == "kd_loss":
        return square * F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(dim=1)
    p, q = log_p.exp(), log_q.exp()
    is_target = F.one_hot(target, student.shape[1]).bool()
    p_t, q_t = p[is_target], q[is_target]
    tckd = q_t * torch.log(q_t / p_t) + (1 - q_t) * torch.log((1 - q_t) / (1 - p_t))
    # 1 at the target (log 1 = 0 there, and no 0/0 for autograd to differentiate)
    p_hat = torch.where(is_target, 1.0, p / (1 - p_t)[:, None])
    q_hat = torch.where(is_target, 1.0, q / (1 - q_t)[:, None])
    nckd = (q_hat * torch.log(q_hat / p_hat)).sum(dim=1)
    a = options.get("alpha", 1.0)
    if name == "aekt_loss":
        ratio = (q_t / p_t).detach().clamp(max=options.get("max_weight", 5.0))
        if options.get("normalize_weight", True):
            ratio = ratio / ratio.mean()
        a = a * ratio
    return square * (a * tckd + options.get("beta", 8.0) * nckd)


def _reduce(per_sample, reduction):
    return {"mean": per_sample.mean, "sum": per_sample.sum}.get(reduction, lambda: per_sample)()


def _sun_standardize(logits):
    """Logit standardization as in Sun et al.'s reference code (``logit_stand``)."""
    mean = logits.mean(dim=-1, keepdims=True)
    stdv = logits.std(dim=-1, keepdims=True)
    return (logits - mean) / (1e-7 + stdv)


moderate = logit_batches(max_batch=8, max_classes=30).filter(
    lambda b: float(torch.cat(b[:2]).abs().max()) / b[3] < 5  # 1 - q_t from probabilities stays accurate
)


# --- temperature tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("per_sample", [False, True])
@given(data=st.data())
def test_temperature_tensor_gradients_match_the_reference(name, per_sample, data):
    student, teacher, target, temperature = data.draw(logit_batches(max_classes=60))
    options = data.draw(loss_options(name))
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 100.0
    scale = torch.rand(student.shape[0], dtype=torch.float64) + 0.5 if per_sample else torch.tensor(1.0)
    t = torch.tensor(temperature, dtype=torch.float64) * scale
    expected = _derivatives(getattr(reference, name), student, teacher, target, t, **options)
    actual = _derivatives(getattr(aekt_plugin, name), student, teacher, target, t, **options)
    amplification = max(1.0, float(expected[0].abs().max()))
    _close(actual[:2], expected[:2], rtol=1e-8, atol=1e-10 * amplification)
    # dL/dT (T1) is a difference of sums of terms as large as the logits over T (Σ_j G_j u_j, ...): its
    # float64 rounding grows with them, and a tiny dL/dT of logits in the thousands differs in absolute
    # terms by more than the student's gradient does (seen: 1.1e-10 at |logits| ≈ 2400).
    largest_logit = max(float(student.abs().max()), float(teacher.abs().max()))
    logit_scale = max(1.0, largest_logit / float(t.min()))
    _close(actual[2:], expected[2:], rtol=1e-8, atol=1e-10 * amplification * logit_scale)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(batch=moderate, per_sample=st.booleans())
def test_dL_dT_is_the_total_derivative_of_the_value(name, batch, per_sample):
    """Against autograd through the definitions written above (AEKT's ratio weight detached there too)."""
    student, teacher, target, temperature = batch
    t = (
        torch.full((student.shape[0],), temperature, dtype=torch.float64)
        if per_sample
        else torch.tensor(temperature, dtype=torch.float64)
    )
    options = {"beta": 3.0} if name != "kd_loss" else {}
    expected = _derivatives(
        lambda z, v, y, temperature: _by_definition(z, v, y, temperature, name=name, options=options).sum(),
        student,
        teacher,
        target,
        t,
    )
    actual = _derivatives(getattr(aekt_plugin, name), student, teacher, target, t, reduction="sum", **options)
    _close(actual, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["kd_loss", "dkd_loss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_in_student_logits_and_temperature(name, reduction):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 7, (5,), generator=generator)
    fn = getattr(aekt_plugin, name)
    for temperature in (torch.tensor(2.3, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 1.0):
        temperature.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda z, t: fn(z, teacher, target, temperature=t, reduction=reduction), (student, temperature)
        )


def test_a_learnable_temperature_trains_inside_a_loss_module():
    torch.manual_seed(0)
    criterion = aekt_plugin.DKDLoss(temperature=torch.nn.Parameter(torch.tensor(4.0)), beta=2.0)
    assert [name for name, _ in criterion.named_parameters()] == ["temperature"]
    optimizer = torch.optim.SGD(criterion.parameters(), lr=0.05)
    student, teacher = torch.randn(32, 10), torch.randn(32, 10) * 4
    target = teacher.argmax(dim=1)
    for _ in range(3):
        optimizer.zero_grad()
        loss = criterion(student, teacher, target)
        loss.backward()
        assert criterion.temperature.grad is not None and math.isfinite(float(criterion.temperature.grad))
        optimizer.step()
    assert float(criterion.temperature.detach()) != 4.0
    assert "tensor" in repr(criterion)


def test_per_sample_temperatures_follow_dense_logits():
    student, teacher = (
        torch.randn(2, 5, 3, 4, dtype=torch.float64),
        torch.randn(2, 5, 3, 4, dtype=torch.float64),
    )
    target = torch.randint(0, 5, (2, 3, 4))
    temperature = torch.rand(2, 3, 4, dtype=torch.float64) + 1.0
    per_pixel = aekt_plugin.aekt_loss(student, teacher, target, temperature=temperature, reduction="none")
    expected = reference.aekt_loss(student, teacher, target, temperature=temperature, reduction="none")
    torch.testing.assert_close(per_pixel, expected, rtol=1e-10, atol=1e-12)


def test_temperature_tensors_are_checked():
    student, teacher, target = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"one value per sample, shape \(4,\)"):
        aekt_plugin.kd_loss(student, teacher, target, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        aekt_plugin.kd_loss(student, teacher, target, temperature=torch.ones((), dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must lie in"):
        aekt_plugin.kd_loss(student, teacher, target, temperature=torch.tensor([1.0, 2.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="0-d"):
        aekt_plugin.KDLoss(temperature=torch.ones(4))


# --- ignore_index --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("validate_args", [True, False])
@given(data=st.data())
def test_ignored_samples_drop_out_of_loss_gradient_and_mean(name, validate_args, data):
    student, teacher, target, temperature = data.draw(logit_batches(max_batch=10, max_classes=40))
    options = data.draw(loss_options(name))
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 100.0
    ignored = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(target), max_size=len(target))))
    marked = target.masked_fill(ignored, -100)
    kwargs = dict(temperature=temperature, validate_args=validate_args, **options)
    fn = getattr(aekt_plugin, name)
    loss, grad = _derivatives(fn, student, teacher, marked, **kwargs)[:2]
    expected = _derivatives(getattr(reference, name), student, teacher, marked, **kwargs)[:2]
    _close((loss, grad), expected, rtol=1e-9, atol=1e-11 * max(1.0, float(expected[0].abs().max())))
    assert float(grad[ignored].abs().sum()) == 0.0
    # The independent check: the loss of the kept samples alone.
    kept = ~ignored
    if bool(kept.any()):
        alone, alone_grad = _derivatives(fn, student[kept], teacher[kept], target[kept], **kwargs)[:2]
        if options["reduction"] == "none":
            torch.testing.assert_close(loss[kept], alone, rtol=1e-9, atol=1e-11)
            assert float(loss[ignored].abs().sum()) == 0.0
        else:
            torch.testing.assert_close(loss, alone, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grad[kept], alone_grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate_args", [True, False])
def test_with_every_sample_ignored_the_loss_and_gradient_are_zero(name, reduction, validate_args):
    student = torch.randn(4, 6, requires_grad=True)
    loss = getattr(aekt_plugin, name)(
        student, torch.randn(4, 6), torch.full((4,), -100), reduction=reduction, validate_args=validate_args
    )
    loss.sum().backward()
    assert float(loss.detach().abs().max()) == 0.0 and float(student.grad.abs().max()) == 0.0


@pytest.mark.parametrize("validate_args", [True, False])
def test_segmentation_masks_ignore_255_and_an_ignore_value_that_is_also_a_class(validate_args):
    student, teacher = (
        torch.randn(2, 4, 3, 3, dtype=torch.float64),
        torch.randn(2, 4, 3, 3, dtype=torch.float64),
    )
    target = torch.randint(0, 4, (2, 3, 3))
    target[0, 1] = 255
    for ignore_index in (255, 2):  # 2 is also a class index: those pixels are ignored, by request
        if ignore_index == 2:
            target = target.masked_fill(target == 255, 0)
        loss = aekt_plugin.dkd_loss(
            student, teacher, target, ignore_index=ignore_index, reduction="none", validate_args=validate_args
        )
        ignored = target == ignore_index
        expected = reference.dkd_loss(student, teacher, target.masked_fill(ignored, -100), reduction="none")
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        assert float(loss[ignored].abs().max()) == 0.0


def test_an_invalid_target_is_still_an_error_when_some_samples_are_ignored():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([0, -100, 7, 1])
    for validate_args in (True, False):
        with pytest.raises(ValueError, match=r"outside \[0, 5\).*ignore_index=-100"):
            aekt_plugin.aekt_loss(student, teacher, target, validate_args=validate_args)


def test_probability_targets_ignore_nothing():
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64) * 3, dim=1)
    classes = soft.argmax(dim=1)
    with_ignore = aekt_plugin.aekt_loss(student, teacher, soft, ignore_index=int(classes[0]))
    torch.testing.assert_close(
        with_ignore, aekt_plugin.aekt_loss(student, teacher, classes, ignore_index=None)
    )


def test_aekt_normalises_its_weight_over_the_kept_samples_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (6,))
    marked = target.clone()
    marked[[0, 4]] = -100
    kept = marked != -100
    loss = aekt_plugin.aekt_loss(student, teacher, marked, beta=0.0, reduction="none")
    alone = aekt_plugin.aekt_loss(student[kept], teacher[kept], target[kept], beta=0.0, reduction="none")
    torch.testing.assert_close(loss[kept], alone, rtol=1e-12, atol=1e-12)


# --- standardization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(data=st.data())
def test_standardized_loss_and_gradient_match_the_reference(name, data):
    student, teacher, target, temperature = data.draw(logit_batches(max_classes=60))
    options = data.draw(loss_options(name))
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 100.0
    expected = _derivatives(
        getattr(reference, name), student, teacher, target, temperature, standardize=True, **options
    )
    actual = _derivatives(
        getattr(aekt_plugin, name), student, teacher, target, temperature, standardize=True, **options
    )
    _close(actual, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(batch=logit_batches(max_batch=8, max_classes=30), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_standardization_is_sun_et_als_definition_with_the_gradient_through_it(name, batch, reduction):
    """Independent check: Sun et al.'s ``logit_stand`` and the definitions above, under autograd."""
    student, teacher, target, temperature = batch
    options = {"beta": 2.0} if name != "kd_loss" else {}

    def by_definition(z, v, y, temperature):
        per_sample = _by_definition(
            _sun_standardize(z), _sun_standardize(v), y, temperature, name=name, options=options
        )
        return _reduce(per_sample, reduction)

    expected = _derivatives(by_definition, student, teacher, target, temperature)
    actual = _derivatives(
        getattr(aekt_plugin, name),
        student,
        teacher,
        target,
        temperature,
        standardize=True,
        reduction=reduction,
        **options,
    )
    _close(actual, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_standardization_stays_finite_on_huge_logits(name, dtype):
    student, teacher = (torch.randn(4, 10) * 1e4).to(dtype), (torch.randn(4, 10) * 1e4).to(dtype)
    target = torch.randint(0, 10, (4,))
    loss, grad = _derivatives(getattr(aekt_plugin, name), student, teacher, target, 4.0, standardize=True)[:2]
    assert math.isfinite(float(loss)) and bool(torch.isfinite(grad).all()) and grad.dtype == dtype


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_standardization_of_a_constant_row_has_the_finite_derivative_one_over_epsilon(name, dtype):
    """A constant row standardizes to 0 and its derivative is ``G / 1e-7`` (the ε of the definition; the
    std's own derivative is 0/0 there and is taken as its limit 0), where autograd through ``std`` gives
    nan. Beyond float16's range, so float16 inputs get inf there."""
    student = torch.cat([torch.full((1, 10), 3.0), torch.randn(1, 10)]).to(dtype)
    teacher, target = torch.randn(2, 10).to(dtype), torch.tensor([2, 5])
    loss, grad = _derivatives(getattr(aekt_plugin, name), student, teacher, target, 4.0, standardize=True)[:2]
    assert math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())
    # The same batch standardized by hand (the constant row becomes 0), gradient taken with respect to y.
    standardized = torch.stack([torch.zeros(10, dtype=torch.float64), _sun_standardize(student[1].double())])
    _, grad_y = _derivatives(
        getattr(aekt_plugin, name), standardized, _sun_standardize(teacher.double()), target, 4.0
    )[:2]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad[0].double(), grad_y[0] / 1e-7, rtol=tolerance, atol=tolerance * 1e7)


# --- unused options cost nothing -----------------------------------------------------------------------


class _CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls(fn):
    with _CountCalls() as counter:
        fn()
    return counter.calls


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("validate_args", [True, False])
def test_the_default_options_add_no_aten_call(name, validate_args):
    """``ignore_index=-100`` (default) costs no call when no target equals it, ``standardize=False`` and a
    number as temperature none at all: the default call makes exactly the calls of the options turned off
    explicitly."""
    student = torch.randn(64, 100, requires_grad=True)
    teacher, target = torch.randn(64, 100), torch.randint(0, 100, (64,))
    fn = getattr(aekt_plugin, name)

    def call(**options):
        return lambda: fn(student, teacher, target, validate_args=validate_args, **options).backward()

    call()()  # warm the constant cache
    assert _calls(call()) == _calls(call(ignore_index=None, standardize=False, temperature=4.0))
