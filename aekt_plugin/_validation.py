"""Argument checks shared by the fused losses, the reference losses and the integrations.

Shape, dtype and option checks need no pass over the data and always run. Value checks (finite logits,
targets in range) read the data, which on CUDA means a host synchronisation, so they run only with
``validate_args=True`` (SPEC §4).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
ORDERS = ("cls_kd", "kd_cls", None)


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float after checking that it is a real number ``> 0``."""
    number = _as_real(name, value)
    if not number > 0 or (math.isinf(number) and not allow_inf):
        limit = "a positive number (math.inf allowed)" if allow_inf else "a finite positive number"
        raise ValueError(f"{name} must be {limit}, got {value!r}")
    return number


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float after checking that it is a finite real number ``>= 0``."""
    number = _as_real(name, value)
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` after checking that it is a ``bool`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_order(order: object) -> str | None:
    """Check a serial-layer order (SPEC §3): ``"cls_kd"``, ``"kd_cls"`` or ``None``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order  # type: ignore[return-value]


def _as_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_logits(student_logits: object, teacher_logits: object) -> None:
    """Check that the two logit tensors are floating point, ``(N, C, d1, ...)`` and alike."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
        if logits.dim() < 2:
            raise ValueError(
                f"{name} must have shape (B, C) or (N, C, d1, ...), got shape {tuple(logits.shape)}"
            )
    assert isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape (same class count, no "
            f"broadcasting), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] < 2:
        raise ValueError(
            "the class dimension (dim 1) of the logits must have at least 2 classes, "
            f"got {student_logits.shape[1]}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )


def target_classes(target: object, logits: torch.Tensor) -> torch.Tensor:
    """Return the target class of every sample as an int64 tensor shaped like ``logits`` without dim 1.

    ``target`` holds class indices ``(N, d1, ...)`` of any integer dtype, or class probabilities shaped
    like ``logits`` (mixup/cutmix), whose argmax over dim 1 is then the target class.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got {target.device}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                "a floating-point target holds class probabilities and must have the logits' shape "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return target.argmax(dim=1)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must hold integer class indices or float probabilities, got dtype {target.dtype}"
        )
    expected = logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"target must have shape {tuple(expected)} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return target if target.dtype == torch.int64 else target.long()


def check_values(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None
) -> None:
    """The data-reading checks of ``validate_args=True``."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{name} contains non-finite values (inf or nan)")
    if target is None:
        return
    if target.is_floating_point():
        if not bool((torch.isfinite(target) & (target >= 0)).all()):
            raise ValueError("target probabilities must be finite and non-negative")
        return
    num_classes = student_logits.shape[1]
    if target.numel() and not bool(((target >= 0) & (target < num_classes)).all()):
        low, high = int(target.min()), int(target.max())
        raise ValueError(f"target holds class indices in [{low}, {high}], outside [0, {num_classes})")


class Rows(NamedTuple):
    """Checked inputs flattened to rows: ``(B, C)`` logits, int64 classes ``(B,)``, and the sample shape."""

    student: Tensor
    teacher: Tensor
    classes: Tensor
    sample_shape: torch.Size
    temperature: float


def _as_rows(logits: Tensor) -> Tensor:
    """``(N, C, d1, ...)`` to ``(N·d1·..., C)``; ``(B, C)`` is returned as it is."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def prepare_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float,
    reduction: str,
    validate_args: bool,
) -> Rows:
    """Run every check of SPEC §7 and flatten ``(N, C, d1, ...)`` to ``(B, C)`` rows.

    ``target=None`` (KD only, whose value does not depend on it) stands for class 0 everywhere.
    """
    check_logits(student_logits, teacher_logits)
    temperature = check_positive("temperature", temperature)
    check_reduction(reduction)
    sample_shape = student_logits.shape[:1] + student_logits.shape[2:]
    if target is None:
        classes = torch.zeros(sample_shape, dtype=torch.long, device=student_logits.device)
    else:
        classes = target_classes(target, student_logits)
    if validate_args:
        check_values(student_logits, teacher_logits, target)
    return Rows(
        student=_as_rows(student_logits),
        teacher=_as_rows(teacher_logits),
        classes=classes if classes.dim() == 1 else classes.reshape(-1),
        sample_shape=sample_shape,
        temperature=temperature,
    )
