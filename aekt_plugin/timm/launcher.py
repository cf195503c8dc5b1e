"""``aekt-timm``: run a timm checkout's own, unchanged ``train.py`` with AEKT or DKD as its distillation.

::

    aekt-timm --model resnet18 --kd-model-name resnet50 --kd-loss-type aekt --kd-beta 2 ...  # + train.py's
    aekt-timm export output/train/EXP/model_best.pth.tar student.pth.tar   # the plain timm model's weights

Every train.py flag passes through and means what it means there; ``--kd-loss-type aekt`` or ``dkd``
selects :class:`~aekt_plugin.timm.AEKTDistillationTask` / :class:`~aekt_plugin.timm.DKDDistillationTask`
(``kl`` stays timm's ``LogitDistillationTask``), and the loss's options join train.py's parser as
``--kd-*`` flags, so ``--help``, yaml configs (``-c``), ``args.yaml`` and the checkpoints' ``args`` know them.
Everything is checked before train.py reads any data; a wrong value is one line and exit status 2.
How train.py is loaded and wired: :mod:`aekt_plugin.timm._train_py`; the export:
:mod:`aekt_plugin.timm.checkpoint`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .._validation import OPTION_CHECKS, check_non_negative
from ..loss import AEKTLoss, DKDLoss
from ._train_py import LaunchSettings, UsageError, checkout_version_note, find_checkout, load_train_py, run

__all__ = ["add_arguments", "main", "settings_from_args"]

PROG = "aekt-timm"
LOSS_TYPES = ("kl", "aekt", "dkd")
ORDERS = ("none", "cls_kd", "kd_cls")

_LOSSES = {"aekt": AEKTLoss, "dkd": DKDLoss}
# Loss options that are no flag of their own: train.py's --kd-temperature; a train.py batch's mean over
# samples none of which is ignored; value checks set from --amp; the global batch, which the task turns on
# in prepare_distributed under torchrun.
_NOT_FLAGS = {"temperature", "reduction", "ignore_index", "validate_args", "global_batch", "process_group"}


def _loss_flags() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """``--kd-<option>`` -> (dest, the loss option, the loss types that have it), for every option of the
    losses' signatures but :data:`_NOT_FLAGS`: an option added to the core is a flag here too."""
    flags: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for loss_type, loss_class in _LOSSES.items():
        for option in loss_class.option_defaults:
            if option not in _NOT_FLAGS:
                flag = "--kd-" + option.replace("_", "-")
                _, _, types = flags.get(flag, ("", "", ()))
                flags[flag] = ("kd_" + option, option, (*types, loss_type))
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the launcher's flags to ``parser`` (train.py's) as one group; a default ``None`` is "not given"."""
    group = parser.add_argument_group(
        "aekt-timm (AEKT / DKD distillation)",
        "with --kd-model-name TEACHER and --kd-loss-type aekt or dkd (train.py's own flags); unset options "
        "keep aekt_plugin.DEFAULTS. --kd-temperature, --task-loss-weight and --distill-loss-weight are "
        "train.py's and mean the same here.",
    )
    for flag, (dest, option, types) in _loss_flags().items():
        default = _LOSSES[types[0]].option_defaults[option]
        kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        if not isinstance(default, bool):
            kind = {"type": type(default), "metavar": option.upper()}
        losses = " and ".join(_LOSSES[t].__name__ for t in types)
        help_text = f"the option {option} of {losses} (default: {default})"
        group.add_argument(flag, dest=dest, default=None, help=help_text, **kind)
    group.add_argument(
        "--kd-warmup-epochs", type=float, default=None, metavar="E",
        help="the distillation term ramps up linearly over E epochs, counted in optimizer updates "
        "(ceil(batches / --grad-accum-steps) per epoch); 0: no warm-up",
    )  # fmt: skip
    group.add_argument(
        "--kd-order", default=None, choices=ORDERS,
        help="AEKT's serial layer S after the student's classifier: cls_kd (S dropped at inference), kd_cls "
        "(S folded into the classifier by 'aekt-timm export') or none (no layer, the default)",
    )  # fmt: skip
    group.add_argument(
        "--kd-pretrained-path", default=None, metavar="PATH",
        help="local weights of the teacher --kd-model-name NAME (a state dict or a train.py checkpoint), "
        "instead of timm's pretrained download; 'local-dir:DIR' as the name works too",
    )
    return group


def _own_parser() -> argparse.ArgumentParser:
    """The launcher's flags alone: ``--help`` where no checkout is found."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a timm checkout's own train.py with AEKT or DKD distillation "
        "(--kd-loss-type aekt|dkd); every train.py flag passes through.",
        epilog="subcommand: aekt-timm export CHECKPOINT OUT  (the plain timm model of a serial-layer run). "
        "Run inside a pytorch-image-models checkout to see train.py's flags here too.",
    )
    parser.add_argument(
        "--timm-root",
        metavar="DIR",
        help="the pytorch-image-models checkout (default: $TIMM_ROOT, else the one the current directory is "
        "in)",
    )
    add_arguments(parser)
    return parser


def _refuse(message: str) -> NoReturn:
    """train.py's parser reports through this: one line instead of its whole usage."""
    raise UsageError(message)


def _check(flag: str, rule: Any, value: Any) -> Any:
    try:
        return rule(flag, value)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def _check_teacher(name: str, pretrained_path: str | None) -> str | None:
    """Refuse a teacher train.py cannot build; return a note when its weights will be downloaded."""
    import timm

    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :]).expanduser()
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--kd-model-name {name}: {folder} has no config.json (a local-dir: folder holds timm's "
                "config.json and model.safetensors or pytorch_model.bin, as timm.models.save_for_hf writes)"
            )
        return None
    if ":" in name:  # hf-hub:ORG/NAME and other sources timm resolves itself
        return None
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UsageError(f"--kd-model-name {name!r} is no timm model{hint}")
    if pretrained_path is None:
        return (
            f"the teacher {name} is created with pretrained=True: timm downloads its weights unless cached; "
            "--kd-pretrained-path PATH or --kd-model-name local-dir:DIR use local ones"
        )
    return None


def settings_from_args(args: argparse.Namespace) -> tuple[LaunchSettings, list[str]]:
    """Check the distillation flags of train.py's parsed ``args``; return the settings and notes.

    Raises:
        UsageError: naming the flag and what it accepts.
    """
    loss_type = args.kd_loss_type
    if loss_type not in LOSS_TYPES:
        near = difflib.get_close_matches(str(loss_type), LOSS_TYPES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UsageError(f"--kd-loss-type {loss_type!r} is none of {', '.join(LOSS_TYPES)}{hint}")
    loss_flags = _loss_flags()
    given = {
        flag: getattr(args, dest)
        for flag, dest in (
            *((flag, dest) for flag, (dest, _, _) in loss_flags.items()),
            ("--kd-warmup-epochs", "kd_warmup_epochs"),
            ("--kd-order", "kd_order"),
            ("--kd-pretrained-path", "kd_pretrained_path"),
        )
        if getattr(args, dest) is not None
    }
    if args.kd_model_name is None:
        if loss_type != "kl" or given:
            flags = ", ".join(([f"--kd-loss-type {loss_type}"] if loss_type != "kl" else []) + list(given))
            raise UsageError(f"{flags} distil from a teacher: add --kd-model-name NAME (train.py's flag)")
        return LaunchSettings(loss_type="kl", loss_options={}), []

    for flag, (_, _, types) in loss_flags.items():
        if flag in given and loss_type not in types:
            raise UsageError(
                f"{flag} is an option of --kd-loss-type {' and '.join(types)}, not of {loss_type}"
            )
    if loss_type == "kl":
        for flag in ("--kd-warmup-epochs", "--kd-order"):
            if flag in given:
                raise UsageError(
                    f"{flag} needs --kd-loss-type aekt or dkd: timm's kl task (LogitDistillationTask) has "
                    "no warm-up and no serial layer"
                )
    elif args.kd_distill_type != "logit":
        raise UsageError(
            f"--kd-loss-type {loss_type} distils logits: it needs --kd-distill-type logit, not "
            f"{args.kd_distill_type!r}"
        )

    _check("--kd-temperature", OPTION_CHECKS["temperature"], args.kd_temperature)
    weights = {"--task-loss-weight": args.task_loss_weight, "--distill-loss-weight": args.distill_loss_weight}
    for flag, value in weights.items():
        if value is not None:
            _check(flag, check_non_negative, value)
    if args.distill_loss_weight is None and args.task_loss_weight is not None and args.task_loss_weight > 1:
        raise UsageError(
            f"--task-loss-weight {args.task_loss_weight} alone gives the distillation term "
            f"1 - {args.task_loss_weight} < 0 (timm's rule); pass --distill-loss-weight too"
        )
    options = {
        option: _check(flag, OPTION_CHECKS[option], given[flag])
        for flag, (_, option, _) in loss_flags.items()
        if flag in given
    }
    warmup = given.get("--kd-warmup-epochs")
    if warmup is not None:
        warmup = _check("--kd-warmup-epochs", check_non_negative, warmup)
    pretrained_path = given.get("--kd-pretrained-path")
    if pretrained_path is not None and not Path(pretrained_path).expanduser().is_file():
        raise UsageError(f"--kd-pretrained-path {pretrained_path}: no such file")
    notes = [note] if (note := _check_teacher(args.kd_model_name, pretrained_path)) else []
    order = given.get("--kd-order")
    settings = LaunchSettings(
        loss_type=loss_type,
        loss_options=options,
        order=None if order in (None, "none") else order,
        warmup_epochs=warmup,
        teacher_pretrained_path=None if pretrained_path is None else str(Path(pretrained_path).expanduser()),
    )
    return settings, notes


def _note(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"{PROG}: note: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aekt-timm``: find the checkout, parse and check train.py's arguments with the
    launcher's flags added, then run the checkout's ``train.py`` with the package's distillation task.

    ``aekt-timm export CHECKPOINT OUT`` writes the plain timm model of a run's checkpoint instead
    (:func:`aekt_plugin.timm.export_checkpoint`).

    Returns:
        the exit status: 0 on success, 2 on a usage or set-up problem (one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from .checkpoint import export_main

        return export_main(argv[1:])
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--timm-root", default=None)
    known, rest = pre.parse_known_args(argv)
    try:
        try:
            root = find_checkout(known.timm_root)
        except UsageError:
            if "-h" in rest or "--help" in rest:
                _own_parser().print_help()
                return 0
            raise
        module = load_train_py(root)
        parser = module.parser
        parser.prog = PROG
        add_arguments(parser)
        parser.error = _refuse  # type: ignore[method-assign]
        saved = sys.argv
        sys.argv = [str(root / "train.py"), *rest]
        try:
            args, args_text = module._parse_args()
        except SystemExit as done:  # --help
            return done.code if isinstance(done.code, int) else 0
        finally:
            sys.argv = saved
        settings, notes = settings_from_args(args)
        version_note = checkout_version_note(root)
        for note in [*notes, *([version_note] if version_note else [])]:
            _note(note)
        run(module, rest, args, args_text, settings)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
