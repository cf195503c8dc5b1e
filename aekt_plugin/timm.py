r"""AEKT for timm: a student wrapper with the serial layer and a timm training task.

Two lines change against timm's own logit distillation::

    student = timm.create_model("resnet18", num_classes=100)
    task = AEKTDistillationTask(student, "resnet50", updates_per_epoch=len(loader))  # was: LogitDistill...

:class:`AEKTDistillationTask` takes any timm classifier. :class:`AEKTStudent` adds AEKT's serial layer
``S`` after the classifier (:class:`aekt_plugin.serial.SerialStudent`) and keeps timm's model API; like
DeiT's ``VisionTransformerDistilled``, ``set_distilled_training(True)`` makes a training-mode
``forward`` return ``(z_cls, z_kd)``, while an eval-mode ``forward`` returns the classification logits
``z_cls`` as a plain tensor. :class:`AEKTDistillationTask` is a :class:`timm.task.TrainingTask` that
returns ``{"loss", "output", "task_loss", "kd_loss"}`` like :class:`timm.task.LogitDistillationTask`::

    task_loss = criterion(z_cls, y)
    kd_loss   = min(progress / warmup_epochs, 1) · L_AEKT(z_kd, v, y)      # T² inside L_AEKT
    loss      = ce_weight · task_loss + kd_loss

:class:`DKDDistillationTask` is the same task with DKD's loss, so the two can be compared in one script.

Importing this module imports timm (>= 1.0.23, the first release with ``timm.task``);
``import aekt_plugin`` alone never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import DEFAULTS, aekt_loss, dkd_loss
from ._validation import check_bool, check_order, warn_if_probabilities
from .serial import SerialStudent
from .warmup import KDWarmup

_TIMM_MIN_VERSION = (1, 0, 23)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


try:
    import timm  # the real timm: absolute import, not this module
except ImportError as exc:  # pragma: no cover - exercised only without timm installed
    raise ImportError("aekt_plugin.timm needs timm >= 1.0.23 (pip install 'aekt-plugin[timm]')") from exc

if _version_tuple(timm.__version__) < _TIMM_MIN_VERSION:  # pragma: no cover - depends on the install
    raise ImportError(
        f"aekt_plugin.timm needs timm >= 1.0.23 (timm.task.TrainingTask); found timm {timm.__version__}"
    )

import inspect  # noqa: E402

from timm.models import group_parameters  # noqa: E402
from timm.task import DistillationTeacher, TrainingTask  # noqa: E402
from timm.utils import unwrap_model  # noqa: E402

try:  # timm >= 1.0.29
    from timm.task.classification import resolve_classification_loss
except ImportError:  # timm 1.0.23 - 1.0.28: plain cross-entropy, or the criterion given
    resolve_classification_loss = None

# timm 1.0.23 - 1.0.24 build a DistillationTeacher from a model name only; 1.0.25 takes a module too.
_TEACHER_TAKES_MODULE = "model_name_or_module" in inspect.signature(DistillationTeacher.__init__).parameters

__all__ = ["AEKTDistillationTask", "AEKTStudent", "DKDDistillationTask", "create_student"]

_logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Attributes read from the wrapped model only where it has them (``hasattr`` stays honest).
_FORWARDED_IF_PRESENT = (
    "head_hidden_size",
    "forward_intermediates",
    "feature_info",
    "global_pool",
    "embed_dim",
)


def _infer_in_chans(model: nn.Module) -> int:
    """``in_chans`` of a timm model: its attribute, else its first conv, else ``pretrained_cfg``."""
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        try:
            conv = model.get_submodule(first_conv)
        except AttributeError:
            conv = None
        if isinstance(conv, nn.Conv2d):
            return conv.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    input_size = cfg.get("input_size")
    return int(input_size[0]) if input_size else 3


def _check_timm_classifier(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm classifier (an nn.Module), got {type(model).__name__}")
    missing = [
        name
        for name in ("num_classes", "get_classifier", "reset_classifier", "forward_features", "forward_head")
        if not hasattr(model, name)
    ]
    if missing:
        raise TypeError(
            f"model {type(model).__name__} lacks timm's classifier API ({', '.join(missing)}); "
            "AEKTStudent wraps models made by timm.create_model"
        )
    num_classes = model.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"model {type(model).__name__} has no classifier (num_classes={num_classes!r}); "
            "create it with num_classes >= 1 or call reset_classifier(num_classes) first"
        )
    if getattr(model, "distilled_training", False):
        raise ValueError(
            f"model {type(model).__name__} has distilled_training enabled and returns two heads' logits; "
            "call model.set_distilled_training(False) first: AEKTStudent then treats the mean of its heads "
            "(the model's inference output) as the classifier, and its own set_distilled_training() "
            "supplies the distillation logits"
        )
    return model


class AEKTStudent(SerialStudent):
    r"""A timm classifier with AEKT's serial layer in series with its classifier.

    With ``h`` the pooled features and ``head(h)`` the wrapped model's logits:

    * ``order="cls_kd"``: ``z_cls = head(h)``, ``z_kd = S(z_cls)``; eval output is exactly the model's.
    * ``order="kd_cls"``: ``z_kd = head(h)``, ``z_cls = S(z_kd)``; :meth:`fold` merges ``S`` into the head.
    * ``order=None``: no serial layer, ``z_cls = z_kd = head(h)``.

    ``S(x) = W x + c`` starts as the identity (``residual=True``: ``x + W x + c`` with ``W = 0``).

    The wrapper keeps timm's model API (``num_classes``, ``num_features``, ``in_chans``, ``pretrained_cfg``,
    ``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``; ``head_hidden_size`` and
    ``forward_intermediates`` where the model has them), so ``timm.optim.create_optimizer_v2`` and
    ``timm.data.resolve_data_config`` work on it. As in DeiT's ``VisionTransformerDistilled``,
    :meth:`set_distilled_training` switches a training-mode ``forward`` to return ``(z_cls, z_kd)``; an
    eval-mode ``forward`` always returns ``z_cls`` as a plain tensor.

    Args:
        model: a timm classifier (``timm.create_model(..., num_classes >= 1)``). DeiT-distilled models are
            accepted with ``distilled_training`` off: the mean of their two heads (their inference output)
            is the classifier.
        order: ``"cls_kd"`` (``S`` is dropped at inference, so the wrapped model is what you deploy),
            ``"kd_cls"`` (``S`` is folded into the classifier by :meth:`fold`; checked when the wrapper is
            built) or ``None`` (no serial layer). The default is ``aekt_plugin.DEFAULTS.order``, ``None``:
            the accuracy benchmark found no gain from the serial layer, so :class:`AEKTDistillationTask`
            takes the plain timm model as well; the wrapper is for measuring the separation and for
            reading :meth:`relation_matrix`.
        residual: the residual parameterisation of ``S``.
        serial_weight_decay: ``False`` lists ``S``'s parameters in :meth:`no_weight_decay`, so timm's
            optimizer factory exempts them from weight decay.

    Examples::

        >>> import timm
        >>> student = AEKTStudent(timm.create_model("resnet10t", num_classes=10), order="kd_cls")
        >>> student.set_distilled_training(True)
        >>> z_cls, z_kd = student.train()(torch.randn(2, 3, 32, 32))
        >>> student.eval()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> deployable = student.fold()  # a plain timm model, S folded into its fc
    """

    def __init__(
        self,
        model: nn.Module,
        order: str | None = DEFAULTS.order,
        *,
        residual: bool = False,
        serial_weight_decay: bool = True,
    ) -> None:
        check_order(order)
        if isinstance(model, AEKTStudent):
            raise TypeError("model is already an AEKTStudent; wrap the timm model once")
        _check_timm_classifier(model)
        check_bool("serial_weight_decay", serial_weight_decay)
        super().__init__(model, order, residual=residual, num_classes=model.num_classes)
        self.serial_weight_decay = serial_weight_decay
        self.in_chans = _infer_in_chans(model)
        self.distilled_training = False

    # --- timm's model vocabulary -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FORWARDED_IF_PRESENT:
                model = self._modules.get("model")
                if model is not None and hasattr(model, name):
                    return getattr(model, name)
            raise

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self.model.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.model.pretrained_cfg = cfg

    def get_classifier(self) -> nn.Module:
        """The wrapped model's classifier (the serial layer is :attr:`serial`)."""
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """Reset the wrapped model's classifier and the serial layer to the identity of ``num_classes``."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes must be an int >= 1 for an AEKTStudent, got {num_classes!r}; "
                "for a feature extractor call fold() first and reset the plain model"
            )
        self.model.reset_classifier(num_classes, *args, **kwargs)
        if self.serial is not None:
            self.serial.reset(num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, make ``forward`` return ``(z_cls, z_kd)`` (DeiT's switch of the same name)."""
        self.distilled_training = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """The wrapped model's exemptions, prefixed; plus ``S`` when ``serial_weight_decay=False``."""
        names = {f"model.{name}" for name in getattr(self.model, "no_weight_decay", lambda: ())()}
        if self.serial is not None and not self.serial_weight_decay:
            names |= {f"serial.{name}" for name, _ in self.serial.named_parameters()}
        return names

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int] | dict:
        """Layer groups for layer-wise lr decay: the model's, with ``S`` in the last (head) group."""
        if not hasattr(self.model, "group_matcher"):
            return {}
        layer_map = group_parameters(self.model, self.model.group_matcher(coarse=coarse), reverse=True)
        head_layer = max(layer_map.values(), default=0)

        def _matcher(name: str) -> int:
            if name.startswith("model."):
                return layer_map.get(name[len("model.") :], head_layer)
            return head_layer

        return _matcher

    # --- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def _check_head(self, head: object) -> Tensor:
        if isinstance(head, (tuple, list)):
            raise TypeError(
                f"{type(self.model).__name__} returned {len(head)} outputs instead of logits; "
                "turn off its own distilled training (model.set_distilled_training(False))"
            )
        if not isinstance(head, Tensor) or head.ndim != 2:
            shape = tuple(head.shape) if isinstance(head, Tensor) else type(head).__name__
            raise TypeError(f"{type(self.model).__name__} must return (B, num_classes) logits, got {shape}")
        if head.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self.model).__name__} returned {head.shape[1]} values per sample but has "
                f"num_classes={self.num_classes}: its output is not the classifier's logits"
            )
        return head

    def _split_head(self, head: object) -> tuple[Tensor, Tensor]:
        return super()._split_head(self._check_head(head))

    def _route(self, head: object) -> Tensor | tuple[Tensor, Tensor]:
        z_cls, z_kd = self._split_head(head)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return z_cls, z_kd
        return z_cls

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled features if ``pre_logits``; else ``z_cls``, or ``(z_cls, z_kd)`` in distilled training."""
        if pre_logits:
            return self.model.forward_head(x, pre_logits=True)
        return self._route(self.model.forward_head(x))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self._route(self.model(x))

    def forward_split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_cls, z_kd)`` in any mode (the task's eval-mode path)."""
        return self.split(x)

    # --- the serial layer --------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain timm model for deployment whose output equals this wrapper's eval output.

        ``S`` is folded into the final linear classifier with :meth:`SerialLayer.fold`: for ``"kd_cls"``,
        ``S(A h + b) = (M A) h + (M b + c)``, exact up to rounding; for ``"cls_kd"`` ``S`` is simply dropped.
        DeiT-distilled's two heads are each folded, which is exact because the model averages them.
        The returned model has the wrapped model's class, state-dict keys and train/eval mode; this
        wrapper is not modified.

        A classifier that cannot be folded (not an ``nn.Linear`` or a timm head ending in one) is refused
        when an ``"kd_cls"`` wrapper is built, not here; ``"cls_kd"`` needs no folding.
        """
        return super().fold()

    def extra_repr(self) -> str:
        return f"order={self.order!r}, distilled_training={self.distilled_training}"


def create_student(
    model_name: str,
    *,
    order: str | None = DEFAULTS.order,
    residual: bool = False,
    serial_weight_decay: bool = True,
    **timm_kwargs: Any,
) -> AEKTStudent:
    """``timm.create_model(model_name, **timm_kwargs)`` wrapped in an :class:`AEKTStudent`.

    Examples::

        >>> student = create_student("resnet10t", order="cls_kd", num_classes=10, in_chans=1)
    """
    check_order(order)
    model = timm.create_model(model_name, **timm_kwargs)
    return AEKTStudent(model, order=order, residual=residual, serial_weight_decay=serial_weight_decay)


def _resolve_criterion(
    criterion: nn.Module | Callable | None, criterion_kwargs: dict[str, Any] | None, device: torch.device
) -> nn.Module | Callable:
    """timm's ``resolve_classification_loss`` where it exists (timm >= 1.0.29), else the same rule by hand."""
    if resolve_classification_loss is not None:
        return resolve_classification_loss(criterion, device, criterion_kwargs=criterion_kwargs)
    if criterion_kwargs:
        raise ValueError(f"criterion_kwargs needs timm >= 1.0.29, found {timm.__version__}; pass criterion=")
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion  # takes hard and soft targets
    return criterion.to(device=device) if isinstance(criterion, nn.Module) else criterion


def _teacher_from_module(model: nn.Module, device: torch.device, dtype: torch.dtype) -> DistillationTeacher:
    """A DistillationTeacher around a module on timm < 1.0.25, whose constructor takes a name only."""
    teacher = DistillationTeacher.__new__(DistillationTeacher)
    nn.Module.__init__(teacher)
    teacher.model = model.eval()
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    for name, key, default in (("mean_kd", "mean", _IMAGENET_MEAN), ("std_kd", "std", _IMAGENET_STD)):
        stat = torch.tensor(cfg.get(key, default), device=device, dtype=dtype).view(1, -1, 1, 1)
        teacher.register_buffer(name, stat, persistent=False)
    return teacher


def _cfg_stat(model: nn.Module, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    return tuple(cfg.get(key, default))


class _DecoupledDistillationTask(TrainingTask):
    """What the decoupled-family timm tasks share: teacher, criterion, warm-up clock, timm plumbing.

    A subclass names its loss (``loss_function``, called as ``loss_function(z_kd, v, target,
    validate_args=..., **loss_kwargs)``) and spells out its options in its own signature.
    """

    loss_function: Callable[..., Tensor]

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher,
        criterion: nn.Module | Callable | None,
        criterion_kwargs: dict[str, Any] | None,
        teacher_pretrained_path: str | None,
        teacher_pretrained_cfg_overlay: dict[str, Any] | None,
        *,
        loss_kwargs: dict[str, Any],
        ce_weight: float,
        warmup_epochs: float,
        updates_per_epoch: int | None,
        validate_args: bool,
        device: torch.device | None,
        dtype: torch.dtype | None,
        verbose: bool,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        student = unwrap_model(student_model)
        if not isinstance(student, AEKTStudent):
            _check_timm_classifier(student)
        self.loss_kwargs = dict(loss_kwargs)
        # Check the loss options now, not at the first batch: one call on a dummy batch.
        with torch.no_grad():
            self.loss_function(
                torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **self.loss_kwargs
            )
        for name, value in (("ce_weight", ce_weight), ("warmup_epochs", warmup_epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if updates_per_epoch is not None:
            if isinstance(updates_per_epoch, bool) or not isinstance(updates_per_epoch, int):
                kind = type(updates_per_epoch).__name__
                raise TypeError(f"updates_per_epoch must be an int or None, got {kind}")
            if updates_per_epoch < 1:
                raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch!r}")

        self.teacher = self._resolve_teacher(
            teacher_model, student, teacher_pretrained_path, teacher_pretrained_cfg_overlay
        )
        teacher_classes = getattr(unwrap_model(self.teacher.model), "num_classes", None)
        if isinstance(teacher_classes, int) and teacher_classes != student.num_classes:
            raise ValueError(
                f"teacher_model has {teacher_classes} classes but student_model has {student.num_classes}"
            )
        for param in self.teacher.parameters():
            param.requires_grad_(False)

        if isinstance(student, AEKTStudent):
            student.set_distilled_training(True)
        self.trainable_module = student_model
        self.criterion = _resolve_criterion(criterion, criterion_kwargs, self.device)
        self.ce_weight = float(ce_weight)
        self.warmup_epochs = float(warmup_epochs)
        self.updates_per_epoch = updates_per_epoch
        self.validate_args = check_bool("validate_args", validate_args)
        # A tensor clock: torch.compile of the task does not recompile as it advances.
        self.kd_clock = KDWarmup(epochs=self.warmup_epochs, steps_per_epoch=updates_per_epoch).to(self.device)
        self._steps_reported = False
        self._teacher_checked = validate_args  # with validate_args the loss checks the teacher's logits

        mean = torch.tensor(_cfg_stat(student, "mean", _IMAGENET_MEAN), device=self.device, dtype=self.dtype)
        std = torch.tensor(_cfg_stat(student, "std", _IMAGENET_STD), device=self.device, dtype=self.dtype)
        self.register_buffer("student_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", std.view(1, -1, 1, 1), persistent=False)

        if self.verbose:
            clock = (
                f"{updates_per_epoch} optimizer updates per epoch"
                if updates_per_epoch
                else "epochs (call set_epoch)"
            )
            _logger.info(
                f"{type(self).__name__}: order={getattr(student, 'order', None)!r}, {self.loss_kwargs}, "
                f"ce_weight={self.ce_weight}, warmup_epochs={self.warmup_epochs} counted in {clock}"
            )

    def _resolve_teacher(
        self,
        teacher: str | nn.Module | DistillationTeacher,
        student: nn.Module,
        pretrained_path: str | None,
        cfg_overlay: dict[str, Any] | None,
    ) -> DistillationTeacher:
        if isinstance(teacher, DistillationTeacher):
            return teacher
        if not isinstance(teacher, (str, nn.Module)):
            raise TypeError(
                "teacher_model must be a timm model name, an nn.Module or a DistillationTeacher, "
                f"got {type(teacher).__name__}"
            )
        if isinstance(teacher, AEKTStudent):
            teacher = teacher.fold()
        if isinstance(teacher, nn.Module) and not _TEACHER_TAKES_MODULE:
            return _teacher_from_module(teacher, self.device, self.dtype)
        kwargs: dict[str, Any] = {}
        if cfg_overlay:
            if not _TEACHER_TAKES_MODULE:
                raise ValueError(
                    f"teacher_pretrained_cfg_overlay needs timm >= 1.0.25, found {timm.__version__}"
                )
            kwargs["pretrained_cfg_overlay"] = cfg_overlay
        return DistillationTeacher(
            teacher,
            num_classes=student.num_classes,
            in_chans=getattr(student, "in_chans", 3),
            pretrained_path=pretrained_path,
            device=self.device,
            dtype=self.dtype,
            **kwargs,
        )

    # --- warm-up clock -----------------------------------------------------------------------------
    @property
    def num_updates(self) -> int:
        """Optimizer updates counted so far (reads the clock: a host synchronisation on CUDA)."""
        return int(self.kd_clock.steps)

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.kd_clock.set_step(value)

    @property
    def epoch(self) -> int | None:
        """The 0-based epoch last given to :meth:`set_epoch` (``None`` before)."""
        epoch = int(self.kd_clock.epoch)
        return None if epoch < 0 else epoch

    def step_update(self, num_updates: int) -> None:
        """Set the optimizer-update count (timm's scheduler vocabulary); stops per-forward counting."""
        self.kd_clock.set_step(num_updates)
        self._steps_reported = True

    def update_ema(self, step: int | None = None) -> None:
        """timm's per-update hook: update the EMA (if any) and take ``step`` as the update count."""
        if hasattr(TrainingTask, "update_ema"):  # timm >= 1.0.27
            super().update_ema(step=step)
        if step is not None:
            self.step_update(step)

    def set_epoch(self, epoch: int) -> None:
        """Start 0-based ``epoch``; with ``updates_per_epoch`` the update count moves to its first update."""
        self.kd_clock.set_epoch(epoch)

    @property
    def kd_warmup(self) -> float:
        """The current warm-up factor ``min(progress / warmup_epochs, 1)`` applied to ``kd_loss``."""
        return float(self._warmup_factor())

    def _warmup_factor(self) -> Tensor:
        try:
            return self.kd_clock.factor
        except RuntimeError:
            raise RuntimeError(
                f"{type(self).__name__} has no warm-up clock: pass updates_per_epoch=len(loader) "
                "(the warm-up then follows optimizer updates), call task.set_epoch(epoch) before each epoch, "
                "or pass warmup_epochs=0"
            ) from None

    def _warmup_now(self) -> Tensor | float:
        if unwrap_model(self.trainable_module).training:
            return self._warmup_factor()
        try:  # evaluation: the clock's factor where there is a clock, else the plain loss
            return self._warmup_factor()
        except RuntimeError:
            return 1.0

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        return {"kd_warmup": self.kd_clock.state_dict()}

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        clock = (state or {}).get("kd_warmup")
        if not clock:
            return
        if "num_updates" in clock:  # the layout of aekt-plugin 0.1.0
            clock = {
                "steps": torch.tensor(float(clock["num_updates"]), dtype=torch.float64),
                "epoch": torch.tensor(int(clock["epoch"])),
            }
        self.kd_clock.load_state_dict(clock, strict=strict)

    # --- timm task plumbing ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> _DecoupledDistillationTask:
        """Set training mode while keeping the teacher in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(
        self, device_ids: list | None = None, **ddp_kwargs: Any
    ) -> _DecoupledDistillationTask:
        """Wrap the student (with its serial layer) in DDP; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
        """Compile the student (train and eval share one forward) and the teacher's logit forward."""
        self.trainable_module = torch.compile(
            self.trainable_module, backend=backend, mode=mode, **compile_kwargs
        )
        self.eval_model = self.trainable_module
        self.teacher.model = torch.compile(self.teacher.model, backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

    def get_clip_parameters(self, exclude_head: bool = False):
        student = unwrap_model(self.trainable_module)
        if exclude_head and isinstance(student, AEKTStudent):
            return list(student.model.parameters())[:-2]
        if hasattr(TrainingTask, "get_clip_parameters"):
            return super().get_clip_parameters(exclude_head=exclude_head)
        parameters = list(self.trainable_module.parameters())
        return parameters[:-2] if exclude_head else parameters

    if not hasattr(TrainingTask, "get_trainable_module"):  # timm < 1.0.27

        def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
            """The module that owns the trainable parameters (the student)."""
            return getattr(self, "trainable_module_ema", None) if ema else self.trainable_module

        def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
            """The model used for validation: the student, in eval mode returning ``z_cls``."""
            if module is not None:
                return module
            eval_model = getattr(self, "eval_model", None)
            return eval_model if eval_model is not None else self.get_trainable_module(ema=ema)

    def _student_logits(self, input: Tensor) -> tuple[Tensor, Tensor]:
        student = unwrap_model(self.trainable_module)
        if isinstance(student, AEKTStudent) and not student.training:
            return student.forward_split(input)
        output = self.trainable_module(input)
        if isinstance(output, (tuple, list)):
            if len(output) != 2:
                raise TypeError(
                    f"the student returned {len(output)} outputs; expected logits or (z_cls, z_kd)"
                )
            return output[0], output[1]
        if not isinstance(output, Tensor):
            raise TypeError(f"the student must return logits, got {type(output).__name__}")
        return output, output

    def _teacher_input(self, input: Tensor) -> Tensor:
        """Renormalise from the student's mean/std to the teacher's, as timm's tasks do.

        timm's ``pretrained_cfg`` stats have 3 entries even for ``in_chans=1`` models; for 1-channel input
        each set is averaged to one value (timm's own ``normalize_input`` would broadcast a grey image to
        three channels). Other channel mismatches are refused.
        """
        s_mean, s_std = self.student_mean, self.student_std
        t_mean, t_std = self.teacher.mean_kd, self.teacher.std_kd
        if torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
            return input
        channels = input.shape[1] if input.ndim == 4 else None
        if channels == s_mean.shape[1] == t_mean.shape[1]:
            return self.teacher.normalize_input(input, s_mean, s_std)
        if channels == 1:
            s_mean, s_std, t_mean, t_std = (t.mean(1, keepdim=True) for t in (s_mean, s_std, t_mean, t_std))
            return (input * s_std + s_mean - t_mean) / t_std
        raise ValueError(
            f"input has {channels} channels but the student/teacher pretrained_cfg mean/std have "
            f"{s_mean.shape[1]}/{t_mean.shape[1]}; set matching 'mean'/'std' in the models' pretrained_cfg"
        )

    def forward(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Return ``{"loss", "output" (z_cls), "task_loss", "kd_loss"}`` for one batch.

        Args:
            input: images ``(B, C, H, W)``, normalised for the student.
            target: class indices ``(B,)`` or soft targets ``(B, num_classes)`` (mixup/cutmix).
        """
        counting = (
            self.updates_per_epoch is not None
            and not self._steps_reported
            and unwrap_model(self.trainable_module).training
            and torch.is_grad_enabled()
        )
        warm = self._warmup_now()
        z_cls, z_kd = self._student_logits(input)
        task_loss = self.criterion(z_cls, target)

        with torch.no_grad():
            teacher_logits = self.teacher(self._teacher_input(input).detach())
        if not self._teacher_checked:  # once: with validate_args=False the loss reads no values
            warn_if_probabilities("the task's teacher logits", teacher_logits)
            self._teacher_checked = True

        kd_loss = warm * self.loss_function(
            z_kd, teacher_logits, target, validate_args=self.validate_args, **self.loss_kwargs
        )
        if counting:
            self.kd_clock.step()
        return {
            "loss": self.ce_weight * task_loss + kd_loss,
            "output": z_cls,
            "task_loss": task_loss,
            "kd_loss": kd_loss,
        }


class AEKTDistillationTask(_DecoupledDistillationTask):
    r"""AEKT logit distillation as a timm training task (a drop-in for ``LogitDistillationTask``).

    Per batch, with ``(z_cls, z_kd)`` from the student (an :class:`AEKTStudent`, or any timm classifier,
    for which ``z_cls = z_kd``) and ``v`` the teacher's logits::

        task_loss = criterion(z_cls, target)
        kd_loss   = min(progress / warmup_epochs, 1) · T²·(α·min(q_t/p_t, w_max)·TCKD + β·NCKD)(z_kd, v)
        loss      = ce_weight · task_loss + kd_loss

    Hard targets ``(B,)`` and timm mixup/cutmix soft targets ``(B, C)`` both work: the default criterion
    (``nn.CrossEntropyLoss``, via timm's ``create_classification_loss``) takes either, and AEKT
    decomposes around the argmax class of a soft target.

    **Warm-up clock.** ``progress`` is in epochs. With ``updates_per_epoch`` it counts optimizer updates
    (``num_updates / updates_per_epoch``, linear from 0, which small problems need): timm's
    ``train.py`` calls ``task.update_ema(step=num_updates)`` after every optimizer step, which sets the
    count exactly (gradient accumulation and resumed runs included); loops that do not are counted one
    update per training-mode forward, or can call :meth:`step_update`. Without ``updates_per_epoch`` it
    counts epochs: call :meth:`set_epoch` with timm's 0-based epoch before each one (``progress =
    epoch + 1``, mdistiller's ``min(epoch / warmup, 1)``). Training with neither clock raises.

    The teacher (a module, a :class:`timm.task.DistillationTeacher` or a timm model name) is kept in eval
    mode and never receives gradients; inputs are renormalised from the student's ``pretrained_cfg``
    mean/std to the teacher's, as in timm's distillation tasks.

    Args:
        student_model: the student, ideally ``AEKTStudent(model)``; its distilled training is switched on.
        teacher_model: teacher module, ``DistillationTeacher``, or timm model name (``num_classes`` and
            ``in_chans`` are taken from the student; weights from ``teacher_pretrained_path`` or timm's hub).
        criterion: task loss on ``z_cls``; created by ``create_classification_loss(**criterion_kwargs)``
            when ``None``.
        criterion_kwargs: arguments for ``create_classification_loss`` when ``criterion`` is ``None``.
        teacher_pretrained_path: local weights for a teacher given by name.
        teacher_pretrained_cfg_overlay: pretrained cfg overrides for a teacher given by name.
        temperature, alpha, beta, max_weight, normalize_weight, standardize: the AEKT loss
            (:func:`aekt_plugin.aekt_loss`); defaults from ``aekt_plugin.DEFAULTS``. A 0-d temperature
            tensor that requires grad (a learnable temperature) receives ``dL/dT``; give it to the
            optimizer yourself.
        ce_weight: weight of the task loss (timm's ``task_loss_weight``).
        warmup_epochs: epochs over which ``kd_loss`` ramps up linearly; ``0`` disables the warm-up.
        updates_per_epoch: optimizer updates per epoch; turns on the optimizer-step clock.
        validate_args: value checks in the loss (see :func:`aekt_plugin.aekt_loss`); ``False`` for AMP.
        device, dtype, verbose: as in timm's tasks.

    Examples:
        ```python
        student = AEKTStudent(timm.create_model("resnet18", num_classes=100), order="cls_kd")
        task = AEKTDistillationTask(student, teacher, beta=2.0, updates_per_epoch=len(loader))
        optimizer = timm.optim.create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3)
        for input, target in loader:
            result = task(input, target)
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
        deployable = student.fold()
        ```
    """

    loss_function = staticmethod(aekt_loss)

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher,
        criterion: nn.Module | Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        teacher_pretrained_path: str | None = None,
        teacher_pretrained_cfg_overlay: dict[str, Any] | None = None,
        *,
        temperature: float | Tensor = DEFAULTS.temperature,
        alpha: float = DEFAULTS.alpha,
        beta: float = DEFAULTS.beta,
        max_weight: float = DEFAULTS.max_weight,
        normalize_weight: bool = DEFAULTS.normalize_weight,
        standardize: bool = False,
        ce_weight: float = DEFAULTS.ce_weight,
        warmup_epochs: float = DEFAULTS.warmup,
        updates_per_epoch: int | None = None,
        validate_args: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            student_model,
            teacher_model,
            criterion,
            criterion_kwargs,
            teacher_pretrained_path,
            teacher_pretrained_cfg_overlay,
            loss_kwargs=dict(
                temperature=temperature,
                alpha=alpha,
                beta=beta,
                max_weight=max_weight,
                normalize_weight=normalize_weight,
                standardize=standardize,
            ),
            ce_weight=ce_weight,
            warmup_epochs=warmup_epochs,
            updates_per_epoch=updates_per_epoch,
            validate_args=validate_args,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )


class DKDDistillationTask(_DecoupledDistillationTask):
    r"""Decoupled KD (Zhao et al., CVPR 2022) as a timm training task: :class:`AEKTDistillationTask` with
    the explicit term unweighted, for a like-for-like comparison in the same training script::

        kd_loss = min(progress / warmup_epochs, 1) · T²·(α·TCKD + β·NCKD)(z_kd, v)

    (:func:`aekt_plugin.dkd_loss`: the family (D1) of ``docs/derivations.md`` with a constant weight).
    Arguments, warm-up clock, teacher handling, returned keys and an optional :class:`AEKTStudent` serial
    layer are those of :class:`AEKTDistillationTask`, without AEKT's ``max_weight`` and
    ``normalize_weight``.
    """

    loss_function = staticmethod(dkd_loss)

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher,
        criterion: nn.Module | Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        teacher_pretrained_path: str | None = None,
        teacher_pretrained_cfg_overlay: dict[str, Any] | None = None,
        *,
        temperature: float | Tensor = DEFAULTS.temperature,
        alpha: float = DEFAULTS.alpha,
        beta: float = DEFAULTS.beta,
        standardize: bool = False,
        ce_weight: float = DEFAULTS.ce_weight,
        warmup_epochs: float = DEFAULTS.warmup,
        updates_per_epoch: int | None = None,
        validate_args: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            student_model,
            teacher_model,
            criterion,
            criterion_kwargs,
            teacher_pretrained_path,
            teacher_pretrained_cfg_overlay,
            loss_kwargs=dict(temperature=temperature, alpha=alpha, beta=beta, standardize=standardize),
            ce_weight=ce_weight,
            warmup_epochs=warmup_epochs,
            updates_per_epoch=updates_per_epoch,
            validate_args=validate_args,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
