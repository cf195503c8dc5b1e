"""The kernel's formulations agree: the single-block kernel, the row-statistics kernel in blocks (large and
dense inputs, eagerly) and in one fusable piece (``torch.compile``), against the reference and each other.

The blocks are made small through the kernel's own knobs (``aekt_plugin._blocked.BLOCK_ELEMENTS`` and
``SINGLE_BLOCK_LIMIT``), so that small inputs span many blocks and these tests stay fast.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from strategies import LOSS_NAMES

import aekt_plugin
from aekt_plugin import _autograd, _blocked, reference
from aekt_plugin.bench.memory import count_saved_bytes


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of 24 logits per input, and the row-statistics kernel from 60 logits on."""
    monkeypatch.setitem(_blocked.BLOCK_ELEMENTS, "cpu", 24)
    monkeypatch.setattr(_blocked, "SINGLE_BLOCK_LIMIT", 60)


@pytest.fixture(params=["blocks", "compiled form"])
def formulation(request, small_blocks, monkeypatch):
    """The row-statistics kernel eagerly in blocks, or in the one piece that ``torch.compile`` traces
    (run here without compiling: the path is chosen by :func:`aekt_plugin._autograd.is_eager`)."""
    if request.param == "compiled form":
        monkeypatch.setattr(_autograd, "is_eager", lambda: False)
    return request.param


def _inputs(shape, *, dtype=torch.float64, scale=3.0, seed=0, ignored=False):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=generator)
    if ignored:
        target.view(-1)[1::3] = -100
    return student, teacher, target


def _temperature(kind, target, dtype):
    if kind == "learnable":
        return torch.tensor(2.5, dtype=dtype, requires_grad=True)
    if kind == "per sample":
        generator = torch.Generator().manual_seed(5)
        return (torch.rand(target.shape, generator=generator, dtype=torch.float64) * 4 + 0.5).to(dtype)
    return 2.5


def _derivatives(fn, student, teacher, target, temperature, **options):
    """The loss and its derivatives in the student's logits and (if it requires grad) the temperature,
    for a random incoming gradient."""
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, target, temperature=temperature, **options)
    incoming = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    incoming = incoming.to(loss.dtype)
    inputs = [student] + (
        [temperature] if isinstance(temperature, torch.Tensor) and temperature.requires_grad else []
    )
    return (loss.detach(), *torch.autograd.grad(loss, inputs, incoming))


_OPTIONS = list(
    itertools.product(
        LOSS_NAMES,
        ("mean", "sum", "none"),
        (False, True),
        (False, True),
        ("number", "learnable", "per sample"),
    )
)


@pytest.mark.parametrize("shape", [(20, 7), (3, 5, 4, 3)], ids=["rows", "dense"])
@pytest.mark.parametrize(("name", "reduction", "ignored", "standardize", "temperature"), _OPTIONS)
def test_row_statistics_kernel_matches_the_reference_with_every_option(
    formulation, shape, name, reduction, ignored, standardize, temperature
):
    student, teacher, target = _inputs(shape, ignored=ignored)
    temperature = _temperature(temperature, target, torch.float64)
    options = {"reduction": reduction, "standardize": standardize, "validate_args": ignored}
    actual = _derivatives(getattr(aekt_plugin, name), student, teacher, target, temperature, **options)
    expected = _derivatives(getattr(reference, name), student, teacher, target, temperature, **options)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("validate_args", [False, True])
def test_dense_input_equals_its_permuted_rows_with_and_without_ignored_pixels(
    formulation, name, ignored, validate_args
):
    """An ``(N, C, H, W)`` input reduced over dim 1 where it lies gives the values and gradients of the
    same pixels as ``(N·H·W, C)`` rows through the single-block kernel, in float32 to its rounding."""
    student, teacher, target = _inputs((2, 6, 5, 7), dtype=torch.float32, ignored=ignored)
    rows = [x.movedim(1, -1).reshape(-1, 6) for x in (student, teacher)]
    for reduction in ("mean", "none"):
        options = {"reduction": reduction, "validate_args": validate_args}
        dense_loss, dense_grad = _derivatives(
            getattr(aekt_plugin, name), student, teacher, target, 4.0, **options
        )
        with _single_block():
            row_loss, row_grad = _derivatives(
                getattr(aekt_plugin, name), *rows, target.reshape(-1), 4.0, **options
            )
        torch.testing.assert_close(dense_loss.reshape(-1), row_loss.reshape(-1), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(dense_grad.movedim(1, -1).reshape(-1, 6), row_grad, rtol=2e-5, atol=1e-7)
        if ignored:
            assert not dense_grad.movedim(1, -1)[target == -100].any()


class _single_block:
    """The single-block kernel for every input, whatever its size."""

    def __enter__(self):
        self._limit, _blocked.SINGLE_BLOCK_LIMIT = _blocked.SINGLE_BLOCK_LIMIT, math.inf

    def __exit__(self, *exc):
        _blocked.SINGLE_BLOCK_LIMIT = self._limit


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_in_blocks_are_computed_in_float32(small_blocks, name, dtype):
    student, teacher, target = _inputs((30, 9), dtype=dtype)
    loss, grad = _derivatives(getattr(aekt_plugin, name), student, teacher, target, 4.0)
    expected, expected_grad = _derivatives(
        getattr(aekt_plugin, name), student.float(), teacher.float(), target, 4.0
    )
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), expected_grad.to(dtype).float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_the_three_formulations_agree_in_float32(small_blocks, monkeypatch, name):
    student, teacher, target = _inputs((24, 11), dtype=torch.float32)
    temperature = torch.tensor(3.0, requires_grad=True)
    options = {"standardize": True}

    def run():
        return _derivatives(getattr(aekt_plugin, name), student, teacher, target, temperature, **options)

    blocks = run()
    with _single_block():
        single = run()
    monkeypatch.setattr(_autograd, "is_eager", lambda: False)
    compiled_form = run()
    for a, b, c in zip(single, blocks, compiled_form, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_logits_stay_finite(formulation, name, sign):
    student, teacher, target = _inputs((16, 8), dtype=torch.float32, scale=1.0)
    student[torch.arange(16), target] = sign * 1e4
    loss, grad = _derivatives(getattr(aekt_plugin, name), student, teacher, target, 1.0)
    expected, expected_grad = _derivatives(
        getattr(reference, name), student.double(), teacher.double(), target, 1.0
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_a_non_finite_row_gets_a_non_finite_gradient_and_an_ignored_one_exactly_zero(formulation):
    student, teacher, target = _inputs((20, 6), dtype=torch.float32)
    student[3, 2] = math.nan
    student[7, 0] = math.inf
    target[7] = -100
    loss = aekt_plugin.dkd_loss(
        student.requires_grad_(True), teacher, target, reduction="none", validate_args=False
    )
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isnan(grad[3]).all() and torch.isnan(loss[3])
    assert torch.equal(grad[7], torch.zeros(6)) and loss[7] == 0
    others = [i for i in range(20) if i not in (3, 7)]
    assert torch.isfinite(grad[others]).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_row_statistics_keep_only_per_sample_numbers_beyond_the_inputs(small_blocks, name):
    """Forward keeps the logits (alive anyway) and O(B) numbers, never a B×C tensor of its own."""
    student, teacher, target = _inputs((40, 50), dtype=torch.float32)
    student.requires_grad_(True)
    fn = getattr(aekt_plugin, name)
    kept = count_saved_bytes(lambda z, v, y: fn(z, v, y, validate_args=False), student, teacher, target)
    assert kept.saved_bytes_new <= 16 * 40 * 4 and kept.ctx_attr_bytes == 0


def test_a_compiled_loss_on_dense_inputs_with_options_equals_the_eager_one():
    student, teacher, target = _inputs((2, 5, 3, 4), dtype=torch.float32, ignored=True)
    temperature = torch.tensor(2.0, requires_grad=True)

    def loss(z, t):
        return aekt_plugin.aekt_loss(z, teacher, target, temperature=t, standardize=True, validate_args=False)

    compiled_loss = torch.compile(loss, backend="aot_eager")
    compiled = _derivatives(
        lambda z, *_, temperature: compiled_loss(z, temperature), student, teacher, target, temperature
    )
    eager = _derivatives(
        lambda z, *_, temperature: loss(z, temperature), student, teacher, target, temperature
    )
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_compiled_form_sums_in_float64_and_keeps_nckd_accurate(monkeypatch):
    """Under torch.compile NCKD is E_q̂[w̃ - ũ] + log s_u - log s_w, whose two terms cancel when p̂ is near q̂
    (R2); its sums run in float64, so the float32 loss stays within 1e-6 of the float64 one."""
    monkeypatch.setattr(_autograd, "is_eager", lambda: False)
    student, teacher, target = _inputs((64, 100), dtype=torch.float32, scale=0.5)
    loss = aekt_plugin.aekt_loss(student, teacher, target, reduction="none", validate_args=False)
    exact = aekt_plugin.aekt_loss(
        student.double(), teacher.double(), target, reduction="none", validate_args=False
    )
    assert float(((loss.double() - exact).abs() / exact.abs()).max()) < 2e-6
