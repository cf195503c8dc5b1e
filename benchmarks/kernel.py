#!/usr/bin/env python
"""Loss-kernel benchmark for the committed results: ``aekt bench`` plus a training step and the revision.

Runs the kernel benchmark of :mod:`aekt_plugin.bench` (the same options as ``aekt bench``) and adds

* the time of one full training step (forward, cross-entropy + distillation loss, backward, SGD step) of a
  small CNN on 28×28 images with each loss, next to the cross-entropy alone (``end_to_end`` in the JSON;
  ``--no-e2e`` skips it);
* the git revision of the measured ``aekt_plugin`` sources (``environment.aekt_plugin_revision``).

Reproduce the committed CPU figures (one pinned thread, fp32)::

    .venv/bin/python benchmarks/kernel.py --device cpu --threads 1 --options \
        --json benchmarks/results/kernel_cpu.json --markdown benchmarks/results/kernel_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aekt_plugin
from aekt_plugin import bench
from aekt_plugin.bench.methods import loss_functions, make_cases
from aekt_plugin.bench.report import format_time
from aekt_plugin.bench.timing import interleaved_timing, pinned_threads, summarise

E2E_METHODS: tuple[str, ...] = (
    "ce_only",
    "kd_plain",
    "kd_fused",
    "dkd_fused",
    "aekt_fused",
    "aekt_reference",
)
_E2E_BASES = ("ce_only", "kd_plain", "kd_fused")


class SmallCNN(nn.Module):
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
    untimed_calls: int = 3,
    min_block_s: float = 0.05,
    seed: int = 0,
    clock: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Seconds per training step (forward, ``CE + distillation``, backward, SGD step) with each loss.

    Each method trains its own copy of one seeded :class:`SmallCNN` (fp32) on one fixed batch of
    ``(batch, 1, 28, 28)`` images; the teacher's logits are a fixed tensor, so the teacher's forward pass --
    identical for every method -- is *not* in the step, which makes the reported overhead an upper bound of
    what a real distillation step sees. The loss alone (forward+backward on logits of the step's shape) is
    timed in the same rounds: the step-time difference between two losses is a few percent at most, below
    the noise of a shared machine, while the loss-alone difference divided by the step time estimates it
    robustly (``estimated_overhead_vs_kd_plain_percent``).
    """
    losses = loss_functions(alpha=alpha, beta=beta)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    teacher_logits = (3.0 * torch.randn(batch, num_classes, generator=gen)).to(device)
    torch.manual_seed(seed)
    template = SmallCNN(num_classes).to(device)

    def make_step(name: str) -> Callable[[], None]:
        model = SmallCNN(num_classes).to(device)
        model.load_state_dict(template.state_dict())
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        kd = None if name == "ce_only" else losses[name]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if kd is not None:
                loss = loss + kd(logits, teacher_logits, labels, temperature)
            loss.backward()
            optimizer.step()

        return step

    steps = {name: make_step(name) for name in methods}
    logits = (2.0 * torch.randn(batch, num_classes, generator=gen)).to(device).requires_grad_(True)
    loss_only = [name for name in methods if name != "ce_only"]
    cases = make_cases(
        loss_only, logits, teacher_logits, labels, temperature=temperature, alpha=alpha, beta=beta
    )
    steps.update({f"loss/{name}": case.step for name, case in cases.items()})
    times, calls = interleaved_timing(
        steps,
        rounds=rounds,
        untimed_calls=untimed_calls,
        min_block_s=min_block_s,
        device=device,
        seed=seed,
        clock=clock,
        progress=progress,
        desc="end-to-end",
    )
    bases = [b for b in _E2E_BASES if b in methods]
    summary = summarise({name: times[name] for name in methods}, bases)
    for name, entry in summary.items():
        entry["calls_per_block"] = calls[name]
        for base in bases:
            entry[f"overhead_vs_{base}_percent"] = 100.0 * (entry[f"ratio_{base}"] - 1.0)
        if name in loss_only:
            loss_time = statistics.median(times[f"loss/{name}"])
            entry["loss_only_median_s"] = loss_time
            entry["loss_share_percent"] = 100.0 * loss_time / entry["median_s"]
            if "kd_plain" in loss_only:
                kd_time = statistics.median(times["loss/kd_plain"])
                entry["estimated_overhead_vs_kd_plain_percent"] = (
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


def end_to_end_markdown(e2e: dict[str, Any]) -> str:
    """The end-to-end section of the report."""
    lines = [
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
            for b in _E2E_BASES
        ]
        cells.append(format_time(m["loss_only_median_s"]) if "loss_only_median_s" in m else "–")
        cells.append(f"{m['loss_share_percent']:.1f} %" if "loss_share_percent" in m else "–")
        estimate = m.get("estimated_overhead_vs_kd_plain_percent")
        cells.append(f"{estimate:+.2f} %" if estimate is not None else "–")
        lines.append(f"| `{name}` | {format_time(m['median_s'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Measured overheads are medians of paired per-round step-time ratios; differences of a few "
        "percent are within the noise of a shared machine. The estimate is (loss-alone time − "
        "kd_plain's loss-alone time) / kd_plain's step time, from the same rounds.",
        "",
    ]
    return "\n".join(lines)


def source_revision() -> str | None:
    """Git commit of the measured ``aekt_plugin`` sources (``+dirty`` if a loaded module differs from it)."""
    package_dir = Path(aekt_plugin.__file__).resolve().parent
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


def _add_end_to_end(result: dict[str, Any], args: argparse.Namespace) -> str:
    """``run_bench`` extension: the revision, and the end-to-end step unless ``--no-e2e``."""
    result["environment"]["aekt_plugin_revision"] = source_revision()
    if not args.e2e:
        return ""
    chosen = [m.strip() for m in args.methods.split(",")]
    env = result["environment"]
    with pinned_threads(env["threads_requested"]):
        result["end_to_end"] = end_to_end_benchmark(
            batch=args.e2e_batch,
            num_classes=args.e2e_classes,
            methods=[m for m in E2E_METHODS if m == "ce_only" or m in chosen],
            device=torch.device(env["device"]),
            temperature=args.temperature,
            alpha=args.alpha,
            beta=args.beta,
            rounds=args.e2e_rounds,
            seed=args.seed,
            clock=args.clock,
            progress=not args.quiet,
        )
    return "\n" + end_to_end_markdown(result["end_to_end"])


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench.add_bench_arguments(
        argparse.ArgumentParser(prog="benchmarks/kernel.py", description=__doc__.split("\n\n")[0])
    )
    e2e = parser.add_argument_group("end-to-end training step")
    e2e.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end training step")
    e2e.add_argument("--e2e-batch", type=_at_least(1), default=128, help="images per step (default 128)")
    e2e.add_argument(
        "--e2e-classes", type=_at_least(2), default=100, help="classes of the head (default 100)"
    )
    e2e.add_argument("--e2e-rounds", type=_at_least(1), default=41, help="interleaved rounds (default 41)")
    return bench.run_bench(parser.parse_args(argv), extend=_add_end_to_end)


if __name__ == "__main__":
    sys.exit(main())
