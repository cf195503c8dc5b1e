"""``nn.Module`` forms of the losses: they store the options and call :mod:`aekt_plugin.functional`.

As in ``torch/nn/modules/loss.py``, the losses are siblings on one small base that holds the options they
share; each adds its own weights and its own ``forward`` signature.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import _validation
from .defaults import DEFAULTS
from .functional import aekt_loss, dkd_loss, kd_loss

__all__ = ["AEKTLoss", "DKDLoss", "KDLoss"]


class _DecoupledLoss(nn.Module):
    """The options of every loss of the family: temperature, reduction, ignore_index, standardize,
    validate_args. A temperature given as an ``nn.Parameter`` (a learnable temperature) is registered as a
    parameter of the module and receives ``dL/dT``."""

    def __init__(
        self,
        *,
        temperature: float | Tensor,
        reduction: str,
        ignore_index: int | None,
        standardize: bool,
        validate_args: bool,
    ) -> None:
        super().__init__()
        if isinstance(temperature, Tensor):
            if temperature.dim() != 0 or not temperature.is_floating_point():
                raise ValueError(
                    "a loss module's temperature tensor must be a 0-d floating-point tensor (pass per-sample "
                    "temperatures to the functional form)"
                )
            self.temperature = temperature
        else:
            self.temperature = _validation.check_temperature(temperature, sample_shape=(), device=None)
        self.reduction = _validation.check_reduction(reduction)
        self.ignore_index = _validation.check_ignore_index(ignore_index)
        self.standardize = _validation.check_bool("standardize", standardize)
        self.validate_args = _validation.check_bool("validate_args", validate_args)

    def _options(self) -> dict[str, object]:
        return {
            "temperature": self.temperature,
            "reduction": self.reduction,
            "ignore_index": self.ignore_index,
            "standardize": self.standardize,
            "validate_args": self.validate_args,
        }

    def extra_repr(self) -> str:
        temperature = self.temperature
        if isinstance(temperature, Tensor):
            temperature = f"{float(temperature.detach()):g} (tensor)"
        text = f"temperature={temperature}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            text += f", ignore_index={self.ignore_index}"
        return text + (", standardize=True" if self.standardize else "")


class KDLoss(_DecoupledLoss):
    """Hinton's KD, ``T²·KL(q ‖ p)``; see :func:`aekt_plugin.kd_loss`.

    Examples::

        >>> criterion = KDLoss(temperature=4.0)
        >>> loss = criterion(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10))
    """

    def __init__(
        self,
        *,
        temperature: float | Tensor = DEFAULTS.temperature,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        standardize: bool = False,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            standardize=standardize,
            validate_args=validate_args,
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, **self._options())


class DKDLoss(_DecoupledLoss):
    """Decoupled KD, ``T²·(α·TCKD + β·NCKD)``; see :func:`aekt_plugin.dkd_loss`."""

    def __init__(
        self,
        *,
        temperature: float | Tensor = DEFAULTS.temperature,
        alpha: float = DEFAULTS.alpha,
        beta: float = DEFAULTS.beta,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        standardize: bool = False,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            standardize=standardize,
            validate_args=validate_args,
        )
        self.alpha = _validation.check_non_negative("alpha", alpha)
        self.beta = _validation.check_non_negative("beta", beta)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return dkd_loss(
            student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta, **self._options()
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}"


class AEKTLoss(_DecoupledLoss):
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
        temperature: float | Tensor = DEFAULTS.temperature,
        alpha: float = DEFAULTS.alpha,
        beta: float = DEFAULTS.beta,
        max_weight: float = DEFAULTS.max_weight,
        normalize_weight: bool = DEFAULTS.normalize_weight,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        standardize: bool = False,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            standardize=standardize,
            validate_args=validate_args,
        )
        self.alpha = _validation.check_non_negative("alpha", alpha)
        self.beta = _validation.check_non_negative("beta", beta)
        self.max_weight = _validation.check_positive("max_weight", max_weight, allow_inf=True)
        self.normalize_weight = _validation.check_bool("normalize_weight", normalize_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return aekt_loss(
            student_logits,
            teacher_logits,
            target,
            alpha=self.alpha,
            beta=self.beta,
            max_weight=self.max_weight,
            normalize_weight=self.normalize_weight,
            **self._options(),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, max_weight={self.max_weight}, "
            f"normalize_weight={self.normalize_weight}"
        )
