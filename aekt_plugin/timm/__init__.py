r"""AEKT for timm: a student wrapper with the serial layer and timm training tasks.

Two lines change against timm's own logit distillation::

    student = timm.create_model("resnet18", num_classes=100)
    task = AEKTDistillationTask(student, "resnet50", updates_per_epoch=len(loader))  # was: LogitDistill...

:class:`AEKTDistillationTask` takes any timm classifier, and its distillation loss as a value
(``distill_loss=AEKTLoss(beta=2.0)``, or ``DKDLoss``, ``KDLoss``, any module with their call signature);
:class:`DKDDistillationTask` is the same task whose default loss is DKD's. :class:`AEKTStudent` adds
AEKT's serial layer ``S`` after the classifier (:class:`aekt_plugin.serial.SerialStudent`) and keeps
timm's model API; like DeiT's ``VisionTransformerDistilled``, ``set_distilled_training(True)`` makes a
training-mode ``forward`` return ``(z_cls, z_kd)``, while an eval-mode ``forward`` returns the
classification logits ``z_cls`` as a plain tensor.

Importing this module imports timm (>= 1.0.29); ``import aekt_plugin`` alone never does.
"""

from __future__ import annotations

try:
    import timm  # the real timm: absolute import, not this package
except ImportError as exc:  # pragma: no cover - exercised only without timm installed
    raise ImportError("aekt_plugin.timm needs timm >= 1.0.29 (pip install 'aekt-plugin[timm]')") from exc


def _release(version: str) -> tuple[int, ...]:
    """``"1.0.29.dev0"`` -> ``(1, 0, 29)``: a development build counts as its release."""
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split("+")[0].split(".")[:3])


if _release(timm.__version__) < (1, 0, 29):  # pragma: no cover - depends on the install
    raise ImportError(f"aekt_plugin.timm needs timm >= 1.0.29 (pip install -U timm); found timm {timm.__version__}")

from .checkpoint import export_checkpoint  # noqa: E402
from .student import AEKTStudent, create_student  # noqa: E402
from .task import AEKTDistillationTask, DKDDistillationTask  # noqa: E402

__all__ = ["AEKTDistillationTask", "AEKTStudent", "DKDDistillationTask", "create_student", "export_checkpoint"]
