#!/usr/bin/env python
"""Where a small batch's time goes: each loss against the *dispatch floor* of its own operators.

For every method of ``aekt bench`` at one shape, the ATen calls of one forward+backward are recorded
(:func:`aekt_plugin.bench.calls.record_aten_calls`) and replayed on their own -- the same operators on the
same tensors, in order, with no Python around them and no autograd graph. Real steps and replays are timed
in the same interleaved, paired rounds as ``aekt bench`` (one pinned CPU thread, thread CPU time).

The replay of a loss is what its operators cost: no rewriting of the Python that issues the same
operators can make the loss faster than that. Comparing a fused loss's floor with a baseline's *real* time
therefore says whether a time target is within reach of Python changes, or needs fewer operators.

One more row, ``function_round_trip``, is the fixed cost of any loss written as a
:class:`torch.autograd.Function` (as the fused kernel is): ``torch.autograd.grad`` through a function whose
forward returns a precomputed loss and whose backward multiplies a precomputed gradient by the incoming
one, three ATen calls in all. Its real time minus its floor is what autograd and the function's machinery
cost per step, whatever the function computes.

Reproduce the committed figures::

    .venv/bin/python benchmarks/dispatch_floor.py --markdown benchmarks/results/dispatch_floor_cpu.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import aekt_plugin
from aekt_plugin.bench.calls import record_aten_calls
from aekt_plugin.bench.methods import make_cases, make_inputs
from aekt_plugin.bench.report import format_time
from aekt_plugin.bench.run import environment
from aekt_plugin.bench.timing import interleaved_timing, pinned_threads, summarise

METHODS = ("kd_plain", "dkd_mdistiller", "kd_fused", "dkd_fused", "aekt_fused")
FLOOR = "@floor"


class _Precomputed(torch.autograd.Function):
    """A loss that computes nothing: the machinery of an autograd function alone."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, loss: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None


def _function_round_trip(student: Tensor) -> Callable[[], object]:
    loss, grad = torch.zeros(()), torch.zeros_like(student)
    return lambda: torch.autograd.grad(_Precomputed.apply(student, loss, grad), student)


def dispatch_floor(
    batch: int, classes: int, *, rounds: int, seed: int = 0, progress: bool = False
) -> dict[str, dict[str, float]]:
    """Per method and per method's replay (``<method>@floor``): the median time of one step, its paired
    ratios to ``kd_plain`` and ``dkd_mdistiller``, and its number of ATen calls."""
    device = torch.device("cpu")
    z, v, y = make_inputs(batch, classes, device=device, dtype=torch.float32, seed=seed)
    cases = make_cases(METHODS, z, v, y, temperature=4.0, alpha=1.0, beta=8.0)
    real = {name: case.step for name, case in cases.items()}
    real["function_round_trip"] = _function_round_trip(z)
    steps, calls = {}, {}
    for name, step in real.items():
        replay = record_aten_calls(step)
        steps[name], steps[name + FLOOR] = step, replay
        calls[name] = calls[name + FLOOR] = len(replay)
    times, _ = interleaved_timing(
        steps,
        rounds=rounds,
        untimed_calls=5,
        min_block_s=0.005,
        device=device,
        seed=seed,
        clock="cpu",
        progress=progress,
        desc=f"floor {batch}x{classes}",
    )
    summary = summarise(times, ("kd_plain", "dkd_mdistiller"))
    return {name: {**summary[name], "calls": calls[name]} for name in steps}


def to_markdown(batch: int, classes: int, rows: dict[str, dict[str, float]], rounds: int) -> str:
    lines = [
        f"# Dispatch floor at ({batch}, {classes})",
        "",
        f"- {environment(torch.device('cpu'), torch.float32, 1)['device_name']}, float32, threads **1**, "
        f"torch {torch.__version__}, aekt-plugin {aekt_plugin.__version__}; {rounds} interleaved rounds, "
        "thread CPU time, ratios are medians of paired per-round ratios (interquartile range).",
        "- `<method>@floor`: the ATen calls of one forward+backward of `<method>` replayed on their own (no "
        "Python around them, no autograd graph): what those operators cost.",
        "",
        "| step | median time | × kd_plain | × dkd_mdistiller | ATen calls |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ratios = [
            f"{row[f'ratio_{base}']:.3f} ({row[f'ratio_{base}_p25']:.2f}–{row[f'ratio_{base}_p75']:.2f})"
            for base in ("kd_plain", "dkd_mdistiller")
        ]
        lines.append(f"| `{name}` | {format_time(row['median_s'])} | {' | '.join(ratios)} | {row['calls']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64x100", help="BxC logit shape (default 64x100)")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    batch, classes = (int(x) for x in args.shape.lower().split("x"))
    with pinned_threads(1):
        rows = dispatch_floor(batch, classes, rounds=args.rounds, progress=True)
    text = to_markdown(batch, classes, rows, args.rounds)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
