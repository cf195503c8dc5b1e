"""``aekt-timm export``: the plain timm model's checkpoint from a train.py checkpoint of an ``aekt-timm`` run.

A run with the serial layer (``--kd-order cls_kd`` or ``kd_cls``) trains an
:class:`~aekt_plugin.timm.AEKTStudent`, whose checkpoints hold ``model.*`` and ``serial.*`` keys: what
``--resume`` needs, but not what ``timm.create_model(name, checkpoint_path=...)`` or timm's
``validate.py`` load. :func:`export_checkpoint` rebuilds the student from the checkpoint's ``args`` (as
train.py built it), loads the weights (and the EMA weights, if any), folds ``S`` into the classifier for
``kd_cls`` (:meth:`AEKTStudent.fold`) or drops it for ``cls_kd``, checks on random inputs that the plain
model gives the wrapper's outputs, and writes the checkpoint in train.py's layout without the optimizer
and task state. A run without the layer needs no export: its checkpoints load into the plain model as they
are (exporting one only drops the optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from .student import AEKTStudent

__all__ = ["ExportResult", "export_checkpoint", "export_main"]

_STATE_KEYS = ("state_dict", "state_dict_ema")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    output: Path
    model: str
    order: str | None
    state_dicts: tuple[str, ...]  # the keys written: "state_dict" and, with an EMA, "state_dict_ema"
    max_abs_difference: float  # between the wrapper's and the plain model's logits on random inputs


class ExportError(Exception):
    """The checkpoint cannot be exported; ``aekt-timm export`` prints it as one line (exit status 2)."""


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "args" not in checkpoint:
        raise ExportError(f"{path} is not a checkpoint of timm's train.py (it needs 'state_dict' and 'args')")
    return checkpoint


def _create_model(args: argparse.Namespace) -> nn.Module:
    """The student as train.py's ``create_model`` call builds it, without pretrained weights (options that
    change only training, such as drop rates, are left out)."""
    in_chans = 3
    if getattr(args, "in_chans", None) is not None:
        in_chans = args.in_chans
    elif getattr(args, "input_size", None) is not None:
        in_chans = args.input_size[0]
    try:
        return timm.create_model(
            args.model,
            pretrained=False,
            in_chans=in_chans,
            num_classes=args.num_classes,
            global_pool=getattr(args, "gp", None),
            bn_momentum=getattr(args, "bn_momentum", None),
            bn_eps=getattr(args, "bn_eps", None),
            **(getattr(args, "model_kwargs", None) or {}),
        )
    except RuntimeError as error:  # an unknown model name
        raise ExportError(f"cannot build the checkpoint's model {args.model!r}: {error}") from None


def _order(args: argparse.Namespace, state_dict: dict[str, Any]) -> str | None:
    order = getattr(args, "kd_order", None)
    order = None if order in (None, "none") else order
    has_serial = any(key.startswith("serial.") for key in state_dict)
    if has_serial and order is None:
        raise ExportError(
            "the checkpoint holds a serial layer (serial.* keys) but its args name no --kd-order: "
            "it was not written by aekt-timm"
        )
    if order is not None and not has_serial:
        raise ExportError(f"the checkpoint's args say --kd-order {order} but it holds no serial layer")
    return order


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, atol: float = 1e-4) -> ExportResult:
    """Write the plain timm model's checkpoint of the train.py checkpoint ``checkpoint`` to ``output``.

    Args:
        checkpoint: a checkpoint train.py wrote in an ``aekt-timm`` run (``last.pth.tar``,
            ``model_best.pth.tar``, ``checkpoint-N.pth.tar``); ``args`` in it say which model and order.
        output: the file to write: ``epoch``, ``arch``, ``args`` (with ``kd_order`` none), ``metric``,
            ``state_dict`` and, if the run had ``--model-ema``, ``state_dict_ema``, each of the plain model.
        atol: the largest absolute difference, scaled by the logits' magnitude (at least 1), between the
            wrapper's and the plain model's logits on random inputs that is accepted.

    Returns:
        what was written, and the largest difference measured.

    Raises:
        ExportError: the file is not a train.py checkpoint, its model cannot be built, or the weights do
            not load into it.
    """
    source, output = Path(checkpoint), Path(output)
    saved = _load(source)
    args = saved["args"]
    order = _order(args, saved["state_dict"])
    exported: dict[str, Any] = {}
    difference = 0.0
    generator = torch.Generator().manual_seed(0)
    for key in _STATE_KEYS:
        if saved.get(key) is None:
            continue
        model = _create_model(args)
        wrapped: nn.Module = model if order is None else AEKTStudent(model, order=order)
        try:
            wrapped.load_state_dict(saved[key])
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ExportError(f"{source} [{key}] does not load into {args.model}: {first}") from None
        plain = wrapped.fold() if isinstance(wrapped, AEKTStudent) else model
        wrapped.eval()
        plain.eval()
        input_size = resolve_data_config(vars(args), model=model)["input_size"]
        with torch.no_grad():
            images = torch.randn(2, *input_size, generator=generator)
            expected, got = wrapped(images), plain(images)
        scale = max(1.0, float(expected.abs().max()))
        difference = max(difference, float((expected - got).abs().max()) / scale)
        if not difference <= atol:
            raise ExportError(
                f"the plain model's logits differ from the wrapper's by {difference:.3g} (relative) on "
                f"random inputs, more than {atol:g}: not exported"
            )
        exported[key] = plain.state_dict()

    plain_args = copy.copy(args)
    plain_args.kd_order = "none"
    layout = {name: saved[name] for name in ("epoch", "version", "metric") if name in saved}
    layout.update(arch=args.model, args=plain_args, **exported)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layout, output)
    return ExportResult(output, args.model, order, tuple(exported), difference)


def export_main(argv: Sequence[str]) -> int:
    """``aekt-timm export CHECKPOINT OUT``; returns the exit status (2 with one line on stderr on failure)."""
    parser = argparse.ArgumentParser(
        prog="aekt-timm export",
        description="Write the plain timm model's checkpoint of an aekt-timm run's train.py checkpoint: the "
        "serial layer folded into the classifier (--kd-order kd_cls) or dropped (cls_kd), EMA weights too; "
        "it loads with timm.create_model(NAME, checkpoint_path=OUT) and validate.py --checkpoint OUT.",
    )
    parser.add_argument("checkpoint", help="a train.py checkpoint (last.pth.tar, model_best.pth.tar, ...)")
    parser.add_argument("output", help="the checkpoint file to write")
    args = parser.parse_args(list(argv))
    try:
        result = export_checkpoint(args.checkpoint, args.output)
    except ExportError as error:
        print(f"aekt-timm export: error: {error}", file=sys.stderr)
        return 2
    what = {None: "no serial layer", "kd_cls": "S folded into the classifier", "cls_kd": "S dropped"}
    what = what[result.order]
    print(
        f"wrote {result.output}: {result.model}, {what}; {' and '.join(result.state_dicts)}; "
        f"largest logit difference to the trained wrapper {result.max_abs_difference:.2g} (relative)"
    )
    return 0
