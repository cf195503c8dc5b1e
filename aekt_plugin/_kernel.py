r"""The fused kernel behind every loss of the decoupled family (``docs/derivations.md``).

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
forward pass and saved (one ``B×C`` tensor), so backward is a single multiplication by the incoming
gradient. Three options leave that path untouched when unused:

* a temperature given as a tensor (0-d, or one per sample) that requires grad gets the closed-form total
  derivative ``dL/dT`` of (T1), formed in the same pass and saved as ``O(B)`` numbers;
* ``standardize`` replaces both rows by ``(x - mean(x)) / (std(x) + 1e-7)`` first, and the student's
  gradient is carried back through that map by (Z1);
* a ``keep`` mask (``ignore_index``) gives ignored rows zero loss and zero gradient; the caller takes them
  out of the mean and the weight rule out of AEKT's batch normalisation.

Rows may carry leading instance dimensions, ``(..., B, C)``: the samples of one instance are the
``B`` rows that the reductions and AEKT's batch normalisation run over (``torch.func.vmap`` uses this).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

if TYPE_CHECKING:
    from ._distributed import BatchScope


class TargetStats:
    """Log-space target/non-target statistics of one batch, read by the weight rules.

    ``log_binary[0]`` holds ``[log p_t, log(1 - p_t)]`` and ``log_binary[1]`` ``[log q_t, log(1 - q_t)]``
    per sample; ``log_ratio = log b^T - log b^S``. Each property is a ``(..., B)`` view, taken only when
    a rule asks for it (small batches pay per operation). ``keep`` is ``None`` or the ``(..., B)`` mask of
    the samples that count (``ignore_index``), and ``scope`` ``None`` or the
    :class:`~aekt_plugin._distributed.BatchScope` of ``global_batch=True``: a rule that averages over the
    batch averages over the kept samples of the scope, with :meth:`normalized`.
    """

    __slots__ = ("keep", "log_binary", "log_ratio", "scope")

    def __init__(
        self, log_binary: Tensor, log_ratio: Tensor, keep: Tensor | None = None, scope: BatchScope | None = None
    ) -> None:
        self.log_binary = log_binary
        self.log_ratio = log_ratio
        self.keep = keep
        self.scope = scope

    def normalized(self, log_weight: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
        """``scale · w_i / mean(w)`` over the batch's kept samples (0 where ignored), from ``log w``: a softmax
        over the batch, ``w_i / mean(w) = n · softmax(log w)_i``, which shifts by the largest ``log w``, so a
        batch of weights too small for the dtype still averages to 1. Returns it and, for a global batch,
        the number of kept samples of all ranks (which the mean then reuses)."""
        if self.scope is not None:
            return self.scope.normalized(log_weight, self.keep, scale)
        if self.keep is None:
            return scale_(torch.softmax(log_weight, dim=-1), scale * log_weight.shape[-1]), None
        kept = self.keep.sum(dim=-1, keepdim=True)
        shares = torch.softmax(log_weight.masked_fill(~self.keep, -math.inf), dim=-1)
        return torch.where(self.keep, shares * kept * scale, 0.0), None

    @property
    def log_1m_q_t(self) -> Tensor:
        """``log(1 - q_t)`` (KD's implicit weight)."""
        return self.log_binary[1, ..., 1]

    @property
    def log_target_ratio(self) -> Tensor:
        """``log(q_t / p_t)`` (AEKT's explicit weight)."""
        return self.log_ratio[..., 0]


class Weights(NamedTuple):
    """The per-sample weights ``(a, b)`` of (D1): numbers or ``(..., B)`` tensors.

    ``db_dq_t`` is ``∂b/∂q_t`` where ``b`` is a function of the teacher's target probability (``-1`` for
    KD's ``b = 1 - q_t``); only the temperature derivative (T1) reads it. ``batch_count`` is the number of
    kept samples of a global batch, where the rule gathered it (:meth:`TargetStats.normalized`).
    """

    a: Tensor | float
    b: Tensor | float
    db_dq_t: float = 0.0
    batch_count: Tensor | None = None


WeightRule = Callable[[TargetStats], Weights]
"""Maps the target statistics of a batch to the per-sample weights of (D1)."""


def decoupled_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    weight_rule: WeightRule,
    *,
    sample_weight: float | Tensor,
    needs_grad: bool,
    needs_temperature_grad: bool = False,
    keep: Tensor | None = None,
    standardize: bool = False,
    propagate_non_finite: bool = False,
    out: Tensor | None = None,
    batch_scope: BatchScope | None = None,
    reduction: str = "sum",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``sample_weight`` times the per-sample loss (D1), shape ``(..., B)``, and times its derivatives.

    ``student_logits``/``teacher_logits`` are ``(..., B, C)`` and ``target`` int64 ``(..., B)``, a valid
    class index everywhere (an ignored row holds any valid index and ``keep`` masks it). ``temperature`` is
    a number or a tensor broadcastable to ``(..., B)``, ``sample_weight`` a number or a ``(..., B)``
    tensor. With ``propagate_non_finite`` a row whose loss is not finite gets a non-finite gradient row
    too. Results are in :func:`compute_dtype`; ``out``, a tensor shaped like the logits in that dtype,
    receives the gradient if given. With a ``batch_scope`` (``global_batch=True``) the weight rule
    normalises over all ranks' samples and ``sample_weight`` is completed for the ``reduction`` over them,
    (B1). Returns the loss, the gradient with respect to the student's logits and the total derivative in
    the temperature (``None`` where not asked for).
    """
    num_classes = student_logits.shape[-1]
    # Student (index 0) and teacher (index 1) share one buffer, so each row operation below runs once for
    # both, which matters for small batches where the cost is per operation. The caller's logits are only
    # read.
    scaled = torch.stack((student_logits, teacher_logits))
    if scaled.dtype not in _COMPUTE_DTYPES:
        scaled = scaled.float()
    if standardize:
        scaled, standardized_student, spread = _standardize(scaled, num_classes)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(scaled.dtype)
        scaled.div_(temperature.unsqueeze(-1) if temperature.dim() else temperature)
    else:
        scale_(scaled, 1.0 / temperature)
    target_column = target.unsqueeze(-1)
    index = target_column.expand((2, *target_column.shape))
    if needs_temperature_grad:  # u = z/T and w = v/T with 0 at the target, and u_t, w_t, for (T1)
        scaled_logits = scaled.scatter(-1, index, 0.0)
        logit_t_copy = scaled.gather(-1, index).squeeze(-1)
    logit_t = scaled.gather(-1, index)
    # The target entry becomes the lowest finite number: the maximum skips it, exp gives exactly 0 there (so
    # the sums are s and q̂_t = 0), and it absorbs the shift by m in both rows alike, so the gap below stays
    # finite there (no -inf - -inf) without a separate masking step.
    scaled.scatter_(-1, index, _LOWEST[scaled.dtype])
    non_target_max = scaled.amax(dim=-1, keepdim=True)
    shifted_z, shifted_v = scaled.sub_(non_target_max).unbind(0)
    # log q̂ - log p̂ of (N3), the shifted gap plus a per-row constant. Its buffer later receives the
    # gradient, so the saved gradient owns one B×C storage.
    log_hat_gap = torch.sub(shifted_v, shifted_z, out=out)
    exps = scaled.exp_()
    non_target_sum = exps.sum(dim=-1, keepdim=True)  # s >= 1: the largest term is exp(0)
    log_s = non_target_sum.log()
    log_s_z, log_s_v = log_s.unbind(0)
    log_hat_gap.add_(log_s_z - log_s_v)
    p_hat, q_hat = exps.mul_(non_target_sum.reciprocal_()).unbind(0)
    nckd = torch.linalg.vecdot(q_hat, log_hat_gap, dim=-1)  # (N3)
    # (N2) with d = z_t/T - LSE_{k≠t}: log p_t = log σ(d), log(1 - p_t) = log σ(-d). The same differences
    # of log-sum-exps, but log σ keeps full relative precision of a tiny 1 - p_t or p_t.
    # Index 0 holds [log p_t, log(1 - p_t)], index 1 [log q_t, log(1 - q_t)].
    target_margin = logit_t.sub_(non_target_max).sub_(log_s)  # (N1): LSE_{k≠t} = m + log s
    log_binary = F.logsigmoid(target_margin * _constant((1.0, -1.0), target_margin))  # [d, -d]
    binary_s, binary_t = log_binary.exp().unbind(0)  # b^S = [p_t, 1 - p_t], b^T = [q_t, 1 - q_t]
    log_b_s, log_b_t = log_binary.unbind(0)
    log_ratio = log_b_t - log_b_s
    tckd = torch.linalg.vecdot(binary_t, log_ratio, dim=-1)  # KL(b^T ‖ b^S)

    weights = weight_rule(TargetStats(log_binary, log_ratio, keep, batch_scope))
    a, b = weights.a, weights.b
    if batch_scope is not None:
        sample_weight = batch_scope.sample_weight(sample_weight, keep, tckd, reduction, weights.batch_count)
    if needs_temperature_grad:
        teacher_terms = _teacher_temperature_terms(
            scaled_logits[1], logit_t_copy[1], q_hat, log_hat_gap, log_binary, log_ratio, nckd, weights
        )
    tensor_scale = isinstance(temperature, Tensor) or isinstance(sample_weight, Tensor)
    if tensor_scale:
        loss = (tckd * a + nckd * b) * (temperature * temperature * sample_weight)  # (D1)
    else:
        loss = _weighted_sum(tckd, a, nckd, b, scale=sample_weight * temperature**2)  # (D1)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    if not (needs_grad or needs_temperature_grad):
        return loss, None, None

    p_t_minus_q_t = (binary_s - binary_t)[..., :1]
    if propagate_non_finite:
        # 0 · loss is 0 for a finite row and nan for a row whose input was not finite, and a nan weight
        # makes its whole gradient row nan: GradScaler, which inspects gradients, then skips the step. One
        # call where a weight is already per sample (AEKT's a, KD's b).
        if isinstance(a, Tensor):
            a = torch.add(a, loss, alpha=0.0)
        elif isinstance(b, Tensor):
            b = torch.add(b, loss, alpha=0.0)
        else:
            p_t_minus_q_t = torch.addcmul(p_t_minus_q_t, loss.unsqueeze(-1), _constant(0.0, p_t_minus_q_t))
    if tensor_scale:
        scale = (temperature * sample_weight).unsqueeze(-1)
        a_col = a.unsqueeze(-1) if isinstance(a, Tensor) else a
        b_col = b.unsqueeze(-1) if isinstance(b, Tensor) else b
        target_gap = p_t_minus_q_t * (a_col * scale)  # (G1)
        scaled_b = b_col * scale
        grad = torch.mul(p_hat, scaled_b - target_gap, out=log_hat_gap).addcmul_(q_hat, scaled_b, value=-1.0)
    else:
        scale = sample_weight * temperature
        if isinstance(a, float):
            target_gap = p_t_minus_q_t.mul_(_constant(a * scale, p_t_minus_q_t))  # (G1): T a (p_t - q_t)
        else:
            zero = _constant(0.0, p_t_minus_q_t)
            target_gap = torch.addcmul(zero, p_t_minus_q_t, a.unsqueeze(-1), value=scale)  # (G1)
        # (G2) T[(b - a(p_t - q_t)) p̂_j - b q̂_j]; p̂_t = q̂_t = 0, and (G1) then fills in the target.
        if isinstance(b, float):
            scaled_b = b * scale
            p_hat_weight = torch.sub(_constant(scaled_b, target_gap), target_gap)
            grad = torch.mul(p_hat, p_hat_weight, out=log_hat_gap).add_(q_hat, alpha=-scaled_b)
        else:
            scaled_b = scale_(b.unsqueeze(-1), scale)
            grad = torch.mul(p_hat, scaled_b - target_gap, out=log_hat_gap).addcmul_(
                q_hat, scaled_b, value=-1.0
            )
    temperature_grad = None
    if needs_temperature_grad:
        # (T1) per sample; grad holds sample_weight·G with 0 at the target, target_gap its target entry.
        grad_dot_u = (
            torch.linalg.vecdot(grad, scaled_logits[0], dim=-1) + target_gap.squeeze(-1) * logit_t_copy[0]
        )
        temperature_grad = (
            sample_weight * temperature * (2 * (tckd * a + nckd * b) - teacher_terms) - grad_dot_u
        )
    grad.scatter_(-1, target_column, target_gap)
    if standardize:
        grad = _standardize_backward(grad, standardized_student, spread, num_classes)
    if keep is not None:
        grad = torch.where(keep.unsqueeze(-1), grad, 0.0)
        if temperature_grad is not None:
            temperature_grad = torch.where(keep, temperature_grad, 0.0)
    return loss, grad if needs_grad else None, temperature_grad


def _teacher_temperature_terms(
    teacher: Tensor,
    teacher_t: Tensor,
    q_hat: Tensor,
    log_hat_gap: Tensor,
    log_binary: Tensor,
    log_ratio: Tensor,
    nckd: Tensor,
    weights: Weights,
) -> Tensor:
    r"""The bracket of (T1) that comes from the teacher's logits ``w = v/T``:

    .. math::

        \big(a(ℓ_t - ℓ_n) + b'\,\mathrm{NCKD}\big)\,q_t(1 - q_t)\,(w_t - E_{\hat q}[w])
            + b\,\mathrm{Cov}_{\hat q}(\log\hat q - \log\hat p,\ w)

    with ``ℓ = log b^T - log b^S`` and ``b' = ∂b/∂q_t``. ``teacher`` holds ``w`` with 0 at the target;
    ``q̂ = 0`` there, so the target entry of ``log_hat_gap`` drops out.
    """
    expected_w = torch.linalg.vecdot(q_hat, teacher, dim=-1)
    covariance = torch.linalg.vecdot(q_hat * log_hat_gap, teacher, dim=-1) - nckd * expected_w
    binary_confidence = log_binary[1].sum(dim=-1).exp()  # q_t (1 - q_t)
    explicit = weights.a * (log_ratio[..., 0] - log_ratio[..., 1]) + weights.db_dq_t * nckd
    return explicit * binary_confidence * (teacher_t - expected_w) + weights.b * covariance


_STANDARDIZE_EPS = 1e-7


def _standardize(scaled: Tensor, num_classes: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Both rows replaced by ``y = (x - mean(x)) / (std(x) + 1e-7)``, std unbiased, over the classes.

    Returns the standardized pair, a copy of the student's ``y`` and the student's ``(σ, σ + 1e-7)``, for
    (Z1).
    """
    centred = scaled - scaled.mean(dim=-1, keepdim=True)
    # From the centred values, a constant row has std exactly 0 (and then y = 0).
    std = centred.square().sum(dim=-1, keepdim=True).div_(num_classes - 1).sqrt_()
    denominator = std + _STANDARDIZE_EPS
    standardized = centred.div_(denominator)
    return standardized, standardized[0].clone(), (std[0], denominator[0])


def _standardize_backward(
    grad: Tensor, standardized: Tensor, spread: tuple[Tensor, Tensor], num_classes: int
) -> Tensor:
    r"""(Z1): the gradient ``G`` with respect to ``y = (z - μ)/(σ + ε)`` carried back to ``z``,

    .. math:: \frac{∂L}{∂z} = \frac{1}{σ + ε}\Big[G - y\,\frac{(σ + ε)\,(G·y)}{(C - 1)\,σ}\Big]

    (the ``mean(G)`` term of the chain rule vanishes because ``G`` sums to zero, (G3)). A constant row has
    ``σ = 0`` and ``y = 0``; there the second term is 0, its value along every path that keeps ``σ > 0``.
    """
    std, denominator = spread
    projection = torch.linalg.vecdot(grad, standardized, dim=-1).unsqueeze(-1)
    factor = denominator / (std.clamp_min(torch.finfo(std.dtype).tiny) * (num_classes - 1))
    return grad.sub_(standardized * (projection * factor)).div_(denominator)


_COMPUTE_DTYPES = (torch.float32, torch.float64)
_LOWEST = {dtype: torch.finfo(dtype).min for dtype in _COMPUTE_DTYPES}


def compute_dtype(student_logits: Tensor, teacher_logits: Tensor) -> torch.dtype:
    """The kernel's working dtype: ``float32`` or ``float64`` (half precision is computed in ``float32``)."""
    if student_logits.dtype is torch.float64 or teacher_logits.dtype is torch.float64:
        return torch.float64
    return torch.float32


def _weighted_sum(
    x: Tensor, x_weight: Tensor | float, y: Tensor, y_weight: Tensor | float, *, scale: float
) -> Tensor:
    """``scale · (x_weight·x + y_weight·y)`` for float or ``(..., B)`` weights, in place, in two calls."""
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
    Under ``torch.compile`` and any tracing the constant is made fresh, not cached: a compiled graph has no
    per-call cost to save, and a cache filled while tracing would leak the graph's tensors out of it.
    """
    if torch.compiler.is_compiling() or type(like) is not Tensor or _get_current_dispatch_mode() is not None:
        # A fake, functional or traced tensor (torch.compile, FakeTensorMode, make_fx, torch.export) gets a
        # constant of its own kind, never one from the cache, and none of its kind enters the cache: each
        # would poison the other world's later calls.
        return torch.tensor(value, dtype=like.dtype, device=like.device)
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


class KernelOptions(NamedTuple):
    """The non-tensor arguments of :class:`DecoupledKDFunction`."""

    weight_rule: WeightRule
    reduction: str
    needs_grad: bool
    needs_temperature_grad: bool = False
    standardize: bool = False
    propagate_non_finite: bool = False
    batch_scope: BatchScope | None = None


def _forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    keep: Tensor | None,
    options: KernelOptions,
    *,
    eager: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The reduced loss and the two derivatives that backward multiplies by the incoming gradient."""
    dtype = compute_dtype(student_logits, teacher_logits)
    local_mean = options.reduction == "mean" and options.batch_scope is None  # a global one is (B1)'s
    if keep is None:
        sample_weight: float | Tensor = 1.0 / max(student_logits.shape[-2], 1) if local_mean else 1.0
    else:
        sample_weight = keep.to(dtype)
        if local_mean:
            sample_weight = sample_weight / keep.sum(dim=-1, keepdim=True).clamp_min(1)
    # Eager, the kernel runs in inference mode, which spares each of its small operations autograd's
    # dispatch (the cost that dominates small batches); a compiled graph has no such cost and cannot trace
    # inference mode. Autograd saves only normal tensors, so the gradient's buffer is made out here and the
    # other results leave inference mode through a functional operation.
    grad_buffer = (
        torch.empty_like(student_logits, dtype=dtype)
        if options.needs_grad and not options.standardize and keep is None
        else None
    )
    with _kernel_mode(student_logits, eager=eager):
        loss, grad, temperature_grad = decoupled_forward(
            student_logits,
            teacher_logits,
            target,
            temperature,
            options.weight_rule,
            sample_weight=sample_weight,
            needs_grad=options.needs_grad,
            needs_temperature_grad=options.needs_temperature_grad,
            keep=keep,
            standardize=options.standardize,
            propagate_non_finite=options.propagate_non_finite,
            out=grad_buffer,
            batch_scope=options.batch_scope,
            reduction=options.reduction,
        )
    if grad is not None and grad is not grad_buffer or dtype != student_logits.dtype and grad is not None:
        grad = grad.to(student_logits.dtype, copy=True)
    if temperature_grad is not None:
        temperature_grad = temperature_grad.clone()
    # "mean" is weighted by 1/B above, so both reductions are a sum here.
    if options.reduction == "none":
        return loss.clone(), grad, temperature_grad
    return (loss.sum() if loss.dim() == 1 else loss.sum(dim=-1)), grad, temperature_grad


def is_eager() -> bool:
    """Neither under ``torch.compile`` nor inside a :mod:`torch.func` transform."""
    return _functorch_level() is None and not torch.compiler.is_compiling()


def decoupled_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float | Tensor,
    keep: Tensor | None,
    options: KernelOptions,
    *,
    eager: bool,
) -> Tensor:
    """The loss through the autograd function that fits the context (``eager``: :func:`is_eager`): the
    lighter :class:`_EagerDecoupledKD` eagerly, :class:`DecoupledKDFunction` under :mod:`torch.func` and
    ``torch.compile`` (PyTorch binds the arguments of a ``setup_context`` function with :mod:`inspect` on
    every call, a cost as large as a tenth of the kernel at small batch sizes)."""
    if eager:
        return _EagerDecoupledKD.apply(student_logits, teacher_logits, target, temperature, keep, options)
    return DecoupledKDFunction.apply(student_logits, teacher_logits, target, temperature, keep, options)[0]


class DecoupledKDFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`decoupled_forward`: the loss, differentiable in the student's logits and,
    when the temperature is a tensor that requires grad, in the temperature; the teacher, the target and
    the mask get no gradient.

    ``forward`` returns ``(loss, grad, temperature_grad)``; the two derivatives (``None`` where not asked
    for) are what backward multiplies by the incoming gradient. Written in the ``setup_context`` form with a
    ``vmap`` rule, so :mod:`torch.func` transforms (``grad``, ``vmap``, ``jacrev``) work on it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return _forward(student_logits, teacher_logits, target, temperature, keep, options, eager=False)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        _, _, _, temperature, _, options = inputs
        _, grad, temperature_grad = output
        ctx.mark_non_differentiable(*(t for t in (grad, temperature_grad) if t is not None))
        ctx.set_materialize_grads(False)  # the derivatives' own incoming gradients are never used
        _save(ctx, grad, temperature_grad, temperature, options)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
        # create_graph=True would give a gradient without its own derivative, hence a silently wrong
        # second derivative; torch.func runs every backward with grad mode on, and there
        # once_differentiable raises when a second derivative is actually taken.
        if torch.is_grad_enabled() and _functorch_level() is None:
            _refuse_double_backward()
        return _backward(ctx, grad_loss)

    @staticmethod
    def vmap(
        info: object,
        in_dims: tuple,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> tuple[tuple, tuple]:
        """Each vmapped instance is a leading dimension of rows: its samples stay one batch for the
        reductions and for AEKT's batch normalisation."""
        size = info.batch_size  # type: ignore[attr-defined]

        def leading(value: Tensor | None, dim: int | None) -> Tensor | None:
            if not isinstance(value, Tensor):
                return value
            return value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)

        student, teacher, classes = (
            leading(x, d) for x, d in zip((student_logits, teacher_logits, target), in_dims[:3], strict=True)
        )
        if isinstance(temperature, Tensor):
            temperature = leading(temperature, in_dims[3])
            if temperature.dim() == 1:  # one temperature per instance: broadcast over its samples
                temperature = temperature.unsqueeze(-1)
        outputs = _forward(
            student, teacher, classes, temperature, leading(keep, in_dims[4]), options, eager=False
        )
        return outputs, tuple(None if x is None else 0 for x in outputs)


class _EagerDecoupledKD(torch.autograd.Function):
    """:class:`DecoupledKDFunction` in the classic form (``forward(ctx, ...)``), for eager calls."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        temperature: float | Tensor,
        keep: Tensor | None,
        options: KernelOptions,
    ) -> Tensor:
        loss, grad, temperature_grad = _forward(
            student_logits, teacher_logits, target, temperature, keep, options, eager=True
        )
        _save(ctx, grad, temperature_grad, temperature, options)
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
        if torch.is_grad_enabled():
            _refuse_double_backward()
        return _multiply(ctx, grad_loss)


def _save(
    ctx: torch.autograd.function.FunctionCtx,
    grad: Tensor | None,
    temperature_grad: Tensor | None,
    temperature: float | Tensor,
    options: KernelOptions,
) -> None:
    if temperature_grad is None:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(grad, temperature_grad)
        ctx.temperature_shape = temperature.shape  # type: ignore[attr-defined]
    ctx.reduction = options.reduction  # type: ignore[attr-defined]


def _refuse_double_backward() -> None:
    raise RuntimeError(
        "double backward through the fused distillation loss is not supported: its saved gradient is a "
        "constant; use aekt_plugin.reference for higher-order derivatives"
    )


def _multiply(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor | None
) -> tuple[Tensor | None, None, None, Tensor | None, None, None]:
    """Multiply the saved derivatives by the incoming gradient (per sample for ``"none"``)."""
    saved = ctx.saved_tensors  # type: ignore[attr-defined]
    grad, temperature_grad = saved if len(saved) == 2 else (saved[0], None)
    if grad_loss is None:
        return None, None, None, None, None, None
    if temperature_grad is None and grad is not None and grad_loss.dim() == 0:  # the common case
        return (
            grad * (grad_loss if grad_loss.dtype == grad.dtype else grad_loss.to(grad.dtype)),
            None,
            None,
            None,
            None,
            None,
        )
    # "mean"/"sum" give one incoming gradient per instance, "none" one per sample.
    per_row = grad_loss if ctx.reduction == "none" or grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)  # type: ignore[attr-defined]
    student_grad = None
    if grad is not None:
        factor = per_row if per_row.dim() == 0 else per_row.unsqueeze(-1)
        student_grad = grad * (factor if factor.dtype == grad.dtype else factor.to(grad.dtype))
    temperature_total = None
    if temperature_grad is not None:
        by_row = temperature_grad * per_row.to(temperature_grad.dtype)
        temperature_total = by_row.sum_to_size(ctx.temperature_shape)  # type: ignore[attr-defined]
    return student_grad, None, None, temperature_total, None, None


_backward = torch.autograd.function.once_differentiable(_multiply)


def _functorch_level() -> int | None:
    """The current ``torch.func`` transform level, or ``None`` outside any transform."""
    return torch._C._functorch.maybe_current_level()


def _kernel_mode(like: Tensor, *, eager: bool):
    """Inference mode for the eager kernel, with autocast off (the loss is computed in float32 or float64
    whatever autocast would choose); no inference mode under ``torch.compile`` and ``torch.func``, which
    cannot trace it."""
    if not eager:
        return torch.autocast(like.device.type, enabled=False)
    if _any_autocast_enabled():
        return _inference_without_autocast(like.device.type)
    return torch.inference_mode()


_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")
)


class _inference_without_autocast:
    def __init__(self, device_type: str) -> None:
        self._modes = (torch.inference_mode(), torch.autocast(device_type, enabled=False))

    def __enter__(self) -> None:
        for mode in self._modes:
            mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
