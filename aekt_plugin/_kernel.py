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

This is the single-block formulation, which the eager loss runs on ``(B, C)`` inputs of up to
:data:`~aekt_plugin._blocked.SINGLE_BLOCK_LIMIT` logits and :mod:`torch.func` on any. Large and dense
inputs and ``torch.compile`` run the row-statistics formulation of :mod:`~aekt_plugin._blocked`, which
shares the per-sample stage, :func:`sample_terms` and :func:`temperature_derivative`, with this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _len_torch_dispatch_stack  # a dispatch mode is active (FakeTensorMode, make_fx, ...)

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
        scaled, std, denominator = logit_standardization(scaled, num_classes, -1)
        standardized_student, spread = scaled[0].clone(), (std[0], denominator[0])
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
    target_margin = logit_t.sub_(non_target_max).sub_(log_s)  # (N1): LSE_{k≠t} = m + log s
    terms = sample_terms(
        target_margin,
        nckd,
        temperature,
        weight_rule,
        sample_weight=sample_weight,
        keep=keep,
        batch_scope=batch_scope,
        reduction=reduction,
        needs_grad=needs_grad or needs_temperature_grad,
        propagate_non_finite=propagate_non_finite,
    )
    if terms.target_gap is None:
        return terms.loss, None, None
    if needs_temperature_grad:  # (T1)'s row sums of the teacher, before the gradient takes their buffer
        teacher = scaled_logits[1]
        expected_w = torch.linalg.vecdot(q_hat, teacher, dim=-1)
        gap_w = torch.linalg.vecdot(q_hat * log_hat_gap, teacher, dim=-1)
    # (G2) T[(b - a(p_t - q_t)) p̂_j - b q̂_j]; p̂_t = q̂_t = 0, and (G1) then fills in the target.
    grad = torch.mul(p_hat, terms.p_hat_weight, out=log_hat_gap)
    if isinstance(terms.q_hat_weight, Tensor):
        grad = grad.addcmul_(q_hat, terms.q_hat_weight, value=-1.0)
    else:
        grad = grad.add_(q_hat, alpha=-terms.q_hat_weight)
    target_gap = terms.target_gap
    temperature_grad = None
    if needs_temperature_grad:
        # (T1) per sample; grad holds sample_weight·G with 0 at the target, target_gap its target entry.
        grad_dot_u = (
            torch.linalg.vecdot(grad, scaled_logits[0], dim=-1) + target_gap.squeeze(-1) * logit_t_copy[0]
        )
        temperature_grad = temperature_derivative(
            terms,
            temperature,
            teacher_t=logit_t_copy[1],
            expected_w=expected_w,
            gap_w=gap_w,
            grad_dot_u=grad_dot_u,
        )
    grad.scatter_(-1, target_column, target_gap)
    if standardize:
        grad = logit_standardization_backward(grad, standardized_student, spread, num_classes, -1)
    if keep is not None:
        grad = torch.where(keep.unsqueeze(-1), grad, 0.0)
        if temperature_grad is not None:
            temperature_grad = torch.where(keep, temperature_grad, 0.0)
    return terms.loss, grad if needs_grad else None, temperature_grad


class SampleTerms(NamedTuple):
    """The per-sample part of (D1)–(G2), formed from the target statistics by :func:`sample_terms`.

    ``loss`` is ``sample_weight · L`` per sample, 0 where ignored. The gradient with respect to the
    student's logits is, per sample, ``p_hat_weight · p̂_j - q_hat_weight · q̂_j`` off the target (G2) and
    ``target_gap`` at it (G1), all three already times ``T · sample_weight`` (``None`` where no derivative
    was asked for). The other fields are what the temperature derivative (T1) reads: TCKD, NCKD, the
    weights as the rule gave them and as applied (``a``, ``b``), the log-space binary statistics and the
    per-sample weight of the reduction.
    """

    loss: Tensor
    target_gap: Tensor | None
    p_hat_weight: Tensor | None
    q_hat_weight: Tensor | float | None
    tckd: Tensor
    nckd: Tensor
    weights: Weights
    a: Tensor | float
    b: Tensor | float
    log_binary: Tensor
    log_ratio: Tensor
    sample_weight: float | Tensor


def sample_terms(
    target_margin: Tensor,
    nckd: Tensor,
    temperature: float | Tensor,
    weight_rule: WeightRule,
    *,
    sample_weight: float | Tensor,
    keep: Tensor | None,
    batch_scope: BatchScope | None,
    reduction: str,
    needs_grad: bool,
    propagate_non_finite: bool,
) -> SampleTerms:
    """TCKD, the weights, the loss (D1) and the gradient's per-sample coefficients (G1)–(G2), from the
    margins ``d = x_t/T - LSE_{k≠t}(x/T)`` of the student (index 0) and the teacher (index 1),
    ``target_margin`` ``(2, ..., B, 1)``, and NCKD ``(..., B)``: the ``O(B)`` part that every formulation
    of the kernel shares."""
    # (N2) with d = z_t/T - LSE_{k≠t}: log p_t = log σ(d), log(1 - p_t) = log σ(-d). The same differences
    # of log-sum-exps, but log σ keeps full relative precision of a tiny 1 - p_t or p_t.
    # Index 0 holds [log p_t, log(1 - p_t)], index 1 [log q_t, log(1 - q_t)].
    log_binary = F.logsigmoid(target_margin * _constant((1.0, -1.0), target_margin))  # [d, -d]
    binary_s, binary_t = log_binary.exp().unbind(0)  # b^S = [p_t, 1 - p_t], b^T = [q_t, 1 - q_t]
    log_b_s, log_b_t = log_binary.unbind(0)
    log_ratio = log_b_t - log_b_s
    tckd = torch.linalg.vecdot(binary_t, log_ratio, dim=-1)  # KL(b^T ‖ b^S)

    weights = weight_rule(TargetStats(log_binary, log_ratio, keep, batch_scope))
    a, b = weights.a, weights.b
    if batch_scope is not None:
        sample_weight = batch_scope.sample_weight(sample_weight, keep, tckd, reduction, weights.batch_count)
    tensor_scale = isinstance(temperature, Tensor) or isinstance(sample_weight, Tensor)
    if tensor_scale:
        loss = (tckd * a + nckd * b) * (temperature * temperature * sample_weight)  # (D1)
    else:
        loss = _weighted_sum(tckd, a, nckd, b, scale=sample_weight * temperature**2)  # (D1)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    if not needs_grad:
        return SampleTerms(
            loss, None, None, None, tckd, nckd, weights, a, b, log_binary, log_ratio, sample_weight
        )

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
    # (G2) T[(b - a(p_t - q_t)) p̂_j - b q̂_j] and (G1) T a (p_t - q_t), times sample_weight.
    q_hat_weight: Tensor | float
    if tensor_scale:
        scale = (temperature * sample_weight).unsqueeze(-1)
        a_col = a.unsqueeze(-1) if isinstance(a, Tensor) else a
        b_col = b.unsqueeze(-1) if isinstance(b, Tensor) else b
        target_gap = p_t_minus_q_t * (a_col * scale)  # (G1)
        q_hat_weight = b_col * scale
        p_hat_weight = q_hat_weight - target_gap
    else:
        scale = sample_weight * temperature
        if isinstance(a, float):
            target_gap = p_t_minus_q_t.mul_(_constant(a * scale, p_t_minus_q_t))  # (G1): T a (p_t - q_t)
        else:
            zero = _constant(0.0, p_t_minus_q_t)
            target_gap = torch.addcmul(zero, p_t_minus_q_t, a.unsqueeze(-1), value=scale)  # (G1)
        if isinstance(b, float):
            q_hat_weight = b * scale
            p_hat_weight = torch.sub(_constant(q_hat_weight, target_gap), target_gap)
        else:
            q_hat_weight = scale_(b.unsqueeze(-1), scale)
            p_hat_weight = q_hat_weight - target_gap
    return SampleTerms(
        loss,
        target_gap,
        p_hat_weight,
        q_hat_weight,
        tckd,
        nckd,
        weights,
        a,
        b,
        log_binary,
        log_ratio,
        sample_weight,
    )


def temperature_derivative(
    terms: SampleTerms,
    temperature: Tensor,
    *,
    teacher_t: Tensor,
    expected_w: Tensor,
    gap_w: Tensor,
    grad_dot_u: Tensor,
) -> Tensor:
    r"""``dL/dT`` of (T1) per sample, times ``sample_weight``, from the row sums the formulation formed:
    ``expected_w = E_q̂[w]``, ``gap_w = E_q̂[(log q̂ - log p̂)·w]`` and ``grad_dot_u = Σ_j G_j u_j`` (``G`` the
    gradient times ``sample_weight``), with ``teacher_t = w_t``. The bracket from the teacher's logits is

    .. math::

        \big(a(ℓ_t - ℓ_n) + b'\,\mathrm{NCKD}\big)\,q_t(1 - q_t)\,(w_t - E_{\hat q}[w])
            + b\,\mathrm{Cov}_{\hat q}(\log\hat q - \log\hat p,\ w)

    with ``ℓ = log b^T - log b^S`` and ``b' = ∂b/∂q_t``. Every term is invariant under a shift of ``w``, so
    ``w`` may be taken shifted (or with 0 at the target, where ``q̂_t = 0``).
    """
    weights, nckd = terms.weights, terms.nckd
    covariance = gap_w - nckd * expected_w
    binary_confidence = terms.log_binary[1].sum(dim=-1).exp()  # q_t (1 - q_t)
    explicit = weights.a * (terms.log_ratio[..., 0] - terms.log_ratio[..., 1]) + weights.db_dq_t * nckd
    teacher_terms = explicit * binary_confidence * (teacher_t - expected_w) + weights.b * covariance
    value = terms.tckd * terms.a + nckd * terms.b
    return terms.sample_weight * temperature * (2 * value - teacher_terms) - grad_dot_u


_STANDARDIZE_EPS = 1e-7


def logit_standardization(x: Tensor, num_classes: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` replaced, in place, by ``y = (x - mean(x)) / (std(x) + 1e-7)``, std unbiased, over the classes
    (dimension ``dim``); returns ``y``, ``σ`` and ``σ + 1e-7``, the spread that (Z1) needs.
    """
    centred = x - x.mean(dim=dim, keepdim=True)
    # From the centred values, a constant row has std exactly 0 (and then y = 0).
    std = centred.square().sum(dim=dim, keepdim=True).div_(num_classes - 1).sqrt_()
    denominator = std + _STANDARDIZE_EPS
    return centred.div_(denominator), std, denominator


def logit_standardization_backward(
    grad: Tensor, standardized: Tensor, spread: tuple[Tensor, Tensor], num_classes: int, dim: int
) -> Tensor:
    r"""(Z1): the gradient ``G`` with respect to ``y = (z - μ)/(σ + ε)`` carried back to ``z``, in place,

    .. math:: \frac{∂L}{∂z} = \frac{1}{σ + ε}\Big[G - y\,\frac{(σ + ε)\,(G·y)}{(C - 1)\,σ}\Big]

    (the ``mean(G)`` term of the chain rule vanishes because ``G`` sums to zero, (G3)). A constant row has
    ``σ = 0`` and ``y = 0``; there the second term is 0, its value along every path that keeps ``σ > 0``.
    """
    std, denominator = spread
    projection = torch.linalg.vecdot(grad, standardized, dim=dim).unsqueeze(dim)
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
    if torch.compiler.is_compiling() or type(like) is not Tensor or _len_torch_dispatch_stack():
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
