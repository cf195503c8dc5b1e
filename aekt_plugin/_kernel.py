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
* ``NCKD = Σ_{j≠t} q̂_j (log q̂_j - log p̂_j)`` with ``q̂_j = exp(v_j/T - m_v)/s_v`` and
  ``log q̂_j - log p̂_j = (v_j - z_j)/T - m_v + m_z - log s_v + log s_z``              (N3)

so ``p_t`` may underflow to 0 or round to 1 without producing ``inf``. The gradient is formed during the
forward pass and saved (one ``B×C`` tensor, nothing else), so backward is a single multiplication by the
incoming gradient. Double backward is not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class TargetStats:
    """Log-space target/non-target statistics of one batch, read by the weight rules.

    ``log_binary[0]`` holds ``[log p_t, log(1 - p_t)]`` and ``log_binary[1]`` ``[log q_t, log(1 - q_t)]``
    per sample; ``log_ratio = log b^T - log b^S``. Each property is a ``(B,)`` view, taken only when a rule
    asks for it (small batches pay per operation).
    """

    __slots__ = ("log_binary", "log_ratio")

    def __init__(self, log_binary: Tensor, log_ratio: Tensor) -> None:
        self.log_binary = log_binary
        self.log_ratio = log_ratio

    @property
    def log_1m_q_t(self) -> Tensor:
        """``log(1 - q_t)`` (KD's implicit weight)."""
        return self.log_binary[1, :, 1]

    @property
    def log_target_ratio(self) -> Tensor:
        """``log(q_t / p_t)`` (AEKT's explicit weight)."""
        return self.log_ratio[:, 0]


WeightRule = Callable[[TargetStats], "tuple[Tensor | float, Tensor | float]"]
"""Maps the target statistics of a batch to the per-sample weights ``(a, b)`` of (D1)."""


def decoupled_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float,
    weight_rule: WeightRule,
    *,
    sample_weight: float,
    needs_grad: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``sample_weight`` times the per-sample loss (D1), shape ``(B,)``, and times its gradient (G1, G2).

    ``student_logits``/``teacher_logits`` are ``(B, C)``, ``target`` int64 ``(B,)``. Both results are in
    :func:`compute_dtype`; the gradient is ``None`` unless ``needs_grad``, and ``out``, a ``(B, C)`` tensor
    of that dtype, receives it if given.
    """
    num_samples = student_logits.shape[0]
    # Student (index 0) and teacher (index 1) share one buffer, so each row operation below runs once for
    # both, which matters for small batches where the cost is per operation. The caller's logits are only
    # read.
    scaled = torch.stack((student_logits, teacher_logits))
    if scaled.dtype not in _COMPUTE_DTYPES:
        scaled = scaled.float()
    scale_(scaled, 1.0 / temperature)
    target_column = target.view(num_samples, 1)
    index = target_column.expand(2, num_samples, 1)
    logit_t = scaled.gather(2, index)
    # The target entry becomes the lowest finite number: the maximum skips it, exp gives exactly 0 there (so
    # the sums are s and q̂_t = 0), and it absorbs the shift by m in both rows alike, so the gap below stays
    # finite there (no -inf - -inf) without a separate masking step.
    scaled.scatter_(2, index, _LOWEST[scaled.dtype])
    non_target_max = scaled.amax(dim=2, keepdim=True)
    shifted_z, shifted_v = scaled.sub_(non_target_max).unbind(0)
    # log q̂ - log p̂ of (N3), the shifted gap plus a per-row constant. Its buffer later receives the
    # gradient, so the saved gradient owns one B×C storage.
    log_hat_gap = torch.sub(shifted_v, shifted_z, out=out)
    exps = scaled.exp_()
    non_target_sum = exps.sum(dim=2, keepdim=True)  # s >= 1: the largest term is exp(0)
    log_s = non_target_sum.log()
    log_s_z, log_s_v = log_s.unbind(0)
    log_hat_gap.add_(log_s_z - log_s_v)
    p_hat, q_hat = exps.mul_(non_target_sum.reciprocal_()).unbind(0)
    nckd = torch.linalg.vecdot(q_hat, log_hat_gap, dim=1)  # (N3)
    # (N2) with d = z_t/T - LSE_{k≠t}: log p_t = log σ(d), log(1 - p_t) = log σ(-d). The same differences
    # of log-sum-exps, but log σ keeps full relative precision of a tiny 1 - p_t or p_t.
    # Index 0 holds [log p_t, log(1 - p_t)], index 1 [log q_t, log(1 - q_t)].
    target_margin = logit_t.sub_(non_target_max).sub_(log_s)  # (N1): LSE_{k≠t} = m + log s
    log_binary = F.logsigmoid(target_margin * _constant((1.0, -1.0), target_margin))  # [d, -d]
    binary_s, binary_t = log_binary.exp().unbind(0)  # b^S = [p_t, 1 - p_t], b^T = [q_t, 1 - q_t]
    log_b_s, log_b_t = log_binary.unbind(0)
    log_ratio = log_b_t - log_b_s
    tckd = torch.linalg.vecdot(binary_t, log_ratio, dim=1)  # KL(b^T ‖ b^S)

    a, b = weight_rule(TargetStats(log_binary, log_ratio))
    loss = _weighted_sum(tckd, a, nckd, b, scale=sample_weight * temperature**2)  # (D1)
    if not needs_grad:
        return loss, None

    scale = sample_weight * temperature
    p_t_minus_q_t = (binary_s - binary_t)[:, :1]
    if isinstance(a, float):
        target_gap = p_t_minus_q_t.mul_(_constant(a * scale, p_t_minus_q_t))  # (G1): T a (p_t - q_t)
    else:
        zero = _constant(0.0, p_t_minus_q_t)
        target_gap = torch.addcmul(zero, p_t_minus_q_t, a.unsqueeze(1), value=scale)  # (G1)
    # (G2) T[(b - a(p_t - q_t)) p̂_j - b q̂_j]; p̂_t = q̂_t = 0, and (G1) then fills in the target.
    if isinstance(b, float):
        scaled_b = b * scale
        p_hat_weight = torch.sub(_constant(scaled_b, target_gap), target_gap)
        grad = torch.mul(p_hat, p_hat_weight, out=log_hat_gap).add_(q_hat, alpha=-scaled_b)
    else:
        scaled_b = scale_(b.unsqueeze(1), scale)
        grad = torch.mul(p_hat, scaled_b - target_gap, out=log_hat_gap).addcmul_(q_hat, scaled_b, value=-1.0)
    grad.scatter_(1, target_column, target_gap)
    return loss, grad


_COMPUTE_DTYPES = (torch.float32, torch.float64)
_LOWEST = {dtype: torch.finfo(dtype).min for dtype in _COMPUTE_DTYPES}


def compute_dtype(student_logits: Tensor, teacher_logits: Tensor) -> torch.dtype:
    """The kernel's working dtype: ``float32`` or ``float64`` (half precision is computed in ``float32``)."""
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


def _weighted_sum(
    x: Tensor, x_weight: Tensor | float, y: Tensor, y_weight: Tensor | float, *, scale: float
) -> Tensor:
    """``scale · (x_weight·x + y_weight·y)`` for float or ``(B,)`` weights, in place, in two operations."""
    if isinstance(x_weight, Tensor) and isinstance(y_weight, Tensor):
        return scale_(x.mul_(x_weight).addcmul_(y, y_weight), scale)
    if isinstance(x_weight, Tensor):
        x, x_weight, y, y_weight = y, y_weight, x, x_weight
    if isinstance(y_weight, Tensor):
        return torch.addcmul(scale_(x, x_weight * scale), y, y_weight, value=scale)
    return scale_(x, x_weight * scale).add_(y, alpha=y_weight * scale)


_CONSTANTS: dict[tuple[object, torch.dtype, torch.device], Tensor] = {}


def _constant(value: float | tuple[float, ...], like: Tensor) -> Tensor:
    """``value`` (0-d) or ``values`` (1-d) as a tensor on ``like``'s dtype and device, made once.

    A Python number as a tensor operand is converted to a tensor on every call, which costs more than the
    operation itself on small batches; the loss reuses a handful of constants (``1/T``, ``T²``, ...).
    """
    key = (value, like.dtype, like.device)
    constant = _CONSTANTS.get(key)
    if constant is None:
        if len(_CONSTANTS) >= 256:  # a temperature schedule must not grow this without bound
            _CONSTANTS.clear()
        # Fills on the device, not a copy from the host (no synchronisation on CUDA).
        if isinstance(value, tuple):
            constant = torch.empty(len(value), dtype=like.dtype, device=like.device)
            for position, entry in enumerate(value):
                constant[position] = entry
        else:
            constant = torch.full((), value, dtype=like.dtype, device=like.device)
        _CONSTANTS[key] = constant
    return constant


def scale_(x: Tensor, factor: float) -> Tensor:
    """``x`` multiplied in place by the number ``factor``, passed as a :func:`_constant`."""
    return x if factor == 1.0 else x.mul_(_constant(factor, x))


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
        sample_weight = 1.0 / max(num_samples, 1) if reduction == "mean" else 1.0
        # Eager, the kernel runs in inference mode, which spares each of its small operations autograd's
        # dispatch (the cost that dominates small batches); a compiled graph has no such cost and cannot
        # trace inference mode. Autograd saves only normal tensors, so the gradient's buffer is made out
        # here, and the loss leaves inference mode through a functional operation.
        grad_buffer = (
            torch.empty_like(student_logits, dtype=compute_dtype(student_logits, teacher_logits))
            if needs_grad
            else None
        )
        with contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode():
            loss, grad = decoupled_forward(
                student_logits,
                teacher_logits,
                target,
                temperature,
                weight_rule,
                sample_weight=sample_weight,
                needs_grad=needs_grad,
                out=grad_buffer,
            )
        if grad is not None:
            ctx.save_for_backward(
                grad if grad.dtype == student_logits.dtype else grad.to(student_logits.dtype)
            )
        ctx.reduction = reduction  # type: ignore[attr-defined]
        return loss.clone() if reduction == "none" else loss.sum()  # "mean": weighted by 1/B above

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
