r"""Rows off the tuned path: the kernel compiled, on dense inputs, and its peak memory on large ones.

The main table measures ``(B, C)`` float32 logits, eagerly. A user leaves that path by compiling the
training step (timm's ``--torchcompile``), by distilling a segmentation model (``(N, C, H, W)`` logits) or a
large label space; each row measures one of these against plain KD under the same conditions:

============ ========================= ==================================================================
row          default shape              what is measured
============ ========================= ==================================================================
``compiled`` ``(4096, 8192)`` float32   time of ``aekt_fused`` and ``kd_plain`` under ``torch.compile``
                                        (inductor) and of the eager ``aekt_fused``, interleaved rounds
``dense``    ``(8, 19, 256, 512)``      time of ``aekt_fused`` against ``kd_plain`` over dim 1 of the same
             float32                    layout, and the extra peak memory of both
``memory``   ``(8192, 16384)``,         extra peak memory of ``aekt_fused`` and ``kd_plain``, in float32
             float32 and bfloat16       and with bfloat16 inputs
============ ========================= ==================================================================

*Extra peak memory* is the peak allocated during one forward and backward (the ``.grad`` it leaves
included) above what was allocated before, in units of one input tensor (the student's logits):
``torch.cuda.max_memory_allocated`` on CUDA, the profiler's record of the CPU allocator on CPU
(:func:`~aekt_plugin.bench.memory.extra_peak_memory`). The targets are in
:mod:`~aekt_plugin.bench.targets`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import aekt_plugin
from aekt_plugin._baselines import kd_plain

from . import targets
from .memory import extra_peak_memory
from .timing import interleaved_timing, summarise

__all__ = ["OFFPATH_ROWS", "OFFPATH_SHAPES", "offpath_benchmark"]

OFFPATH_ROWS: tuple[str, ...] = ("compiled", "dense", "memory")
OFFPATH_SHAPES: dict[str, tuple[int, ...]] = {
    "compiled": (4096, 8192),
    "dense": (8, 19, 256, 512),
    "memory": (8192, 16384),
}
"""The shape of each row's logits, where the targets are defined (:func:`offpath_benchmark` takes others)."""

_MEMORY_DTYPES = (torch.float32, torch.bfloat16)
_COMPILED = ":compiled"
"""Suffix of a method under ``torch.compile``: ``aekt_fused:compiled``."""


def _inputs(shape: Sequence[int], *, device: torch.device, dtype: torch.dtype, seed: int):
    """Student logits (a leaf that requires grad), teacher logits and int64 targets, seeded."""
    gen = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (3.0 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen).to(device)
    return student, teacher, target


def _losses(temperature: float, alpha: float, beta: float) -> dict[str, Callable[..., Tensor]]:
    return {
        "kd_plain": lambda z, v, y: kd_plain(z, v, temperature),
        "aekt_fused": lambda z, v, y: aekt_plugin.aekt_loss(
            z, v, y, temperature=temperature, alpha=alpha, beta=beta, validate_args=False
        ),
    }


def _step(loss: Callable[..., Tensor], z: Tensor, v: Tensor, y: Tensor) -> Callable[[], None]:
    return lambda: torch.autograd.grad(loss(z, v, y), z)


def _extra_peak(
    loss: Callable[..., Tensor], z: Tensor, v: Tensor, y: Tensor, device: torch.device
) -> float | None:
    """Extra peak memory of one forward and backward into ``z.grad``, in units of ``z``."""

    def step() -> None:
        loss(z, v, y).backward()

    z.grad = None
    step()  # a first call may fill caches, as the first call of a training loop does
    z.grad = None
    peak = extra_peak_memory(step, device)
    z.grad = None
    return None if peak is None else peak / (z.numel() * z.element_size())


def _timed(
    steps: dict[str, Callable[[], None]],
    bases: Sequence[str],
    *,
    device: torch.device,
    rounds: int,
    seed: int,
    clock: str,
    progress: bool,
    desc: str,
) -> dict[str, dict[str, Any]]:
    times, calls = interleaved_timing(
        steps,
        rounds=rounds,
        untimed_calls=1,  # compiles the compiled methods
        min_block_s=0.0,  # one call takes long enough
        device=device,
        seed=seed,
        clock=clock,
        progress=progress,
        desc=desc,
    )
    summary = summarise(times, bases)
    for name in summary:
        summary[name]["calls_per_block"] = calls[name]
    return summary


def _agreement(first: Callable[..., Tensor], second: Callable[..., Tensor], z: Tensor, v: Tensor, y: Tensor):
    """Max |difference| of two losses' values and gradients on the same inputs (a sanity check)."""
    results = []
    for loss in (first, second):
        value = loss(z, v, y)
        (grad,) = torch.autograd.grad(value, z)
        results.append((value.detach().double(), grad.double()))
    (a, ga), (b, gb) = results
    return {"loss_abs_diff": float((a - b).abs()), "grad_max_abs_diff": float((ga - gb).abs().max())}


def offpath_benchmark(
    rows: Sequence[str] = OFFPATH_ROWS,
    *,
    device: torch.device,
    shapes: dict[str, tuple[int, ...]] | None = None,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    rounds: int = 15,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
    compile_backend: str = "inductor",
) -> list[dict[str, Any]]:
    """One entry per row of :data:`OFFPATH_ROWS` asked for: ``row``, ``shape``, ``dtype``, ``methods`` (times,
    paired ratios, extra peak memory), ``agreement`` and ``targets``. The ``compiled`` row compiles with
    ``compile_backend`` (its targets are defined for inductor)."""
    shapes = {**OFFPATH_SHAPES, **(shapes or {})}
    losses = _losses(temperature, alpha, beta)
    timing = {"device": device, "rounds": rounds, "seed": seed, "clock": clock, "progress": progress}
    entries = []
    for row in rows:
        shape = shapes[row]
        if row == "compiled":
            z, v, y = _inputs(shape, device=device, dtype=torch.float32, seed=seed)
            compiled = {
                f"{name}{_COMPILED}": torch.compile(fn, backend=compile_backend)
                for name, fn in losses.items()
            }
            steps = {name: _step(fn, z, v, y) for name, fn in compiled.items()}
            steps["aekt_fused"] = _step(losses["aekt_fused"], z, v, y)
            bases = ("kd_plain" + _COMPILED, "aekt_fused")
            methods = _timed(
                steps,
                bases,
                **timing,
                desc=f"compiled {'x'.join(map(str, shape))}",
            )
            agreement = {
                "aekt_fused:compiled~aekt_fused": _agreement(
                    compiled["aekt_fused" + _COMPILED], losses["aekt_fused"], z, v, y
                )
            }
            entries.append(_entry(row, shape, torch.float32, methods, agreement))
        elif row == "dense":
            z, v, y = _inputs(shape, device=device, dtype=torch.float32, seed=seed)
            steps = {name: _step(fn, z, v, y) for name, fn in losses.items()}
            methods = _timed(
                steps,
                ("kd_plain",),
                **timing,
                desc=f"dense {'x'.join(map(str, shape))}",
            )
            for name, fn in losses.items():
                methods[name]["extra_peak_inputs"] = _extra_peak(fn, z, v, y, device)
            entries.append(_entry(row, shape, torch.float32, methods, {}))
        elif row == "memory":
            for dtype in _MEMORY_DTYPES:
                z, v, y = _inputs(shape, device=device, dtype=dtype, seed=seed)
                methods = {
                    name: {"extra_peak_inputs": _extra_peak(fn, z, v, y, device)}
                    for name, fn in losses.items()
                }
                del z, v, y
                entries.append(_entry(row, shape, dtype, methods, {}))
        else:
            raise ValueError(f"offpath: unknown row {row!r}; choose from {list(OFFPATH_ROWS)}")
    return entries


def _entry(
    row: str, shape: Sequence[int], dtype: torch.dtype, methods: dict[str, dict[str, Any]], agreement: dict
) -> dict[str, Any]:
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "row": row,
        "shape": list(shape),
        "dtype": dtype_name,
        "methods": methods,
        "agreement": agreement,
        "targets": targets.judge_offpath(row, dtype_name, methods),
    }
