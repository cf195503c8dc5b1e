"""``nn.Module`` forms of the losses: they store the options and call :mod:`aekt_plugin.functional`.

As in ``torch/nn/modules/loss.py``, the losses are siblings on one small base. Each module's options are
the keyword-only parameters of its function, with the same names and defaults — read from the function's
signature, so an option added to a function is an option of its module too — and are checked once, when
the module is built, by the rules every loss uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from . import _validation
from .functional import aekt_loss, dkd_loss, kd_loss

__all__ = ["AEKTLoss", "DKDLoss", "KDLoss"]


class _DecoupledLoss(nn.Module):
    """The base of the family's modules: ``Subclass(**options)`` stores the options of ``function`` and
    ``forward(student_logits, teacher_logits, target)`` calls it with them.

    A temperature given as a 0-d ``nn.Parameter`` (a learnable temperature) is registered as a parameter of
    the module and receives ``dL/dT``.
    """

    function: ClassVar[Callable[..., Tensor]]
    option_defaults: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, *, function: Callable[..., Tensor], **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.function = staticmethod(function)
        parameters = [
            p for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        cls.option_defaults = {p.name: p.default for p in parameters}
        cls.__signature__ = inspect.Signature(parameters)  # what help() and inspect show for the class

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected option(s) {', '.join(map(repr, unknown))}; its options "
                f"are those of {self.function.__name__}: {', '.join(self.option_defaults)}"
            )
        checked = _validation.check_options(**{**self.option_defaults, **options})
        temperature = checked["temperature"]
        if isinstance(temperature, Tensor) and temperature.dim() != 0:
            raise ValueError(
                "a loss module's temperature tensor must be 0-d (pass per-sample temperatures to the "
                "functional form)"
            )
        for name, value in checked.items():
            setattr(self, name, value)  # an nn.Parameter temperature is registered by nn.Module

    def options(self) -> dict[str, Any]:
        """The options this module calls its function with."""
        return {name: getattr(self, name) for name in self.option_defaults}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return self.function(student_logits, teacher_logits, target, **self.options())

    def extra_repr(self) -> str:
        shown = []
        for name, value in self.options().items():
            if isinstance(value, Tensor):
                shown.append(f"{name}={float(value.detach()):g} (tensor)")
            elif value != self.option_defaults[name] or name == "temperature":
                shown.append(f"{name}={value!r}")
        return ", ".join(shown)


class KDLoss(_DecoupledLoss, function=kd_loss):
    """Hinton's KD, ``T²·KL(q ‖ p)``; options and mathematics: :func:`aekt_plugin.kd_loss`.

    Examples::

        >>> criterion = KDLoss(temperature=4.0)
        >>> loss = criterion(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10))
    """


class DKDLoss(_DecoupledLoss, function=dkd_loss):
    """Decoupled KD, ``T²·(α·TCKD + β·NCKD)``; options and mathematics: :func:`aekt_plugin.dkd_loss`.

    Examples::

        >>> criterion = DKDLoss(beta=2.0)
        >>> loss = criterion(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)))
    """


class AEKTLoss(_DecoupledLoss, function=aekt_loss):
    """Adaptive explicit knowledge transfer; options and mathematics: :func:`aekt_plugin.aekt_loss`.

    Examples::

        >>> criterion = AEKTLoss(temperature=4.0, beta=2.0)
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> loss = criterion(student, torch.randn(8, 10), torch.randint(0, 10, (8,)))
        >>> loss.backward()
    """
