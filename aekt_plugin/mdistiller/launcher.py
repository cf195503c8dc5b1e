"""``aekt-mdistiller``: run an mdistiller checkout's own, unchanged ``tools/train.py`` with AEKT registered."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import CFG_NODE, MdistillerImportError, config_file, list_configs, read_config, register

__all__ = ["main"]


class _UsageError(Exception):
    """A problem the user fixes; :func:`main` prints it and exits with status 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aekt-mdistiller",
        description=(
            "Train with mdistiller's own tools/train.py, with the AEKT and DKD_FUSED distillers and the "
            "AEKT config node registered; the mdistiller checkout is not modified."
        ),
        epilog=(
            "examples:\n"
            "  aekt-mdistiller --list\n"
            "  aekt-mdistiller --mdistiller-root ~/mdistiller --cfg cifar100/res32x4_res8x4\n"
            "  aekt-mdistiller --cfg my_aekt.yaml SOLVER.BATCH_SIZE 128 AEKT.ORDER kd_cls\n"
            "Run it from where mdistiller's outputs should go (LOG.PREFIX is relative, ./output by default)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cfg",
        default="",
        help="a yaml file, a path relative to the mdistiller checkout, or a shipped config name (see --list)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="resume from the experiment's 'latest' checkpoint"
    )
    parser.add_argument(
        "--mdistiller-root",
        default=None,
        help="the mdistiller git checkout (default: $MDISTILLER_ROOT, else the checkout the current "
        "directory is in, else the one the importable mdistiller package lives in)",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped AEKT configs and exit")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ..., as for mdistiller's tools/train.py",
    )
    return parser


def _describe_config(name: str) -> str:
    """``teacher -> student`` and the loss settings of a shipped config, when PyYAML (a yacs dependency) is
    there."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - yacs needs PyYAML
        return ""
    data = yaml.safe_load(read_config(name))
    distiller, node = data.get("DISTILLER", {}), data.get(CFG_NODE, {})
    pair = f"{distiller.get('TEACHER')} -> {distiller.get('STUDENT')}"
    settings = ", ".join(f"{key}={value}" for key, value in node.items() if key not in ("CE_WEIGHT", "WARMUP"))
    return f"{pair}, {settings}"


def _checkout_above(directory: Path) -> Path | None:
    """The mdistiller checkout that contains ``directory`` (or is it), if any."""
    for candidate in (directory, *directory.parents):
        if (candidate / "mdistiller" / "__init__.py").is_file() and (
            candidate / "tools" / "train.py"
        ).is_file():
            return candidate
    return None


def _find_root(option: str | None) -> Path:
    """The mdistiller checkout: ``--mdistiller-root``, else ``$MDISTILLER_ROOT``, else the checkout the
    current directory is in, else the one the importable ``mdistiller`` package lives in."""
    here = _checkout_above(Path.cwd().resolve())
    if option:
        root, source = Path(option).expanduser(), "--mdistiller-root"
    elif os.environ.get("MDISTILLER_ROOT"):
        root, source = Path(os.environ["MDISTILLER_ROOT"]).expanduser(), "$MDISTILLER_ROOT"
    elif here is not None:
        root, source = here, "the current directory"
    else:
        spec = importlib.util.find_spec("mdistiller")
        # A directory named mdistiller without __init__.py (e.g. the checkout itself, seen from its
        # parent directory) is a namespace package with no origin: not the package.
        if spec is None or spec.origin is None or not spec.submodule_search_locations:
            raise _UsageError(
                "cannot find an mdistiller checkout: the current directory is not inside one, mdistiller is "
                "not importable, and neither --mdistiller-root nor $MDISTILLER_ROOT is set. Fix: git clone "
                "https://github.com/megvii-research/mdistiller and run aekt-mdistiller from inside the "
                "checkout, or pass --mdistiller-root PATH (or set MDISTILLER_ROOT=PATH)."
            )
        root, source = Path(spec.origin).parent.parent, "the importable mdistiller"
    root = root.resolve()
    if not (root / "mdistiller" / "__init__.py").is_file():
        raise _UsageError(
            f"{root} (from {source}) is not an mdistiller checkout: it has no mdistiller/__init__.py"
        )
    if not (root / "tools" / "train.py").is_file():
        raise _UsageError(
            f"{root} (from {source}) has no tools/train.py. tools/ is not part of the installed mdistiller "
            "package: point --mdistiller-root (or $MDISTILLER_ROOT) at the git checkout itself."
        )
    return root


def _import_from(root: Path) -> None:
    """Import mdistiller from ``root`` and register AEKT in it."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    register()
    imported = Path(sys.modules["mdistiller"].__file__ or "").resolve().parent
    if imported != (root / "mdistiller").resolve():
        raise _UsageError(
            f"mdistiller was imported from {imported}, not from the checkout {root}; "
            "point --mdistiller-root at the checkout mdistiller is installed from, or uninstall the other one"
        )


@contextlib.contextmanager
def _resolve_cfg(value: str, root: Path) -> Iterator[Path]:
    if not value:
        raise _UsageError("--cfg is required (a yaml file or a shipped name; see aekt-mdistiller --list)")
    for candidate in (Path(value).expanduser(), root / value):
        if candidate.is_file():
            yield candidate.resolve()
            return
    key = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if key not in list_configs():
        raise _UsageError(
            f"--cfg {value!r} is neither a file (here or in {root}) nor a shipped config; "
            f"shipped: {', '.join(list_configs())}"
        )
    with config_file(key) as path:
        yield path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aekt-mdistiller``: register AEKT, then run the checkout's ``tools/train.py``.

    ``--cfg``, ``--resume`` and the trailing ``KEY VALUE`` overrides mean what they mean for mdistiller's
    ``tools/train.py``, which receives them unchanged (``--cfg`` resolved to a file). ``--list`` and
    ``--help`` need no mdistiller.

    Returns:
        the exit status: 0 on success, 2 on a usage or set-up problem (printed with its fix).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name in list_configs():
            print(f"{name:32s} {_describe_config(name)}".rstrip())
        return 0
    try:
        root = _find_root(args.mdistiller_root)
        _import_from(root)
        train_py = root / "tools" / "train.py"
        with _resolve_cfg(args.cfg, root) as cfg_path:
            train_argv = [str(train_py), "--cfg", str(cfg_path)]
            train_argv += ["--resume"] if args.resume else []
            train_argv += list(args.opts)
            saved_argv = sys.argv
            sys.argv = train_argv
            try:
                runpy.run_path(str(train_py), run_name="__main__")
            finally:
                sys.argv = saved_argv
    except (_UsageError, MdistillerImportError) as error:
        print(f"aekt-mdistiller: error: {error}", file=sys.stderr)
        return 2
    return 0
