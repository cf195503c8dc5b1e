r"""The decoupled family's distillation as a timm training task: the distillation loss is a value.

Per batch, with ``(z_cls, z_kd)`` from the student (an :class:`~aekt_plugin.timm.AEKTStudent`, or any timm
classifier, for which ``z_cls = z_kd``) and ``v`` the teacher's logits::

    task_loss = criterion(z_cls, target)
    kd_loss   = min(progress / warmup_epochs, 1) · distill_loss(z_kd, v, target)
    loss      = task_loss_weight · task_loss + distill_loss_weight · kd_loss

``distill_loss`` is a constructed loss module — :class:`aekt_plugin.AEKTLoss` (the default),
:class:`~aekt_plugin.DKDLoss`, :class:`~aekt_plugin.KDLoss`, or any module called as
``distill_loss(student_logits, teacher_logits, target)`` — as timm's tasks take ``criterion=`` for the task
loss, so every option of the core reaches the task through the module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model
from torch import Tensor, nn

from .._validation import warn_if_probabilities
from ..defaults import DEFAULTS
from ..loss import AEKTLoss, DKDLoss
from ..warmup import KDWarmup
from .student import AEKTStudent, _check_timm_classifier

try:
    from timm.task.classification import resolve_classification_loss
except ImportError:  # development checkouts of timm 1.0.29 predate it
    resolve_classification_loss = None

__all__ = ["AEKTDistillationTask", "DKDDistillationTask"]

_logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _resolve_criterion(
    criterion: nn.Module | Callable | None, criterion_kwargs: dict[str, Any] | None, device: torch.device
) -> nn.Module | Callable:
    """timm's rule: the criterion given, else ``create_classification_loss(**criterion_kwargs)``."""
    if resolve_classification_loss is not None:
        return resolve_classification_loss(criterion, device, criterion_kwargs=criterion_kwargs)
    if criterion_kwargs:
        raise ValueError("criterion_kwargs needs timm's resolve_classification_loss (timm >= 1.0.29); pass criterion=")
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion  # takes hard and soft targets
    return criterion.to(device=device) if isinstance(criterion, nn.Module) else criterion


def _loss_weights(task_loss_weight: float | None, distill_loss_weight: float | None) -> tuple[float, float]:
    """timm's ``LogitDistillationTask`` rule: both given, or the task's alone (the distillation term then
    gets ``1 - task_loss_weight``), or neither (both 1)."""
    for name, value in (("task_loss_weight", task_loss_weight), ("distill_loss_weight", distill_loss_weight)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else float(task_loss_weight)), float(distill_loss_weight)
    if task_loss_weight is not None:
        if task_loss_weight > 1:
            raise ValueError(
                f"task_loss_weight={task_loss_weight} alone gives the distillation term 1 - task_loss_weight < 0; "
                "pass distill_loss_weight too"
            )
        return float(task_loss_weight), 1.0 - float(task_loss_weight)
    return 1.0, 1.0


def _cfg_stat(model: nn.Module, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    return tuple(cfg.get(key, default))


class AEKTDistillationTask(TrainingTask):
    r"""Logit distillation with a decoupled-family loss as a timm training task (a drop-in for
    ``LogitDistillationTask``), returning ``{"loss", "output", "task_loss", "kd_loss"}`` like it::

        task_loss = criterion(z_cls, target)
        kd_loss   = min(progress / warmup_epochs, 1) · distill_loss(z_kd, v, target)
        loss      = task_loss_weight · task_loss + distill_loss_weight · kd_loss

    ``distill_loss`` defaults to :class:`aekt_plugin.AEKTLoss` built from the keyword options given
    (``AEKTDistillationTask(student, teacher, beta=2.0)`` is ``distill_loss=AEKTLoss(beta=2.0)``); pass a
    constructed module instead to choose the loss and all its options, e.g. ``DKDLoss(beta=2.0)`` or
    ``AEKTLoss(validate_args=False)`` for AMP. A 0-d temperature ``nn.Parameter`` in the loss (a learnable
    temperature) is part of the task: its ``parameters()``, ``state_dict()``, checkpoint task state and dtype
    conversions; give it to the optimizer yourself.

    Hard targets ``(B,)`` and timm mixup/cutmix soft targets ``(B, C)`` both work: the default criterion
    takes either, and the loss decomposes around the argmax class of a soft target.

    **Warm-up clock.** ``progress`` is in epochs. With ``updates_per_epoch`` (or
    :meth:`set_updates_per_epoch`, for a loop that knows it only later) it counts optimizer updates
    (``num_updates / updates_per_epoch``, linear from 0, which small problems need): timm's ``train.py``
    calls ``task.update_ema(step=num_updates)`` after every optimizer step, which sets the count exactly
    (gradient accumulation and resumed runs included); loops that do not are counted one update per
    training-mode forward, or can call :meth:`step_update`. Without ``updates_per_epoch`` it counts epochs:
    call :meth:`set_epoch` with timm's 0-based epoch before each one (``progress = epoch + 1``,
    mdistiller's ``min(epoch / warmup, 1)``). Training with neither clock raises. The clock is part of the
    checkpoint's task state.

    The teacher (a module, a :class:`timm.task.DistillationTeacher` or a timm model name) is kept in eval
    mode and never receives gradients; inputs are renormalised from the student's ``pretrained_cfg``
    mean/std to the teacher's, as in timm's distillation tasks.

    Args:
        student_model: the student, a timm classifier or an ``AEKTStudent`` (its distilled training is
            switched on).
        teacher_model: teacher module, ``DistillationTeacher``, or timm model name (``num_classes`` and
            ``in_chans`` are taken from the student; weights from ``teacher_pretrained_path`` or timm's hub).
        criterion: task loss on ``z_cls``; created by timm's ``create_classification_loss(**criterion_kwargs)``
            (cross-entropy by default) when ``None``.
        criterion_kwargs: arguments for ``create_classification_loss`` when ``criterion`` is ``None``.
        teacher_pretrained_path: local weights for a teacher given by name.
        teacher_pretrained_cfg_overlay: pretrained cfg overrides for a teacher given by name.
        distill_loss: the distillation loss module (default: :attr:`default_distill_loss` of
            ``**loss_options``).
        task_loss_weight, distill_loss_weight: the weights of the two terms, with timm's rule: both given,
            or ``task_loss_weight`` alone (then ``distill_loss_weight = 1 - task_loss_weight``), or neither
            (both 1).
        warmup_epochs: epochs over which ``kd_loss`` ramps up linearly; ``0`` disables the warm-up.
        updates_per_epoch: optimizer updates per epoch; turns on the optimizer-update clock.
        device, dtype, verbose: as in timm's tasks.
        ce_weight: deprecated spelling of ``task_loss_weight`` with ``distill_loss_weight=1``.
        **loss_options: options of the default loss (those of :func:`aekt_plugin.aekt_loss` here), when
            ``distill_loss`` is not given.

    Examples:
        ```python
        student = timm.create_model("resnet18", num_classes=100)
        task = AEKTDistillationTask(student, teacher, beta=2.0, updates_per_epoch=len(loader))
        # the same with the loss as a value:
        task = AEKTDistillationTask(student, teacher, distill_loss=AEKTLoss(beta=2.0), updates_per_epoch=len(loader))
        ```
    """

    default_distill_loss: ClassVar[Callable[..., nn.Module]] = AEKTLoss

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher,
        criterion: nn.Module | Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        teacher_pretrained_path: str | None = None,
        teacher_pretrained_cfg_overlay: dict[str, Any] | None = None,
        *,
        distill_loss: nn.Module | None = None,
        task_loss_weight: float | None = None,
        distill_loss_weight: float | None = None,
        warmup_epochs: float = DEFAULTS.warmup,
        updates_per_epoch: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        ce_weight: float | None = None,
        **loss_options: Any,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        student = unwrap_model(student_model)
        if not isinstance(student, AEKTStudent):
            _check_timm_classifier(student)
        if distill_loss is None:
            distill_loss = self.default_distill_loss(**loss_options)
        elif loss_options:
            raise TypeError(
                f"options {sorted(loss_options)} go to the loss module you pass as distill_loss, not to the task"
            )
        if not callable(distill_loss):
            raise TypeError(f"distill_loss must be a loss module, got {type(distill_loss).__name__}")
        if ce_weight is not None:
            warnings.warn(
                "ce_weight is deprecated: pass task_loss_weight (and distill_loss_weight=1.0), timm's names",
                FutureWarning,
                stacklevel=2,
            )
            if task_loss_weight is not None:
                raise TypeError("pass task_loss_weight or its deprecated spelling ce_weight, not both")
            task_loss_weight, distill_loss_weight = ce_weight, 1.0 if distill_loss_weight is None else distill_loss_weight
        self.task_loss_weight, self.distill_loss_weight = _loss_weights(task_loss_weight, distill_loss_weight)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)):
            raise TypeError(f"warmup_epochs must be a real number, got {type(warmup_epochs).__name__}")
        if not warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")

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
        self.distill_loss = distill_loss
        self.warmup_epochs = float(warmup_epochs)
        # A tensor clock: torch.compile of the task does not recompile as it advances.
        self.kd_clock = KDWarmup(epochs=self.warmup_epochs).to(self.device)
        if updates_per_epoch is not None:
            self.set_updates_per_epoch(updates_per_epoch)
        self._steps_reported = False
        # The loss checks the teacher's logits itself unless its value checks are off.
        self._teacher_checked = getattr(distill_loss, "validate_args", True)

        mean = torch.tensor(_cfg_stat(student, "mean", _IMAGENET_MEAN), device=self.device, dtype=self.dtype)
        std = torch.tensor(_cfg_stat(student, "std", _IMAGENET_STD), device=self.device, dtype=self.dtype)
        self.register_buffer("student_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", std.view(1, -1, 1, 1), persistent=False)

        if self.verbose:
            _logger.info(
                f"{type(self).__name__}: order={getattr(student, 'order', None)!r}, distill_loss={distill_loss}, "
                f"task_loss_weight={self.task_loss_weight}, distill_loss_weight={self.distill_loss_weight}, "
                f"warmup_epochs={self.warmup_epochs}"
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
        overlay = {"pretrained_cfg_overlay": cfg_overlay} if cfg_overlay else {}
        return DistillationTeacher(
            teacher,
            num_classes=student.num_classes,
            in_chans=getattr(student, "in_chans", 3),
            pretrained_path=pretrained_path,
            device=self.device,
            dtype=self.dtype,
            **overlay,
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

    @property
    def updates_per_epoch(self) -> int | None:
        return self.kd_clock.steps_per_epoch

    def set_updates_per_epoch(self, updates_per_epoch: int) -> None:
        """Count the warm-up in optimizer updates, ``updates_per_epoch`` per epoch."""
        self.kd_clock.set_steps_per_epoch(updates_per_epoch, name="updates_per_epoch")

    def step_update(self, num_updates: int) -> None:
        """Set the optimizer-update count (timm's scheduler vocabulary); stops per-forward counting."""
        self.kd_clock.set_step(num_updates)
        self._steps_reported = True

    def update_ema(self, step: int | None = None) -> None:
        """timm's per-update hook: update the EMA (if any) and take ``step`` as the update count."""
        super().update_ema(step=step)
        if step is not None:
            self.step_update(step)

    def set_epoch(self, epoch: int) -> None:
        """Start 0-based ``epoch``; with ``updates_per_epoch`` the update count moves to its first update
        (unless it already counts an update of that epoch, as after a resume in the middle of it)."""
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

    # --- checkpoints: the clock and the loss's own state (a learnable temperature) ------------------
    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"kd_warmup": self.kd_clock.state_dict()}
        if isinstance(self.distill_loss, nn.Module) and self.distill_loss.state_dict():
            state["distill_loss"] = self.distill_loss.state_dict()
        return state

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        state = state or {}
        clock = state.get("kd_warmup")
        if clock and "num_updates" in clock:  # the layout of aekt-plugin 0.1.0
            clock = {
                "steps": torch.tensor(float(clock["num_updates"]), dtype=torch.float64),
                "epoch": torch.tensor(int(clock["epoch"])),
            }
        if clock:
            self.kd_clock.load_state_dict(clock, strict=strict)
        if "distill_loss" in state and isinstance(self.distill_loss, nn.Module):
            self.distill_loss.load_state_dict(state["distill_loss"], strict=strict)

    # --- timm task plumbing ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> AEKTDistillationTask:
        """Set training mode while keeping the teacher in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> AEKTDistillationTask:
        """Wrap the student (with its serial layer) in DDP; the frozen teacher stays unwrapped.

        The distillation loss switches to ``global_batch=True`` (where it has the option), so that DDP's
        averaged gradient is that of one process on all ranks' samples; set it back afterwards to normalise
        per rank. ``device_ids`` are dropped for a student on the CPU, where DDP refuses them (timm's
        ``train.py`` passes ``[device]`` on every device).
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        for param in self.teacher.parameters():
            param.requires_grad_(False)
        if getattr(self.distill_loss, "global_batch", None) is False:
            # DDP averages the ranks' gradients: with the global batch, that average is the gradient of one
            # process on all ranks' samples (AEKT's normalisation and the mean run over them).
            self.distill_loss.global_batch = True
        parameter = next(self.trainable_module.parameters(), None)
        if parameter is not None and parameter.device.type == "cpu":
            device_ids = None
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
        return super().get_clip_parameters(exclude_head=exclude_head)

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
            self.kd_clock.steps_per_epoch is not None
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

        kd_loss = warm * self.distill_loss(z_kd, teacher_logits, target)
        if counting:
            self.kd_clock.step()
        return {
            "loss": self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss,
            "output": z_cls,
            "task_loss": task_loss,
            "kd_loss": kd_loss,
        }


class DKDDistillationTask(AEKTDistillationTask):
    r"""Decoupled KD (Zhao et al., CVPR 2022) as a timm training task: :class:`AEKTDistillationTask` whose
    default loss is :class:`aekt_plugin.DKDLoss`, so that the two can be compared in one script::

        kd_loss = min(progress / warmup_epochs, 1) · T²·(α·TCKD + β·NCKD)(z_kd, v)

    ``DKDDistillationTask(student, teacher, beta=2.0)`` is
    ``AEKTDistillationTask(student, teacher, distill_loss=DKDLoss(beta=2.0))``.
    """

    default_distill_loss = DKDLoss
