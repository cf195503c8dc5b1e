r"""The loss-kernel benchmark behind ``aekt bench`` (SPEC §5).

What is measured
----------------
Forward **and** backward with respect to the student logits (``torch.autograd.grad(loss, z)``) of

================== ==================================================================================
``kd_plain``        ``T²·kl_div(log_softmax(z/T), log_softmax(v/T), log_target=True)``, timm's KD
``dkd_mdistiller``  DKD by mdistiller's algorithm (:func:`aekt_plugin._baselines.dkd_mdistiller`)
``aekt_reference``  the readable autograd AEKT of :mod:`aekt_plugin.reference`
``kd_fused``        :func:`aekt_plugin.kd_loss` (fused kernel, ``validate_args=False``)
``dkd_fused``       :func:`aekt_plugin.dkd_loss` (fused kernel, ``validate_args=False``)
``aekt_fused``      :func:`aekt_plugin.aekt_loss` (fused kernel, ``validate_args=False``)
================== ==================================================================================

on ``(B, C)`` float logits, plus the bytes each loss saves for backward and, as the end-to-end view, the
time of one full training step (forward, loss, backward, SGD step) of a small CNN on 28×28 images with
each loss next to the cross-entropy.

How it is timed
---------------
Absolute times on a shared machine mean little, so every figure is a *ratio measured in one process*:

* each method is warmed up, then calibrated to a block of ``n`` calls lasting at least ``--min-block-ms``;
* ``--rounds`` rounds follow; in each round every method runs one block, **in a freshly shuffled order**,
  so that load from other processes and clock drift fall on all methods alike;
* a method's time is the median over rounds of its per-call time; its ratio to a baseline is the median
  over rounds of the *paired* per-round ratio (both blocks ran within milliseconds of each other), which
  cancels slow drift better than a ratio of medians.

On CPU the thread count is pinned (``torch.set_num_threads``, default 1, reported: with two threads on a
two-core machine small ops become orders of magnitude slower) and blocks are timed, by default, in CPU
time of the timing thread (``time.thread_time``; process CPU time with several threads), which other
processes on a shared machine cannot inflate by taking the core away; ``--clock wall`` uses
``time.perf_counter``. On CUDA each block is timed with CUDA events after a synchronisation, and the peak
memory of one forward+backward is reported.

Saved bytes
-----------
Every tensor autograd saves for backward passes through
:class:`torch.autograd.graph.saved_tensors_hooks`. Three counts are reported: ``saved_bytes`` (sum of
``numel·element_size`` over the saved tensors, as an op sees them), ``saved_bytes_unique`` (bytes of the
distinct storages behind them -- what the graph actually keeps alive) and ``saved_bytes_new`` (the unique
storages that are not the inputs themselves). Tensors a custom ``autograd.Function`` stores as plain
``ctx`` attributes bypass those hooks; they are found by walking the graph and reported as
``ctx_attr_bytes`` so that nothing is hidden.

Targets (SPEC §5, fused AEKT, fp32, one CPU thread)
----------------------------------------------------
``B·C >= 131072`` ("memory" tier, e.g. (512, 1000), (1024, 1000)): ≤ 1.15 × ``kd_plain`` and
≤ 0.35 × ``dkd_mdistiller``; smaller ("overhead" tier, e.g. (64, 100), (256, 100)): ≤ 2 × ``kd_plain`` and
≤ 0.5 × ``dkd_mdistiller``; always ≤ 0.5 × ``aekt_reference``; ``saved_bytes_unique`` ≤ that of
``kd_plain`` and ≤ two ``B×C`` tensors plus ``O(B)``. Targets are judged on any device and dtype, but they
are *defined* for fp32 on one CPU thread; the report says which configuration it judged.

Use ``aekt bench --help`` (or ``python benchmarks/kernel.py --help``) for the options.
"""

from __future__ import annotations

import argparse
import datetime as _datetime
import gc
import inspect
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._baselines import dkd_mdistiller, kd_plain

__all__ = [
    "DEFAULT_SHAPES",
    "KERNEL_METHODS",
    "E2E_METHODS",
    "SCHEMA",
    "add_bench_arguments",
    "run_bench",
    "benchmark",
    "count_saved_bytes",
    "SavedBytes",
    "to_markdown",
    "main",
]

_logger = logging.getLogger(__name__)

SCHEMA = "aekt-bench/1"
"""Identifier of the JSON layout written by ``--json`` (bumped when a field changes meaning)."""

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((64, 100), (256, 100), (512, 1000), (1024, 1000))
KERNEL_METHODS: tuple[str, ...] = (
    "kd_plain",
    "dkd_mdistiller",
    "aekt_reference",
    "kd_fused",
    "dkd_fused",
    "aekt_fused",
)
BASELINES: tuple[str, ...] = ("kd_plain", "dkd_mdistiller", "aekt_reference")
E2E_METHODS: tuple[str, ...] = (
    "ce_only",
    "kd_plain",
    "kd_fused",
    "dkd_fused",
    "aekt_fused",
    "aekt_reference",
)

MEMORY_TIER_NUMEL = 131072
"""``B·C`` from which a shape is in the "memory" tier of SPEC §5 (passes over memory dominate)."""

_TIER_LIMITS = {  # (× kd_plain, × dkd_mdistiller), SPEC §5
    "memory": (1.15, 0.35),
    "overhead": (2.0, 0.5),
}
_REFERENCE_LIMIT = 0.5
_O_B_BYTES_PER_SAMPLE = 64
"""Allowance per sample for the ``O(B)`` part of the saved-bytes bound (eight 8-byte scalars per row)."""

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------------
# Saved-for-backward accounting
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedBytes:
    """What autograd keeps for backward after one forward pass (see the module docstring)."""

    saved_tensors: int
    saved_bytes: int
    saved_bytes_unique: int
    saved_bytes_new: int
    ctx_attr_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "saved_tensors": self.saved_tensors,
            "saved_bytes": self.saved_bytes,
            "saved_bytes_unique": self.saved_bytes_unique,
            "saved_bytes_new": self.saved_bytes_new,
            "ctx_attr_bytes": self.ctx_attr_bytes,
        }


def _storage_key(tensor: Tensor) -> tuple[Any, int, int]:
    """``(key, bytes)`` identifying the storage behind ``tensor`` (its own bytes when it has none)."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes(), 0
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a storage
        return ("id", id(tensor)), tensor.numel() * tensor.element_size(), 1


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


def count_saved_bytes(loss_fn: Callable[..., Tensor], *inputs: Tensor) -> SavedBytes:
    r"""Bytes that ``loss_fn(*inputs)`` saves for its backward pass.

    Every tensor autograd saves goes through :class:`torch.autograd.graph.saved_tensors_hooks` during the
    forward pass and is recorded. ``saved_bytes`` is ``Σ numel·element_size`` over those tensors;
    ``saved_bytes_unique`` counts each distinct storage once (views and repeated saves of one tensor share
    storage); ``saved_bytes_new`` leaves out the storages of ``inputs`` (alive anyway);
    ``ctx_attr_bytes`` is the unique storage of tensors stashed as attributes of graph nodes, which the hooks
    cannot see.

    Args:
        loss_fn: callable returning a tensor with a ``grad_fn``.
        inputs: its positional arguments.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> count_saved_bytes(lambda t: (t * t).sum(), x).saved_bytes  # mul saves both operands
        96
    """
    saved: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor)
        return tensor

    def unpack(tensor: Tensor) -> Tensor:
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = loss_fn(*inputs)
    if out.grad_fn is None:
        raise ValueError("loss_fn must return a tensor attached to the autograd graph (grad_fn is None)")

    input_keys = {_storage_key(t)[0] for t in inputs if isinstance(t, Tensor)}
    unique: dict[Any, int] = {}
    for tensor in saved:
        key, nbytes, _ = _storage_key(tensor)
        unique[key] = nbytes
    ctx_unique: dict[Any, int] = {}
    for tensor in _graph_ctx_tensors(out):
        key, nbytes, _ = _storage_key(tensor)
        ctx_unique[key] = nbytes
    return SavedBytes(
        saved_tensors=len(saved),
        saved_bytes=sum(t.numel() * t.element_size() for t in saved),
        saved_bytes_unique=sum(unique.values()),
        saved_bytes_new=sum(n for k, n in unique.items() if k not in input_keys),
        ctx_attr_bytes=sum(ctx_unique.values()),
    )


# --------------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------------


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def kernel_methods(*, temperature: float, alpha: float, beta: float) -> dict[str, LossFn]:
    """The six losses of the kernel benchmark, each ``fn(z, v, target) -> scalar`` (batch mean).

    Fused and reference losses use the package defaults for every other option (``max_weight``,
    ``normalize_weight``), with ``validate_args=False``.
    """
    import aekt_plugin
    from aekt_plugin import reference

    def no_checks(fn: Callable[..., Tensor]) -> dict[str, Any]:
        return {"validate_args": False} if _accepts(fn, "validate_args") else {}

    fused_kw = no_checks(aekt_plugin.aekt_loss)
    ref_kw = no_checks(reference.aekt_loss)
    return {
        "kd_plain": lambda z, v, y: kd_plain(z, v, temperature),
        "dkd_mdistiller": lambda z, v, y: dkd_mdistiller(
            z, v, y, alpha=alpha, beta=beta, temperature=temperature
        ),
        "aekt_reference": lambda z, v, y: reference.aekt_loss(
            z, v, y, temperature=temperature, alpha=alpha, beta=beta, **ref_kw
        ),
        "kd_fused": lambda z, v, y: aekt_plugin.kd_loss(z, v, y, temperature=temperature, **fused_kw),
        "dkd_fused": lambda z, v, y: aekt_plugin.dkd_loss(
            z, v, y, temperature=temperature, alpha=alpha, beta=beta, **fused_kw
        ),
        "aekt_fused": lambda z, v, y: aekt_plugin.aekt_loss(
            z, v, y, temperature=temperature, alpha=alpha, beta=beta, **fused_kw
        ),
    }


_AGREEMENT_PAIRS = (
    ("kd_fused", "kd_plain"),
    ("dkd_fused", "dkd_mdistiller"),
    ("aekt_fused", "aekt_reference"),
)


def _make_inputs(batch: int, classes: int, *, device: torch.device, dtype: torch.dtype, seed: int):
    """Student logits (leaf, requires grad), detached teacher logits and int64 targets, seeded."""
    gen = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(batch, classes, generator=gen)).to(device=device, dtype=dtype)
    teacher = (3.0 * torch.randn(batch, classes, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    student.requires_grad_(True)
    return student, teacher, target


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("cpu", "wall")
"""``cpu``: CPU time of the timing thread (one thread) or of the process (several), immune to being
descheduled by other processes on a shared machine; ``wall``: ``time.perf_counter``. CUDA uses events."""


def _cpu_clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def _time_block(step: Callable[[], None], calls: int, device: torch.device, clock: str = "cpu") -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``step``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / calls
    now = _cpu_clock() if clock == "cpu" else time.perf_counter
    begin = now()
    for _ in range(calls):
        step()
    return (now() - begin) / calls


def _calibrate(
    step: Callable[[], None], min_block_s: float, device: torch.device, clock: str, max_calls: int = 10_000
) -> int:
    """Number of calls making one block last at least ``min_block_s`` (at least 1)."""
    calls = 1
    while True:
        per_call = _time_block(step, calls, device, clock)
        if per_call * calls >= min_block_s or calls >= max_calls:
            return max(1, min(max_calls, math.ceil(min_block_s / max(per_call, 1e-9))))
        calls = min(max_calls, calls * 4)


def _progress(iterable: Iterable[Any], *, desc: str, total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional (demo) dependency; the benchmark runs without bars
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def interleaved_timing(
    steps: dict[str, Callable[[], None]],
    *,
    rounds: int,
    warmup: int,
    min_block_s: float,
    device: torch.device,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
    desc: str = "timing",
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-round seconds per call of each step, blocks run in a shuffled order every round.

    Returns ``(times, calls)``: ``times[name][r]`` is the per-call time of ``name`` in round ``r`` and
    ``calls[name]`` the block length found by calibration.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    calls = {name: _calibrate(step, min_block_s, device, clock) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in _progress(range(rounds), desc=desc, total=rounds, enabled=progress):
            rng.shuffle(order)
            for name in order:
                times[name].append(_time_block(steps[name], calls[name], device, clock))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, calls


def _summarise(times: dict[str, list[float]], baselines: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median/quartile times and paired ratios (median over rounds of per-round ratios)."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        entry: dict[str, Any] = {
            "median_s": statistics.median(values),
            "p25_s": _quantile(values, 0.25),
            "p75_s": _quantile(values, 0.75),
            "min_s": min(values),
        }
        for base in baselines:
            if base in times:
                ratios = [a / b for a, b in zip(values, times[base], strict=True)]
                entry[f"ratio_{base}"] = statistics.median(ratios)
                entry[f"ratio_{base}_p25"] = _quantile(ratios, 0.25)
                entry[f"ratio_{base}_p75"] = _quantile(ratios, 0.75)
        out[name] = entry
    return out


def _peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory allocated by one call of ``step`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


# --------------------------------------------------------------------------------------------------------
# Kernel benchmark and targets
# --------------------------------------------------------------------------------------------------------


def shape_tier(batch: int, classes: int) -> str:
    """``"memory"`` when ``B·C >= 131072`` (passes over memory dominate), else ``"overhead"``."""
    return "memory" if batch * classes >= MEMORY_TIER_NUMEL else "overhead"


def _targets(
    batch: int, classes: int, methods: dict[str, dict[str, Any]], element_size: int
) -> list[dict[str, Any]]:
    """Pass/fail of the fused AEKT kernel against SPEC §5 at one shape."""
    if "aekt_fused" not in methods:
        return []
    fused = methods["aekt_fused"]
    tier = shape_tier(batch, classes)
    vs_kd, vs_dkd = _TIER_LIMITS[tier]
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float) -> None:
        if value is not None:
            checks.append({"name": name, "value": value, "limit": limit, "passed": bool(value <= limit)})

    check("time / kd_plain", fused.get("ratio_kd_plain"), vs_kd)
    check("time / dkd_mdistiller", fused.get("ratio_dkd_mdistiller"), vs_dkd)
    check("time / aekt_reference", fused.get("ratio_aekt_reference"), _REFERENCE_LIMIT)
    saved = fused["saved_bytes_unique"] + fused["ctx_attr_bytes"]
    if "kd_plain" in methods:
        kd_saved = methods["kd_plain"]["saved_bytes_unique"] + methods["kd_plain"]["ctx_attr_bytes"]
        check("saved bytes / kd_plain", saved / max(kd_saved, 1), 1.0)
    bound = 2 * batch * classes * element_size + _O_B_BYTES_PER_SAMPLE * batch
    check("saved bytes / (2·B·C·elem + O(B))", saved / bound, 1.0)
    return checks


def _agreement(methods: dict[str, LossFn], z: Tensor, v: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """Max |difference| of loss and gradient between each fused loss and its baseline (sanity check)."""
    values: dict[str, tuple[Tensor, Tensor]] = {}
    for name, fn in methods.items():
        loss = fn(z, v, y)
        (grad,) = torch.autograd.grad(loss, z)
        values[name] = (loss.detach().double(), grad.double())
    out = {}
    for fused, base in _AGREEMENT_PAIRS:
        if fused in values and base in values:
            out[f"{fused}~{base}"] = {
                "loss_abs_diff": float((values[fused][0] - values[base][0]).abs()),
                "grad_max_abs_diff": float((values[fused][1] - values[base][1]).abs().max()),
            }
    return out


def _kernel_step(fn: LossFn, z: Tensor, v: Tensor, y: Tensor) -> Callable[[], None]:
    """One forward+backward of ``fn`` with respect to the student logits ``z``."""

    def step() -> None:
        torch.autograd.grad(fn(z, v, y), z)

    return step


def kernel_benchmark(
    shapes: Sequence[tuple[int, int]],
    *,
    methods: Sequence[str] = KERNEL_METHODS,
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    rounds: int = 51,
    warmup: int = 5,
    min_block_s: float = 0.005,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Time, paired ratios, saved bytes (and CUDA peak memory) of each method at each shape."""
    all_methods = kernel_methods(temperature=temperature, alpha=alpha, beta=beta)
    chosen = {name: all_methods[name] for name in methods}
    results = []
    for batch, classes in shapes:
        z, v, y = _make_inputs(batch, classes, device=device, dtype=dtype, seed=seed)

        steps = {name: _kernel_step(fn, z, v, y) for name, fn in chosen.items()}
        times, calls = interleaved_timing(
            steps,
            rounds=rounds,
            warmup=warmup,
            min_block_s=min_block_s,
            device=device,
            seed=seed,
            clock=clock,
            progress=progress,
            desc=f"kernel {batch}x{classes}",
        )
        summary = _summarise(times, [b for b in BASELINES if b in chosen])
        for name, fn in chosen.items():
            summary[name]["calls_per_block"] = calls[name]
            summary[name].update(count_saved_bytes(fn, z, v, y).as_dict())
            summary[name]["peak_memory_bytes"] = _peak_memory(steps[name], device)
        results.append(
            {
                "shape": [batch, classes],
                "tier": shape_tier(batch, classes),
                "methods": summary,
                "agreement": _agreement(chosen, z, v, y),
                "targets": _targets(batch, classes, summary, z.element_size()),
            }
        )
    return results


# --------------------------------------------------------------------------------------------------------
# End-to-end: one training step of a small CNN
# --------------------------------------------------------------------------------------------------------


class _SmallCNN(nn.Module):
    """Two 3×3 conv blocks (BatchNorm, ReLU, 2×2 max-pool) and a linear head for ``(B, 1, 28, 28)`` images."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 7 * 7, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def end_to_end_benchmark(
    *,
    batch: int = 128,
    num_classes: int = 100,
    methods: Sequence[str] = E2E_METHODS,
    device: torch.device,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    rounds: int = 41,
    warmup: int = 3,
    min_block_s: float = 0.05,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Seconds per training step (forward, ``CE + distillation``, backward, SGD step) with each loss.

    Each method trains its own copy of one seeded :class:`_SmallCNN` (fp32) on one fixed batch of
    ``(batch, 1, 28, 28)`` images; the teacher's logits are a fixed tensor, so the teacher's forward pass --
    identical for every method -- is *not* in the step, which makes the reported overhead an upper bound of
    what a real distillation step sees.
    """
    losses = kernel_methods(temperature=temperature, alpha=alpha, beta=beta)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    teacher_logits = (3.0 * torch.randn(batch, num_classes, generator=gen)).to(device)
    torch.manual_seed(seed)
    template = _SmallCNN(num_classes).to(device)

    def make_step(name: str) -> Callable[[], None]:
        model = _SmallCNN(num_classes).to(device)
        model.load_state_dict(template.state_dict())
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        kd = None if name == "ce_only" else losses[name]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if kd is not None:
                loss = loss + kd(logits, teacher_logits, labels)
            loss.backward()
            optimizer.step()

        return step

    steps = {name: make_step(name) for name in methods}
    # The loss alone (forward+backward on logits of the step's shape), timed in the same rounds: the
    # step-time difference between two losses is a few percent at most, below the noise of a shared
    # machine, while this difference divided by the step time estimates it robustly.
    logits = (2.0 * torch.randn(batch, num_classes, generator=gen)).to(device).requires_grad_(True)
    loss_only = [name for name in methods if name != "ce_only"]
    for name in loss_only:
        steps[f"loss/{name}"] = _kernel_step(losses[name], logits, teacher_logits, labels)
    times, calls = interleaved_timing(
        steps,
        rounds=rounds,
        warmup=warmup,
        min_block_s=min_block_s,
        device=device,
        seed=seed,
        clock=clock,
        progress=progress,
        desc="end-to-end",
    )
    bases = [b for b in ("ce_only", "kd_plain", "kd_fused") if b in methods]
    summary = _summarise({name: times[name] for name in methods}, bases)
    for name in summary:
        summary[name]["calls_per_block"] = calls[name]
        for base in bases:
            summary[name][f"overhead_vs_{base}_percent"] = 100.0 * (summary[name][f"ratio_{base}"] - 1.0)
        if name in loss_only:
            loss_time = statistics.median(times[f"loss/{name}"])
            summary[name]["loss_only_median_s"] = loss_time
            summary[name]["loss_share_percent"] = 100.0 * loss_time / summary[name]["median_s"]
            if "kd_plain" in loss_only:
                kd_time = statistics.median(times["loss/kd_plain"])
                summary[name]["estimated_overhead_vs_kd_plain_percent"] = (
                    100.0 * (loss_time - kd_time) / summary["kd_plain"]["median_s"]
                )
    return {
        "model": "SmallCNN(conv16-bn-relu-pool, conv32-bn-relu-pool, linear)",
        "parameters": sum(p.numel() for p in template.parameters()),
        "batch": batch,
        "image_shape": [1, 28, 28],
        "num_classes": num_classes,
        "optimizer": "SGD(lr=0.01, momentum=0.9)",
        "teacher_forward_included": False,
        "estimate": "estimated_overhead_vs_kd_plain_percent = (loss-only time - kd_plain loss-only time) "
        "/ kd_plain step time",
        "methods": summary,
    }


# --------------------------------------------------------------------------------------------------------
# Driver, report and command line
# --------------------------------------------------------------------------------------------------------


def _source_revision() -> str | None:
    """Git commit of the measured ``aekt_plugin`` sources (``+dirty`` if a loaded module differs from it)."""
    package_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        loaded = sorted(  # only the package's modules this process imported (the kernel, the baselines, ...)
            str(Path(module.__file__).resolve())
            for name, module in list(sys.modules.items())
            if name.startswith("aekt_plugin") and getattr(module, "__file__", None)
        )
        dirty = subprocess.run(
            ["git", "-C", str(package_dir), "status", "--porcelain", "--", *(loaded or ["."])],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def _environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    import aekt_plugin

    env: dict[str, Any] = {
        "device": device.type,
        "device_name": platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aekt_plugin": getattr(aekt_plugin, "__version__", None),
        "aekt_plugin_revision": _source_revision(),
        "timestamp": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        env["device_name"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def benchmark(
    *,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    methods: Sequence[str] = KERNEL_METHODS,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    threads: int = 1,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    rounds: int = 51,
    warmup: int = 5,
    min_block_ms: float = 5.0,
    seed: int = 0,
    clock: str = "cpu",
    e2e: bool = True,
    e2e_batch: int = 128,
    e2e_classes: int = 100,
    e2e_rounds: int = 41,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the kernel benchmark (and the end-to-end step) and return the JSON-ready result.

    ``torch.set_num_threads(threads)`` is set for the duration of the call and restored afterwards.
    Raises ``ValueError`` naming the argument on bad input (unknown method, non-positive shapes, ...).
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype)
    shapes = [tuple(map(int, s)) for s in shapes]  # type: ignore[misc]
    for batch, classes in shapes:
        if batch < 1 or classes < 2:
            raise ValueError(f"shapes: need B >= 1 and C >= 2, got ({batch}, {classes})")
    unknown = sorted(set(methods) - set(KERNEL_METHODS))
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(KERNEL_METHODS)}")
    if not methods:
        raise ValueError("methods: choose at least one")
    for name, value in (
        ("threads", threads),
        ("rounds", rounds),
        ("e2e_rounds", e2e_rounds),
        ("e2e_batch", e2e_batch),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0 or min_block_ms < 0:
        raise ValueError(f"warmup and min_block_ms must be >= 0, got {warmup}, {min_block_ms}")
    if e2e_classes < 2:
        raise ValueError(f"e2e_classes must be >= 2, got {e2e_classes}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        import aekt_plugin

        result: dict[str, Any] = {
            "schema": SCHEMA,
            "environment": _environment(device, dtype, threads),
            "settings": {
                "temperature": temperature,
                "alpha": alpha,
                "beta": beta,
                "aekt_defaults": {k: aekt_plugin.DEFAULTS[k] for k in ("max_weight", "normalize_weight")},
                "rounds": rounds,
                "warmup": warmup,
                "min_block_ms": min_block_ms,
                "seed": seed,
                "clock": _clock_name(device, clock),
                "timing": "forward+backward w.r.t. student logits; median over interleaved rounds; "
                "ratios are medians of per-round paired ratios",
            },
            "kernel": kernel_benchmark(
                shapes,
                methods=methods,
                device=device,
                dtype=dtype,
                temperature=temperature,
                alpha=alpha,
                beta=beta,
                rounds=rounds,
                warmup=warmup,
                min_block_s=min_block_ms / 1000.0,
                seed=seed,
                clock=clock,
                progress=progress,
            ),
            "end_to_end": None,
        }
        if e2e:
            e2e_methods = [m for m in E2E_METHODS if m == "ce_only" or m in methods]
            result["end_to_end"] = end_to_end_benchmark(
                batch=e2e_batch,
                num_classes=e2e_classes,
                methods=e2e_methods,
                device=device,
                temperature=temperature,
                alpha=alpha,
                beta=beta,
                rounds=e2e_rounds,
                seed=seed,
                clock=clock,
                progress=progress,
            )
    finally:
        torch.set_num_threads(previous_threads)
    checks = [c for entry in result["kernel"] for c in entry["targets"]]
    result["targets_judged_on"] = (
        "fp32, one CPU thread (as SPEC §5 defines them)"
        if device.type == "cpu" and dtype == torch.float32 and threads == 1
        else f"{result['environment']['dtype']} on {device.type} with {threads} thread(s) "
        "(SPEC §5 defines the targets for fp32 on one CPU thread; indicative only)"
    )
    result["passed"] = bool(checks) and all(c["passed"] for c in checks)
    return result


def _clock_name(device: torch.device, clock: str) -> str:
    if device.type == "cuda":
        return "cuda events"
    if clock == "wall":
        return "wall (time.perf_counter)"
    return "thread CPU time (time.thread_time)" if torch.get_num_threads() == 1 else "process CPU time"


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: cannot parse {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: only 'cpu', 'cuda' or 'auto' are supported, got {device!r}")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype: expected a floating dtype among {list(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64x100,512x1000"`` -> ``[(64, 100), (512, 1000)]``; ``ValueError`` naming ``--shapes`` otherwise."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            batch, classes = (int(part) for part in item.split("x"))
        except ValueError as exc:
            raise ValueError(f"--shapes: expected BxC items like '512x1000', got {item!r}") from exc
        shapes.append((batch, classes))
    if not shapes:
        raise ValueError("--shapes: no shape given")
    return shapes


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def _fmt_bytes(nbytes: int | None) -> str:
    if nbytes is None:
        return "–"
    if nbytes < 1024 * 1024:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"


def _fmt_ratio(entry: dict[str, Any], base: str) -> str:
    value = entry.get(f"ratio_{base}")
    if value is None:
        return "–"
    return f"{value:.2f} ({entry[f'ratio_{base}_p25']:.2f}–{entry[f'ratio_{base}_p75']:.2f})"


def to_markdown(result: dict[str, Any]) -> str:
    """The benchmark result as markdown tables (environment first, then one table per shape)."""
    env, settings = result["environment"], result["settings"]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines = [
        "# `aekt bench` — loss-kernel benchmark",
        "",
        f"- device: **{env['device']}** ({env['device_name']}), dtype **{env['dtype']}**, "
        f"threads **{env['threads']}**, torch {env['torch']}, Python {env['python']}, "
        f"aekt-plugin {env.get('aekt_plugin')} ({env.get('aekt_plugin_revision') or 'no git revision'}), "
        f"{env['timestamp']}",
        f"- loss settings: T={settings['temperature']}, α={settings['alpha']}, β={settings['beta']}, "
        f"AEKT {settings['aekt_defaults']}",
        f"- timing: {settings['timing']}; clock: {settings['clock']}; {settings['rounds']} rounds, "
        f"blocks ≥ {settings['min_block_ms']} ms. "
        "Ratios show median (interquartile range) of the paired per-round ratios.",
        "- saved = unique storages autograd keeps for backward (+ tensors stored on `ctx`); "
        "`new` excludes the inputs themselves.",
        f"- targets judged on: {result['targets_judged_on']}; overall: **{verdict}**",
        "",
    ]
    for entry in result["kernel"]:
        batch, classes = entry["shape"]
        lines += [
            f"## ({batch}, {classes}) — {entry['tier']} tier",
            "",
            "| method | median time | × kd_plain | × dkd_mdistiller | × aekt_reference | saved (unique) | "
            "saved (new) | saved tensors | peak mem |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in entry["methods"].items():
            lines.append(
                f"| `{name}` | {_fmt_time(m['median_s'])} | {_fmt_ratio(m, 'kd_plain')} | "
                f"{_fmt_ratio(m, 'dkd_mdistiller')} | {_fmt_ratio(m, 'aekt_reference')} | "
                f"{_fmt_bytes(m['saved_bytes_unique'] + m['ctx_attr_bytes'])} | "
                f"{_fmt_bytes(m['saved_bytes_new'])} | "
                f"{m['saved_tensors']} | {_fmt_bytes(m['peak_memory_bytes'])} |"
            )
        if entry["targets"]:
            lines += ["", "| fused AEKT target | value | limit | result |", "|---|---:|---:|---|"]
            for check in entry["targets"]:
                verdict = "pass" if check["passed"] else "**FAIL**"
                lines.append(f"| {check['name']} | {check['value']:.3f} | {check['limit']:.2f} | {verdict} |")
        if entry["agreement"]:
            agree = ", ".join(
                f"{pair}: loss {d['loss_abs_diff']:.1e}, grad {d['grad_max_abs_diff']:.1e}"
                for pair, d in entry["agreement"].items()
            )
            lines += ["", f"Agreement (max abs diff): {agree}."]
        lines.append("")
    e2e = result.get("end_to_end")
    if e2e:
        lines += [
            f"## End-to-end training step ({e2e['model']}, {e2e['parameters']} parameters, "
            f"batch {e2e['batch']}×1×28×28, {e2e['num_classes']} classes, {e2e['optimizer']}, "
            "teacher forward not included)",
            "",
            "| loss next to CE | median step | measured overhead vs CE only | vs kd_plain | vs kd_fused "
            "| loss fwd+bwd alone | loss share of step | estimated overhead vs kd_plain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in e2e["methods"].items():
            cells = [
                f"{m[f'overhead_vs_{b}_percent']:+.1f} %" if f"overhead_vs_{b}_percent" in m else "–"
                for b in ("ce_only", "kd_plain", "kd_fused")
            ]
            cells.append(_fmt_time(m["loss_only_median_s"]) if "loss_only_median_s" in m else "–")
            cells.append(f"{m['loss_share_percent']:.1f} %" if "loss_share_percent" in m else "–")
            estimate = m.get("estimated_overhead_vs_kd_plain_percent")
            cells.append(f"{estimate:+.2f} %" if estimate is not None else "–")
            lines.append(f"| `{name}` | {_fmt_time(m['median_s'])} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Measured overheads are medians of paired per-round step-time ratios; differences of a few "
            "percent are within the noise of a shared machine. The estimate is (loss-alone time − "
            "kd_plain's loss-alone time) / kd_plain's step time, from the same rounds.",
            "",
        ]
    return "\n".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``aekt bench`` to ``parser`` (used by the ``aekt`` CLI and benchmarks/kernel.py)."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (cuda when available; default auto)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(_DTYPES), help="logit dtype (default float32)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads for the run (default 1)"
    )
    parser.add_argument(
        "--shapes",
        default=",".join(f"{b}x{c}" for b, c in DEFAULT_SHAPES),
        help="comma-separated BxC logit shapes (default %(default)s)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(KERNEL_METHODS),
        help="comma-separated subset of %(default)s",
    )
    parser.add_argument("--temperature", type=float, default=4.0, help="T (default 4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="α of DKD/AEKT (default 1)")
    parser.add_argument("--beta", type=float, default=8.0, help="β of DKD/AEKT (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=51, help="interleaved timing rounds per shape (default 51)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="warm-up calls per method (default 5)")
    parser.add_argument(
        "--min-block-ms", type=float, default=5.0, help="minimum length of a timed block (default 5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the shuffled order")
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=CLOCKS,
        help="CPU timer: cpu = CPU time of the timing thread, unaffected by other processes taking the core "
        "(default); wall = time.perf_counter. CUDA always uses events",
    )
    parser.add_argument(
        "--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end training step"
    )
    parser.add_argument("--e2e-batch", type=int, default=128, help="images per training step (default 128)")
    parser.add_argument("--e2e-classes", type=int, default=100, help="classes of the CNN head (default 100)")
    parser.add_argument("--e2e-rounds", type=int, default=41, help="interleaved rounds of the training step")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result as JSON")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="PATH", help="write the markdown tables"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a SPEC §5 target fails"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no table on stdout")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run ``aekt bench`` from parsed arguments; print the table, write ``--json``/``--markdown``.

    Returns the exit status: 0; 1 with ``--strict`` when a target of SPEC §5 is missed; 2 on a bad option
    (the message, naming the option, goes to stderr).
    """
    try:
        result = _benchmark_from_args(args)
    except ValueError as exc:
        print(f"aekt bench: error: {exc}", file=sys.stderr)
        return 2
    table = to_markdown(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if not args.quiet:
        print(table)
    return 1 if (args.strict and not result["passed"]) else 0


def _benchmark_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return benchmark(
        shapes=parse_shapes(args.shapes),
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        temperature=args.temperature,
        alpha=args.alpha,
        beta=args.beta,
        rounds=args.rounds,
        warmup=args.warmup,
        min_block_ms=args.min_block_ms,
        seed=args.seed,
        clock=args.clock,
        e2e=args.e2e,
        e2e_batch=args.e2e_batch,
        e2e_classes=args.e2e_classes,
        e2e_rounds=args.e2e_rounds,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aekt_plugin.bench`` / ``benchmarks/kernel.py``: the same as ``aekt bench``."""
    parser = add_bench_arguments(
        argparse.ArgumentParser(prog="aekt bench", description=__doc__.split("\n\n")[0])
    )
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
