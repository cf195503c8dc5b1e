r"""What a loss keeps for backward, and (on CUDA) the peak memory of one step.

Every tensor autograd saves for backward passes through :class:`torch.autograd.graph.saved_tensors_hooks`.
Three counts are reported: ``saved_bytes`` (sum of ``numel·element_size`` over the saved tensors, as an op
sees them), ``saved_bytes_unique`` (bytes of the distinct storages behind them -- what the graph actually
keeps alive) and ``saved_bytes_new`` (the unique storages that are not the inputs themselves). Tensors a
custom ``autograd.Function`` stores as plain ``ctx`` attributes bypass those hooks; they are found by
walking the graph and reported as ``ctx_attr_bytes`` so that nothing is hidden.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedBytes", "count_saved_bytes", "peak_memory"]


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
