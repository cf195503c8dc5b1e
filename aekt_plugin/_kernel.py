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
* ``log p_t = z_t/T - LSE(z/T) = log σ(d)``, ``log(1 - p_t) = LSE_{k≠t}(z/T) - LSE(z/T) = log σ(-d)``
  with the margin ``d = z_t/T - LSE_{k≠t}(z/T)``                                    (N2)
* ``NCKD = Σ_{j≠t} q̂_j ((v_j - z_j)/T - m_v + m_z) - log s_v + log s_z``           (N3)

so ``p_t`` may underflow to 0 or round to 1 without producing ``inf``. The gradient is formed during the
forward pass and saved (one ``B×C`` tensor, nothing else), so backward is a single multiplication by the
incoming gradient. Double backward is not supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class TargetStats:
    """Log-space target/non-target statistics of one batch, read by the weight rules.

    ``log_binary[0]`` holds ``[log p_t, log(1 - p_t)]`` and ``log_binary[1]`` ``[log q_t, log(1 - q_t)]``
    per sample; ``log_ratio = log b^T - log b^S``. Each property is a column of shape ``(B, 1)``, sliced
    only when a rule asks for it (small batches pay per operation).
    """

    __slots__ = ("log_binary", "log_ratio")

    def __init__(self, log_binary: Tensor, log_ratio: Tensor) -> None:
        self.log_binary = log_binary
        self.log_ratio = log_ratio

    @property
    def log_1m_q_t(self) -> Tensor:
        """``log(1 - q_t)`` (KD's implicit weight)."""
        return self.log_binary[1, :, 1:]

    @property
    def log_target_ratio(self) -> Tensor:
        """``log(q_t / p_t)`` (AEKT's explicit weight)."""
        return self.log_ratio[:, :1]


WeightRule = Callable[[TargetStats], "tuple[Tensor | float, Tensor | float]"]
"""Maps the target statistics of a batch to the per-sample weights ``(a, b)`` of (D1)."""


def decoupled_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float,
    weight_rule: WeightRule,
    *,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-sample loss (D1), shape ``(B, 1)``, and ``grad_scale ·`` its gradient (G1, G2), or ``None``.

    ``student_logits``/``teacher_logits`` are ``(B, C)``, ``target`` int64 ``(B,)``. The loss is returned in
    ``float32`` (or ``float64`` for double inputs); the gradient in the student's dtype.
    """
    num_samples, num_classes = student_logits.shape
    # Student (index 0) and teacher (index 1) share one buffer, so each row operation below runs once for
    # both, which matters for small batches where the cost is per operation. The caller's logits are only
    # read. Half precision is computed in float32.
    scaled = torch.stack((student_logits, teacher_logits))
    if scaled.dtype not in (torch.float32, torch.float64):
        scaled = scaled.float()
    scaled.mul_(1.0 / temperature)
    scaled_z, scaled_v = scaled.unbind(0)
    index = target.view(1, num_samples, 1).expand(2, num_samples, 1)
    target_index = index[0]
    logit_t = scaled.gather(2, index)
    # Shift by the non-target maximum m; the target entry stays -inf, so exp gives exactly 0 there and the
    # row sums are s = Σ_{k≠t} exp(·) >= 1 (the largest non-target term is exp(0)).
    scaled.scatter_(2, index, float("-inf"))
    non_target_max = scaled.amax(dim=2, keepdim=True)
    scaled.sub_(non_target_max)

    # The shifted gap (v_j - z_j)/T - m_v + m_z of (N3), set to 0 at the target (-inf - -inf there): it is
    # exactly 0 wherever the two rows differ by a constant, so NCKD's precision does not depend on a per-row
    # logit offset. Its buffer later receives the gradient, so the saved gradient owns one B×C storage.
    shifted_gap = torch.sub(scaled_v, scaled_z).scatter_(1, target_index, 0.0)
    exps = scaled.exp_()
    student_exps, teacher_exps = exps.unbind(0)
    non_target_sum = exps.sum(dim=2, keepdim=True)
    cross = torch.linalg.vecdot(teacher_exps, shifted_gap, dim=1).unsqueeze(1)
    log_s = non_target_sum.log()
    lse_non_target = non_target_max.add_(log_s)  # (N1)
    # (N2) with d = z_t/T - LSE_{k≠t}: log p_t = log σ(d), log(1 - p_t) = log σ(-d). The same differences
    # of log-sum-exps, but log σ keeps full relative precision of a tiny 1 - p_t or p_t.
    # Index 0 holds [log p_t, log(1 - p_t)], index 1 [log q_t, log(1 - q_t)].
    target_margin = logit_t.sub_(lse_non_target)
    log_binary = F.logsigmoid(target_margin * _margin_signs(target_margin))
    binary = log_binary.exp()
    log_b_s, log_b_t = log_binary.unbind(0)
    log_ratio = log_b_t - log_b_s

    tckd = torch.linalg.vecdot(binary[1], log_ratio, dim=1).unsqueeze(1)  # KL(b^T ‖ b^S)
    inv_s_z, inv_s_v = non_target_sum.reciprocal_().unbind(0)
    nckd = cross.mul_(inv_s_v).add_(torch.sub(*log_s.unbind(0)))  # (N3)
    a, b = weight_rule(TargetStats(log_binary, log_ratio))
    loss = _weighted_sum(tckd, a, nckd, b, scale=temperature**2)  # (D1), shape (B, 1)
    if grad_scale is None:
        return loss, None

    scale = grad_scale * temperature
    p_t, q_t = binary[:, :, :1].unbind(0)
    target_gap = p_t - q_t
    target_gap = target_gap.mul_(a).mul_(scale) if isinstance(a, Tensor) else target_gap.mul_(a * scale)
    # (G2) T[(b - a(p_t - q_t)) p̂_j - b q̂_j] with p̂_j = exps_j / s_z and q̂_j = exps_j / s_v.
    scaled_b = b * scale
    grad = torch.mul(student_exps, torch.sub(scaled_b, target_gap).mul_(inv_s_z), out=shifted_gap)
    if isinstance(scaled_b, Tensor):
        grad.addcmul_(teacher_exps, inv_s_v.mul_(scaled_b), value=-1.0)
    else:
        grad.addcmul_(teacher_exps, inv_s_v, value=-scaled_b)
    grad.scatter_(1, target_index, target_gap)  # (G1): T a (p_t - q_t)
    return loss, grad if grad.dtype == student_logits.dtype else grad.to(student_logits.dtype)


_SIGNS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _margin_signs(like: Tensor) -> Tensor:
    """``[1, -1]`` on ``like``'s dtype and device (made once), so ``d · signs = [d, -d]`` in one operation."""
    key = (like.dtype, like.device)
    if key not in _SIGNS:
        signs = torch.ones(2, dtype=like.dtype, device=like.device)
        signs[1] = -1.0  # a fill on the device, not a copy from the host (no synchronisation on CUDA)
        _SIGNS[key] = signs
    return _SIGNS[key]


def _weighted_sum(
    x: Tensor, x_weight: Tensor | float, y: Tensor, y_weight: Tensor | float, *, scale: float
) -> Tensor:
    """``scale · (x_weight·x + y_weight·y)`` for float or ``(B, 1)`` weights, in place, in two operations."""
    if isinstance(x_weight, Tensor) and isinstance(y_weight, Tensor):
        return x.mul_(x_weight).addcmul_(y, y_weight).mul_(scale)
    if isinstance(x_weight, Tensor):
        x, x_weight, y, y_weight = y, y_weight, x, x_weight
    if isinstance(y_weight, Tensor):
        return torch.addcmul(x.mul_(x_weight * scale), y, y_weight, value=scale)
    return x.mul_(x_weight * scale).add_(y, alpha=y_weight * scale)


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
        return loss.view(-1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # cheaper than @once_differentiable, and says why
            raise RuntimeError(
                "double backward through the fused distillation loss is not supported: its saved gradient "
                "is a constant; use aekt_plugin.reference for higher-order derivatives"
            )
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if ctx.reduction == "none":  # type: ignore[attr-defined]
            grad_output = grad_output.unsqueeze(1)
        if grad_output.dtype != grad.dtype:
            grad_output = grad_output.to(grad.dtype)
        return grad * grad_output, None, None, None, None, None
