"""The fused KD/DKD/AEKT kernel against the reference, the closed form and the identities of
``docs/derivations.md`` (equation labels cited in each test)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import LOSS_NAMES, logit_batches, loss_options

import aekt_plugin
from aekt_plugin import _baselines, reference


def fused(name):
    return getattr(aekt_plugin, name)


def loss_and_grad(fn, student, teacher, target, **options):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, target, **options)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    return loss.detach(), grad


def assert_close_relative(actual, expected, rtol, *, floor=1.0, atol=0.0):
    """``|actual - expected| <= rtol · max(|expected|, floor) + atol``, the maximum over the tensor."""
    scale = expected.abs().max().clamp_min(floor)
    assert float((actual - expected).abs().max()) <= rtol * float(scale) + atol, (actual, expected)


def kd_weights(parts):
    return 1.0, parts.log_1m_q_t.exp()


# --- fused vs reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(data=st.data())
def test_fused_matches_reference_in_float64(name, data):
    student, teacher, target, temperature = data.draw(logit_batches())
    options = data.draw(loss_options(name))
    expected, expected_grad = loss_and_grad(
        getattr(reference, name), student, teacher, target, temperature=temperature, **options
    )
    assume(bool(torch.isfinite(expected).all()))  # only an unbounded AEKT weight (w_max=inf) overflows
    actual, actual_grad = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, **options
    )
    # An unbounded AEKT weight a = q_t/p_t multiplies the rounding of TCKD by a: the problem's condition.
    parts = reference.decompose(student, teacher, target, temperature)
    amplification = (
        float((parts.log_q_t - parts.log_p_t).exp().max()) if options.get("max_weight") == math.inf else 1.0
    )
    assert_close_relative(actual, expected, 1e-10 * max(1.0, amplification))
    assert_close_relative(actual_grad, expected_grad, 1e-10 * max(1.0, amplification))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_zero_switches_an_overflowing_ratio_weight_off(dtype):
    # p_t underflows, so q_t/p_t overflows the dtype: the weight is its largest finite number, and 0 times
    # it is 0 (found by hypothesis: the fused loss gave 0 · inf = nan where the reference gives 0).
    student = torch.tensor([[1540.9961, -293.4289]], dtype=dtype)
    teacher = torch.tensor([[-2178.7894, 568.4313]], dtype=dtype)
    target = torch.tensor([1])
    options = dict(temperature=1.0, beta=0.0, max_weight=math.inf, normalize_weight=False)
    value, grad = loss_and_grad(aekt_plugin.aekt_loss, student, teacher, target, alpha=0.0, **options)
    assert float(value) == 0.0 and not grad.any()
    ref_value, _ = loss_and_grad(reference.aekt_loss, student, teacher, target, alpha=0.0, **options)
    assert float(ref_value) == 0.0
    value, _ = loss_and_grad(aekt_plugin.aekt_loss, student, teacher, target, alpha=1.0, **options)
    assert float(value) == math.inf  # documented: an unbounded weight can give an infinite loss


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(data=st.data())
def test_fused_float32_matches_float64_reference(name, data):
    student, teacher, target, temperature = data.draw(logit_batches(dtype=torch.float32))
    options = data.draw(loss_options(name))
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 10.0  # an unbounded weight amplifies float32 rounding without limit
    expected, expected_grad = loss_and_grad(
        getattr(reference, name),
        student.double(),
        teacher.double(),
        target,
        temperature=temperature,
        **options,
    )
    actual, actual_grad = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, **options
    )
    assert actual.dtype == torch.float32 and actual_grad.dtype == torch.float32
    # A divergence near 0 is a difference of log-sum-exps of size log C: float32 rounding of those, times
    # the weights T²(a + b) and summed over the samples of "sum", sets the floor, not the loss value
    # (plain KD's kl_div has the same one).
    parts = reference.decompose(student.double(), teacher.double(), target, temperature)
    weight_sum = (
        1.0
        + float(options.get("alpha", 1.0))
        * (
            float(
                reference.aekt_weight(
                    parts, max_weight=options["max_weight"], normalize_weight=options["normalize_weight"]
                ).max()
            )
            if name == "aekt_loss"
            else 1.0
        )
        + float(options.get("beta", 1.0))
    )
    samples = student.shape[0] if options["reduction"] == "sum" else 1
    assert_close_relative(actual.double(), expected, 1e-5, floor=temperature**2 * weight_sum * samples)
    # Rounding z/T to float32 moves a scaled logit by up to ε·M (M the largest |scaled logit|), so every
    # probability by that relative amount; the gradient T·(a·(p_t - q_t) + b·(p̂ - q̂)) carries it times
    # T(a + b). Irrelevant for moderate logits, it dominates at |z/T| in the thousands.
    largest_scaled_logit = float(torch.cat((student, teacher)).abs().max()) / temperature
    input_rounding = torch.finfo(torch.float32).eps * largest_scaled_logit
    assert_close_relative(
        actual_grad.double(), expected_grad, 1e-5, atol=4 * input_rounding * temperature * weight_sum
    )


# --- the closed form (G1)-(G2) ---------------------------------------------------------------------------


@given(batch=logit_batches(max_classes=60), alpha=st.floats(0, 3), beta=st.floats(0, 10))
def test_reference_autograd_equals_closed_form_G1_G2(batch, alpha, beta):
    """(G1)-(G2), with the formula written out here rather than taken from the package."""
    student, teacher, target, temperature = batch
    _, grad = loss_and_grad(
        reference.dkd_loss,
        student,
        teacher,
        target,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        reduction="sum",
    )
    z, v = student / temperature, teacher / temperature
    p, q = z.softmax(1), v.softmax(1)
    is_target = F.one_hot(target, z.shape[1]).bool()
    p_t, q_t = p[is_target][:, None], q[is_target][:, None]
    p_hat = F.softmax(z.masked_fill(is_target, -math.inf), 1)
    q_hat = F.softmax(v.masked_fill(is_target, -math.inf), 1)
    expected = temperature * (-alpha * (p_t - q_t) * p_hat + beta * (p_hat - q_hat))
    expected = torch.where(is_target, temperature * alpha * (p_t - q_t), expected)
    assert_close_relative(grad, expected, 1e-9)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(data=st.data())
def test_fused_gradient_equals_closed_form(name, data):
    student, teacher, target, temperature = data.draw(logit_batches(max_classes=80))
    options = {k: v for k, v in data.draw(loss_options(name)).items() if k != "reduction"}
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 1e3
    _, grad = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, reduction="sum", **options
    )
    parts = reference.decompose(student, teacher, target, temperature)
    if name == "kd_loss":
        a, b = kd_weights(parts)
    elif name == "dkd_loss":
        a, b = options["alpha"], options["beta"]
    else:
        weight = reference.aekt_weight(
            parts, max_weight=options["max_weight"], normalize_weight=options["normalize_weight"]
        )
        a, b = options["alpha"] * weight, options["beta"]
    expected = reference.closed_form_grad(student, teacher, target, a, b, temperature=temperature)
    assert_close_relative(grad, expected, 1e-9)


def test_kd_gradient_is_T_times_p_minus_q_G4():
    student, teacher = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    _, grad = loss_and_grad(aekt_plugin.kd_loss, student, teacher, None, temperature=3.0, reduction="sum")
    expected = 3.0 * (F.softmax(student / 3.0, 1) - F.softmax(teacher / 3.0, 1))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


# --- gradcheck and the meaning of stop-gradient (12)-(13) ------------------------------------------------


def _gradcheck_inputs(classes=5):
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, classes, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(4, classes, dtype=torch.float64, generator=generator)
    target = torch.randint(0, classes, (4,), generator=generator)
    return student, teacher, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_kd_and_dkd(reduction):
    student, teacher, target = _gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda z: aekt_plugin.kd_loss(z, teacher, target, temperature=2.0, reduction=reduction), (student,)
    )
    assert torch.autograd.gradcheck(
        lambda z: aekt_plugin.dkd_loss(z, teacher, target, temperature=2.0, beta=3.0, reduction=reduction),
        (student,),
    )


def test_gradcheck_aekt_with_its_weight_held_fixed():
    """With ``w_max`` below every ratio ``q_t/p_t`` the weight is the constant ``α·w_max`` near the point."""
    student, teacher, target = _gradcheck_inputs()
    teacher = teacher.scatter(1, target[:, None], 6.0)  # q_t ≈ 1 > p_t, so min(q_t/p_t, 0.5) = 0.5
    parts = reference.decompose(student.detach(), teacher, target, 2.0)
    assert bool(((parts.log_q_t - parts.log_p_t).exp() > 0.5).all())
    assert torch.autograd.gradcheck(
        lambda z: aekt_plugin.aekt_loss(
            z, teacher, target, temperature=2.0, max_weight=0.5, normalize_weight=False
        ),
        (student,),
    )


def test_aekt_gradient_is_not_the_derivative_of_its_value_when_the_weight_varies_eq13():
    """Stop-gradient (12): the fused gradient differs from d(value)/dz by exactly the term (13)."""
    student, teacher, target = _gradcheck_inputs()
    temperature = 2.0

    def value(z):
        return aekt_plugin.aekt_loss(
            z,
            teacher,
            target,
            temperature=temperature,
            max_weight=math.inf,
            normalize_weight=False,
            reduction="sum",
        )

    assert not torch.autograd.gradcheck(value, (student,), raise_exception=False)

    # Full derivative, the weight differentiated too: T² a(z) TCKD(z) + T² β NCKD(z) through autograd.
    z = student.detach().clone().requires_grad_(True)
    parts = reference.decompose(z, teacher, target, temperature)
    weight = (parts.log_q_t - parts.log_p_t).exp()
    full = (temperature**2 * (weight * parts.tckd + 8.0 * parts.nckd)).sum()
    (full_grad,) = torch.autograd.grad(full, z)
    _, fused_grad = loss_and_grad(lambda z, *_: value(z), student, teacher, target)
    p = F.softmax(z.detach() / temperature, 1)
    delta = F.one_hot(target, p.shape[1]).double()
    term_13 = -temperature * (weight * parts.tckd).detach()[:, None] * (delta - p)
    torch.testing.assert_close(full_grad, fused_grad + term_13, rtol=1e-10, atol=1e-12)
    assert float((full_grad - fused_grad).abs().max()) > 1e-3


# --- identities and invariances ---------------------------------------------------------------------------


@given(batch=logit_batches())
def test_kd_equals_tckd_plus_one_minus_q_t_nckd_eq7(batch):
    student, teacher, target, temperature = batch
    parts = reference.decompose(student, teacher, target, temperature)
    decomposed = temperature**2 * (parts.tckd + parts.log_1m_q_t.exp() * parts.nckd)
    log_p, log_q = F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1)
    kl = temperature**2 * (log_q.exp() * (log_q - log_p)).sum(1)
    fused_value = aekt_plugin.kd_loss(student, teacher, target, temperature=temperature, reduction="none")
    assert_close_relative(decomposed, kl, 1e-10)
    assert_close_relative(fused_value, kl, 1e-10)


def test_kd_does_not_depend_on_the_target():
    student, teacher = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    values = [aekt_plugin.kd_loss(student, teacher, torch.full((5,), c), reduction="none") for c in range(7)]
    values.append(aekt_plugin.kd_loss(student, teacher, reduction="none"))
    for other in values[1:]:
        torch.testing.assert_close(other, values[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(
    batch=logit_batches(max_classes=50),
    shift=st.floats(-1e3, 1e3),
    which=st.sampled_from(["student", "teacher"]),
)
def test_adding_a_constant_to_a_row_changes_nothing(name, batch, shift, which):
    student, teacher, target, temperature = batch
    before, grad_before = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, reduction="none"
    )
    row_shift = torch.zeros(student.shape[0], 1, dtype=torch.float64)
    row_shift[0] = shift
    if which == "student":
        student = student + row_shift
    else:
        teacher = teacher + row_shift
    after, grad_after = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, reduction="none"
    )
    # Shifting by up to 1e3 rounds the logits themselves at ~1e-13 relative to the shift.
    tolerance = 1e-9 * max(1.0, abs(shift)) / temperature
    assert_close_relative(after, before, tolerance * temperature**2 * 10)
    assert_close_relative(grad_after, grad_before, tolerance * 10)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(batch=logit_batches(max_classes=40), seed=st.integers(0, 1000))
def test_permuting_classes_and_targets_permutes_the_gradient(name, batch, seed):
    student, teacher, target, temperature = batch
    permutation = torch.randperm(student.shape[1], generator=torch.Generator().manual_seed(seed))
    inverse = torch.argsort(permutation)
    value, grad = loss_and_grad(
        fused(name), student, teacher, target, temperature=temperature, reduction="none"
    )
    value_p, grad_p = loss_and_grad(
        fused(name),
        student[:, permutation],
        teacher[:, permutation],
        inverse[target],
        temperature=temperature,
        reduction="none",
    )
    assert_close_relative(value_p, value, 1e-10)
    assert_close_relative(grad_p, grad[:, permutation], 1e-10)


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(data=st.data())
def test_gradient_rows_sum_to_zero_G3(name, data):
    student, teacher, target, temperature = data.draw(logit_batches())
    options = data.draw(loss_options(name))
    if options.get("max_weight") == math.inf:
        options["max_weight"] = 1e3
    _, grad = loss_and_grad(fused(name), student, teacher, target, temperature=temperature, **options)
    assert float(grad.sum(1).abs().max()) <= 1e-12 * max(1.0, float(grad.abs().max())) * student.shape[1]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(name, dtype):
    logits = torch.randn(16, 30, dtype=dtype) * 5
    target = torch.randint(0, 30, (16,))
    loss, grad = loss_and_grad(fused(name), logits, logits.clone(), target, reduction="none")
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(loss.abs().max()) <= tolerance
    assert float(grad.abs().max()) <= tolerance


# --- numerics ----------------------------------------------------------------------------------------------


def _extreme_case(sign: float, dtype=torch.float32):
    """Student logits of magnitude 1e4 with the target at +1e4 (p_t rounds to 1) or -1e4 (p_t underflows)."""
    student = torch.zeros(4, 10, dtype=dtype)
    target = torch.tensor([0, 3, 5, 9])
    student[torch.arange(4), target] = sign * 1e4
    student[:, 1] = -sign * 1e4 * (target != 1)
    teacher = torch.randn(4, 10, dtype=dtype) * 3
    return student, teacher, target


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["p_t_rounds_to_1", "p_t_underflows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_loss_and_gradient_on_extreme_logits(name, sign, dtype):
    student, teacher, target = _extreme_case(sign, dtype)
    for temperature in (1.0, 4.0):
        loss, grad = loss_and_grad(fused(name), student, teacher, target, temperature=temperature)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
        assert grad.dtype == dtype


def test_mdistiller_dkd_algorithm_is_inf_where_the_fused_dkd_is_finite():
    student, teacher, target = _extreme_case(1.0)
    assert not bool(torch.isfinite(_baselines.dkd_mdistiller(student, teacher, target, beta=8.0)))
    loss, grad = loss_and_grad(aekt_plugin.dkd_loss, student, teacher, target, beta=8.0)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


@given(batch=logit_batches(max_classes=100), alpha=st.floats(0, 3), beta=st.floats(0, 10))
def test_dkd_equals_mdistiller_algorithm_on_moderate_logits(batch, alpha, beta):
    student, teacher, target, temperature = batch
    assume(float(student.abs().max()) < 30 * temperature and float(teacher.abs().max()) < 30 * temperature)
    expected, expected_grad = loss_and_grad(
        lambda z, v, t: _baselines.dkd_mdistiller(z, v, t, alpha=alpha, beta=beta, temperature=temperature),
        student,
        teacher,
        target,
    )
    actual, actual_grad = loss_and_grad(
        aekt_plugin.dkd_loss, student, teacher, target, temperature=temperature, alpha=alpha, beta=beta
    )
    assert_close_relative(actual, expected, 1e-6)
    assert_close_relative(actual_grad, expected_grad, 1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(name, dtype):
    student = (torch.randn(32, 100) * 4).to(dtype)
    teacher = (torch.randn(32, 100) * 4).to(dtype)
    target = torch.randint(0, 100, (32,))
    loss, grad = loss_and_grad(fused(name), student, teacher, target)
    expected, expected_grad = loss_and_grad(fused(name), student.float(), teacher.float(), target)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)  # same float32 arithmetic inside
    torch.testing.assert_close(grad, expected_grad.to(dtype), rtol=0, atol=0)


# --- memory, purity, shapes --------------------------------------------------------------------------------


def saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("shape", [(64, 100), (512, 1000)])
def test_saved_bytes_at_most_plain_kd_and_two_BxC_tensors(name, shape):
    student = torch.randn(shape, requires_grad=True)
    teacher, target = torch.randn(shape), torch.randint(0, shape[1], shape[:1])
    ours = saved_bytes(lambda: fused(name)(student, teacher, target, validate_args=False))
    plain = saved_bytes(lambda: _baselines.kd_plain(student, teacher))
    assert 0 < ours <= plain
    assert ours <= 2 * student.numel() * 4 + 64 * shape[0]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_gets_no_gradient_and_inputs_are_unchanged(name):
    student = torch.randn(8, 12, requires_grad=True)
    teacher = torch.randn(8, 12, requires_grad=True)
    target = torch.randint(0, 12, (8,))
    copies = [x.detach().clone() for x in (student, teacher, target)]
    with pytest.warns(UserWarning, match="teacher_logits requires grad"):
        fused(name)(student, teacher, target).backward()
    assert teacher.grad is None and student.grad is not None
    for original, copy in zip((student, teacher, target), copies, strict=True):
        assert torch.equal(original.detach(), copy)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_dense_logits_are_samples_like_cross_entropy(name):
    student = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    teacher = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 6, (3, 4, 5))
    per_pixel = fused(name)(student, teacher, target, reduction="none")
    assert per_pixel.shape == (3, 4, 5)
    rows = fused(name)(
        student.movedim(1, -1).reshape(-1, 6),
        teacher.movedim(1, -1).reshape(-1, 6),
        target.reshape(-1),
        reduction="none",
    )
    torch.testing.assert_close(per_pixel.reshape(-1), rows, rtol=1e-12, atol=1e-12)
    _, grad = loss_and_grad(fused(name), student, teacher, target)
    _, expected = loss_and_grad(getattr(reference, name), student, teacher, target)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reductions_are_mean_sum_and_none_over_samples(name):
    student, teacher = torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (10,))
    none = fused(name)(student, teacher, target, reduction="none")
    torch.testing.assert_close(fused(name)(student, teacher, target, reduction="sum"), none.sum())
    torch.testing.assert_close(fused(name)(student, teacher, target, reduction="mean"), none.mean())
    # backward with a per-sample incoming gradient (reduction="none")
    weights = torch.rand(10, dtype=torch.float64)
    _, grad = loss_and_grad(
        lambda *a, **k: fused(name)(*a, **k) * weights, student, teacher, target, reduction="none"
    )
    _, expected = loss_and_grad(
        lambda *a, **k: getattr(reference, name)(*a, **k) * weights,
        student,
        teacher,
        target,
        reduction="none",
    )
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dkd_loss", "aekt_loss"])
def test_probability_targets_use_their_argmax_class(name):
    student, teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    hard = torch.tensor([0, 4, 2, 2, 1, 3])
    soft = 0.7 * F.one_hot(hard, 5).double() + 0.3 / 5  # mixup-style: the argmax is the hard class
    torch.testing.assert_close(fused(name)(student, teacher, soft), fused(name)(student, teacher, hard))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_target_dtype(dtype):
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    torch.testing.assert_close(
        aekt_plugin.aekt_loss(student, teacher, target.to(dtype)),
        aekt_plugin.aekt_loss(student, teacher, target),
    )


def test_normalized_aekt_weight_has_batch_mean_alpha():
    """normalize_weight keeps DKD's scale: the weights a average to α over the batch (14)."""
    student, teacher = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (32,))
    parts = reference.decompose(student, teacher, target, 4.0)
    weight = reference.aekt_weight(parts, max_weight=5.0, normalize_weight=True)
    assert abs(float(weight.mean()) - 1.0) < 1e-12
    # and with normalisation on, scaling α scales only the explicit term
    base = aekt_plugin.aekt_loss(student, teacher, target, alpha=0.0, normalize_weight=True)
    with_alpha = aekt_plugin.aekt_loss(student, teacher, target, alpha=2.0, normalize_weight=True)
    explicit = (4.0**2 * weight * parts.tckd).mean()
    torch.testing.assert_close(with_alpha - base, 2.0 * explicit)


def test_loss_modules_store_options_and_match_functions():
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    target = torch.randint(0, 5, (6,))
    module = aekt_plugin.AEKTLoss(
        temperature=2.0, beta=2.0, max_weight=3.0, normalize_weight=False, reduction="sum"
    )
    expected = aekt_plugin.aekt_loss(
        student,
        teacher,
        target,
        temperature=2.0,
        beta=2.0,
        max_weight=3.0,
        normalize_weight=False,
        reduction="sum",
    )
    torch.testing.assert_close(module(student, teacher, target), expected)
    torch.testing.assert_close(
        aekt_plugin.DKDLoss(beta=2.0)(student, teacher, target),
        aekt_plugin.dkd_loss(student, teacher, target, beta=2.0),
    )
    torch.testing.assert_close(
        aekt_plugin.KDLoss(temperature=1.0)(student, teacher),
        aekt_plugin.kd_loss(student, teacher, temperature=1.0),
    )
    assert "max_weight=3.0" in repr(module)


@pytest.mark.slow
def test_works_inside_a_compiled_training_step():
    """A torch.compile'd step (graph break at the custom function allowed) gives the eager gradients."""
    torch.manual_seed(0)
    model, teacher = torch.nn.Linear(12, 6), torch.nn.Linear(12, 6)
    x, y = torch.randn(16, 12), torch.randint(0, 6, (16,))

    def step():
        model.zero_grad()
        logits = model(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = F.cross_entropy(logits, y) + aekt_plugin.aekt_loss(
            logits, teacher_logits, y, validate_args=False
        )
        loss.backward()
        return loss.detach(), model.weight.grad.clone()

    eager_loss, eager_grad = step()
    compiled_loss, compiled_grad = torch.compile(step, backend="aot_eager")()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_normalized_weight_survives_ratios_that_underflow_float32():
    """q_t/p_t = e^-570 is 0 in float32; its batch-normalised value is still exactly 1 (14)."""
    student = torch.tensor([[95.7444, -776.1763]])
    teacher = torch.tensor([[-1226.6798, -85.1113]])
    target = torch.tensor([0])
    options = dict(temperature=2.0, beta=0.0, max_weight=1.0, normalize_weight=True)
    expected = reference.aekt_loss(student.double(), teacher.double(), target, **options)
    actual = aekt_plugin.aekt_loss(student, teacher, target, **options)
    assert float(expected) > 1000
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=0)


def test_double_backward_is_refused_with_a_clear_error():
    student = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = aekt_plugin.aekt_loss(student, torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,)))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_a_temperature_schedule_keeps_the_constant_cache_bounded_and_the_values_right():
    """The kernel caches its scalar operands as tensors; a new temperature every step must neither grow that
    cache without bound nor reuse a stale constant (checked before and after the cache is cleared)."""
    from aekt_plugin import _kernel

    student = torch.randn(8, 5, dtype=torch.float64)
    teacher = torch.randn(8, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (8,))
    for step in range(400):
        temperature = 1.0 + step / 100
        actual, actual_grad = loss_and_grad(
            aekt_plugin.aekt_loss, student, teacher, target, temperature=temperature
        )
        assert len(_kernel._CONSTANTS) <= 256
        if step % 97 == 0:
            expected, expected_grad = loss_and_grad(
                reference.aekt_loss, student, teacher, target, temperature=temperature
            )
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_reuses_the_saved_gradient_only_when_the_graph_is_freed(reduction):
    """Without retain_graph the saved gradient's buffer becomes the result (no second B×C tensor); with it
    the saved gradient stays intact for the next backward. Both give the same numbers."""
    student = torch.randn(16, 10, requires_grad=True)
    teacher, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    loss = aekt_plugin.aekt_loss(student, teacher, target, reduction=reduction).sum()
    kept = [torch.autograd.grad(loss * scale, student, retain_graph=True)[0] for scale in (1.0, 3.0, 1.0)]
    assert torch.equal(kept[0], kept[2]) and torch.equal(kept[1], kept[0] * 3.0)
    (last,) = torch.autograd.grad(loss, student)
    assert torch.equal(last, kept[0])
    per_sample = aekt_plugin.aekt_loss(student, teacher, target, reduction=reduction)
    node = per_sample.grad_fn
    if reduction == "none":  # past the view to the sample shape
        node = node.next_functions[0][0]
    saved = node.saved_tensors[0].data_ptr()
    per_sample.sum().backward()
    assert student.grad.data_ptr() == saved  # .grad took over the saved gradient's buffer
    assert torch.equal(student.grad, kept[0])
