"""``nn.Module`` forms of the losses: they store the options and call :mod:`aekt_plugin.functional`."""

from __future__ import annotations

from torch import Tensor, nn

from . import _validation
from .functional import DEFAULTS, aekt_loss, dkd_loss, kd_loss

__all__ = ["AEKTLoss", "DKDLoss", "KDLoss"]


class KDLoss(nn.Module):
    """Hinton's KD, ``T²·KL(q ‖ p)``; see :func:`aekt_plugin.kd_loss`.

    Examples::

        >>> criterion = KDLoss(temperature=4.0)
        >>> loss = criterion(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10))
    """

    def __init__(
        self, *, temperature: float = 4.0, reduction: str = "mean", validate_args: bool = True
    ) -> None:
        super().__init__()
        self.temperature = _validation.check_positive("temperature", temperature)
        self.reduction = _validation.check_reduction(reduction)
        self.validate_args = validate_args

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            reduction=self.reduction,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DKDLoss(KDLoss):
    """Decoupled KD, ``T²·(α·TCKD + β·NCKD)``; see :func:`aekt_plugin.dkd_loss`."""

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        reduction: str = "mean",
        validate_args: bool = True,
    ) -> None:
        super().__init__(temperature=temperature, reduction=reduction, validate_args=validate_args)
        self.alpha = _validation.check_non_negative("alpha", alpha)
        self.beta = _validation.check_non_negative("beta", beta)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return dkd_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            reduction=self.reduction,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}"


class AEKTLoss(DKDLoss):
    """Adaptive explicit knowledge transfer; see :func:`aekt_plugin.aekt_loss` for the mathematics.

    Examples::

        >>> criterion = AEKTLoss(temperature=4.0, beta=2.0)
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> loss = criterion(student, torch.randn(8, 10), torch.randint(0, 10, (8,)))
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        max_weight: float = DEFAULTS["max_weight"],  # type: ignore[assignment]
        normalize_weight: bool = DEFAULTS["normalize_weight"],  # type: ignore[assignment]
        reduction: str = "mean",
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            temperature=temperature, alpha=alpha, beta=beta, reduction=reduction, validate_args=validate_args
        )
        self.max_weight = _validation.check_positive("max_weight", max_weight, allow_inf=True)
        self.normalize_weight = _validation.check_bool("normalize_weight", normalize_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return aekt_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            max_weight=self.max_weight,
            normalize_weight=self.normalize_weight,
            reduction=self.reduction,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, max_weight={self.max_weight}, normalize_weight={self.normalize_weight}"
        )
