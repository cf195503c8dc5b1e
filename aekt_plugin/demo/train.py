"""Training of the demo's teacher and students: one loop, the methods differ only in the loss.

Per step, with ``(z_cls, z_kd) = SerialStudent(student, order).split(x)`` (both the student's logits
without a serial layer)::

    loss = ce_weight · CE(z_cls, y) + min(step / warmup_steps, 1) · kd_weight · L(z_kd, v, y)

where ``v`` are the teacher's logits and ``L`` is ``kd_loss``, ``dkd_loss`` or ``aekt_loss`` of the core
(the core modules, ``T²`` inside, with the method's options); ``L = 0`` for CE. The warm-up
(:class:`aekt_plugin.warmup.KDWarmup`) counts optimiser steps linearly from 0.
Accuracy is measured on ``z_cls`` at the last epoch (nothing is selected on the test set).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import DEFAULTS, ONE_PROCESS_TRAINING_OPTIONS
from ..loss import AEKTLoss, DKDLoss, KDLoss
from ..warmup import KDWarmup
from .data import Splits
from .models import count_parameters, make_model

__all__ = [
    "MethodConfig",
    "TrainConfig",
    "StepFactory",
    "TrainStep",
    "cache_dir",
    "core_step",
    "evaluate",
    "fixed_batches",
    "get_teacher",
    "is_collapsed",
    "predict_logits",
    "train_student",
    "train_teacher",
]

_logger = logging.getLogger(__name__)

LOSSES = ("ce", "kd", "dkd", "aekt")


_LOSS_MODULES: dict[str, Callable[..., nn.Module]] = {"kd": KDLoss, "dkd": DKDLoss, "aekt": AEKTLoss}
# Options every run uses alike: a training step is the hot loop, the tables' samples are never ignored, and
# a run is one process.
_FIXED_OPTIONS = ONE_PROCESS_TRAINING_OPTIONS


@dataclass(frozen=True)
class MethodConfig:
    """One method of a table: a core loss with the options it changes, the serial-layer order and the
    weights of the two terms.

    ``options`` are keyword options of the loss's core module (:class:`aekt_plugin.KDLoss`,
    ``DKDLoss`` or ``AEKTLoss``; empty for cross-entropy only); every option not given keeps the core's
    default, :data:`aekt_plugin.DEFAULTS`, and the stored ``options`` are all those in effect. ``order=None`` means no serial layer (``z_cls = z_kd``);
    ``kd_weight`` multiplies the distillation term (the standardization recipe of Sun et al. weights KD by 9
    at ``T = 2``).
    """

    name: str
    loss: str = "aekt"
    options: Mapping[str, Any] = field(default_factory=dict)
    order: str | None = DEFAULTS.order
    ce_weight: float = DEFAULTS.ce_weight
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "ce" and self.options:
            raise ValueError(f"method {self.name!r}: cross-entropy only takes no loss options")
        criterion = self.criterion()  # the loss's own checks, now rather than at the first step
        in_effect = {} if criterion is None else criterion.options()
        options = {k: v for k, v in in_effect.items() if k not in _FIXED_OPTIONS}
        object.__setattr__(self, "options", MappingProxyType(options))

    def with_options(self, name: str, **options: Any) -> MethodConfig:
        """This method renamed, with ``options`` changed."""
        return replace(self, name=name, options={**self.options, **options})

    def criterion(self) -> nn.Module | None:
        """The core loss module of this method (``None`` for cross-entropy only)."""
        if self.loss == "ce":
            return None
        return _LOSS_MODULES[self.loss](**self.options, **_FIXED_OPTIONS)

    def option(self, name: str) -> Any:
        """One loss option in effect."""
        return self.options[name]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: name, loss, every option in effect, order and the term weights."""
        record: dict[str, Any] = {"name": self.name, "loss": self.loss}
        for key, value in self.options.items():
            record[key] = "inf" if isinstance(value, float) and math.isinf(value) else value
        for f in fields(self):
            if f.name not in record and f.name != "options":
                record[f.name] = getattr(self, f.name)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MethodConfig:
        """A method back from :meth:`to_dict`'s record; keys that are neither a field nor an option of its
        loss (the options of other losses, in older records) are left out."""
        loss = record.get("loss", "aekt")
        names = set(_LOSS_MODULES[loss]().options()) - set(_FIXED_OPTIONS) if loss != "ce" else set()
        options = {k: float(v) if v == "inf" else v for k, v in record.items() if k in names}
        own = {f.name: record[f.name] for f in fields(cls) if f.name in record and f.name != "options"}
        return cls(**own, options=options)

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """``kd_weight · L(z_kd, v, y)`` of this method (``None`` for cross-entropy only)."""
        loss = self.criterion()
        if loss is None or self.kd_weight == 1.0:
            return loss
        return lambda s, t, y: self.kd_weight * loss(s, t, y)

    def build(self, student: nn.Module, num_classes: int) -> nn.Module:
        """The trained module: ``student`` with this method's serial layer; ``split(x)`` gives
        ``(z_cls, z_kd)``, ``forward(x)`` the classification logits."""
        from aekt_plugin.serial import SerialStudent

        return SerialStudent(student, self.order, num_classes=num_classes)

    def param_groups(self, student: nn.Module, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: the student's, then the serial layer's (if any), each with its
        ``weight_decay`` and an ``lr_scale`` of the schedule's learning rate."""
        groups = [{"params": list(student.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0}]
        serial = getattr(model, "serial", None)
        if serial is not None:
            groups.append({"params": list(serial.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0})
        return groups


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every student of one table (tuned once, not per method)."""

    model: str = "fmnist100-student"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    collapse_factor: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/aekt-plugin`` (default ``~/.cache/aekt-plugin``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aekt-plugin"


def is_collapsed(accuracy: float, num_classes: int, factor: float = 2.0) -> bool:
    """A run is collapsed when its accuracy stays below ``factor`` × chance (``1/C``) or is NaN."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return not (accuracy >= factor / num_classes)


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    if isinstance(model, nn.Module):
        model.train(was_training)
    return out


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in ``[0, 1]``."""
    if x.shape[0] == 0:
        return float("nan")
    return float((predict_logits(model, x).argmax(1) == y).float().mean())


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _tqdm(iterable: Any, *, show: bool, **kwargs: Any) -> Any:
    if not show:
        return iterable
    from ._deps import require

    return require("tqdm").tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------------- teacher
def _teacher_key(data: Splits, data_key: dict[str, Any], cfg: TrainConfig, seed: int) -> str:
    payload = json.dumps(
        {
            "data": data_key,
            "train": cfg.to_dict(),
            "seed": seed,
            "shape": list(data.input_shape),
            "classes": data.num_classes,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_teacher(
    data: Splits,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    batches: BatchFn | None = None,
) -> nn.Module:
    """Train a teacher with cross-entropy only (same loop as the students, CE method)."""
    model, _ = train_student(
        data, None, MethodConfig("teacher", loss="ce"), cfg, seed=seed, progress=progress, batches=batches
    )
    return model.model  # type: ignore[return-value]


def get_teacher(
    data: Splits,
    data_key: dict[str, Any],
    cfg: TrainConfig,
    *,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
    batches: BatchFn | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``data``, trained once and cached under :func:`cache_dir` keyed by its settings.

    ``data_key`` names the data settings (dataset, sizes, seed, augmentation) that built ``data`` and
    ``batches``. Returns the model (eval mode) and its record ``{"key", "accuracy", "train_accuracy",
    "params", "train_config", "cached", ...}``.
    """
    key = _teacher_key(data, data_key, cfg, seed)
    path = cache_dir() / "teachers" / f"{data.name}-{key}.pt"
    model = make_model(cfg.model, data.input_shape[0], data.num_classes)
    if cache and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        model.eval()
        info = dict(json.loads(blob["info"]), cached=True, path=str(path))
        return model, info
    t0 = time.perf_counter()
    model = train_teacher(data, cfg, seed=seed, progress=progress, batches=batches)
    model.eval()
    info = {
        "key": key,
        "model": cfg.model,
        "params": count_parameters(model),
        "accuracy": evaluate(model, data.x_test, data.y_test),
        "val_accuracy": evaluate(model, data.x_val, data.y_val),
        "train_accuracy": evaluate(model, data.x_train, data.y_train),
        "train_config": cfg.to_dict(),
        "seed": seed,
        "data": data_key,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": json.dumps(info, default=str)}, tmp)
        os.replace(tmp, path)
    return model, dict(info, cached=False, path=str(path) if cache else None)


# --------------------------------------------------------------------------------------------- student
BatchFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]
"""``batches(indices, epoch) -> (inputs, teacher_logits)`` for one training batch (``teacher_logits`` may be
``None`` for cross-entropy); lets a protocol augment the inputs and give the teacher's logits on exactly
the augmented batch."""


def fixed_batches(x: torch.Tensor, teacher_logits: torch.Tensor | None) -> BatchFn:
    """The training examples as they are, with teacher logits computed once on them."""

    def batches(indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x[indices], None if teacher_logits is None else teacher_logits[indices]

    return batches


class TrainStep(Protocol):
    """One training step's forward: ``{"loss", "loss_ce", "loss_kd"}`` (``loss = loss_ce + loss_kd``, each
    term with its weight) for inputs ``x``, targets ``y`` and the teacher's logits on ``x``."""

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None
    ) -> dict[str, torch.Tensor]: ...


StepFactory = Callable[[nn.Module, MethodConfig, int, int, float], tuple[nn.Module, TrainStep]]
"""``(student, method, num_classes, steps_per_epoch, warmup_epochs) -> (trained module, step)``."""


def core_step(
    student: nn.Module, method: MethodConfig, num_classes: int, steps_per_epoch: int, warmup_epochs: float
) -> tuple[nn.Module, TrainStep]:
    """The demo's step: the core loss of ``method`` on ``SerialStudent(student, order).split(x)``, the
    distillation term warmed up by a :class:`~aekt_plugin.warmup.KDWarmup` over optimiser steps."""
    model = method.build(student, num_classes)
    loss_fn = method.loss_fn()
    warmup = KDWarmup(steps=warmup_epochs * steps_per_epoch)
    no_kd = torch.zeros(())

    def step(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor | None) -> dict[str, torch.Tensor]:
        z_cls, z_kd = model.split(x)
        loss_ce = method.ce_weight * F.cross_entropy(z_cls, y)
        if loss_fn is None:
            return {"loss": loss_ce, "loss_ce": loss_ce, "loss_kd": no_kd}
        loss_kd = warmup.factor * loss_fn(z_kd, v, y)
        warmup.step()  # one step per training forward = per optimiser step in this loop
        return {"loss": loss_ce + loss_kd, "loss_ce": loss_ce, "loss_kd": loss_kd}

    return model, step


def train_student(
    data: Splits,
    teacher_logits: torch.Tensor | None,
    method: MethodConfig,
    cfg: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str | None = None,
    batches: BatchFn | None = None,
    step_factory: StepFactory = core_step,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one student with ``method``; returns the model (``forward`` = ``z_cls``) and its record.

    ``teacher_logits`` are the teacher's logits on ``data.x_train`` (computed once, no augmentation);
    required unless ``method.loss == "ce"`` or ``batches`` supplies them. ``batches`` (default
    :func:`fixed_batches` of ``data.x_train`` and ``teacher_logits``) gives each batch's inputs and teacher
    logits, e.g. augmented inputs with the teacher's logits on them. The record holds the last-epoch test
    and (clean) training accuracy, the per-epoch validation accuracy (when a validation split exists), the
    mean training losses, whether the run collapsed (:func:`is_collapsed`) and its wall time.
    ``step_factory`` (default :func:`core_step`) builds the trained module and its step, e.g. a step
    through a toolkit's training task.
    """
    if method.loss != "ce" and teacher_logits is None and batches is None:
        raise ValueError(f"method {method.name!r} ({method.loss}) needs teacher_logits")
    if teacher_logits is not None and teacher_logits.shape != (data.x_train.shape[0], data.num_classes):
        raise ValueError(
            f"teacher_logits must have shape {(data.x_train.shape[0], data.num_classes)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if batches is None:
        batches = fixed_batches(data.x_train, teacher_logits)
    torch.manual_seed(seed)
    student = make_model(cfg.model, data.input_shape[0], data.num_classes)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    model, train_step = step_factory(student, method, data.num_classes, steps_per_epoch, cfg.warmup_epochs)
    groups = method.param_groups(student, model, cfg.weight_decay)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(seed + 12345)
    step = 0
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    epochs = _tqdm(range(cfg.epochs), show=progress, desc=desc or method.name, leave=False, unit="ep")
    finite = True
    for epoch in epochs:
        model.train()
        sums = {"loss_ce": 0.0, "loss_kd": 0.0}
        for idx in _batches(n, cfg.batch_size, gen):
            lr = cfg.lr * _cosine(step, total)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, v = batches(idx, epoch)
            y = data.y_train[idx]
            losses = train_step(x, y, v)
            sums["loss_kd"] += float(losses["loss_kd"].detach())
            sums["loss_ce"] += float(losses["loss_ce"].detach())
            if not torch.isfinite(losses["loss"]):
                finite = False
                break
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
        rec = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
        if data.x_val.shape[0]:
            rec["val_accuracy"] = evaluate(model, data.x_val, data.y_val)
        history.append(rec)
        if progress and hasattr(epochs, "set_postfix"):
            epochs.set_postfix({k: round(v, 3) for k, v in rec.items() if k != "epoch"})
        if not finite:
            break
    model.eval()
    acc = evaluate(model, data.x_test, data.y_test) if finite else float("nan")
    record: dict[str, Any] = {
        "method": method.name,
        "seed": seed,
        "accuracy": acc,
        "collapsed": is_collapsed(acc, data.num_classes, cfg.collapse_factor),
        "finite": finite,
        "val_accuracy": history[-1].get("val_accuracy") if history else None,
        "train_accuracy": evaluate(model, data.x_train, data.y_train) if finite else float("nan"),
        "history": history,
        "config": method.to_dict(),
        "params": count_parameters(student),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model, record
