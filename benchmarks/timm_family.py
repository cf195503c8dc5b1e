r"""The paper-like protocol's third student family: a timm ResNet trained through timm's task API.

Every row of this family trains through a :class:`timm.task.TrainingTask`, as a timm user would:

* CE: :class:`timm.task.ClassificationTask`;
* KD: timm's own :class:`timm.task.LogitDistillationTask` (``T²·KL``, no warm-up);
* DKD and AEKT: :class:`aekt_plugin.timm.DKDDistillationTask` and
  :class:`aekt_plugin.timm.AEKTDistillationTask` (the student wrapped in
  :class:`aekt_plugin.timm.AEKTStudent` when the method has a serial layer).

The tasks compute the teacher's logits themselves, on the augmented batch the student sees; they equal the
fixed views' logits the other families read (the teacher is deterministic in eval mode). The optimiser,
schedule, batches and augmentation are the demo loop's (:func:`aekt_plugin.demo.train.train_student`),
only the step goes through the task (:func:`timm_step_factory`). The family's schedule has no KD warm-up,
because timm's ``LogitDistillationTask`` has none and the rows must differ only in the loss.

The student is timm's ``ResNet`` (BasicBlock, one block per stage, widths 4-8-16-32) with the stem's
max-pool removed, as CIFAR ports of ImageNet ResNets do, so that a 1×8×16 pair image still has a 4×8 map
after the stem.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from variants import SerialVariant

from aekt_plugin.demo.train import MethodConfig, StepFactory, TrainStep

__all__ = ["TIMM_RESNET", "timm_resnet", "timm_step_factory"]

TIMM_RESNET = "paperlike-digits-timm-resnet"


def timm_resnet(in_chans: int, num_classes: int) -> nn.Module:
    """timm's ResNet-10-style student for 1×8×16 inputs (about 28k parameters)."""
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(
        BasicBlock,
        [1, 1, 1, 1],
        num_classes=num_classes,
        in_chans=in_chans,
        channels=(4, 8, 16, 32),
        stem_width=4,
    )
    model.maxpool = nn.Identity()
    # The data are already normalised: no renormalisation between student and teacher in the tasks.
    model.pretrained_cfg = {"mean": (0.0,) * in_chans, "std": (1.0,) * in_chans, "num_classes": num_classes}
    return model


def _check_supported(method: MethodConfig) -> None:
    base = {f.name for f in fields(SerialVariant)}
    unsupported = [
        f"{f.name}={getattr(method, f.name)!r} (a variant of variants.py; the tasks run the package's losses)"
        for f in fields(method)
        if f.name not in base and getattr(method, f.name) != f.default
    ]
    if isinstance(method, SerialVariant) and (method.s_lr_scale != 1.0 or not method.s_weight_decay):
        unsupported.append("a serial layer with its own learning rate or weight decay")
    if method.loss == "kd":
        defaults = MethodConfig("kd", loss="kd").options
        changed = sorted(k for k, v in method.options.items() if k != "temperature" and v != defaults[k])
        if changed:
            unsupported.append(f"{', '.join(changed)} (timm's LogitDistillationTask takes a temperature only)")
    if unsupported:
        raise ValueError(f"method {method.name!r}: the timm family cannot run {', '.join(unsupported)}")


def timm_step_factory(teacher: nn.Module) -> StepFactory:
    """A :data:`~aekt_plugin.demo.train.StepFactory` whose steps go through timm tasks with ``teacher``."""
    from timm.task import ClassificationTask, LogitDistillationTask

    from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent

    if not getattr(teacher, "pretrained_cfg", None):
        teacher.pretrained_cfg = {"mean": (0.0,), "std": (1.0,)}
    teacher.eval()

    def factory(
        student: nn.Module, method: MethodConfig, num_classes: int, steps_per_epoch: int, warmup_epochs: float
    ) -> tuple[nn.Module, TrainStep]:
        _check_supported(method)
        model: nn.Module = student
        if method.loss == "ce":
            task = ClassificationTask(student, nn.CrossEntropyLoss(), verbose=False)
        elif method.loss == "kd":
            task = LogitDistillationTask(
                student,
                teacher,
                nn.CrossEntropyLoss(),
                temperature=method.option("temperature"),
                task_loss_weight=method.ce_weight,
                distill_loss_weight=method.kd_weight,
                verbose=False,
            )
        else:
            model = AEKTStudent(student, order=method.order, residual=getattr(method, "residual", False))
            task = AEKTDistillationTask(
                model,
                teacher,
                nn.CrossEntropyLoss(),
                distill_loss=method.criterion(),
                task_loss_weight=method.ce_weight,
                distill_loss_weight=method.kd_weight,
                warmup_epochs=warmup_epochs,
                updates_per_epoch=steps_per_epoch,
                verbose=False,
            )
        task.train()
        ce_weight = method.ce_weight

        def step(
            x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None
        ) -> dict[str, torch.Tensor]:
            result = task(x, y)
            loss_ce = ce_weight * result["task_loss"] if "kd_loss" in result else result["loss"]
            return {"loss": result["loss"], "loss_ce": loss_ce, "loss_kd": result["loss"] - loss_ce}

        return model, step

    return factory
