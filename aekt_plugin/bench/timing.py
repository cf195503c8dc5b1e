r"""The timing harness: interleaved, shuffled rounds and paired per-round ratios.

Absolute times on a shared machine mean little, so every figure is a *ratio measured in one process*:

* each method is warmed up, then calibrated to a block of ``n`` calls lasting at least ``min_block_s``;
* ``rounds`` rounds follow; in each round every method runs one block, **in a freshly shuffled order**,
  so that load from other processes and clock drift fall on all methods alike;
* a method's time is the median over rounds of its per-call time; its ratio to a baseline is the median
  over rounds of the *paired* per-round ratio (both blocks ran within milliseconds of each other), which
  cancels slow drift better than a ratio of medians.

On CPU the thread count is pinned (:func:`pinned_threads`; with two threads on a two-core machine small ops
become orders of magnitude slower) and blocks are timed, by default, in CPU time of the timing thread
(``time.thread_time``; process CPU time with several threads), which other processes on a shared machine
cannot inflate by taking the core away; ``clock="wall"`` uses ``time.perf_counter``. On CUDA each block is
timed with CUDA events after a synchronisation.

Why not :class:`torch.utils.benchmark.Timer` throughout? ``Timer.blocked_autorange`` measures one
statement at a time, all of its blocks back to back, so a machine that slows down between two methods'
measurements shifts their ratio; it has no notion of pairing blocks of different statements, and on CUDA
it synchronises and reads a host clock rather than recording events. It would fit the calibration -- "how
many calls make a block of at least ``min_block_s``" -- but importing it pulls in
``torch.utils.cpp_extension`` and ``setuptools``, and on a machine with a CUDA toolkit and no GPU logs a
``CUDA_HOME`` warning on every ``aekt bench``; :func:`calibrate` reuses :func:`time_block` instead.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CLOCKS",
    "calibrate",
    "clock_name",
    "interleaved_timing",
    "paired_ratio",
    "pinned_threads",
    "summarise",
    "time_block",
]

CLOCKS = ("cpu", "wall")
"""``cpu``: CPU time of the timing thread (one thread) or of the process (several), immune to being
descheduled by other processes on a shared machine; ``wall``: ``time.perf_counter``. CUDA uses events."""


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _host_clock(clock: str) -> Callable[[], float]:
    if clock == "wall":
        return time.perf_counter
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def clock_name(device: torch.device, clock: str) -> str:
    """How blocks are timed on ``device`` with ``clock`` at the current thread count, in words."""
    if device.type == "cuda":
        return "cuda events"
    if clock == "wall":
        return "wall (time.perf_counter)"
    return "thread CPU time (time.thread_time)" if torch.get_num_threads() == 1 else "process CPU time"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], None], calls: int, device: torch.device, clock: str = "cpu") -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``step`` (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / calls
    now = _host_clock(clock)
    begin = now()
    for _ in range(calls):
        step()
    return (now() - begin) / calls


def calibrate(
    step: Callable[[], None], min_block_s: float, device: torch.device, clock: str, max_calls: int = 10_000
) -> int:
    """Number of calls (1 to ``max_calls``) that makes one block of ``step`` last at least ``min_block_s``.

    Times blocks of 1, 4, 16, ... calls with :func:`time_block` until one lasts ``min_block_s``, then
    scales the count to that length.
    """
    calls = 1
    while True:
        per_call = time_block(step, calls, device, clock)
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


def interleaved_timing(
    steps: dict[str, Callable[[], None]],
    *,
    rounds: int,
    untimed_calls: int,
    min_block_s: float,
    device: torch.device,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
    desc: str = "timing",
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-round seconds per call of each step, blocks run in a shuffled order every round.

    Returns ``(times, calls)``: ``times[name][r]`` is the per-call time of ``name`` in round ``r`` and
    ``calls[name]`` the block length found by :func:`calibrate`. The garbage collector is off during the
    rounds.
    """
    for step in steps.values():
        for _ in range(untimed_calls):
            step()
    _sync(device)
    calls = {name: calibrate(step, min_block_s, device, clock) for name, step in steps.items()}
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
                times[name].append(time_block(steps[name], calls[name], device, clock))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, calls


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def paired_ratio(values: Sequence[float], base_values: Sequence[float], base: str) -> dict[str, float]:
    """``ratio_<base>``: the median over rounds of ``values[r] / base_values[r]``, with ``_p25`` and ``_p75``
    its quartiles."""
    ratios = [a / b for a, b in zip(values, base_values, strict=True)]
    return {
        f"ratio_{base}": statistics.median(ratios),
        f"ratio_{base}_p25": _quantile(ratios, 0.25),
        f"ratio_{base}_p75": _quantile(ratios, 0.75),
    }


def summarise(times: dict[str, list[float]], bases: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median, quartiles and minimum of each method's per-call times, and its :func:`paired_ratio` against
    each of ``bases`` that was timed."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        entry: dict[str, Any] = {
            "median_s": statistics.median(values),
            "p25_s": _quantile(values, 0.25),
            "p75_s": _quantile(values, 0.75),
            "min_s": min(values),
        }
        for base in bases:
            if base in times:
                entry.update(paired_ratio(values, times[base], base))
        out[name] = entry
    return out
