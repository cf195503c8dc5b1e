"""The kernel benchmark as a function: every method at every shape, the environment, the verdict."""

from __future__ import annotations

import datetime as _datetime
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import aekt_plugin

from . import targets
from .calls import count_aten_calls
from .memory import count_saved_bytes, peak_memory
from .methods import (
    AGREEMENT_PAIRS,
    BASELINES,
    DEFAULT_SHAPES,
    KERNEL_METHODS,
    OPTIONS,
    Case,
    is_known,
    make_cases,
    make_inputs,
    split_option,
)
from .offpath import OFFPATH_ROWS, offpath_benchmark
from .timing import CLOCKS, clock_name, interleaved_timing, paired_ratio, pinned_threads, summarise

__all__ = ["DTYPES", "SCHEMA", "benchmark", "environment", "kernel_benchmark"]

SCHEMA = "aekt-bench/3"
"""Identifier of the JSON layout written by ``--json`` (bumped when a field changes meaning or goes).

2: ``end_to_end`` and ``environment.aekt_plugin_revision`` are written by ``benchmarks/kernel.py`` only,
no longer by ``aekt bench``; new per-method ``calls`` (ATen operators of one forward+backward); methods
with an option (``aekt_fused+ignore``) with ``ratio_<the loss without it>``, described in
``settings.options``.
3: ``off_path`` (the compiled, dense and memory rows of :mod:`~aekt_plugin.bench.offpath`, each with its
targets) and ``settings.offpath_rounds``; ``ratio_dkd_fused`` for every method and the overhead tier's
``time / dkd_fused`` target; ``passed`` covers the off-path targets too."""

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _agreement(cases: dict[str, Case]) -> dict[str, dict[str, float]]:
    """Max |difference| of loss and gradient between each fused loss and its baseline (sanity check)."""

    def loss_and_grad(case: Case) -> tuple[Tensor, Tensor]:
        loss = case.loss()
        (grad,) = torch.autograd.grad(loss, case.args[0])
        return loss.detach().double(), grad.double()

    out = {}
    for fused, base in AGREEMENT_PAIRS:
        if fused in cases and base in cases:
            (fused_loss, fused_grad), (base_loss, base_grad) = map(loss_and_grad, (cases[fused], cases[base]))
            out[f"{fused}~{base}"] = {
                "loss_abs_diff": float((fused_loss - base_loss).abs()),
                "grad_max_abs_diff": float((fused_grad - base_grad).abs().max()),
            }
    return out


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
    untimed_calls: int = 5,
    min_block_s: float = 0.005,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """At each shape: time and paired ratios of one forward+backward of each method (a method with an
    option also against the same loss without it, which must be among ``methods``), its number of ATen
    calls, the bytes it saves for backward (and its CUDA peak memory), the agreement of the fused losses
    with their baselines, and the targets (:mod:`~aekt_plugin.bench.targets`)."""
    results = []
    for batch, classes in shapes:
        z, v, y = make_inputs(batch, classes, device=device, dtype=dtype, seed=seed)
        cases = make_cases(methods, z, v, y, temperature=temperature, alpha=alpha, beta=beta)
        times, block_calls = interleaved_timing(
            {name: case.step for name, case in cases.items()},
            rounds=rounds,
            untimed_calls=untimed_calls,
            min_block_s=min_block_s,
            device=device,
            seed=seed,
            clock=clock,
            progress=progress,
            desc=f"kernel {batch}x{classes}",
        )
        summary = summarise(times, BASELINES)
        for name, case in cases.items():
            base, option = split_option(name)
            if option is not None:
                summary[name].update(paired_ratio(times[name], times[base], base))
            summary[name]["calls_per_block"] = block_calls[name]
            summary[name]["calls"] = count_aten_calls(case.step)
            summary[name].update(count_saved_bytes(case, *case.args).as_dict())
            summary[name]["peak_memory_bytes"] = peak_memory(case.step, device)
        results.append(
            {
                "shape": [batch, classes],
                "tier": targets.shape_tier(batch, classes),
                "methods": summary,
                "agreement": _agreement(cases),
                "targets": targets.judge(batch, classes, summary, z.element_size()),
            }
        )
    return results


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    """Device, dtype, threads (in use and requested), CPUs, torch, Python, platform and package version."""
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
        "aekt_plugin": aekt_plugin.__version__,
        "timestamp": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if device.type == "cpu":
        env["device_name"] = _cpu_name() or env["device_name"]
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


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
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: expected a floating dtype among {list(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_methods(methods: Sequence[str]) -> list[str]:
    """The methods in order, each option method's base (the loss without the option) added before it."""
    unknown = sorted(name for name in methods if not is_known(name))
    if unknown:
        raise ValueError(
            f"methods: unknown {unknown}; choose from {list(KERNEL_METHODS)} or <fused>+<option> with a "
            f"fused method and an option in {list(OPTIONS)}"
        )
    if not methods:
        raise ValueError("methods: choose at least one")
    ordered: list[str] = []
    for name in methods:
        base, _ = split_option(name)  # base == name without an option
        ordered += [m for m in (base, name) if m not in ordered]
    return ordered


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
    untimed_calls: int = 5,
    min_block_ms: float = 5.0,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
    offpath: Sequence[str] = (),
    offpath_rounds: int = 15,
) -> dict[str, Any]:
    """Run the kernel benchmark (:func:`kernel_benchmark`) and the off-path rows named in ``offpath``
    (:func:`~aekt_plugin.bench.offpath.offpath_benchmark`, each ``offpath_rounds`` rounds; ``aekt bench``
    runs them all by default) and return the JSON-ready result.

    A method with an option (``aekt_fused+ignore``) is timed with the same loss without it, added to
    ``methods`` if missing. The result holds ``schema``, ``environment``, ``settings``, ``kernel`` (one
    entry per shape), ``off_path`` (one entry per off-path row), ``targets_judged_on`` and ``passed``
    (every target met).
    ``torch.set_num_threads(threads)`` is set for the duration of the call and restored afterwards. Raises
    ``ValueError`` naming the argument on bad input (unknown method, non-positive shapes, ...).
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype)
    shapes = [(int(b), int(c)) for b, c in shapes]
    for batch, classes in shapes:
        if batch < 1 or classes < 2:
            raise ValueError(f"shapes: need B >= 1 and C >= 2, got ({batch}, {classes})")
    methods = _check_methods(methods)
    unknown = sorted(set(offpath) - set(OFFPATH_ROWS))
    if unknown:
        raise ValueError(f"offpath: unknown rows {unknown}; choose from {list(OFFPATH_ROWS)}")
    for name, value in (("threads", threads), ("rounds", rounds), ("offpath_rounds", offpath_rounds)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if untimed_calls < 0 or min_block_ms < 0:
        raise ValueError(f"untimed_calls and min_block_ms must be >= 0, got {untimed_calls}, {min_block_ms}")
    if clock not in CLOCKS:
        raise ValueError(f"clock: must be one of {CLOCKS}, got {clock!r}")

    with pinned_threads(threads):
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "environment": environment(device, dtype, threads),
            "settings": {
                "temperature": temperature,
                "alpha": alpha,
                "beta": beta,
                "aekt_defaults": {k: getattr(aekt_plugin.DEFAULTS, k) for k in ("max_weight", "normalize_weight")},
                "rounds": rounds,
                "untimed_calls": untimed_calls,
                "min_block_ms": min_block_ms,
                "offpath_rounds": offpath_rounds,
                "seed": seed,
                "clock": clock_name(device, clock),
                "timing": "forward+backward w.r.t. student logits; median over interleaved rounds; "
                "ratios are medians of per-round paired ratios",
                "calls": "ATen operators dispatched by one forward+backward (after one uncounted call)",
                "options": {
                    option: OPTIONS[option] for _, option in map(split_option, methods) if option is not None
                },
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
                untimed_calls=untimed_calls,
                min_block_s=min_block_ms / 1000.0,
                seed=seed,
                clock=clock,
                progress=progress,
            ),
        }
        result["off_path"] = offpath_benchmark(
            [row for row in OFFPATH_ROWS if row in offpath],
            device=device,
            temperature=temperature,
            alpha=alpha,
            beta=beta,
            rounds=offpath_rounds,
            seed=seed,
            clock=clock,
            progress=progress,
        )
    checks = [c for entry in result["kernel"] + result["off_path"] for c in entry["targets"]]
    result["targets_judged_on"] = targets.judged_on(device, dtype, threads)
    result["passed"] = bool(checks) and all(c["passed"] for c in checks)
    return result
