"""``aekt bench``: its options, and running it from parsed arguments."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .methods import DEFAULT_SHAPES, KERNEL_METHODS, OPTION_METHODS, OPTIONS
from .offpath import OFFPATH_ROWS
from .report import failures, to_markdown
from .run import DTYPES, benchmark
from .timing import CLOCKS

__all__ = ["add_bench_arguments", "main", "parse_rows", "parse_shapes", "run_bench"]


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


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``aekt bench`` to ``parser`` (used by the ``aekt`` CLI and benchmarks/kernel.py)."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (cuda when available; default auto)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="logit dtype (default float32)"
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
        help="comma-separated subset of %(default)s; a fused method with an option, e.g. aekt_fused+ignore "
        f"(options: {', '.join(OPTIONS)}), is timed against the same loss without it",
    )
    parser.add_argument(
        "--options",
        action="store_true",
        help=f"also time {', '.join(OPTION_METHODS)}: the cost of each option against aekt_fused",
    )
    parser.add_argument(
        "--offpath",
        default=",".join(OFFPATH_ROWS),
        help="comma-separated rows off the tuned path to run after the main table, or 'none': compiled "
        "(torch.compile at 4096x8192), dense (8x19x256x512), memory (peak memory at 8192x16384, float32 and "
        "bfloat16); default %(default)s",
    )
    parser.add_argument(
        "--offpath-rounds",
        type=int,
        default=15,
        help="interleaved timing rounds of each off-path row (default 15)",
    )
    parser.add_argument("--temperature", type=float, default=4.0, help="T (default 4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="α of DKD/AEKT (default 1)")
    parser.add_argument("--beta", type=float, default=8.0, help="β of DKD/AEKT (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=51, help="interleaved timing rounds per shape (default 51)"
    )
    parser.add_argument("--untimed-calls", type=int, default=5, help="calls of each method before timing starts, for caches and allocators (default 5)")
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
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result as JSON")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="PATH", help="write the markdown tables"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target of the fused AEKT fails"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no table on stdout")
    return parser


def _benchmark_from_args(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return benchmark(
        shapes=parse_shapes(args.shapes),
        methods=methods + list(OPTION_METHODS) if args.options else methods,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        temperature=args.temperature,
        alpha=args.alpha,
        beta=args.beta,
        rounds=args.rounds,
        untimed_calls=args.untimed_calls,
        min_block_ms=args.min_block_ms,
        seed=args.seed,
        clock=args.clock,
        progress=not args.quiet,
        offpath=parse_rows(args.offpath),
        offpath_rounds=args.offpath_rounds,
    )


def parse_rows(text: str) -> list[str]:
    """``"compiled,dense"`` -> ``["compiled", "dense"]``; ``"none"`` -> ``[]``; ``ValueError`` naming
    ``--offpath`` for an unknown row."""
    rows = [item.strip().lower() for item in text.split(",") if item.strip()]
    if rows == ["none"]:
        return []
    unknown = [row for row in rows if row not in OFFPATH_ROWS]
    if unknown:
        raise ValueError(f"--offpath: unknown rows {unknown}; choose from {', '.join(OFFPATH_ROWS)} or none")
    return rows


def _write(path: Path | None, text: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


Extension = Callable[[dict[str, Any], argparse.Namespace], str]


def run_bench(args: argparse.Namespace, *, extend: Extension | None = None) -> int:
    """Run ``aekt bench`` from parsed arguments; print the tables, write ``--json``/``--markdown``.

    ``extend(result, args)``, if given, runs after the kernel benchmark: it may add fields to the result
    and returns markdown to append to the tables (``benchmarks/kernel.py`` adds its end-to-end training
    step this way). Returns the exit status: 0; 1 with ``--strict`` when a target is missed; 2 on a bad
    option (the message, naming the option, goes to stderr).
    """
    try:
        result = _benchmark_from_args(args)
        extra = extend(result, args) if extend is not None else ""
    except ValueError as exc:
        print(f"aekt bench: error: {exc}", file=sys.stderr)
        return 2
    table = to_markdown(result) + extra
    _write(args.json, json.dumps(result, indent=2) + "\n")
    _write(args.markdown, table + "\n")
    if not args.quiet:
        print(table)
    for line in failures(result):  # also with --quiet
        print(f"aekt bench: FAIL {line}", file=sys.stderr)
    return 1 if (args.strict and not result["passed"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aekt_plugin.bench``: the same as ``aekt bench``."""
    parser = argparse.ArgumentParser(
        prog="aekt bench", description="Loss-kernel benchmark: time, ratios and saved bytes of the losses."
    )
    return run_bench(add_bench_arguments(parser).parse_args(argv))
