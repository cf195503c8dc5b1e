"""Load a timm checkout's ``train.py`` as a module and wire the package's tasks into it, unchanged on disk.

``aekt-timm`` (:mod:`aekt_plugin.timm.launcher`) parses and checks its options, then :func:`run` replaces
four names in the loaded module's namespace — nothing in the file itself — and calls its ``main()``:

* ``_parse_args``: returns the arguments the launcher already parsed (and checked) with train.py's parser;
* ``create_loader`` / ``create_naflex_loader``: the same functions, remembering the training loader, whose
  length train.py knows only after it has built the task's arguments (the warm-up counts optimizer updates,
  ``ceil(len(loader) / grad_accum_steps)`` per epoch, as train.py's own scheduler does);
* ``LogitDistillationTask``: a factory that builds :class:`~aekt_plugin.timm.AEKTDistillationTask` or
  :class:`~aekt_plugin.timm.DKDDistillationTask` (``--kd-loss-type aekt`` / ``dkd``; train.py's
  ``loss_type`` is dropped) or timm's own ``LogitDistillationTask`` (``kl``).

Every task the factory builds also

* drops DDP's ``device_ids`` for a student on the CPU (train.py passes ``[device]`` on every device, which
  ``DistributedDataParallel`` refuses for CPU modules under ``torchrun``), and logs that it was reached;
* keeps the random number generators' states (torch, CUDA, numpy, Python) in the checkpoint's task state
  and restores them on ``--resume`` in a single-process run, so that a resumed run draws the same data
  order, augmentations and mixup as one never interrupted (train.py itself reseeds from ``--seed``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .._checkout import locate_checkout
from ..loss import AEKTLoss, DKDLoss
from .student import AEKTStudent
from .task import AEKTDistillationTask, DKDDistillationTask

__all__ = ["LaunchSettings", "UsageError", "find_checkout", "load_train_py", "run"]

_logger = logging.getLogger(__name__)

_RNG_KEY = "aekt_timm_rng"


class UsageError(Exception):
    """A problem the user fixes; ``aekt-timm`` prints it as one line and exits with status 2."""


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher's flags decided, checked: the loss, its options and the serial layer."""

    loss_type: str  # "kl", "aekt" or "dkd"
    loss_options: dict[str, Any]  # options of AEKTLoss / DKDLoss beyond the temperature train.py passes
    order: str | None = None
    warmup_epochs: float | None = None  # None: the task's default
    teacher_pretrained_path: str | None = None


# --- the checkout --------------------------------------------------------------------------------------
def _is_checkout(directory: Path) -> bool:
    return (directory / "train.py").is_file() and (directory / "timm" / "__init__.py").is_file()


def find_checkout(option: str | None) -> Path:
    """The directory of timm's ``train.py``: ``--timm-root``, else ``$TIMM_ROOT``, else the
    pytorch-image-models checkout the current directory is in."""
    located = locate_checkout(option, flag="--timm-root", env_var="TIMM_ROOT", is_checkout=_is_checkout)
    if located is None:
        raise UsageError(
            "cannot find timm's train.py: the current directory is not inside a pytorch-image-models "
            "checkout and neither --timm-root nor $TIMM_ROOT is set. Fix: git clone "
            "https://github.com/huggingface/pytorch-image-models and run aekt-timm inside it, or pass "
            "--timm-root DIR (or set TIMM_ROOT=DIR)"
        )
    root, source = located
    if not (root / "train.py").is_file():
        raise UsageError(
            f"{root} (from {source}) has no train.py: point it at the pytorch-image-models git checkout "
            "(the pip-installed timm has no train.py)"
        )
    return root


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def load_train_py(root: Path) -> ModuleType:
    """``root/train.py`` executed as a module (its ``if __name__ == '__main__'`` block does not run)."""
    path = root / "train.py"
    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    with _argv([str(path)]):
        try:
            spec.loader.exec_module(module)
        except ImportError as error:
            import timm

            raise UsageError(
                f"{path} does not import with the installed timm {timm.__version__} ({error}); install the "
                f"checkout's own timm: pip install -e {root}"
            ) from None
    needed = ("parser", "_parse_args", "main", "LogitDistillationTask")
    missing = [name for name in needed if not hasattr(module, name)]
    if missing:
        raise UsageError(
            f"{path} lacks {', '.join(missing)}: aekt-timm runs the train.py of timm >= 1.0.29 "
            "(pytorch-image-models with timm.task)"
        )
    return module


def checkout_version_note(root: Path) -> str | None:
    """A note when train.py's checkout holds another timm version than the one imported (and so used)."""
    import re

    import timm

    version_file = root / "timm" / "version.py"
    if not version_file.is_file():
        return None
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
    if match is None or match.group(1) == timm.__version__:
        return None
    return (
        f"train.py of timm {match.group(1)} ({root}) runs with the installed timm {timm.__version__} "
        f"({Path(timm.__file__).parent}); pip install -e {root} to run it with its own"
    )


# --- random number generators in the task state ----------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """The generators' states in types ``torch.load(weights_only=True)`` reads back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - timm needs numpy
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
        )


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class _LaunchedTask:
    """What every task built for train.py adds (a mixin before the task class)."""

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        state = dict(super().get_task_state(module=module, ema=ema) or {})
        if not ema:
            # Only rank 0 saves a checkpoint, so only a single-process run can restore every rank's state.
            state[_RNG_KEY] = _rng_state()
        return state

    def load_task_state(
        self, state: dict[str, Any] | None, *args: Any, ema: bool = False, **kwargs: Any
    ) -> None:
        state = dict(state or {})
        rng = state.pop(_RNG_KEY, None)
        super().load_task_state(state or None, *args, ema=ema, **kwargs)
        if rng is not None and not ema and _world_size() == 1:
            _set_rng_state(rng)

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> nn.Module:
        parameter = next(self.get_trainable_module().parameters(), None)
        if parameter is not None and parameter.device.type == "cpu":
            device_ids = None  # DistributedDataParallel refuses device_ids for a CPU module
        result = super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        loss = getattr(self, "distill_loss", None)
        _logger.info(
            f"aekt-timm: rank {rank} of {_world_size()}: {type(self).__name__} wrapped its student in "
            f"{type(self.get_trainable_module()).__name__} (device_ids={device_ids}"
            + (f", global_batch={loss.global_batch})" if hasattr(loss, "global_batch") else ")")
        )
        return result


@functools.cache
def _launched(task_class: type) -> type:
    """``task_class`` with :class:`_LaunchedTask` in front, under the same name."""
    return type(task_class.__name__, (_LaunchedTask, task_class), {"__module__": __name__})


# --- the factory that stands in for train.py's LogitDistillationTask ------------------------------------
class _TrainingLoader:
    """Wraps the module's loader factories and remembers the training loader they return."""

    def __init__(self) -> None:
        self.loader: Any = None

    def wrap(self, create: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(create)

        @functools.wraps(create)
        def create_and_remember(*args: Any, **kwargs: Any) -> Any:
            loader = create(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs).arguments
            if bound.get("is_training", False):
                self.loader = loader
            return loader

        return create_and_remember

    def updates_per_epoch(self, grad_accum_steps: int) -> int:
        if self.loader is None:
            raise UsageError(
                "train.py built its task before its training loader (or not with create_loader / "
                "create_naflex_loader): aekt-timm cannot count the warm-up in optimizer updates; "
                "pass --kd-warmup-epochs 0"
            )
        return math.ceil(len(self.loader) / max(1, int(grad_accum_steps)))


def _task_factory(
    timm_task: type, settings: LaunchSettings, args: argparse.Namespace, loader: _TrainingLoader
) -> Callable[..., nn.Module]:
    def LogitDistillationTask(  # noqa: N802 - the name train.py calls
        student_model: nn.Module,
        teacher_model: str | nn.Module,
        criterion: nn.Module | None = None,
        *,
        loss_type: str = "kl",
        temperature: float | None = None,
        task_loss_weight: float | None = None,
        distill_loss_weight: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        common = dict(
            criterion=criterion,
            task_loss_weight=task_loss_weight,
            distill_loss_weight=distill_loss_weight,
            device=device,
            dtype=dtype,
            verbose=verbose,
            **kwargs,
        )
        if settings.teacher_pretrained_path is not None:
            common["teacher_pretrained_path"] = settings.teacher_pretrained_path
        if settings.loss_type == "kl":
            options = {} if temperature is None else {"temperature": temperature}
            task_class = _launched(timm_task)
            return task_class(student_model, teacher_model, loss_type=loss_type, **options, **common)

        task_class, loss_class = {
            "aekt": (AEKTDistillationTask, AEKTLoss),
            "dkd": (DKDDistillationTask, DKDLoss),
        }[settings.loss_type]
        options = dict(settings.loss_options)
        if temperature is not None:
            options["temperature"] = temperature
        # Value checks read the logits (a host synchronisation) and refuse the inf of an fp16 overflow,
        # which AMP's GradScaler handles; fp32 runs keep them.
        options.setdefault("validate_args", not getattr(args, "amp", False))
        student = student_model
        if settings.order is not None:
            student = AEKTStudent(student_model, order=settings.order)
            parameter = next(student_model.parameters())
            student.to(device=parameter.device, dtype=dtype or parameter.dtype)
        warmup = {} if settings.warmup_epochs is None else {"warmup_epochs": settings.warmup_epochs}
        updates_per_epoch = None
        if settings.warmup_epochs != 0:
            updates_per_epoch = loader.updates_per_epoch(getattr(args, "grad_accum_steps", 1))
        task = _launched(task_class)(
            student,
            teacher_model,
            distill_loss=loss_class(**options),
            updates_per_epoch=updates_per_epoch,
            **warmup,
            **common,
        )
        # train.py reports every optimizer update (task.update_ema(step=num_updates)): count those, not the
        # forwards of accumulated micro-batches.
        task.step_update(0)
        return task

    return LogitDistillationTask


def run(
    module: ModuleType, argv: list[str], args: argparse.Namespace, args_text: str, settings: LaunchSettings
) -> None:
    """Run train.py's ``main()`` on ``args`` (parsed from ``argv`` by its parser) with the task wired in."""
    module._parse_args = lambda: (args, args_text)
    loader = _TrainingLoader()
    for name in ("create_loader", "create_naflex_loader"):
        if hasattr(module, name):
            setattr(module, name, loader.wrap(getattr(module, name)))
    module.LogitDistillationTask = _task_factory(module.LogitDistillationTask, settings, args, loader)
    with _argv([module.__file__, *argv]):
        module.main()
