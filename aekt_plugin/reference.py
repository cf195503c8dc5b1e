r"""Readable autograd implementations of KD, DKD and AEKT, written equation by equation.

These are the test oracle and the benchmark baseline of the fused kernel in :mod:`aekt_plugin.functional`:
same signatures, same values, same gradients, but every quantity of ``docs/derivations.md`` is a named
tensor and autograd differentiates the loss -- in the student's logits and, for a temperature tensor, in
the temperature (through the teacher's softened distribution too; only AEKT's ratio weight is detached).
Logit standardization is the plain formula under autograd; ignored samples are masked out.
:func:`closed_form_grad` writes the gradient (G1)–(G2) out explicitly, as a third, independent statement
of the same mathematics.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _distributed, _validation, functional


class Decomposition(NamedTuple):
    """The per-sample quantities of ``docs/derivations.md`` §1 for ``(B, C)`` logits (``(B,)`` or ``(B, C)``
    each)."""

    log_p_t: Tensor
    log_q_t: Tensor
    log_1m_p_t: Tensor  # log(1 - p_t), from log-sum-exps, never from 1 - p_t
    log_1m_q_t: Tensor
    p_hat: Tensor  # non-target distribution of the student, 0 at the target
    q_hat: Tensor
    tckd: Tensor  # KL(b^T ‖ b^S)
    nckd: Tensor  # KL(q̂ ‖ p̂)


def standardize(logits: Tensor) -> Tensor:
    """Logit standardization (Sun et al., CVPR 2024): ``(x - mean(x)) / (std(x) + 1e-7)`` over the classes
    (dim -1, std unbiased), as their reference code computes it."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + 1e-7)


def decompose(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float | Tensor
) -> Decomposition:
    """TCKD and NCKD of every sample, from ``(B, C)`` logits and int64 targets ``(B,)``; ``temperature`` is
    a number, a 0-d tensor or one value per sample."""
    if isinstance(temperature, Tensor) and temperature.dim():
        temperature = temperature[:, None]
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


def _rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    target_required: bool = True,
    **options: object,
) -> tuple[_validation.Rows, Tensor, Tensor, Tensor]:
    """Checked rows, the logits the loss sees (standardized or not), and the mask of kept samples."""
    checked = _validation.check_options(**options)
    if _distributed.batch_scope(checked["global_batch"], checked["process_group"]) is not None:
        raise ValueError(
            "the reference computes one process's batch; for global_batch=True under torch.distributed "
            "compare with one process on the concatenated batch"
        )
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=checked["temperature"],
        reduction=checked["reduction"],
        validate_args=checked["validate_args"],
        ignore_index=checked["ignore_index"],
        target_required=target_required,
    )
    keep = rows.keep
    classes = rows.classes
    if keep is None and rows.ignore_index is not None:
        keep = rows.classes != rows.ignore_index
        classes = torch.where(keep, classes, 0)
    if keep is None:
        keep = torch.ones_like(classes, dtype=torch.bool)
    student, teacher = rows.student, rows.teacher
    if checked["standardize"]:
        student, teacher = standardize(student), standardize(teacher)
    return rows._replace(classes=classes), student, teacher, keep


def _reduce(per_sample: Tensor, keep: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    per_sample = torch.where(keep, per_sample, 0.0)
    if reduction == "mean":
        return per_sample.sum() / keep.sum().clamp_min(1)
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.view(shape)


def _squared(temperature: float | Tensor) -> float | Tensor:
    return temperature**2


def _signature_of(fused: Callable[..., Tensor]) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Give a reference loss the signature of its fused twin: same arguments, same defaults."""
    signature = inspect.signature(fused)

    def decorate(body: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(body)
        def loss(*args: Any, **kwargs: Any) -> Tensor:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(**bound.arguments)

        loss.__signature__ = signature  # type: ignore[attr-defined]
        return loss

    return decorate


@_signature_of(functional.kd_loss)
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, **options: Any) -> Tensor:
    """``T²·(TCKD + (1 - q_t)·NCKD)``, which equals ``T²·KL(q ‖ p)`` (derivations, eq. (7))."""
    rows, student, teacher, keep = _rows(student_logits, teacher_logits, target, target_required=False, **options)
    parts = decompose(student, teacher, rows.classes, rows.temperature)
    per_sample = _squared(rows.temperature) * (parts.tckd + parts.log_1m_q_t.exp() * parts.nckd)
    return _reduce(per_sample, keep, options["reduction"], rows.sample_shape)


@_signature_of(functional.dkd_loss)
def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, alpha: float, beta: float, **options: Any
) -> Tensor:
    """``T²·(α·TCKD + β·NCKD)``."""
    _validation.check_options(alpha=alpha, beta=beta)
    rows, student, teacher, keep = _rows(student_logits, teacher_logits, target, **options)
    parts = decompose(student, teacher, rows.classes, rows.temperature)
    per_sample = _squared(rows.temperature) * (alpha * parts.tckd + beta * parts.nckd)
    return _reduce(per_sample, keep, options["reduction"], rows.sample_shape)


def aekt_weight(
    parts: Decomposition, *, max_weight: float, normalize_weight: bool, keep: Tensor | None = None
) -> Tensor:
    """``min(q_t / p_t, w_max)``, divided by its mean over the (kept) batch when ``normalize_weight``; no
    gradient."""
    log_ratio = (parts.log_q_t - parts.log_p_t).clamp(max=math.log(max_weight)).detach()
    if normalize_weight:  # ratio / mean(ratio), in log space so that tiny ratios still average to 1
        keep = torch.ones_like(log_ratio, dtype=torch.bool) if keep is None else keep
        kept_log_ratio = log_ratio.masked_fill(~keep, -math.inf)
        log_mean = torch.logsumexp(kept_log_ratio, dim=0) - math.log(max(int(keep.sum()), 1))
        log_ratio = kept_log_ratio - log_mean
    return log_ratio.exp().nan_to_num(0.0)


@_signature_of(functional.aekt_loss)
def aekt_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float,
    beta: float,
    max_weight: float,
    normalize_weight: bool,
    **options: Any,
) -> Tensor:
    """``T²·(α·w·TCKD + β·NCKD)`` with the stop-gradient weight ``w = min(q_t/p_t, w_max)``."""
    _validation.check_options(alpha=alpha, beta=beta, max_weight=max_weight, normalize_weight=normalize_weight)
    rows, student, teacher, keep = _rows(student_logits, teacher_logits, target, **options)
    parts = decompose(student, teacher, rows.classes, rows.temperature)
    weight = aekt_weight(parts, max_weight=max_weight, normalize_weight=normalize_weight, keep=keep)
    per_sample = _squared(rows.temperature) * (alpha * weight * parts.tckd + beta * parts.nckd)
    return _reduce(per_sample, keep, options["reduction"], rows.sample_shape)


def closed_form_grad(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    a: Tensor | float,
    b: Tensor | float,
    *,
    temperature: float | Tensor,
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
    if isinstance(temperature, Tensor) and temperature.dim():
        temperature = temperature[:, None]
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
    "standardize",
]
