r"""The decoupled distillation family: KD, DKD and AEKT on one fused kernel (SPEC §2).

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

Each function below only names its weight rule ``(a, b)``; :class:`~aekt_plugin._kernel.DecoupledKDFunction`
does the rest in log space (finite for ``|logits|`` up to 1e4, ``p_t`` underflowing or rounding to 1) and
returns the closed-form gradient. Only the student's logits are differentiated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _validation
from ._kernel import DecoupledKDFunction, TargetStats, WeightRule, scale_

DEFAULTS: dict[str, object] = {
    "temperature": 4.0,
    "alpha": 1.0,
    "beta": 8.0,
    "max_weight": 5.0,
    "normalize_weight": True,
    "order": None,
    "ce_weight": 1.0,
    "warmup": 20,
}
"""The package defaults (SPEC §3; ``max_weight``, ``normalize_weight`` and ``order`` from the accuracy
benchmark in ``benchmarks/results``). Integrations read their defaults from here."""

_DOC_INPUTS = """
    Args:
        student_logits: ``(B, C)`` or ``(N, C, d1, ...)`` (extra dimensions become samples, as in
            :func:`torch.nn.functional.cross_entropy`). The only input that is differentiated.
        teacher_logits: same shape as ``student_logits``; never receives a gradient.
        target: class indices ``(B,)``/``(N, d1, ...)`` of any integer dtype, or class probabilities shaped
            like the logits (timm's mixup/cutmix targets) — then the target class ``t`` of the
            decomposition is their argmax over dim 1.
        temperature: ``T > 0``; ``T²`` is already inside the loss.
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` (one value per sample, shaped like
            the class-index target).
        validate_args: also check values (finite logits, targets in range), which reads the data and
            synchronises a CUDA device; ``False`` for hot loops and AMP, where ``GradScaler`` needs a
            non-finite loss to pass through. Shape, dtype and option checks always run.

    Half-precision inputs are computed in ``float32``; the loss is returned in ``float32`` (``float64`` for
    double inputs) and the gradient in the student's dtype. Double backward is not supported.
"""


def _kd_weights(stats: TargetStats) -> tuple[float, Tensor]:
    """KD: ``a = 1``, ``b = 1 - q_t`` — exactly ``T²·KL(q‖p)`` (derivations, eq. (7))."""
    return 1.0, stats.log_1m_q_t.exp()


def _dkd_weights(stats: TargetStats, *, alpha: float, beta: float) -> tuple[float, float]:
    """DKD: constant ``a = α``, ``b = β``."""
    return alpha, beta


def _aekt_weights(
    stats: TargetStats, *, alpha: float, beta: float, max_weight: float, normalize_weight: bool
) -> tuple[Tensor, float]:
    """AEKT: ``a = α · min(q_t/p_t, w_max)`` (optionally divided by its batch mean), ``b = β``.

    The ratio is formed in log space, ``exp(min(log q_t - log p_t, log w_max))``, so an underflowing
    ``p_t`` gives ``w_max`` rather than ``inf``. The batch-mean normalisation is a softmax over the batch,
    ``w_i / mean(w) = B · softmax(log w)_i``, which shifts by the largest ``log w`` first, so a batch of
    ratios too small for the dtype still averages to 1. It is a stop-gradient constant (derivations,
    eq. (12)).
    """
    log_ratio = stats.log_target_ratio.clamp(max=math.log(max_weight))
    if normalize_weight:
        return scale_(torch.softmax(log_ratio, dim=0), alpha * log_ratio.shape[0]), beta
    return scale_(log_ratio.exp_(), alpha), beta


def _decoupled_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float,
    weight_rule: WeightRule,
    reduction: str,
    validate_args: bool,
) -> Tensor:
    rows = _validation.prepare_rows(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        reduction=reduction,
        validate_args=validate_args,
    )
    loss = DecoupledKDFunction.apply(
        rows.student, rows.teacher, rows.classes, rows.temperature, weight_rule, reduction
    )
    return loss.view(rows.sample_shape) if reduction == "none" else loss


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
    validate_args: bool = True,
) -> Tensor:
    return _decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        weight_rule=_kd_weights,
        reduction=reduction,
        validate_args=validate_args,
    )


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
    alpha = _validation.check_non_negative("alpha", alpha)
    beta = _validation.check_non_negative("beta", beta)

    def weight_rule(stats: TargetStats) -> tuple[float, float]:
        return _dkd_weights(stats, alpha=alpha, beta=beta)

    return _decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        weight_rule=weight_rule,
        reduction=reduction,
        validate_args=validate_args,
    )


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
    alpha = _validation.check_non_negative("alpha", alpha)
    beta = _validation.check_non_negative("beta", beta)
    max_weight = _validation.check_positive("max_weight", max_weight, allow_inf=True)
    _validation.check_bool("normalize_weight", normalize_weight)

    def weight_rule(stats: TargetStats) -> tuple[Tensor, float]:
        return _aekt_weights(
            stats, alpha=alpha, beta=beta, max_weight=max_weight, normalize_weight=normalize_weight
        )

    return _decoupled_loss(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        weight_rule=weight_rule,
        reduction=reduction,
        validate_args=validate_args,
    )


kd_loss.__doc__ = (
    r"""Hinton's KD, ``T²·KL(q ‖ p)``, written as the decoupled family with ``a = 1``, ``b = 1 - q_t``.

    ``target`` is optional: the value does not depend on it (derivations, eq. (7)).
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
