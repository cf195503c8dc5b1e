r"""What a loss keeps for backward, and the peak memory of one step.

Every tensor autograd saves for backward passes through :class:`torch.autograd.graph.saved_tensors_hooks`.
Three counts are reported: ``saved_bytes`` (sum of ``numel·element_size`` over the saved tensors, as an op
sees them), ``saved_bytes_unique`` (bytes of the distinct storages behind them -- what the graph actually
keeps alive) and ``saved_bytes_new`` (the unique storages that are not the inputs themselves). Tensors a
custom ``autograd.Function`` stores as plain ``ctx`` attributes bypass those hooks; they are found by
walking the graph and reported as ``ctx_attr_bytes`` so that nothing is hidden.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedBytes", "count_saved_bytes", "extra_peak_memory", "peak_memory"]


@dataclass(frozen=True)
class SavedBytes:
    """What autograd keeps for backward after one forward pass (see the module docstring)."""

    saved_tensors: int
    saved_bytes: int
    saved_bytes_unique: int
    saved_bytes_new: int
    ctx_attr_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _storage_key(tensor: Tensor) -> tuple[Any, int]:
    """``(key, bytes)`` identifying the storage behind ``tensor`` (its own bytes when it has none)."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a storage
        return ("id", id(tensor)), tensor.numel() * tensor.element_size()


def _unique_bytes(tensors: list[Tensor]) -> dict[Any, int]:
    return dict(_storage_key(t) for t in tensors)


def _graph_ctx_tensors(root: Tensor) -> list[Tensor]:
    """Tensors held as plain attributes of the graph's nodes (``ctx.x = tensor`` in a custom Function)."""
    found: list[Tensor] = []
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            found.extend(item for item in items if isinstance(item, Tensor))
        stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))
    return found


def count_saved_bytes(loss_fn: Callable[..., Tensor], *inputs: Any) -> SavedBytes:
    r"""Bytes that ``loss_fn(*inputs)`` saves for its backward pass.

    Every tensor autograd saves goes through :class:`torch.autograd.graph.saved_tensors_hooks` during the
    forward pass and is recorded. ``saved_bytes`` is ``Σ numel·element_size`` over those tensors;
    ``saved_bytes_unique`` counts each distinct storage once (views and repeated saves of one tensor share
    storage); ``saved_bytes_new`` leaves out the storages of ``inputs`` (alive anyway);
    ``ctx_attr_bytes`` is the unique storage of tensors stashed as attributes of graph nodes, which the hooks
    cannot see.

    Args:
        loss_fn: callable returning a tensor with a ``grad_fn``.
        inputs: its positional arguments; the storages of the tensors among them are not "new".

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> count_saved_bytes(lambda t: (t * t).sum(), x).saved_bytes  # mul saves both operands
        96
    """
    saved: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = loss_fn(*inputs)
    if out.grad_fn is None:
        raise ValueError("loss_fn must return a tensor attached to the autograd graph (grad_fn is None)")

    input_keys = {_storage_key(t)[0] for t in inputs if isinstance(t, Tensor)}
    unique = _unique_bytes(saved)
    return SavedBytes(
        saved_tensors=len(saved),
        saved_bytes=sum(t.numel() * t.element_size() for t in saved),
        saved_bytes_unique=sum(unique.values()),
        saved_bytes_new=sum(n for k, n in unique.items() if k not in input_keys),
        ctx_attr_bytes=sum(_unique_bytes(_graph_ctx_tensors(out)).values()),
    )


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory allocated by one call of ``step`` above what was allocated before it (``None``
    off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def extra_peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory allocated by one call of ``step`` above what was allocated before it, on any device:
    :func:`peak_memory` on CUDA; on CPU from the allocations the profiler records
    (``profile_memory=True``: every allocation and free of the CPU allocator, in order), which costs a
    profiled call, so it is measured apart from the timing. ``None`` where the profiler has no record."""
    if device.type == "cuda":
        return peak_memory(step, device)
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silenced_stderr():  # the profiler's own start and stop lines (and a no-GPU error) go to fd 2
        profiler.start()
    try:
        step()
    finally:
        with _silenced_stderr():
            profiler.stop()
    try:
        from torch._C._profiler import _EventType

        events = profiler.profiler.kineto_results.experimental_event_tree()
        allocations = sorted(
            (event for event in _walk(events) if event.tag == _EventType.Allocation),
            key=lambda event: event.start_time_ns,
        )
    except (AttributeError, ImportError, RuntimeError):  # a torch whose profiler records differently
        return None
    allocated = peak = 0
    for event in allocations:
        allocated += event.extra_fields.alloc_size
        peak = max(peak, allocated)
    return peak


@contextmanager
def _silenced_stderr() -> Iterator[None]:
    """File descriptor 2 sent to ``os.devnull`` inside the block (C++ logging writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _walk(events: Any) -> Any:
    for event in events:
        yield event
        yield from _walk(event.children)

