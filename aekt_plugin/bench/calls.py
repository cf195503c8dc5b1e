"""How many ATen operators one forward+backward dispatches.

On small inputs a loss costs per operator call rather than per byte (a few microseconds each on one CPU
thread), so the count explains the "overhead" tier's times where the saved bytes explain the "memory"
tier's. Every operator that reaches the dispatcher below autograd is counted once, whichever device runs
it: the forward's, the backward's, views and in-place ones alike (a
:class:`torch.utils._python_dispatch.TorchDispatchMode` sees each of them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_aten_calls"]


class _CallCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_aten_calls(step: Callable[[], object]) -> int:
    """ATen operators dispatched by one call of ``step`` (e.g. one forward+backward of a loss).

    ``step`` runs once uncounted first: a first call may fill caches (the fused kernel builds its 0-d
    constants once), which later calls -- the ones a training loop makes -- do not pay.

    Example:
        >>> x = torch.randn(3)
        >>> count_aten_calls(lambda: x.exp().sum())  # exp, sum
        2
    """
    step()
    with _CallCounter() as counter:
        step()
    return counter.calls
