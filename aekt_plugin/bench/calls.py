"""How many ATen operators one forward+backward dispatches.

On small inputs a loss costs per operator call rather than per byte (a few microseconds each on one CPU
thread), so the count explains the "overhead" tier's times where the saved bytes explain the "memory"
tier's. Every operator that reaches the dispatcher below autograd is counted once, whichever device runs
it: the forward's, the backward's, views and in-place ones alike (a
:class:`torch.utils._python_dispatch.TorchDispatchMode` sees each of them).

:func:`record_aten_calls` keeps those calls to be run again on their own: the time of a replay is the
*dispatch floor* of a loss, what its operators cost with no Python around them and no autograd graph,
which no rewriting of the Python that issues the same operators can go below.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AtenReplay", "count_aten_calls", "record_aten_calls"]


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


class AtenReplay:
    """The ATen calls of one step, replayable: ``replay()`` dispatches the same operators on the same
    inputs again, in order, under inference mode, and returns the last call's result.

    A tensor an earlier call produced is taken from this replay's own results (an in-place call's result
    is its argument, so in-place chains stay chains); any other tensor -- the step's inputs, cached
    constants -- is the recorded object itself, only read (the replay holds it). Every replay therefore
    computes what the recorded step computed, values included (a drifting input would change the time of
    ``exp``). The replay loop does as little as it can per call, so that its time is the operators'.
    """

    def __init__(self, calls: list[_Call]) -> None:
        self._calls = calls
        self._results = sum(len(call.slots) for call in calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __call__(self) -> Any:
        produced: list[Any] = [None] * self._results
        result = None
        with torch.inference_mode():
            for call in self._calls:
                args = call.args
                if call.substitutions or call.list_substitutions:
                    args = list(args)
                    for position, slot in call.substitutions:
                        args[position] = produced[slot]
                    for position, slots in call.list_substitutions:
                        args[position] = [produced[slot] if slot >= 0 else item for slot, item in slots]
                kwargs = call.kwargs
                if call.keyword_substitutions:
                    kwargs = dict(kwargs)
                    for name, slot in call.keyword_substitutions:
                        kwargs[name] = produced[slot]
                result = call.op(*args, **kwargs)
                if call.returns_sequence:
                    for slot, value in zip(call.slots, result, strict=True):
                        produced[slot] = value
                else:
                    produced[call.slots[0]] = result
        return result


class _Call(NamedTuple):
    op: Callable[..., Any]
    args: tuple
    kwargs: dict
    substitutions: list[tuple[int, int]]  # (argument position, slot of the tensor an earlier call produced)
    list_substitutions: list[tuple[int, list[tuple[int, Any]]]]  # the same inside a list argument
    keyword_substitutions: list[tuple[str, int]]  # the same for a keyword argument (out=)
    slots: list[int]  # where the replay keeps the call's results
    returns_sequence: bool  # a tuple or list of results (unbind, ...), not one


class _CallRecorder(TorchDispatchMode):
    """Records each call with the tensors earlier calls produced replaced by their slots. It holds no
    reference to a produced tensor (only weak ones): a kept tensor would change what the step dispatches
    (autograd takes over a gradient buffer that nothing else references, and copies one that is shared).

    A tensor literal (``torch.tensor(...)``: ``lift_fresh``, then ``detach_`` on it) is left out and its
    tensor kept as a constant: the fused kernel makes its 0-d constants afresh while any dispatch mode is
    active, where outside one it takes them from its cache, so the replay reuses them as the real step does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self._slots: dict[int, tuple[weakref.ref, int]] = {}  # id of a produced tensor -> (it, its slot)
        self._produced = 0
        self._literals: dict[int, weakref.ref] = {}  # id of a literal -> it

    def _is_literal(self, value: Tensor) -> bool:
        reference = self._literals.get(id(value))
        return reference is not None and reference() is value

    def _slot(self, value: Any) -> int:
        if not isinstance(value, Tensor):
            return -1
        reference, slot = self._slots.get(id(value), (None, -1))
        return slot if reference is not None and reference() is value else -1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.lift_fresh.default or (
            func is torch.ops.aten.detach_.default and self._is_literal(args[0])
        ):
            result = func(*args, **kwargs)
            self._literals[id(result)] = weakref.ref(result)
            return result
        stored_args, stored_kwargs = list(args), dict(kwargs)
        substitutions, list_substitutions, keyword_substitutions = [], [], []
        for position, value in enumerate(args):
            slot = self._slot(value)
            if slot >= 0:
                substitutions.append((position, slot))
                stored_args[position] = None
            elif isinstance(value, (list, tuple)):
                item_slots = [self._slot(item) for item in value]
                items = [(slot, None if slot >= 0 else item) for slot, item in zip(item_slots, value)]
                if any(slot >= 0 for slot in item_slots):
                    list_substitutions.append((position, items))
                    stored_args[position] = None
        for name, value in kwargs.items():
            slot = self._slot(value)
            if slot >= 0:
                keyword_substitutions.append((name, slot))
                stored_kwargs[name] = None
        result = func(*args, **kwargs)
        returns_sequence = isinstance(result, (tuple, list))
        outputs = list(result) if returns_sequence else [result]
        slots = list(range(self._produced, self._produced + len(outputs)))
        self._produced += len(outputs)
        for slot, value in zip(slots, outputs, strict=True):
            if isinstance(value, Tensor):
                self._slots[id(value)] = (weakref.ref(value), slot)
        self.calls.append(
            _Call(
                func._op,
                tuple(stored_args),
                stored_kwargs,
                substitutions,
                list_substitutions,
                keyword_substitutions,
                slots,
                returns_sequence,
            )
        )
        return result


def record_aten_calls(step: Callable[[], object]) -> AtenReplay:
    """The ATen calls of one call of ``step`` (after an uncounted first one, as :func:`count_aten_calls`),
    as an :class:`AtenReplay`.

    Example:
        >>> x = torch.randn(3)
        >>> replay = record_aten_calls(lambda: x.exp().sum())
        >>> len(replay), bool(replay() == x.exp().sum())
        (2, True)
    """
    step()
    with _CallRecorder() as recorder:
        step()
    return AtenReplay(recorder.calls)
