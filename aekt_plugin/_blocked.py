r"""The row-statistics formulation of the kernel: large and dense inputs, and ``torch.compile``
(``docs/derivations.md``, section 12, eqs. (R1)–(R3)).

The single-block kernel (:mod:`~aekt_plugin._kernel`) forms the whole gradient in the forward pass and
saves it; its ``B×C`` temporaries and the saved gradient are what its memory is made of and, once the
inputs outgrow the caches, its time. This formulation passes over the logits once in each direction:

* forward computes, per sample, the statistics (D1) needs — the target entries ``u_t = z_t/T``,
  ``w_t = v_t/T``, and for both the non-target maximum ``m`` and ``log s`` of (N1), by (R1), and NCKD by
  (R2) — and from them, with :func:`~aekt_plugin._kernel.sample_terms`, the loss and the gradient's
  per-sample coefficients; it keeps those ``O(B)`` numbers and the logits themselves (alive anyway) for
  backward; a temperature that requires grad adds the row sums of (R3);
* backward recomputes ``p̂`` and ``q̂`` and writes (G1)–(G2), times the incoming gradient, straight into the
  result: ``G_j = c_p p̂_j - c_q q̂_j`` off the target and ``G_t = T a (p_t - q_t)`` at it.

Eagerly, both passes run block by block — a few rows, or a few positions of a dense input, sized for the
cache (:data:`BLOCK_ELEMENTS`) — so every temporary is bounded by the block, half-precision inputs
included (each block is computed in ``float32``): the extra memory of a forward and backward is the
gradient itself. Dense inputs ``(N, C, d1, ...)`` are reduced over dim 1 where they lie, as ``(N, C, S)``,
with no permuted copy. Under ``torch.compile`` the same steps run over the whole input as plain tensor
operations that inductor fuses into one loop per pass: a ``where`` instead of a scatter at the target, and
``exp``/``sum`` instead of ATen's fused softmax (eagerly the fastest ``exp`` there is).

Shapes: the logits are ``(B, C)`` or ``(N, C, S)``; per-sample tensors are kept in the *column layout*
``(B, 1)`` or ``(N, 1, S)`` (the logits reduced over dim 1, kept), and flattened to ``(B·S,)`` samples for
:func:`~aekt_plugin._kernel.sample_terms`, in the order of the flattened target.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ._kernel import (
    _LOWEST,
    _constant,
    compute_dtype,
    logit_standardization,
    logit_standardization_backward,
    sample_terms,
    temperature_derivative,
)

if TYPE_CHECKING:
    from ._autograd import KernelOptions

BLOCK_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 23}
"""Logits of each input in one eager block, by device type: 512 KiB of ``float32`` on a CPU, so that the
block's few temporaries stay in a core's L2 cache; 32 MiB on a GPU, where each block costs a kernel launch
per operation. Other devices use the CUDA figure."""

SINGLE_BLOCK_LIMIT = 1 << 20
"""``(B, C)`` inputs with at most this many logits run the single-block kernel eagerly (its ``B×C``
temporaries fit the caches and its fewer operations cost less per call); larger and dense inputs run this
formulation."""

_STATISTICS = 7
"""Per-sample statistics of every call (:func:`_statistics`); (T1) adds four."""


def uses_row_statistics(student_logits: Tensor) -> bool:
    """Whether an eager call on these logits runs this formulation: a dense input, or more logits than
    :data:`SINGLE_BLOCK_LIMIT`."""
    return student_logits.dim() > 2 or student_logits.numel() > SINGLE_BLOCK_LIMIT


def _blocks(shape: torch.Size, device: torch.device) -> list[tuple[slice, ...]]:
    """Indices of the eager blocks that tile the logits: rows of ``(B, C)``, or images and positions of
    ``(N, C, S)`` (whole classes always), each about ``BLOCK_ELEMENTS`` logits."""
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cuda"])
    classes = shape[1]
    if len(shape) == 2:
        rows = max(1, budget // classes)
        return [(slice(start, start + rows),) for start in range(0, shape[0], rows)]
    positions = min(shape[2], max(1, budget // classes))
    images = max(1, budget // (classes * positions))
    return [
        (slice(image, image + images), slice(None), slice(position, position + positions))
        for image in range(0, shape[0], images)
        for position in range(0, shape[2], positions)
    ]


def _per_sample(value: Tensor | float, index: tuple[slice, ...]) -> Tensor | float:
    """The block's part of a column-layout tensor (a number or a 0-d tensor is the same everywhere)."""
    return value[index] if isinstance(value, Tensor) and value.dim() else value


def _softened(
    logits: Tensor,
    temperature: Tensor | float,
    *,
    dtype: torch.dtype,
    standardize: bool,
    keep_standardized: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
    """``x/T`` of one block in the compute dtype, a tensor of its own (never the input); with
    ``standardize``, of the standardized ``y`` (Z1), which is also returned with its spread ``(σ, σ + ε)``
    when ``keep_standardized``."""
    owned = logits.dtype != dtype
    x = logits.to(dtype) if owned else logits
    standardized = spread = None
    if standardize:
        x, std, denominator = logit_standardization(x, x.shape[1], 1)
        owned = not keep_standardized
        if keep_standardized:
            standardized, spread = x, (std, denominator)
    if isinstance(temperature, Tensor):
        return (x.div_(temperature) if owned else x / temperature), standardized, spread
    factor = _constant(1.0 / temperature, x)
    return (x.mul_(factor) if owned else x * factor), standardized, spread


def _without_target(x: Tensor, target: Tensor, *, eager: bool) -> Tensor:
    """``x`` with the lowest finite number at the target class: the maximum skips it, ``exp`` gives exactly
    0 there and the shift by ``m`` leaves it the lowest number (derivations, (N3)). Eagerly a scatter into
    the block's own tensor; under ``torch.compile`` a ``where`` that inductor fuses with its consumers."""
    if eager:
        return x.scatter_(1, target, _LOWEST[x.dtype])
    return torch.where(_class_index(x) == target, _LOWEST[x.dtype], x)


def _class_index(x: Tensor) -> Tensor:
    """The class of each entry of ``x`` along dim 1, shaped to broadcast against it."""
    return torch.arange(x.shape[1], device=x.device).view(-1, *([1] * (x.dim() - 2)))


def _statistics(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperature: Tensor | float,
    *,
    dtype: torch.dtype,
    standardize: bool,
    temperature_sums: bool,
    eager: bool,
    out: Tensor | None = None,
) -> Tensor:
    r"""The per-sample statistics of one block, side by side along dim 1 (``out``, if given, receives
    them): ``u_t, w_t, m_u, m_w, log s_u, log s_w`` (N1), (R1) and NCKD (R2); with ``temperature_sums``
    also the row sums of (R3), ``E_p̂[ũ], E_q̂[ũ], E_q̂[w̃], E_q̂[(log q̂ - log p̂) w̃]`` (``ũ = u - m_u``,
    ``w̃ = w - m_w``). The target entries of the shifted rows, both the lowest number, cancel in the gap and
    meet ``p̂_t = q̂_t = 0``.
    """
    u = _softened(student, temperature, dtype=dtype, standardize=standardize)[0]
    w = _softened(teacher, temperature, dtype=dtype, standardize=standardize)[0]
    u_t, w_t = u.gather(1, target), w.gather(1, target)
    u, w = _without_target(u, target, eager=eager), _without_target(w, target, eager=eager)
    m_u, m_w = u.amax(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    u, w = u.sub_(m_u), w.sub_(m_w)
    if eager:  # ATen's softmax; the maximum of ũ is 0, so at its maximum p̂ = 1/s (R1)
        p_hat, q_hat = torch.softmax(u, dim=1), torch.softmax(w, dim=1)
        log_s_u = p_hat.amax(dim=1, keepdim=True).log_().neg_()
        log_s_w = q_hat.amax(dim=1, keepdim=True).log_().neg_()
        # log q̂ - log p̂ of (N3) with its constant inside: NCKD is then a sum of small terms when p̂ is near
        # q̂, not the difference of two large ones.
        gap = (w - u).add_(log_s_u - log_s_w)
        statistics = [u_t, w_t, m_u, m_w, log_s_u, log_s_w, _mean(q_hat, gap)]
        if temperature_sums:
            statistics += [_mean(p_hat, u), _mean(q_hat, u), _mean(q_hat, w), _mean(q_hat, gap * w)]
    else:
        # exp and sums, which inductor fuses into one reduction loop per row after the maxima's: the
        # constant of (N3) is known only after it, so the sums accumulate in float64, where (R2)'s
        # E_q̂[w̃ - ũ] + log s_u - log s_w loses nothing to their cancellation.
        exp_u, exp_w = u.exp(), w.exp()
        s_u, s_w = _sum64(exp_u), _sum64(exp_w)
        log_s_u, log_s_w = s_u.log(), s_w.log()
        shift = log_s_u - log_s_w
        q_gap = _sum64(exp_w * (w - u)) / s_w
        statistics = [u_t, w_t, m_u, m_w, log_s_u, log_s_w, q_gap + shift]
        if temperature_sums:
            q_w = _sum64(exp_w * w) / s_w
            statistics += [_sum64(exp_u * u) / s_u, _sum64(exp_w * u) / s_w, q_w]
            statistics.append(_sum64(exp_w * (w - u) * w) / s_w + shift * q_w)
        statistics = [x.to(dtype) for x in statistics]
    return torch.cat(statistics, dim=1, out=out) if out is not None else torch.cat(statistics, dim=1)


def _mean(probabilities: Tensor, x: Tensor) -> Tensor:
    """``E[x]`` over dim 1 under ``probabilities``, kept."""
    return torch.linalg.vecdot(probabilities, x, dim=1).unsqueeze(1)


def _sum64(x: Tensor) -> Tensor:
    """The sum over dim 1, kept, accumulated in float64."""
    return x.sum(dim=1, keepdim=True, dtype=torch.float64)


class Saved(NamedTuple):
    """What the forward pass keeps for the backward pass (column layout): the gradient's per-sample
    coefficients ``c_p``, ``c_q`` (a number where it is one) and ``G_t`` of (G1)–(G2), the non-target
    log-sum-exps ``m + log s`` of the student and the teacher (used under ``torch.compile``), the mask of
    kept samples, and ``dL/dT`` per sample (T1)."""

    p_hat_weight: Tensor
    q_hat_weight: Tensor | float
    target_gap: Tensor
    non_target_lse: Tensor
    keep: Tensor | None
    temperature_grad: Tensor | None


def row_statistics_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    keep: Tensor | None,
    options: KernelOptions,
    *,
    sample_weight: float | Tensor,
    eager: bool,
) -> tuple[Tensor, Saved | None]:
    """The reduced loss and what backward needs (``None`` when no derivative was asked for).

    ``target``, ``keep`` and a per-sample ``temperature`` hold one value per sample, flattened; the
    options are those of :class:`~aekt_plugin._autograd.KernelOptions`.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    layout = column_layout(student_logits)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(dtype)
    column_temperature = (
        temperature.view(layout) if isinstance(temperature, Tensor) and temperature.dim() else temperature
    )
    columns = target.view(layout)
    settings = {
        "dtype": dtype,
        "standardize": options.standardize,
        "temperature_sums": options.needs_temperature_grad,
        "eager": eager,
    }
    count = _STATISTICS + 4 * options.needs_temperature_grad
    if eager and student_logits.numel() > 0:
        stats = torch.empty(_with_dim_1(layout, count), dtype=dtype, device=student_logits.device)
        with torch.inference_mode():  # which spares each of a block's small operations autograd's dispatch
            for index in _blocks(student_logits.shape, student_logits.device):
                _statistics(
                    student_logits[index],
                    teacher_logits[index],
                    columns[index],
                    _per_sample(column_temperature, index),
                    **settings,
                    out=stats[index],
                )
    else:
        stats = _statistics(student_logits, teacher_logits, columns, column_temperature, **settings)
    stats = stats.movedim(1, 0).reshape(count, -1)  # (K, samples)
    target_margin = (stats[0:2] - stats[2:4] - stats[4:6]).unsqueeze(-1)  # (N1): d = x_t/T - LSE_{k≠t}
    terms = sample_terms(
        target_margin,
        stats[6],
        temperature,
        options.weight_rule,
        sample_weight=sample_weight,
        keep=keep,
        batch_scope=options.batch_scope,
        reduction=options.reduction,
        needs_grad=options.needs_grad or options.needs_temperature_grad,
        propagate_non_finite=options.propagate_non_finite,
    )
    loss = terms.loss if options.reduction == "none" else terms.loss.sum()
    if terms.target_gap is None:
        return loss, None
    temperature_grad = None
    if options.needs_temperature_grad:
        p_hat_u, q_hat_u, q_hat_w, q_hat_gap_w = stats[_STATISTICS:]
        grad_dot_u = (  # (R3): Σ_j G_j u_j = Σ_j G_j ũ_j, since G sums to zero (G3)
            terms.p_hat_weight.squeeze(-1) * p_hat_u
            - _squeezed(terms.q_hat_weight) * q_hat_u
            + terms.target_gap.squeeze(-1) * (stats[0] - stats[2])
        )
        temperature_grad = temperature_derivative(
            terms,
            temperature,
            teacher_t=stats[1] - stats[3],
            expected_w=q_hat_w,
            gap_w=q_hat_gap_w,
            grad_dot_u=grad_dot_u,
        )
        if keep is not None:
            temperature_grad = torch.where(keep, temperature_grad, 0.0)
    saved = Saved(
        terms.p_hat_weight.reshape(layout),
        _in_columns(terms.q_hat_weight, layout),
        terms.target_gap.reshape(layout),
        (stats[2:4] + stats[4:6]).view(2, *layout),
        None if keep is None else keep.view(layout),
        temperature_grad,
    )
    return loss, saved


def _with_dim_1(layout: tuple[int, ...], size: int) -> tuple[int, ...]:
    return (layout[0], size, *layout[2:])


def _in_columns(value: Tensor | float, layout: tuple[int, ...]) -> Tensor | float:
    """A per-sample tensor in the column layout, a tensor of one number 0-d, a number as it is."""
    if not isinstance(value, Tensor):
        return value
    return value.reshape(layout if value.numel() == math.prod(layout) else ())


def _squeezed(value: Tensor | float) -> Tensor | float:
    return value.squeeze(-1) if isinstance(value, Tensor) else value


def column_layout(logits: Tensor) -> tuple[int, ...]:
    """``(B, 1)`` for ``(B, C)`` logits, ``(N, 1, S)`` for ``(N, C, S)``."""
    return (logits.shape[0], 1, *logits.shape[2:])


def row_statistics_backward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    saved: Saved,
    grad_loss: Tensor,
    *,
    standardize: bool,
    reduction: str,
    eager: bool,
) -> Tensor:
    """The gradient with respect to the student's logits, ``grad_loss`` times (G1)–(G2) (Z1 with
    ``standardize``), in the student's dtype; ``grad_loss`` is 0-d, or one value per sample for
    ``"none"``."""
    dtype = compute_dtype(student_logits, teacher_logits)
    layout = column_layout(student_logits)
    incoming = grad_loss.to(dtype)
    if reduction == "none":
        incoming = incoming.view(layout)
    p_weight = saved.p_hat_weight * incoming
    q_weight = saved.q_hat_weight * incoming
    target_gap = saved.target_gap * incoming
    if isinstance(temperature, Tensor):
        temperature = temperature.to(dtype)
        if temperature.dim():
            temperature = temperature.view(layout)
    columns = target.view(layout)
    if not eager:
        grad = _compiled_gradient(
            student_logits,
            teacher_logits,
            columns,
            temperature,
            saved,
            (p_weight, q_weight, target_gap),
            dtype=dtype,
            standardize=standardize,
        )
        return grad.to(student_logits.dtype)
    result = torch.empty_like(student_logits)  # made outside inference mode: it becomes .grad
    with torch.inference_mode():
        _gradient_blocks(
            student_logits,
            teacher_logits,
            columns,
            temperature,
            saved.keep,
            (p_weight, q_weight, target_gap),
            result,
            dtype=dtype,
            standardize=standardize,
        )
    return result


def _gradient_blocks(
    student_logits: Tensor,
    teacher_logits: Tensor,
    columns: Tensor,
    temperature: Tensor | float,
    keep: Tensor | None,
    weights: tuple[Tensor, Tensor, Tensor],
    result: Tensor,
    *,
    dtype: torch.dtype,
    standardize: bool,
) -> None:
    """:func:`row_statistics_backward` eagerly: ``p̂`` and ``q̂`` of each block by ATen's softmax, and
    (G1)–(G2) written into ``result`` block by block."""
    p_weight, q_weight, target_gap = weights
    # Without standardize and ignored samples, (G1)–(G2) is the result: each block is written in place.
    direct = not standardize and keep is None
    target_entry = target_gap.to(result.dtype) if direct else target_gap
    for index in _blocks(student_logits.shape, student_logits.device):
        block_temperature = _per_sample(temperature, index)
        u, standardized, spread = _softened(
            student_logits[index],
            block_temperature,
            dtype=dtype,
            standardize=standardize,
            keep_standardized=True,
        )
        w = _softened(teacher_logits[index], block_temperature, dtype=dtype, standardize=standardize)[0]
        block_target = columns[index]
        p_hat = torch.softmax(_without_target(u, block_target, eager=True), dim=1)
        q_hat = torch.softmax(_without_target(w, block_target, eager=True), dim=1)
        grad = torch.addcmul(  # (G2): c_p p̂ - c_q q̂, then (G1) at the target
            p_hat.mul_(_per_sample(p_weight, index)),
            q_hat,
            _per_sample(q_weight, index),
            value=-1.0,
            out=result[index] if direct else None,
        ).scatter_(1, block_target, target_entry[index])
        if direct:
            continue
        if standardize:
            grad = logit_standardization_backward(grad, standardized, spread, grad.shape[1], 1)
        if keep is not None:
            grad = grad.masked_fill_(~keep[index], 0.0)
        result[index] = grad


def _compiled_gradient(
    student_logits: Tensor,
    teacher_logits: Tensor,
    columns: Tensor,
    temperature: Tensor | float,
    saved: Saved,
    weights: tuple[Tensor, Tensor, Tensor],
    *,
    dtype: torch.dtype,
    standardize: bool,
) -> Tensor:
    """:func:`row_statistics_backward` over the whole input in one fused pass:
    ``p̂_j = exp(u_j - LSE_{k≠t}(u))`` from the saved log-sum-exps, and a ``where`` at the target."""
    p_weight, q_weight, target_gap = weights
    u, standardized, spread = _softened(
        student_logits, temperature, dtype=dtype, standardize=standardize, keep_standardized=True
    )
    w = _softened(teacher_logits, temperature, dtype=dtype, standardize=standardize)[0]
    lse_u, lse_w = saved.non_target_lse.unbind(0)
    grad = torch.exp(u - lse_u) * p_weight - torch.exp(w - lse_w) * q_weight
    grad = torch.where(_class_index(grad) == columns, target_gap, grad)
    if standardize:
        grad = logit_standardization_backward(grad, standardized, spread, grad.shape[1], 1)
    if saved.keep is not None:
        grad = torch.where(saved.keep, grad, 0.0)
    return grad


def samples(logits: Tensor) -> int:
    """The number of samples of ``(B, C)`` or ``(N, C, S)`` logits."""
    return math.prod(column_layout(logits))
