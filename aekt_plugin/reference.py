r"""Readable autograd implementations of KD, DKD and AEKT, written equation by equation from SPEC §2.

These are the test oracle and the benchmark baseline of the fused kernel in :mod:`aekt_plugin.functional`:
same signatures, same values, same gradients, but every quantity of ``docs/derivations.md`` is a named
tensor and autograd differentiates the loss. :func:`closed_form_grad` writes the gradient (G1)–(G2) out
explicitly, as a third, independent statement of the same mathematics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation
from .functional import DEFAULTS


class Decomposition(NamedTuple):
    """The per-sample quantities of SPEC §2 for ``(B, C)`` logits (``(B,)`` or ``(B, C)`` each)."""

    log_p_t: Tensor
    log_q_t: Tensor
    log_1m_p_t: Tensor  # log(1 - p_t), from log-sum-exps, never from 1 - p_t
    log_1m_q_t: Tensor
    p_hat: Tensor  # non-target distribution of the student, 0 at the target
    q_hat: Tensor
    tckd: Tensor  # KL(b^T ‖ b^S)
    nckd: Tensor  # KL(q̂ ‖ p̂)


def decompose(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float
) -> Decomposition:
    """TCKD and NCKD of every sample, from ``(B, C)`` logits and int64 targets ``(B,)``."""
    z = student_logits / temperature
    v = teacher_logits.detach() / temperature  # the teacher's logits never receive a gradient
    is_target = F.one_hot(target, z.shape[1]).bool()

    log_p_t = z.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    log_q_t = v.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(v, dim=1)
    z_non_target = z.masked_fill(is_target, float("-inf"))
    v_non_target = v.masked_fill(is_target, float("-inf"))
    log_1m_p_t = torch.logsumexp(z_non_target, dim=1) - torch.logsumexp(z, dim=1)
    log_1m_q_t = torch.logsumexp(v_non_target, dim=1) - torch.logsumexp(v, dim=1)
    log_p_hat = F.log_softmax(z_non_target, dim=1).masked_fill(is_target, 0.0)
    log_q_hat = F.log_softmax(v_non_target, dim=1).masked_fill(is_target, 0.0)

    q_t, one_minus_q_t = log_q_t.exp(), log_1m_q_t.exp()
    tckd = q_t * (log_q_t - log_p_t) + one_minus_q_t * (log_1m_q_t - log_1m_p_t)
    q_hat = log_q_hat.exp().masked_fill(is_target, 0.0)
    nckd = (q_hat * (log_q_hat - log_p_hat)).sum(dim=1)
    p_hat = log_p_hat.exp().masked_fill(is_target, 0.0)
    return Decomposition(log_p_t, log_q_t, log_1m_p_t, log_1m_q_t, p_hat, q_hat, tckd, nckd)


def _reduce(per_sample: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.view(shape)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
    validate_args: bool = True,
) -> Tensor:
    """``T²·(TCKD + (1 - q_t)·NCKD)``, which equals ``T²·KL(q ‖ p)`` (derivations, eq. (7))."""
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        reduction=reduction,
        validate_args=validate_args,
    )
    parts = decompose(rows.student, rows.teacher, rows.classes, rows.temperature)
    per_sample = temperature**2 * (parts.tckd + parts.log_1m_q_t.exp() * parts.nckd)
    return _reduce(per_sample, reduction, rows.sample_shape)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    reduction: str = "mean",
    validate_args: bool = True,
) -> Tensor:
    """``T²·(α·TCKD + β·NCKD)``."""
    _validation.check_non_negative("alpha", alpha)
    _validation.check_non_negative("beta", beta)
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        reduction=reduction,
        validate_args=validate_args,
    )
    parts = decompose(rows.student, rows.teacher, rows.classes, rows.temperature)
    per_sample = temperature**2 * (alpha * parts.tckd + beta * parts.nckd)
    return _reduce(per_sample, reduction, rows.sample_shape)


def aekt_weight(parts: Decomposition, *, max_weight: float, normalize_weight: bool) -> Tensor:
    """``min(q_t / p_t, w_max)``, divided by its batch mean when ``normalize_weight``; no gradient."""
    log_ratio = (parts.log_q_t - parts.log_p_t).clamp(max=math.log(max_weight))
    if normalize_weight:  # ratio / mean(ratio), in log space so that tiny ratios still average to 1
        log_ratio = log_ratio - (torch.logsumexp(log_ratio, dim=0) - math.log(log_ratio.shape[0]))
    return log_ratio.exp().detach()


def aekt_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    max_weight: float = DEFAULTS["max_weight"],  # type: ignore[assignment]
    normalize_weight: bool = DEFAULTS["normalize_weight"],  # type: ignore[assignment]
    reduction: str = "mean",
    validate_args: bool = True,
) -> Tensor:
    """``T²·(α·w·TCKD + β·NCKD)`` with the stop-gradient weight ``w = min(q_t/p_t, w_max)``."""
    _validation.check_non_negative("alpha", alpha)
    _validation.check_non_negative("beta", beta)
    _validation.check_positive("max_weight", max_weight, allow_inf=True)
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        reduction=reduction,
        validate_args=validate_args,
    )
    parts = decompose(rows.student, rows.teacher, rows.classes, rows.temperature)
    weight = aekt_weight(parts, max_weight=max_weight, normalize_weight=normalize_weight)
    per_sample = temperature**2 * (alpha * weight * parts.tckd + beta * parts.nckd)
    return _reduce(per_sample, reduction, rows.sample_shape)


def closed_form_grad(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    a: Tensor | float,
    b: Tensor | float,
    *,
    temperature: float,
) -> Tensor:
    r"""The gradient of the per-sample loss ``T²(a·TCKD + b·NCKD)`` w.r.t. ``(B, C)`` student logits.

    .. math::

        ∂L/∂z_t = T·a·(p_t - q_t),\qquad ∂L/∂z_j = T·[-a(p_t - q_t)\,\hat p_j + b(\hat p_j - \hat q_j)]

    (derivations, eqs. (G1), (G2)); ``a``, ``b`` are scalars or ``(B,)`` tensors. Sum over samples;
    divide by ``B`` for ``reduction="mean"``.
    """
    parts = decompose(student_logits.detach(), teacher_logits.detach(), target, temperature)
    a_col = a.reshape(-1, 1) if isinstance(a, Tensor) else a
    b_col = b.reshape(-1, 1) if isinstance(b, Tensor) else b
    target_gap = (parts.log_p_t.exp() - parts.log_q_t.exp())[:, None]
    grad = temperature * ((b_col - a_col * target_gap) * parts.p_hat - b_col * parts.q_hat)
    return grad.scatter(1, target[:, None], temperature * a_col * target_gap)


__all__ = [
    "Decomposition",
    "aekt_loss",
    "aekt_weight",
    "closed_form_grad",
    "decompose",
    "dkd_loss",
    "kd_loss",
]
