r"""The fused kernel behind every loss of the decoupled family (SPEC §2, ``docs/derivations.md``).

Per sample (one row of ``(B, C)`` logits), with ``z`` the student's and ``v`` the teacher's logits, ``t``
the target class and ``T`` the temperature, the kernel computes

.. math::

    L = T^2 \,(a \cdot \mathrm{TCKD} + b \cdot \mathrm{NCKD})                         \quad (D1)

and, in the same pass, its closed-form gradient with respect to ``z`` (the weights ``a``, ``b`` are
stop-gradient constants produced by a *weight rule* from the target statistics):

.. math::

    \partial L / \partial z_t = T\, a\, (p_t - q_t)                                     \quad (G1)

    \partial L / \partial z_j = T\,[(b - a(p_t - q_t))\,\hat p_j - b\,\hat q_j],\ j \ne t  \quad (G2)

Everything is computed from log-sum-exps. With ``m = max_{k≠t} z_k/T`` and
``s = Σ_{k≠t} exp(z_k/T - m)`` (so ``s >= 1``: the largest non-target term is ``exp(0)``):

* ``LSE_{k≠t}(z/T) = m + log s`` and ``LSE(z/T) = logaddexp(m + log s, z_t/T)``  (N1)
* ``log p_t = z_t/T - LSE(z/T)``, ``log(1 - p_t) = LSE_{k≠t}(z/T) - LSE(z/T)``     (N2)
* ``NCKD = Σ_{j≠t} q̂_j ((v_j - z_j)/T - m_v + m_z) - log s_v + log s_z``           (N3)

so ``p_t`` may underflow to 0 or round to 1 without producing ``inf``. The gradient is formed during the
forward pass and saved (one ``B×C`` tensor plus ``O(B)``), so backward is a single multiplication by the
incoming gradient. Double backward is not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class TargetStats(NamedTuple):
    """Log-space target/non-target statistics of one batch, each of shape ``(B, 1)``."""

    log_p_t: Tensor
    log_1m_p_t: Tensor
    log_q_t: Tensor
    log_1m_q_t: Tensor


WeightRule = Callable[[TargetStats], "tuple[Tensor | float, Tensor | float]"]
"""Maps the target statistics of a batch to the per-sample weights ``(a, b)`` of (D1)."""


def _scaled_copy(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``logits / T`` in ``dtype``, always a fresh tensor (the caller's logits are never written)."""
    if logits.dtype == dtype:
        return torch.div(logits, temperature)
    return logits.to(dtype).div_(temperature)


def _shift_by_non_target_max(scaled: Tensor, index: Tensor) -> Tensor:
    """Subtract ``m = max_{k≠t}`` from every entry in place; the target entry becomes 0, not ``-inf``.

    Keeping every entry finite lets (N3) run over whole rows without a mask. Returns ``m``, ``(B, 1)``.
    """
    scaled.scatter_(1, index, float("-inf"))
    non_target_max = scaled.amax(dim=1, keepdim=True)
    scaled.scatter_(1, index, non_target_max)
    scaled.sub_(non_target_max)
    return non_target_max


def _non_target_exp(shifted: Tensor, index: Tensor, *, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``exp`` of the shifted logits with the target entry zeroed, and its row sum ``s >= 1``."""
    exps = torch.exp(shifted, out=out) if out is not None else torch.exp(shifted)
    exps.scatter_(1, index, 0.0)
    return exps, exps.sum(dim=1, keepdim=True)


def decoupled_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float,
    weight_rule: WeightRule,
    *,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-sample loss (D1), shape ``(B,)``, and ``grad_scale ·`` its gradient (G1, G2), or ``None``.

    ``student_logits``/``teacher_logits`` are ``(B, C)``, ``target`` int64 ``(B,)``. The loss is returned in
    ``float32`` (or ``float64`` for double inputs); the gradient in the student's dtype.
    """
    compute_dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    index = target.unsqueeze(1)
    z = _scaled_copy(student_logits, compute_dtype, temperature)
    v = _scaled_copy(teacher_logits, compute_dtype, temperature)
    z_t = z.gather(1, index)
    v_t = v.gather(1, index)
    m_z = _shift_by_non_target_max(z, index)
    m_v = _shift_by_non_target_max(v, index)

    teacher_exps, s_v = _non_target_exp(v, index)
    shifted_gap = v.sub_(z)  # (v_j - z_j)/T - m_v + m_z, finite in every entry
    cross = torch.bmm(teacher_exps.unsqueeze(1), shifted_gap.unsqueeze(2)).view(-1, 1)
    student_exps, s_z = _non_target_exp(z, index, out=z)

    log_s_z, log_s_v = s_z.log(), s_v.log()
    lse_non_target_z, lse_non_target_v = m_z + log_s_z, m_v + log_s_v  # (N1)
    lse_z = torch.logaddexp(lse_non_target_z, z_t)
    lse_v = torch.logaddexp(lse_non_target_v, v_t)
    stats = TargetStats(
        log_p_t=z_t - lse_z,
        log_1m_p_t=lse_non_target_z - lse_z,
        log_q_t=v_t - lse_v,
        log_1m_q_t=lse_non_target_v - lse_v,
    )  # (N2)

    q_t, one_minus_q_t = stats.log_q_t.exp(), stats.log_1m_q_t.exp()
    tckd = q_t * (stats.log_q_t - stats.log_p_t) + one_minus_q_t * (stats.log_1m_q_t - stats.log_1m_p_t)
    nckd = cross / s_v + log_s_z - log_s_v  # (N3)
    a, b = weight_rule(stats)
    loss = (temperature**2) * (a * tckd + b * nckd)

    if grad_scale is None:
        return loss.view(-1), None
    scale = grad_scale * temperature
    target_gap = a * (stats.log_p_t.exp() - q_t)
    grad = student_exps.mul_(scale * (b - target_gap) / s_z)  # (G2), first term: p̂_j = exps_j / s_z
    grad.addcmul_(teacher_exps, -scale * b / s_v)  # (G2), second term: q̂_j = exps_j / s_v
    grad.scatter_(1, index, scale * target_gap)  # (G1)
    return loss.view(-1), grad.to(student_logits.dtype)


class DecoupledKDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`decoupled_forward`; the teacher and the target get no gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float,
        weight_rule: WeightRule,
        reduction: str,
    ) -> Tensor:
        num_samples = student_logits.shape[0]
        needs_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        grad_scale = (1.0 / max(num_samples, 1) if reduction == "mean" else 1.0) if needs_grad else None
        loss, grad = decoupled_forward(
            student_logits, teacher_logits, target, temperature, weight_rule, grad_scale=grad_scale
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.reduction = reduction  # type: ignore[attr-defined]
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if ctx.reduction == "none":  # type: ignore[attr-defined]
            grad_output = grad_output.unsqueeze(1)
        return grad * grad_output.to(grad.dtype), None, None, None, None, None
