r"""The decoupled distillation family: KD, DKD and AEKT on one fused kernel.

Notation (per sample; ``docs/derivations.md`` derives every equation cited here):

* ``z``, ``v`` — student and teacher logits, ``t`` — target class, ``T`` — temperature;
* ``p = softmax(z/T)``, ``q = softmax(v/T)``; ``p̂``, ``q̂`` — the non-target distributions (target removed,
  renormalised); ``b^S = [p_t, 1 - p_t]``, ``b^T = [q_t, 1 - q_t]``;
* ``TCKD = KL(b^T ‖ b^S)`` (explicit knowledge: the teacher's target confidence ``q_t``);
  ``NCKD = KL(q̂ ‖ p̂)`` (implicit knowledge: the teacher's non-target distribution).

Every loss here is ``L = T² (a·TCKD + b·NCKD)`` with stop-gradient weights:

======  ===============================  =========
loss    a                                b
======  ===============================  =========
KD      1                                1 - q_t
DKD     α                                β
AEKT    α · min(q_t / p_t, w_max)        β
======  ===============================  =========

Each function below only names its weight rule ``(a, b)``; :func:`~aekt_plugin._autograd.decoupled_kd`
does the rest in log space (finite for ``|logits|`` up to 1e4, ``p_t`` underflowing or rounding to 1) and
returns the closed-form gradient. The student's logits are differentiated, and a temperature tensor that
requires grad; the teacher's logits never are.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _autograd, _distributed, _validation
from ._autograd import KernelOptions, decoupled_kd
from ._kernel import TargetStats, WeightRule, Weights, scale_
from .defaults import DEFAULTS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["TargetStats", "WeightRule", "Weights", "aekt_loss", "decoupled_loss", "dkd_loss", "kd_loss"]

_DOC_INPUTS = """
    Args:
        student_logits: ``(B, C)`` or ``(N, C, d1, ...)`` (extra dimensions become samples, as in
            :func:`torch.nn.functional.cross_entropy`). The input that is differentiated.
        teacher_logits: same shape as ``student_logits``; never receives a gradient (a warning says so,
            once, if it requires one).
        target: class indices ``(B,)``/``(N, d1, ...)`` of any integer dtype, or class probabilities shaped
            like the logits (timm's mixup/cutmix targets) — then the target class ``t`` of the
            decomposition is their argmax over dim 1, and no sample is ignored.
        temperature: ``T`` in ``[1e-4, 1e4]``; ``T²`` is already inside the loss. A number, or a tensor:
            0-d (e.g. a learnable temperature, CTKD) or one value per sample (shaped like a class-index
            target). A tensor that requires grad receives ``dL/dT``, the total derivative of the loss's
            value in ``T`` with only AEKT's ratio weight held fixed (``docs/derivations.md``, (T1)).
        reduction: ``"mean"`` over the samples that are not ignored, ``"sum"``, or ``"none"`` (one value
            per sample, shaped like the class-index target, 0 where ignored).
        ignore_index: samples whose class index equals it contribute nothing to the loss or the gradient
            (``-100`` by default, as :func:`torch.nn.functional.cross_entropy`; ``None``: none is
            ignored). With no sample kept, ``"mean"`` gives 0 and a zero gradient.
        standardize: first replace the student's and the teacher's logits, per sample, by
            ``(x - mean(x)) / (std(x) + 1e-7)`` (std over the classes, unbiased): logit standardization
            (Sun et al., CVPR 2024). The gradient flows through the student's standardization.
        validate_args: also check values (finite logits, targets in range, a temperature tensor in range,
            logits that look like probabilities), which reads the data and synchronises a CUDA device;
            ``False`` for hot loops and AMP. Shape, dtype and option checks always run. With ``False``, a
            sample whose logits are not finite gets a non-finite loss *and* a non-finite gradient row (so
            ``torch.amp.GradScaler``, which inspects gradients, skips the step); the other samples keep
            finite values, except under AEKT's batch normalisation, which then spreads the bad sample's
            ``nan`` weight over the batch.

        global_batch: under ``torch.distributed``, take AEKT's batch normalisation and the mean over the
            kept samples over the samples of all ranks of ``process_group`` (``docs/derivations.md``, (B1)),
            at the cost of one all-gather of two numbers per rank, so that DDP's averaged gradient is the
            gradient of one process on the concatenated batch. Each rank's ``"mean"`` or ``"sum"`` value is
            then its share of the global loss times the world size (their mean is the global loss). Without
            torch.distributed, or with one rank, nothing changes. Every rank must call the loss alike.
        process_group: the group whose samples make the batch (``None``: the world).

    Half-precision inputs are computed in ``float32`` (also under autocast); the loss is returned in
    ``float32`` (``float64`` for double inputs) and the gradient in the student's dtype. Double backward is
    not supported. Works under :func:`torch.compile` and :mod:`torch.func` (``grad``, ``vmap``).
"""


def _kd_weights(stats: TargetStats) -> Weights:
    """KD: ``a = 1``, ``b = 1 - q_t`` — exactly ``T²·KL(q‖p)`` (derivations, eq. (7))."""
    return Weights(1.0, stats.log_1m_q_t.exp(), db_dq_t=-1.0)


def _dkd_weights(stats: TargetStats, *, alpha: float, beta: float) -> Weights:
    """DKD: constant ``a = α``, ``b = β``."""
    return Weights(alpha, beta)


def _log_largest_finite(dtype: torch.dtype) -> float:
    """The largest ``x`` whose ``exp`` is finite in ``dtype``."""
    x = torch.tensor(math.log(torch.finfo(dtype).max), dtype=dtype)
    while not torch.isfinite(x.exp()):
        x = torch.nextafter(x, torch.zeros((), dtype=dtype))
    return float(x)


# A table made at import, so that a traced or compiled loss only looks a number up.
_LOG_LARGEST_FINITE = {
    dtype: _log_largest_finite(dtype)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _aekt_weights(
    stats: TargetStats, *, alpha: float, beta: float, max_weight: float, normalize_weight: bool
) -> Weights:
    """AEKT: ``a = α · min(q_t/p_t, w_max)`` (optionally divided by its batch mean), ``b = β``.

    The ratio is formed in log space, ``exp(min(log q_t - log p_t, log w_max))``, so an underflowing
    ``p_t`` gives ``w_max`` rather than ``inf``. The batch-mean normalisation (:meth:`TargetStats.normalized`,
    over all ranks' samples with ``global_batch``, (B1)) leaves ignored samples out and is a stop-gradient
    constant (derivations, eq. (12)).
    """
    bound = math.log(max_weight)
    if not normalize_weight:
        # A ratio beyond the dtype's range becomes its largest finite number (as in the reference), not
        # inf, so that alpha = 0 still switches the explicit term off instead of giving 0 · inf = nan.
        bound = min(bound, _LOG_LARGEST_FINITE.get(stats.log_target_ratio.dtype, math.inf))
        log_ratio = stats.log_target_ratio.clamp(max=bound)
        return Weights(scale_(log_ratio.exp_(), alpha), beta)
    shares, batch_count = stats.normalized(stats.log_target_ratio.clamp(max=bound), alpha)
    return Weights(shares, beta, batch_count=batch_count)


def decoupled_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    weight_rule: WeightRule,
    *,
    temperature: float | Tensor = DEFAULTS.temperature,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    standardize: bool = False,
    validate_args: bool = True,
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
    target_required: bool = True,
) -> Tensor:
    r"""Any member of the family, ``T²·(a·TCKD + b·NCKD)``, with the stop-gradient weights of your own
    ``weight_rule``: a function of the batch's :class:`TargetStats` (log-space ``p_t``, ``q_t`` and their
    ratios) that returns :class:`Weights` ``(a, b)``, numbers or one value per sample. :func:`kd_loss`,
    :func:`dkd_loss` and :func:`aekt_loss` are this function with their own rules; it is the place to try a
    new weighting on the fused kernel. ``target_required=False`` lets ``target`` be ``None`` for a rule
    whose loss does not depend on the target (KD's); the other options are those of the losses below.
    """
    checked = _validation.check_options(
        temperature=temperature,
        reduction=reduction,
        ignore_index=ignore_index,
        standardize=standardize,
        validate_args=validate_args,
        global_batch=global_batch,
        process_group=process_group,
    )
    reduction, standardize, validate_args = checked["reduction"], checked["standardize"], checked["validate_args"]
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=checked["temperature"],
        reduction=reduction,
        validate_args=validate_args,
        ignore_index=checked["ignore_index"],
        target_required=target_required,
        dense=True,
    )
    scope = _distributed.batch_scope(checked["global_batch"], checked["process_group"])
    if scope is not None and _autograd._functorch_level() is not None:
        raise ValueError(
            "global_batch=True under a torch.func transform is not supported: each vmapped instance is a "
            "batch of its own; pass global_batch=False there"
        )
    grad_enabled = torch.is_grad_enabled()
    if teacher_logits.requires_grad and grad_enabled:
        _validation.warn_once(
            "teacher-requires-grad",
            "teacher_logits requires grad, but the distillation loss never differentiates the teacher (and "
            "computes no gradient for the student unless student_logits requires grad). If the arguments "
            "are swapped, pass the student's logits first; otherwise detach the teacher's logits.",
        )
    temperature = rows.temperature
    options = KernelOptions(
        weight_rule,
        reduction,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and isinstance(temperature, Tensor) and temperature.requires_grad,
        standardize,
        not validate_args,
        scope,
    )
    eager = _autograd.is_eager()
    classes, keep = rows.classes, rows.keep
    if rows.ignore_index is not None:
        # The targets were not read (validate_args=False) and may hold ignore_index. Finding ignored samples
        # takes a pass over the targets, and on CUDA a synchronisation, which the default path must not
        # pay. Eager on CPU, an ignore value outside [0, C) makes the kernel's first gather fail before
        # anything is written: the kernel runs unmasked and masks only after that failure. Elsewhere (CUDA,
        # torch.compile and torch.func, an ignore value that is also a class index) it always masks.
        num_classes = rows.student.shape[1]
        if eager and classes.is_cpu and not 0 <= rows.ignore_index < num_classes:
            try:
                loss = decoupled_kd(
                    rows.student, rows.teacher, classes, temperature, None, options, eager=True
                )
                return loss.view(rows.sample_shape) if reduction == "none" else loss
            except RuntimeError as error:
                if "out of bounds" not in str(error):
                    raise
                _check_kept_classes(classes, num_classes, rows.ignore_index)
        keep = classes != rows.ignore_index
        classes = torch.where(keep, classes, 0)
    loss = decoupled_kd(rows.student, rows.teacher, classes, temperature, keep, options, eager=eager)
    return loss.view(rows.sample_shape) if reduction == "none" else loss


def _check_kept_classes(classes: Tensor, num_classes: int, ignore_index: int) -> None:
    kept = classes[classes != ignore_index]
    if kept.numel() and not (int(kept.min()) >= 0 and int(kept.max()) < num_classes):
        raise ValueError(
            f"target holds class indices in [{int(kept.min())}, {int(kept.max())}], outside "
            f"[0, {num_classes}) (and not ignore_index={ignore_index})"
        )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float | Tensor = DEFAULTS.temperature,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    standardize: bool = False,
    validate_args: bool = True,
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    return decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        _kd_weights,
        target_required=False,
        temperature=temperature,
        reduction=reduction,
        ignore_index=ignore_index,
        standardize=standardize,
        validate_args=validate_args,
        global_batch=global_batch,
        process_group=process_group,
    )


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = DEFAULTS.temperature,
    alpha: float = DEFAULTS.alpha,
    beta: float = DEFAULTS.beta,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    standardize: bool = False,
    validate_args: bool = True,
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    weights = _validation.check_options(alpha=alpha, beta=beta)
    return decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        functools.partial(_dkd_weights, **weights),
        temperature=temperature,
        reduction=reduction,
        ignore_index=ignore_index,
        standardize=standardize,
        validate_args=validate_args,
        global_batch=global_batch,
        process_group=process_group,
    )


def aekt_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = DEFAULTS.temperature,
    alpha: float = DEFAULTS.alpha,
    beta: float = DEFAULTS.beta,
    max_weight: float = DEFAULTS.max_weight,
    normalize_weight: bool = DEFAULTS.normalize_weight,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    standardize: bool = False,
    validate_args: bool = True,
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    weights = _validation.check_options(
        alpha=alpha, beta=beta, max_weight=max_weight, normalize_weight=normalize_weight
    )
    return decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        functools.partial(_aekt_weights, **weights),
        temperature=temperature,
        reduction=reduction,
        ignore_index=ignore_index,
        standardize=standardize,
        validate_args=validate_args,
        global_batch=global_batch,
        process_group=process_group,
    )


kd_loss.__doc__ = (
    r"""Hinton's KD, ``T²·KL(q ‖ p)``, written as the decoupled family with ``a = 1``, ``b = 1 - q_t``.

    ``target`` is optional: the value does not depend on it (derivations, eq. (7)); it matters only for
    ``ignore_index``.
    """
    + _DOC_INPUTS
)
dkd_loss.__doc__ = (
    r"""Decoupled KD (Zhao et al., CVPR 2022): ``T²·(α·TCKD + β·NCKD)``.

    Same value as mdistiller's ``dkd_loss`` on moderate logits, but computed from log-sum-exps, so it stays
    finite where the usual code (probabilities, then ``log``; ``-1000`` masking) returns ``inf``.

    Args (in addition to those below):
        alpha, beta: the constant weights ``a = α`` of TCKD and ``b = β`` of NCKD, ``>= 0``.
    """
    + _DOC_INPUTS
)
aekt_loss.__doc__ = (
    r"""Adaptive explicit knowledge transfer: ``T²·(α·min(q_t/p_t, w_max)·TCKD + β·NCKD)``.

    The explicit (target-class) term is weighted by the teacher/student ratio of target confidence: a
    student less confident than its teacher (``p_t < q_t``) learns ``q_t`` harder, an over-confident one is
    pulled down gently. The weight is a stop-gradient constant: the gradient is (G1)–(G2) of
    ``docs/derivations.md`` with that weight held fixed, which is *not* the derivative of the value as a
    function of ``p_t`` through the weight.

    Args (in addition to those below):
        alpha, beta: scales of the explicit and implicit terms, ``>= 0``.
        max_weight: ``w_max > 0`` bounds the ratio early in training, when ``p_t ≈ 1/C``; ``math.inf``
            leaves it unbounded.
        normalize_weight: divide ``min(q_t/p_t, w_max)`` by its mean over the batch (still a constant),
            which redistributes emphasis between samples while keeping DKD's overall scale.

    .. note:: With probability targets (mixup/cutmix) ``t`` is the argmax class of each target row.
    """
    + _DOC_INPUTS
)
