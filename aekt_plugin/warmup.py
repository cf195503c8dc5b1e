r"""The linear warm-up of the distillation term, as a schedule object.

The total objective of one step (mdistiller's conventions) is::

    loss_ce = ce_weight · CE(z_cls, y)
    loss_kd = min(progress / warmup, 1) · L(z_kd, v, y)        # L already contains T²

with ``progress`` counted in optimiser updates or in epochs by :class:`KDWarmup`, which every integration
uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._validation import warn_once

__all__ = ["KDWarmup"]


class KDWarmup(nn.Module):
    """The linear warm-up ``min(progress / length, 1)`` of the distillation loss, as a schedule object.

    Shaped like :class:`torch.optim.lr_scheduler.LinearLR`: :meth:`step` after every optimiser update,
    :meth:`set_epoch` at the start of an epoch, :attr:`factor` to read, :meth:`state_dict` /
    :meth:`load_state_dict` so that a resumed run continues where it stopped (it is an ``nn.Module`` whose
    clock is a buffer, so it also travels inside a module's ``state_dict`` and to its device).

    The clock counts optimiser updates from 0 (the factor is 0 at the first update and rises linearly):

    * ``KDWarmup(steps=N)``: ``factor = min(steps / N, 1)``;
    * ``KDWarmup(epochs=E, steps_per_epoch=S)``: the same with ``N = E·S``; :meth:`set_epoch` moves the
      clock to the epoch's first update unless it already lies inside that epoch (a run resumed in the
      middle of an epoch keeps its exact count);
    * ``KDWarmup(epochs=E)``: epoch granularity, ``factor = min((epoch + 1) / E, 1)`` for the 0-based
      epoch last given to :meth:`set_epoch` (mdistiller's ``min(epoch / WARMUP, 1)`` with its 1-based
      epochs).

    A length of 0 means no warm-up (factor 1). :attr:`factor` is a 0-d tensor on the clock's device
    (no host synchronisation, and no recompilation under ``torch.compile`` as the clock advances).
    ``steps_per_epoch`` may also be given later, once a training loop knows it (:meth:`set_steps_per_epoch`).
    """

    steps: Tensor
    epoch: Tensor

    def __init__(
        self, *, steps: float | None = None, epochs: float | None = None, steps_per_epoch: int | None = None
    ) -> None:
        super().__init__()
        if (steps is None) == (epochs is None):
            raise ValueError("KDWarmup takes exactly one of steps= and epochs=")
        if steps is not None and steps_per_epoch is not None:
            raise ValueError("steps_per_epoch goes with epochs=, not steps=")
        length = steps if steps is not None else epochs
        if isinstance(length, bool) or not isinstance(length, (int, float)) or not length >= 0:
            raise ValueError(f"the warm-up length must be a number >= 0, got {length!r}")
        self.epochs = None if epochs is None else float(epochs)
        self.steps_per_epoch: int | None = None
        self.length = float(length)
        if steps_per_epoch is not None:
            self.set_steps_per_epoch(steps_per_epoch)
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.int64))
        self._epoch_known = False  # kept on the host: reading the buffer would synchronise a CUDA device
        self._last_step: int | None = None  # likewise, for the backwards check of set_step

    @property
    def by_epoch(self) -> bool:
        """Whether the clock counts epochs (``epochs=`` without ``steps_per_epoch``)."""
        return self.epochs is not None and self.steps_per_epoch is None

    def set_steps_per_epoch(self, steps_per_epoch: int, *, name: str = "steps_per_epoch") -> None:
        """Count ``epochs=`` in optimiser updates from now on, ``steps_per_epoch`` of them per epoch (``name``
        is the caller's word for it, in errors)."""
        if self.epochs is None:
            raise ValueError("steps_per_epoch goes with epochs=, not steps=")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
            raise TypeError(f"{name} must be an int, got {type(steps_per_epoch).__name__}")
        if steps_per_epoch < 1:
            raise ValueError(f"{name} must be an int >= 1, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        self.length = self.epochs * steps_per_epoch

    @property
    def factor(self) -> Tensor:
        """The current factor, a 0-d float tensor in ``[0, 1]``."""
        if self.length <= 0:
            return torch.ones((), dtype=torch.float32, device=self.steps.device)
        if self.by_epoch:
            if not self._epoch_known:
                raise RuntimeError(
                    "KDWarmup(epochs=...) has no epoch yet: call set_epoch(epoch) at the start of each "
                    "epoch, or give steps_per_epoch and call step() after each optimiser update"
                )
            progress = self.epoch.to(torch.float64) + 1
        else:
            progress = self.steps
        return (progress / self.length).clamp(0.0, 1.0).to(torch.float32)

    def step(self) -> None:
        """Count one optimiser update."""
        self.steps.add_(1)
        if self._last_step is not None:
            self._last_step += 1

    def set_epoch(self, epoch: int) -> None:
        """Start the 0-based ``epoch``. With ``steps_per_epoch``, the clock moves to the epoch's first update,
        unless it already counts an update of that epoch (a run resumed mid-epoch keeps its count)."""
        epoch = int(epoch)
        self.epoch.fill_(epoch)
        self._epoch_known = True
        if self.steps_per_epoch is not None:
            first = epoch * self.steps_per_epoch
            if not first <= float(self.steps) < first + self.steps_per_epoch:
                self.steps.fill_(first)
                self._last_step = first

    def set_step(self, steps: int) -> None:
        """Set the number of optimiser updates done so far (timm's ``update_ema(step=...)``).

        A count that goes backwards is taken, with a one-time warning: it is what a loop that restarts its
        update count every epoch does, and then the warm-up never finishes.
        """
        steps = int(steps)
        if self._last_step is not None and steps < self._last_step:
            warn_once(
                "warmup-clock-backwards",
                f"the distillation warm-up clock moved back from {self._last_step} to {steps} optimiser "
                "updates; count updates across epochs (a count that restarts every epoch keeps the warm-up "
                "from finishing)",
            )
        self.steps.fill_(steps)
        self._last_step = steps

    def extra_repr(self) -> str:
        unit = "epochs" if self.by_epoch else "steps"
        return f"length={self.length:g} {unit}" + (
            f", steps_per_epoch={self.steps_per_epoch}" if self.steps_per_epoch else ""
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._epoch_known = int(self.epoch) >= 0
        self._last_step = int(self.steps)
