"""Baseline distillation losses, written the way the toolkits write them.

These are *not* the package's losses. They are the two reference points of the kernel benchmark
(``aekt bench``) and independent oracles for the core's tests:

- :func:`kd_plain` is Hinton's KD exactly as timm's ``LogitDistillationTask`` computes it;
- :func:`dkd_mdistiller` is decoupled KD (Zhao et al., CVPR 2022) following the *algorithm* of
  mdistiller's ``DKD`` distiller step by step -- masks built with ``scatter``, two full softmaxes,
  binary probabilities gathered by masked sums, ``log`` of probabilities, and the ``-1000`` mask trick for
  the non-target softmax. It is re-implemented here from that description (no code is copied) so that
  the benchmark measures the cost of that algorithm and the tests can compare against it.

Notation (``docs/derivations.md`` §1): student logits ``z``, teacher logits ``v``, target ``t``,
temperature ``T``, ``p = softmax(z/T)``, ``q = softmax(v/T)``, ``b^S = [p_t, 1-p_t]``, ``b^T = [q_t, 1-q_t]``,
``p̂ = p_{j≠t}/(1-p_t)``, ``q̂ = q_{j≠t}/(1-q_t)``.

.. warning::
    :func:`dkd_mdistiller` inherits the numerical weakness of the algorithm it reproduces: on extreme
    logits ``p_t`` underflows to 0 (or ``1 - p_t`` to 0) and ``log`` returns ``-inf``, so the loss becomes
    ``inf``/``nan``. That is the point of having it -- use :func:`aekt_plugin.dkd_loss` for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_plain", "dkd_mdistiller"]


def kd_plain(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    r"""Hinton KD as timm's ``LogitDistillationTask`` computes it (batch mean).

    .. math::
        L = \frac{T^2}{B} \sum_b \mathrm{KL}(q_b \,\|\, p_b)
          = \frac{T^2}{B} \sum_b \sum_j q_{bj} (\log q_{bj} - \log p_{bj})

    computed as ``T² · kl_div(log_softmax(z/T), log_softmax(v/T), log_target=True, reduction="batchmean")``,
    the softmaxes over dim 1 (the classes, also of dense ``(N, C, d1, ...)`` logits, whose "batchmean"
    divides by ``N``).

    Args:
        student: student logits ``z``, shape ``(B, C)`` or ``(N, C, d1, ...)``.
        teacher: teacher logits ``v``, same shape; used as given (detach it if it carries a graph).
        temperature: ``T > 0``.

    Returns:
        A scalar tensor. Equals ``T²·(TCKD + (1 - q_t)·NCKD)`` averaged over the batch (derivations, eq. (7)).
    """
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (temperature**2)


def _target_masks(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, C)`` masks of the target class and of the other classes, built by ``scatter``."""
    gt_mask = torch.zeros_like(logits).scatter_(1, target.reshape(-1, 1), 1.0).bool()
    other_mask = torch.ones_like(logits).scatter_(1, target.reshape(-1, 1), 0.0).bool()
    return gt_mask, other_mask


def _binary(prob: torch.Tensor, gt_mask: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` binary distribution ``[prob_t, Σ_{j≠t} prob_j]`` from masked sums of a full softmax."""
    target_part = (prob * gt_mask).sum(dim=1, keepdim=True)
    other_part = (prob * other_mask).sum(dim=1, keepdim=True)
    return torch.cat([target_part, other_part], dim=1)


def dkd_mdistiller(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    r"""Decoupled KD computed by mdistiller's algorithm (the benchmark baseline and test oracle).

    .. math::
        L = \frac{T^2}{B} \sum_b \big( \alpha \, \mathrm{KL}(b^T_b \,\|\, b^S_b)
                                       + \beta \, \mathrm{KL}(\hat q_b \,\|\, \hat p_b) \big)

    Steps, as in mdistiller:

    1. ``gt_mask``/``other_mask`` by ``scatter`` of the target into zeros/ones;
    2. ``p = softmax(z/T)``, ``q = softmax(v/T)`` (full softmaxes);
    3. TCKD: binary distributions ``b = cat[(p·gt).sum, (p·other).sum]``, ``log b^S`` by ``torch.log`` of the
       probabilities, ``kl_div(log b^S, b^T, reduction="sum")`` (mdistiller's ``size_average=False``);
    4. NCKD: ``q̂ = softmax(v/T - 1000·gt)``, ``log p̂ = log_softmax(z/T - 1000·gt)`` -- the target logit is
       pushed down by 1000 so that it (almost) vanishes from the softmax -- then ``kl_div(..., "sum")``;
    5. both divergences multiplied by ``T²`` and divided by the batch size ``B``.

    Args:
        student: student logits ``z``, shape ``(B, C)``.
        teacher: teacher logits ``v``, shape ``(B, C)``; used as given (mdistiller computes it under
            ``torch.no_grad()``).
        target: class indices ``t``, shape ``(B,)``, integer dtype.
        alpha: weight ``α`` of TCKD.
        beta: weight ``β`` of NCKD.
        temperature: ``T > 0``.

    Returns:
        A scalar tensor, ``α·TCKD_mean + β·NCKD_mean`` with ``T²`` inside.

    .. warning::
        Not numerically safe (``log`` of probabilities, finite ``-1000`` mask): with logits of large
        magnitude the result is ``inf`` or ``nan``, and when ``|z/T|`` spreads over ~1000 the "removed" target
        class leaks back into the non-target softmax. Kept so on purpose -- it is a baseline.
    """
    gt_mask, other_mask = _target_masks(student, target)
    p = F.softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    b_student = _binary(p, gt_mask, other_mask)
    b_teacher = _binary(q, gt_mask, other_mask)
    batch = target.shape[0]
    tckd = F.kl_div(torch.log(b_student), b_teacher, reduction="sum") * (temperature**2) / batch
    q_hat = F.softmax(teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_p_hat = F.log_softmax(student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_p_hat, q_hat, reduction="sum") * (temperature**2) / batch
    return alpha * tckd + beta * nckd
