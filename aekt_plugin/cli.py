"""The ``aekt`` command line (also ``python -m aekt_plugin``): a thin dispatcher.

* ``aekt demo``  — train a teacher, distil a student with CE, KD, DKD and AEKT, print the table;
* ``aekt check`` — the gradient-equivalence checks on your device and dtypes (exit 1 on failure);
* ``aekt bench`` — the loss-kernel benchmark (time, ratios and saved bytes against plain KD).

A subcommand's module is imported only when that subcommand runs (or shows its ``--help``): ``aekt check``
needs torch alone, ``aekt demo`` its optional packages.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from . import __version__

# subcommand -> (module, function adding its options, function running it, one-line help)
_COMMANDS = {
    "demo": (
        "aekt_plugin.demo.run",
        "add_demo_arguments",
        "run_demo",
        "train a teacher, distil students with CE/KD/DKD/AEKT, print the accuracy table",
    ),
    "check": (
        "aekt_plugin.check",
        "add_check_arguments",
        "run_check",
        "gradient-equivalence checks of the fused kernel on a device and dtypes",
    ),
    "bench": (
        "aekt_plugin.bench",
        "add_bench_arguments",
        "run_bench",
        "loss-kernel benchmark: time, ratios and saved bytes against plain KD and mdistiller's DKD",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog="aekt", description="AEKT knowledge distillation: demo, gradient checks and kernel benchmark."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,check,bench}")
    for name, (module, add_arguments, _, help_text) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(module), add_arguments)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aekt`` with ``argv``; returns the exit status (2, with one line on stderr, when an optional
    package the subcommand needs is not installed)."""
    import sys

    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    try:
        args = build_parser(command if command in _COMMANDS else None).parse_args(arguments)
        module, _, run, _ = _COMMANDS[args.command]
        status = getattr(importlib.import_module(module), run)(args)
    except ImportError as err:
        from .demo._deps import missing_extra  # imports nothing beyond the standard library

        missing = missing_extra(err)
        if missing is None:
            raise
        print(f"aekt {command}: error: {missing}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
