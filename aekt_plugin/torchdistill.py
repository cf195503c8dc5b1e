r"""torchdistill integration: ``AEKTLoss`` and ``DKDLoss`` selectable from a torchdistill yaml config.

Importing this module (``dependencies: ['aekt_plugin.torchdistill']`` in the yaml, or a plain ``import``)
registers, with torchdistill's own registries:

* mid-level losses (:func:`torchdistill.losses.registry.register_mid_level_loss`)
  ``AEKTLoss`` -- ``T²·(α·min(q_t/p_t, w_max)·TCKD + β·NCKD)`` -- and ``DKDLoss`` --
  ``T²·(α·TCKD + β·NCKD)``, both on the fused, finite kernel of :mod:`aekt_plugin`;
* a model (:func:`torchdistill.models.registry.register_model`) ``AEKTSerialStudent``, which puts the
  serial layer ``S`` behind any student (:class:`aekt_plugin.serial.SerialStudent`) and exposes the
  distillation logits ``z_kd`` at the module path ``kd_logits`` (so a forward hook can record them)
  while the model itself returns the classification logits ``z_cls`` (where the cross-entropy term reads
  them);
* the box processes ``aekt_pre_epoch_process`` and ``aekt_post_forward_process``
  (:func:`~torchdistill.core.interfaces.registry.register_pre_epoch_proc_func`, ...), torchdistill's
  defaults plus the losses' warm-up clock: it then advances once per optimiser step and is set from the
  epoch at the start of every epoch, so a resumed run continues its warm-up (select them under
  ``train:`` or a stage, as the sample configs do). The pre-epoch process also puts the teacher in eval
  mode, which torchdistill's default leaves in whatever mode it was.

Unlike torchdistill's ``KDLoss``, the losses here contain **no cross-entropy**: ``alpha`` and ``beta`` are
the TCKD and NCKD weights of DKD, and the cross-entropy is its own ``sub_terms`` entry of a
``WeightedSumLoss``, as in the sample configs under ``aekt_plugin/configs/torchdistill/``::

    dependencies:
      - name: 'aekt_plugin.torchdistill'
    ...
      criterion:
        key: 'WeightedSumLoss'
        kwargs:
          sub_terms:
            ce:
              criterion: {key: 'CrossEntropyLoss', kwargs: {reduction: 'mean'}}
              criterion_wrapper:
                key: 'SimpleLossWrapper'
                kwargs:
                  input: {is_from_teacher: False, module_path: '.', io: 'output'}
                  target: {uses_label: True}
              weight: 1.0
            kd:
              criterion:
                key: 'AEKTLoss'
                kwargs:
                  student_module_path: '.'
                  student_module_io: 'output'
                  teacher_module_path: '.'
                  teacher_module_io: 'output'
                  temperature: 4.0
                  beta: 8.0
              weight: 1.0

torchdistill is imported only by this module; ``import aekt_plugin`` does not import it. The small
demo model and data set of the digits sample config are registered by :mod:`aekt_plugin.demo.torchdistill`,
which that config names under ``dependencies:``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import loss as core
from ._validation import warn_once
from .defaults import DEFAULTS
from .serial import SerialStudent, fold_serial
from .warmup import KDWarmup

try:
    from torchdistill.core.interfaces.post_forward_proc import default_post_forward_process
    from torchdistill.core.interfaces.pre_epoch_proc import default_pre_epoch_process_with_teacher
    from torchdistill.core.interfaces.registry import (
        POST_FORWARD_PROC_FUNC_DICT,
        PRE_EPOCH_PROC_FUNC_DICT,
        register_post_forward_proc_func,
        register_pre_epoch_proc_func,
    )
    from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss
    from torchdistill.models.registry import MODEL_DICT, get_model, register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "aekt_plugin.torchdistill needs torchdistill; install it with: "
        'pip install "aekt-plugin[torchdistill]"'
    ) from err

__all__ = [
    "AEKTSerialStudent",
    "IODictLoss",
    "LOSS_KEYS",
    "MODEL_KEYS",
    "PROCESS_KEYS",
    "aekt_post_forward_process",
    "aekt_pre_epoch_process",
    "register",
]

_logger = logging.getLogger(__name__)

_IO_TYPES = ("input", "output")


def _check_module_path(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a module path string such as '.' or 'fc', got {type(value).__name__}"
        )
    if not value:
        raise ValueError(f"{name} must not be empty; use '.' for the model's own output")
    return value


def _check_module_io(name: str, value: object) -> str:
    if value not in _IO_TYPES:
        raise ValueError(f"{name} must be one of {_IO_TYPES}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_reduction(value: object) -> object:
    """torchdistill's ``'batchmean'`` is the core's ``'mean'``; other values go to the core's own check."""
    return "mean" if value == "batchmean" else value


def _check_warmup_steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"warmup_steps must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {value}")
    return value


def _read_logits(io_dict: Mapping[str, Any], side: str, path: str, io: str, loss_name: str) -> Tensor:
    """``io_dict[path][io]`` with errors that name the yaml keys instead of a bare ``KeyError``."""
    if not isinstance(io_dict, Mapping):
        raise TypeError(f"{loss_name}: the {side} io dict must be a mapping, got {type(io_dict).__name__}")
    if path not in io_dict:
        recorded = sorted(str(k) for k in io_dict)
        raise ValueError(
            f"{loss_name}: {side}_module_path {path!r} is not in the {side}'s io dict (recorded paths: "
            f"{recorded}); add {path!r} to train.{side}.forward_hook.{io} in the yaml, or use '.' for the "
            f"model's own output"
        )
    module_io = io_dict[path]
    if not isinstance(module_io, Mapping) or io not in module_io:
        recorded = sorted(module_io) if isinstance(module_io, Mapping) else []
        raise ValueError(
            f"{loss_name}: {side}_module_io {io!r} was not recorded for {side}_module_path {path!r} "
            f"(recorded: {recorded}); add {path!r} to train.{side}.forward_hook.{io} in the yaml"
        )
    value = module_io[io]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{loss_name}: {side}_module_path {path!r} ({io}) holds a {type(value).__name__}, not a logits "
            f"tensor; for a model that returns a tuple or dict, hook its classifier module instead (e.g. "
            f"{side}_module_path: 'fc' with 'fc' in train.{side}.forward_hook.output)"
        )
    return value


class IODictLoss(nn.Module):
    r"""A distillation loss on logits read from torchdistill's io dicts: ``criterion(z, v, targets)``, times
    an optional linear warm-up, where ``z = student_io_dict[student_module_path][student_module_io]`` and
    ``v`` the teacher's logits likewise.

    ``criterion`` is a core loss module (:class:`aekt_plugin.AEKTLoss`, :class:`~aekt_plugin.DKDLoss`,
    :class:`~aekt_plugin.KDLoss`) or any module with their call signature. The registered yaml keys
    ``AEKTLoss`` and ``DKDLoss`` build one from the yaml's kwargs: the io-dict keys below go to this
    wrapper, every other key to the core module, whose options they are (``temperature``, ``alpha``,
    ``beta``, ``max_weight``, ``normalize_weight``, ``reduction`` — ``'batchmean'`` is taken as
    ``'mean'``, as torchdistill's KD configs spell it —, ``ignore_index``, ``standardize``,
    ``validate_args``, ...; see :func:`aekt_plugin.aekt_loss`). Options left out take the package
    defaults.

    .. warning::
        ``alpha`` is **not** torchdistill ``KDLoss``'s cross-entropy weight: it scales TCKD. These losses
        contain no cross-entropy; give the CE term its own ``sub_terms`` entry in ``WeightedSumLoss``.

    Args:
        criterion: the distillation loss module.
        student_module_path: module path of the student's distillation logits (``'.'``: the model output;
            ``'kd_logits'`` with :class:`AEKTSerialStudent`; ``'fc'`` for a hooked classifier).
        student_module_io: ``'input'`` or ``'output'`` of that module.
        teacher_module_path: module path of the teacher's logits.
        teacher_module_io: ``'input'`` or ``'output'`` of that module.
        warmup_steps: linear warm-up ``min(step/warmup_steps, 1)`` over the first optimiser steps, from 0;
            ``0`` disables it. torchdistill's ``WeightedSumLoss`` weights are constants, so the warm-up
            lives here; select the box processes ``aekt_pre_epoch_process`` and
            ``aekt_post_forward_process`` so that it counts optimiser steps and resumes with the run
            (without them it counts training forward calls, and says so once).
        name: how errors call this loss (the yaml key).
    """

    def __init__(
        self,
        criterion: nn.Module,
        student_module_path: str = ".",
        student_module_io: str = "output",
        teacher_module_path: str = ".",
        teacher_module_io: str = "output",
        *,
        warmup_steps: int = 0,
        name: str = "IODictLoss",
    ) -> None:
        super().__init__()
        if not callable(criterion):
            raise TypeError(f"criterion must be a loss module, got {type(criterion).__name__}")
        self.student_module_path = _check_module_path("student_module_path", student_module_path)
        self.student_module_io = _check_module_io("student_module_io", student_module_io)
        self.teacher_module_path = _check_module_path("teacher_module_path", teacher_module_path)
        self.teacher_module_io = _check_module_io("teacher_module_io", teacher_module_io)
        self.warmup_steps = _check_warmup_steps(warmup_steps)
        self.criterion = criterion
        self.name = name
        self.warmup = KDWarmup(steps=self.warmup_steps)
        self.driven_by_box = False  # set by the aekt box processes, which then advance the clock

    def extra_repr(self) -> str:
        return (
            f"student={self.student_module_path!r}:{self.student_module_io}, "
            f"teacher={self.teacher_module_path!r}:{self.teacher_module_io}, warmup_steps={self.warmup_steps}"
        )

    def forward(
        self,
        student_io_dict: Mapping[str, Any],
        teacher_io_dict: Mapping[str, Any],
        targets: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Read ``z`` (student) and ``v`` (teacher) from the io dicts and return the loss on them.

        Args:
            student_io_dict: torchdistill's io dict of the student, ``{module_path: {'input'|'output': x}}``.
            teacher_io_dict: the same for the teacher.
            targets: class indices ``(B,)`` (or ``(B, C)`` probabilities: their argmax is the target class).
        """
        if targets is None:
            raise ValueError(f"{self.name} needs the targets (class labels); torchdistill passed None")
        z = _read_logits(student_io_dict, "student", self.student_module_path, self.student_module_io, self.name)
        v = _read_logits(teacher_io_dict, "teacher", self.teacher_module_path, self.teacher_module_io, self.name)
        loss = self.criterion(z, v, targets)
        if self.warmup_steps == 0:
            return loss
        factor = self.warmup.factor
        if not self.driven_by_box and torch.is_grad_enabled() and z.requires_grad:
            warn_once(
                "torchdistill-warmup-clock",
                f"{self.name}: warmup_steps counts training forward calls, because the box does not advance "
                "the warm-up; select train.pre_epoch_process: 'aekt_pre_epoch_process' and "
                "train.post_forward_process: 'aekt_post_forward_process' to count optimiser steps and to "
                "resume the warm-up with the run",
            )
            self.warmup.step()
        return loss * factor.to(loss.dtype)


_WRAPPER_KEYS = ("student_module_path", "student_module_io", "teacher_module_path", "teacher_module_io", "warmup_steps")


def _distributed_run() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def _io_dict_loss(key: str, loss_class: Callable[..., nn.Module]) -> Callable[..., IODictLoss]:
    """The registered builder of ``key``: the io-dict keys of the yaml go to :class:`IODictLoss`, every
    other key to ``loss_class``."""

    def build(**kwargs: Any) -> IODictLoss:
        wrapper = {name: kwargs.pop(name) for name in _WRAPPER_KEYS if name in kwargs}
        # torchdistill builds the criterion after it has set up torch.distributed: a distributed run gets the
        # batch of all ranks (AEKT's normalisation, the mean over kept samples) unless the yaml says otherwise.
        kwargs.setdefault("global_batch", _distributed_run())
        if "reduction" in kwargs:
            kwargs["reduction"] = _check_reduction(kwargs["reduction"])
        try:
            criterion = loss_class(**kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{key}: {error}") from None
        return IODictLoss(criterion, **wrapper, name=key)

    build.__name__ = build.__qualname__ = key
    build.__doc__ = f"``{key}`` in a torchdistill yaml: :class:`IODictLoss` around :class:`aekt_plugin.{key}`."
    return build


def _aekt_losses(criterion: object) -> Iterator[IODictLoss]:
    """The AEKT/DKD losses inside a torchdistill criterion (its ``term_dict`` holds them outside the module
    tree)."""
    seen: set[int] = set()
    stack = [criterion]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, IODictLoss):
            yield item
        if isinstance(item, nn.Module):
            stack.extend(item.children())
        for entry in getattr(item, "term_dict", {}).values():
            stack.append(entry[0] if isinstance(entry, tuple) else entry)


def _updates_before(box: Any, epoch: int) -> int:
    """Optimiser updates the box has made in its current stage before ``epoch``: torchdistill counts forward
    passes across the stage (``stage_grad_count``) and steps every ``grad_accum_step`` of them."""
    first_epoch = 0
    stage = getattr(box, "stage_number", None)
    if stage is not None:  # a multi-stage box: the stage began num_epochs of it before its end
        first_epoch = box.stage_end_epoch - box.train_config[f"stage{stage}"]["num_epochs"]
    accumulation = max(int(getattr(box, "grad_accum_step", 1) or 1), 1)
    return (epoch - first_epoch) * len(box.train_data_loader) // accumulation


def aekt_pre_epoch_process(self: Any, epoch: int | None = None, **kwargs: Any) -> None:
    """torchdistill's pre-epoch process, plus: the teacher goes to eval mode, and the warm-up clock of every
    AEKT/DKD loss is set to the optimiser updates made before ``epoch`` (so a resumed run continues its
    warm-up exactly, with any ``grad_accum_step``)."""
    default_pre_epoch_process_with_teacher(self, epoch=epoch, **kwargs)
    teacher = getattr(self, "teacher_model", None)
    if isinstance(teacher, nn.Module) and not getattr(self, "teacher_updatable", False):
        teacher.eval()
    updates = 0 if epoch is None else _updates_before(self, int(epoch))
    for loss in _aekt_losses(self.criterion):
        loss.driven_by_box = True
        loss.warmup.set_step(updates)


def aekt_post_forward_process(self: Any, loss: Tensor, metrics: Any = None, **kwargs: Any) -> None:
    """torchdistill's post-forward process (backward, optimiser and scheduler steps), plus one tick of the
    warm-up clock of every AEKT/DKD loss after each optimiser step."""
    default_post_forward_process(self, loss, metrics=metrics, **kwargs)
    if self.stage_grad_count % max(int(getattr(self, "grad_accum_step", 1)), 1) == 0:
        for aekt_loss in _aekt_losses(self.criterion):
            aekt_loss.driven_by_box = True
            aekt_loss.warmup.step()


class AEKTSerialStudent(SerialStudent):
    r"""A student with the serial layer ``S`` (:class:`aekt_plugin.serial.SerialStudent`), for torchdistill
    (registered as ``AEKTSerialStudent``).

    ``forward(x)`` splits the model's logits into ``(z_cls, z_kd)``, passes ``z_kd`` through the identity
    module ``kd_logits`` -- so that ``train.student.forward_hook.output: ['kd_logits']`` records the
    distillation logits -- and returns ``z_cls``, the classification logits (where the CE term and
    evaluation read them, path ``'.'``):

    * ``order='cls_kd'``: ``z_cls = head``, ``z_kd = S(head)``; in eval mode ``S`` is skipped (zero
      inference cost), so ``model`` alone is the deployable network;
    * ``order='kd_cls'``: ``z_kd = head``, ``z_cls = S(head)``; ``S`` stays at inference, or is folded
      into the classifier by :meth:`deploy_model`.

    Args:
        model: the student (an ``nn.Module`` returning ``(B, C)`` logits), or its torchdistill model config
            ``{key, kwargs, repo_or_dir}`` resolved with :func:`torchdistill.models.registry.get_model`.
        num_classes: ``C``; read from ``model.num_classes`` or its classifier when omitted.
        order: ``'cls_kd'``, ``'kd_cls'`` or ``None`` (no serial layer: ``z_cls = z_kd``); default
            ``DEFAULTS.order``, which the accuracy benchmark chose.
        residual: residual form ``z_kd = z_cls + S·z_cls`` with ``S`` initialised to zero.

    Example (yaml)::

        student_model:
          key: 'AEKTSerialStudent'
          kwargs:
            model: {key: 'resnet20', kwargs: {num_classes: 100, pretrained: False}}
            num_classes: 100
            order: 'cls_kd'
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        num_classes: int | None = None,
        order: str | None = DEFAULTS.order,
        residual: bool = False,
    ) -> None:
        if isinstance(model, Mapping):
            if "key" not in model:
                raise ValueError("model: a model config needs a 'key' naming a torchdistill model")
            model = get_model(model["key"], model.get("repo_or_dir"), **(model.get("kwargs") or {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a model config dict, got {type(model).__name__}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        super().__init__(model, order, residual=residual, num_classes=num_classes)
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        self.kd_logits = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.order == "cls_kd":
            return self.model(x)
        z_cls, z_kd = self.split(x)
        expected = self.serial.num_classes if self.serial is not None else self.num_classes
        if z_cls.dim() < 2 or (expected is not None and z_cls.shape[1] != expected):
            raise ValueError(
                f"model must return (B, {expected}) logits, got {tuple(z_cls.shape)}; wrap a model whose "
                "forward returns a tuple so that it returns the logits"
            )
        self.kd_logits(z_kd)
        return z_cls

    def deploy_model(self, classifier_path: str | None = None) -> nn.Module:
        """A copy of the wrapped model alone whose output is ``z_cls`` (eval mode): the serial layer is
        folded into the classifier (``docs/derivations.md`` (S1); exact up to rounding for ``'kd_cls'``,
        the classifier unchanged for ``'cls_kd'``). This wrapper is not modified.

        Args:
            classifier_path: dotted module path of the model's final ``nn.Linear``; found by
                :func:`aekt_plugin.serial.find_classifier` when omitted.
        """
        if classifier_path is None:
            return self.fold().eval()
        try:
            classifier = self.model.get_submodule(classifier_path) if classifier_path else None
        except AttributeError:
            classifier = None
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"classifier_path {classifier_path!r} must name the model's final nn.Linear, got "
                f"{type(classifier).__name__}"
            )
        return fold_serial(self.model, self.serial, [classifier_path]).eval()


_LOSS_BUILDERS = {key: _io_dict_loss(key, getattr(core, key)) for key in ("AEKTLoss", "DKDLoss")}
LOSS_KEYS: tuple[str, ...] = tuple(_LOSS_BUILDERS)
"""Keys under which :func:`register` puts the losses in torchdistill's mid-level loss registry."""
MODEL_KEYS: tuple[str, ...] = ("AEKTSerialStudent",)
"""Keys under which :func:`register` puts the models in torchdistill's model registry."""
PROCESS_KEYS: tuple[str, ...] = ("aekt_pre_epoch_process", "aekt_post_forward_process")
"""Keys under which :func:`register` puts the box processes in torchdistill's registries."""


def _same_object(a: object, b: object) -> bool:
    """``a`` is ``b``, or the same class/function defined again (an ``importlib.reload`` of this module)."""
    return a is b or (
        getattr(a, "__module__", None) == getattr(b, "__module__", None) == __name__
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
    )


def _register_one(registry: dict[str, Any], register: Callable[..., Any], key: str, obj: Any) -> None:
    current = registry.get(key)
    if current is obj:
        return
    if current is not None and not _same_object(current, obj):
        _logger.warning(
            "torchdistill key %r was registered by %s.%s; aekt_plugin replaces it with %s.%s",
            key,
            getattr(current, "__module__", "?"),
            getattr(current, "__qualname__", "?"),
            obj.__module__,
            obj.__qualname__,
        )
    register(key=key)(obj)


def register() -> None:
    """Register :data:`LOSS_KEYS`, :data:`MODEL_KEYS` and :data:`PROCESS_KEYS` with torchdistill (done on
    import).

    Idempotent: torchdistill's ``register_*`` decorators silently overwrite a key, so this checks first
    and re-registers only what is missing or belongs to another object (with a warning when that object
    is not ours).
    """
    for key, builder in _LOSS_BUILDERS.items():
        _register_one(MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss, key, builder)
    _register_one(MODEL_DICT, register_model, "AEKTSerialStudent", AEKTSerialStudent)
    _register_one(
        PRE_EPOCH_PROC_FUNC_DICT,
        register_pre_epoch_proc_func,
        "aekt_pre_epoch_process",
        aekt_pre_epoch_process,
    )
    _register_one(
        POST_FORWARD_PROC_FUNC_DICT,
        register_post_forward_proc_func,
        "aekt_post_forward_process",
        aekt_post_forward_process,
    )


register()
