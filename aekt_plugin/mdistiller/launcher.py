"""``aekt-mdistiller``: run an mdistiller checkout's own, unchanged ``tools/train.py`` with AEKT registered."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import runpy
import sys
import urllib.error
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .._checkout import locate_checkout
from ..loss import AEKTLoss, DKDLoss
from . import CFG_NODE, MdistillerImportError, config_file, list_configs, read_config, register
from .distillers import _parse_order, loss_from_node

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


def _is_checkout(candidate: Path) -> bool:
    return (candidate / "mdistiller" / "__init__.py").is_file() and (
        candidate / "tools" / "train.py"
    ).is_file()


def _find_root(option: str | None) -> Path:
    """The mdistiller checkout: ``--mdistiller-root``, else ``$MDISTILLER_ROOT``, else the checkout the
    current directory is in, else the one the importable ``mdistiller`` package lives in."""
    located = locate_checkout(
        option, flag="--mdistiller-root", env_var="MDISTILLER_ROOT", is_checkout=_is_checkout
    )
    if located is not None:
        root, source = located
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


_CIFAR_TEACHERS = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints (cifar_teachers.tar)"
_LOSS_NODES = {"AEKT": (AEKTLoss, CFG_NODE), "DKD_FUSED": (DKDLoss, "DKD")}


def _merged_config(cfg_path: Path, opts: Sequence[str]) -> Any:
    """mdistiller's ``CFG`` with the yaml and the overrides merged, as ``tools/train.py`` will merge them
    (into a clone: train.py merges into the real one itself)."""
    config = importlib.import_module("mdistiller.engine.cfg").CFG.clone()
    try:
        config.merge_from_file(str(cfg_path))
        config.merge_from_list(list(opts))
    except (AssertionError, KeyError, ValueError, TypeError) as error:
        message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
        raise _UsageError(f"the config ({cfg_path.name} and the overrides) is refused by yacs: {message}") from None
    return config


def _check_distiller(config: Any) -> None:
    kind = config.DISTILLER.TYPE
    known = sorted(importlib.import_module("mdistiller.distillers").distiller_dict)
    if kind not in known:
        near = difflib.get_close_matches(kind, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise _UsageError(f"DISTILLER.TYPE {kind!r} is no mdistiller distiller{hint}; known: {', '.join(known)}")
    if kind in _LOSS_NODES:  # the package's own checks, under the yaml names
        loss_class, node_name = _LOSS_NODES[kind]
        try:
            loss_from_node(loss_class, config[node_name], node_name)
            if "ORDER" in config[node_name]:
                _parse_order(config[node_name].ORDER, f"{node_name}.ORDER")
        except (TypeError, ValueError) as error:
            raise _UsageError(str(error)) from None


def _check_models(config: Any, root: Path) -> list[str]:
    """The teacher and student exist for the data set, and the teacher's weights are where mdistiller reads
    them; returns notes for what will be downloaded."""
    models = importlib.import_module("mdistiller.models")
    dataset = config.DATASET.TYPE
    registry = {
        "cifar100": "cifar_model_dict",
        "imagenet": "imagenet_model_dict",
        "tiny_imagenet": "tiny_imagenet_model_dict",
    }.get(dataset)
    if registry is None or not hasattr(models, registry):
        raise _UsageError(f"DATASET.TYPE {dataset!r} is none of mdistiller's: cifar100, imagenet, tiny_imagenet")
    model_dict = getattr(models, registry)
    roles = [("DISTILLER.STUDENT", config.DISTILLER.STUDENT)]
    if config.DISTILLER.TYPE != "NONE":
        roles.append(("DISTILLER.TEACHER", config.DISTILLER.TEACHER))
    for key, name in roles:
        if name not in model_dict:
            near = difflib.get_close_matches(name, list(model_dict), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise _UsageError(f"{key} {name!r} is no {dataset} model of mdistiller{hint}")
    if config.DISTILLER.TYPE == "NONE":
        return []
    if dataset == "imagenet":
        return [
            f"the ImageNet teacher {config.DISTILLER.TEACHER} is built with pretrained=True: its torchvision "
            f"weights are downloaded on first use to {torch.hub.get_dir()}/checkpoints unless already there"
        ]
    checkpoint = model_dict[config.DISTILLER.TEACHER][1]
    if checkpoint is None:
        raise _UsageError(f"DISTILLER.TEACHER {config.DISTILLER.TEACHER!r} has no trained checkpoint in mdistiller")
    if not Path(checkpoint).is_file():
        raise _UsageError(
            f"the teacher checkpoint {Path(checkpoint).resolve()} is missing: download {_CIFAR_TEACHERS} and "
            f"untar it into {root / 'download_ckpts'}"
        )
    return []


def _check_data(config: Any, root: Path) -> list[str]:
    """The data set is where mdistiller reads it (``<checkout>/data``), or can be downloaded there."""
    data = root / "data"
    if config.DATASET.TYPE == "cifar100":
        if not (data / "cifar-100-python").is_dir():
            return [f"CIFAR-100 is not in {data}: torchvision downloads it there (about 170 MB) on this first run"]
        return []
    folder = data / ("imagenet" if config.DATASET.TYPE == "imagenet" else "tiny-imagenet-200")
    missing = [split for split in ("train", "val") if not (folder / split).is_dir()]
    if missing:
        raise _UsageError(
            f"{config.DATASET.TYPE} is not in {folder} ({' and '.join(missing)} missing): mdistiller never "
            f"downloads it; put the image folders there"
        )
    return []


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _preflight(root: Path, cfg_path: Path, opts: Sequence[str]) -> list[str]:
    """Everything a run of ``tools/train.py`` needs, checked before it reads any data: the merged config,
    the distiller and its node, the models and the teacher's weights, the data set, a CUDA device.
    Raises :class:`_UsageError` naming the fix; returns notes (what will be downloaded)."""
    config = _merged_config(cfg_path, opts)
    _check_distiller(config)
    notes = _check_models(config, root) + _check_data(config, root)
    if not _cuda_available():
        raise _UsageError(
            "no CUDA GPU: mdistiller's tools/train.py moves the models to the GPU (.cuda()) and wraps them in "
            "DataParallel; run it on a machine with one"
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aekt-mdistiller``: register AEKT, check the run's configuration and environment,
    then run the checkout's ``tools/train.py``.

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
            for note in _preflight(root, cfg_path, args.opts):
                print(f"aekt-mdistiller: note: {note}", file=sys.stderr)
            train_argv = [str(train_py), "--cfg", str(cfg_path)]
            train_argv += ["--resume"] if args.resume else []
            train_argv += list(args.opts)
            saved_argv = sys.argv
            sys.argv = train_argv
            try:
                runpy.run_path(str(train_py), run_name="__main__")
            except urllib.error.URLError as error:  # torchvision's download of CIFAR-100 or of a teacher
                raise _UsageError(
                    f"a download failed ({error.reason}); on an offline machine put CIFAR-100 in {root / 'data'} "
                    f"and ImageNet teachers' weights in {torch.hub.get_dir()}/checkpoints first"
                ) from None
            finally:
                sys.argv = saved_argv
    except (_UsageError, MdistillerImportError) as error:
        print(f"aekt-mdistiller: error: {error}", file=sys.stderr)
        return 2
    return 0
