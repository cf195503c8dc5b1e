"""Argument checks shared by the fused losses, the reference losses and the integrations.

Shape, dtype and option checks need no pass over the data and always run. Value checks (finite logits,
targets in range, logits that look like probabilities) read the data, which on CUDA means a host
synchronisation, so they run only with ``validate_args=True``.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
ORDERS = ("cls_kd", "kd_cls", None)
TEMPERATURE_RANGE = (1e-4, 1e4)
"""Temperatures outside this range put ``T²`` or ``1/T`` of the loss beyond float32's useful range."""


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
    """Return ``value`` as a ``bool`` after checking that it is one (not merely truthy). numpy's bool
    scalar counts as a bool, as it does for ``if``."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return bool(value)
    qualified = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    raise TypeError(f"{name} must be a bool, got {qualified}")


def check_reduction(name: str, reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name} must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_order(order: object) -> str | None:
    """Check a serial-layer order: ``"cls_kd"``, ``"kd_cls"`` or ``None``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order  # type: ignore[return-value]


def check_ignore_index(name: str, ignore_index: object) -> int | None:
    if ignore_index is None or type(ignore_index) is int:
        return ignore_index  # type: ignore[return-value]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"{name} must be an int or None, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_temperature(name: str, temperature: object) -> float | Tensor:
    """A number in :data:`TEMPERATURE_RANGE`, or a floating-point tensor (its shape and values are checked
    against the logits by :func:`prepare_rows`)."""
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {temperature.dtype}")
        return temperature
    low, high = TEMPERATURE_RANGE
    number = _as_real(name, temperature)
    if not low <= number <= high:
        raise ValueError(
            f"{name} must be a number in [{low:g}, {high:g}] (beyond it T² or 1/T leaves float32's "
            f"useful range), got {temperature!r}"
        )
    return number


def _check_temperature_tensor(temperature: Tensor, sample_shape: torch.Size, device: torch.device) -> None:
    if temperature.dim() and temperature.shape != sample_shape:
        raise ValueError(
            "a temperature tensor must be 0-d or hold one value per sample, shape "
            f"{tuple(sample_shape)}; got shape {tuple(temperature.shape)}"
        )
    if temperature.device != device:
        raise ValueError(f"temperature must be on the logits' device {device}, got {temperature.device}")


def _check_max_weight(name: str, value: object) -> float:
    return check_positive(name, value, allow_inf=True)


def check_process_group(name: str, group: object) -> object:
    """``None`` (the world) or a ``torch.distributed`` process group."""
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return group


OPTION_CHECKS: dict[str, Callable[[str, object], object]] = {
    "temperature": check_temperature,
    "alpha": check_non_negative,
    "beta": check_non_negative,
    "max_weight": _check_max_weight,
    "normalize_weight": check_bool,
    "reduction": check_reduction,
    "ignore_index": check_ignore_index,
    "standardize": check_bool,
    "validate_args": check_bool,
    "global_batch": check_bool,
    "process_group": check_process_group,
}
"""The rule of every loss option, by keyword: the one place an option's type and range are checked."""


def check_options(**options: object) -> dict[str, object]:
    """Check each loss option by its rule in :data:`OPTION_CHECKS` (errors name the keyword) and return
    them normalised (real numbers as ``float``, numpy bools as ``bool``)."""
    try:
        return {name: OPTION_CHECKS[name](name, value) for name, value in options.items()}
    except KeyError as error:
        raise TypeError(f"unknown loss option {error.args[0]!r}") from None


def _as_real(name: str, value: object) -> float:
    if type(value) is float:  # the common case; the ABC check below is slow
        return value  # type: ignore[return-value]
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
    if (student_logits.dtype is torch.float64) != (teacher_logits.dtype is torch.float64):
        raise TypeError(
            "student_logits and teacher_logits must both be float64 or neither (float16, bfloat16 and "
            "float32 mix freely: they are computed in float32), got "
            f"{student_logits.dtype} and {teacher_logits.dtype}; convert one, e.g. teacher_logits.float()"
        )
    if student_logits.shape[1] < 2:
        raise ValueError(
            "the class dimension (dim 1) of the logits must have at least 2 classes, "
            f"got {student_logits.shape[1]}"
        )
    both_on_cpu = student_logits.is_cpu and teacher_logits.is_cpu  # no device objects on the common path
    if not both_on_cpu and student_logits.device != teacher_logits.device:
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
    if not (target.is_cpu and logits.is_cpu) and target.device != logits.device:
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


_WARNED: set[str] = set()


def warn_once(key: str, message: str, *, stacklevel: int = 3) -> None:
    """A ``UserWarning`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def warn_if_probabilities(name: str, logits: Tensor) -> None:
    """Warn (once) when every row of ``logits`` lies in [0, 1] and sums to 1: probabilities passed where
    logits belong give a different, wrong loss. Reads the data."""
    if f"probabilities:{name}" in _WARNED or logits.numel() == 0:
        return
    rows = logits.detach().movedim(1, -1).float()
    if bool(rows.min() >= 0) and bool(rows.max() <= 1):
        sums = rows.sum(dim=-1)
        if bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
            warn_once(
                f"probabilities:{name}",
                f"every row of {name} lies in [0, 1] and sums to 1: these look like probabilities, but the "
                "loss expects logits (pre-softmax scores); pass the logits, or their log if you only have "
                "probabilities",
                stacklevel=4,
            )


def check_values(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """The data-reading checks of ``validate_args=True`` on the logits."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{name} contains non-finite values (inf or nan)")
        warn_if_probabilities(name, logits)


def check_classes(classes: Tensor, num_classes: int, ignore_index: int | None) -> Tensor | None:
    """Check that every class index is in ``[0, C)`` or equal to ``ignore_index``; return the mask of the
    kept samples, or ``None`` when none is ignored. Reads the data."""
    if classes.numel() == 0:
        return None
    low, high = (int(x) for x in torch.aminmax(classes))
    may_hold_ignore_index = ignore_index is not None and low <= ignore_index <= high
    if 0 <= low and high < num_classes and not may_hold_ignore_index:
        return None
    ignored = (
        classes == ignore_index if ignore_index is not None else torch.zeros_like(classes, dtype=torch.bool)
    )
    kept = classes[~ignored]
    if kept.numel() and not (int(kept.min()) >= 0 and int(kept.max()) < num_classes):
        hint = "" if ignore_index is None else f" (and not ignore_index={ignore_index})"
        raise ValueError(
            f"target holds class indices in [{int(kept.min())}, {int(kept.max())}], outside "
            f"[0, {num_classes}){hint}"
        )
    return ~ignored


def check_probability_target(target: Tensor) -> None:
    if not bool((torch.isfinite(target) & (target >= 0)).all()):
        raise ValueError("target probabilities must be finite and non-negative")


def check_temperature_values(temperature: Tensor) -> None:
    low, high = TEMPERATURE_RANGE
    if not bool(((temperature >= low) & (temperature <= high)).all()):
        raise ValueError(
            f"temperature must lie in [{low:g}, {high:g}] (finite and positive), got values in "
            f"[{float(temperature.min()):g}, {float(temperature.max()):g}]"
        )


def _check_values_can_be_read() -> None:
    """``validate_args=True`` reads values, which ``torch.func.vmap`` and ``torch.export`` cannot: say what
    to pass instead of failing deep inside them."""
    where = None
    if torch.compiler.is_exporting():
        where = "torch.export"
    elif torch._C._functorch.maybe_current_level() is not None:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(level.key() == TransformType.Vmap for level in retrieve_all_functorch_interpreters()):
            where = "torch.func.vmap"
    if where is not None:
        raise ValueError(
            f"validate_args=True reads the logits' values, which {where} cannot do; pass validate_args=False "
            "(shapes, dtypes and options are still checked)"
        )


class Rows(NamedTuple):
    """Checked inputs flattened to rows: ``(B, C)`` logits (or dense ``(N, C, S)``, see
    :func:`prepare_rows`), int64 classes ``(B,)`` (one per sample, flattened), the sample shape, the
    temperature (a number, a 0-d tensor or a ``(B,)`` tensor), and the ignore information: ``keep`` when
    the targets were read, else ``ignore_index`` to be resolved by the kernel's caller."""

    student: Tensor
    teacher: Tensor
    classes: Tensor
    sample_shape: torch.Size
    temperature: float | Tensor
    keep: Tensor | None
    ignore_index: int | None


def _as_rows(logits: Tensor, dense: bool) -> Tensor:
    """``(N, C, d1, ...)`` to ``(N, C, d1·...)`` (a view where the layout allows) with ``dense``, else to
    the rows ``(N·d1·..., C)``; ``(B, C)`` is returned as it is."""
    if logits.dim() == 2:
        return logits
    if dense:
        return logits.reshape(logits.shape[0], logits.shape[1], -1)
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def prepare_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float | Tensor,
    reduction: str,
    validate_args: bool,
    ignore_index: int | None = None,
    target_required: bool = True,
    dense: bool = False,
) -> Rows:
    """Check the tensors against each other and flatten ``(N, C, d1, ...)`` to ``(B, C)`` rows; the options
    come checked by :func:`check_options`.

    ``target=None`` is allowed only where the value does not depend on it (``target_required=False``, KD)
    and then stands for class 0 everywhere. ``ignore_index`` applies to class-index targets: with
    ``validate_args`` the targets are read here and ``keep`` says which samples count (``None``: all);
    otherwise ``ignore_index`` is passed on for the caller to resolve. With ``dense``, dense logits stay
    ``(N, C, S)``, classes at dim 1 where they lie (the fused kernel reduces them there), instead of rows.
    """
    check_logits(student_logits, teacher_logits)
    sample_shape = student_logits.shape[:1] + student_logits.shape[2:]
    if isinstance(temperature, Tensor):
        _check_temperature_tensor(temperature, sample_shape, student_logits.device)
    soft_target = isinstance(target, Tensor) and target.is_floating_point()
    if target is None:
        if target_required:
            raise TypeError(
                "target is required: the split into target and non-target classes (TCKD, NCKD) needs each "
                "sample's class; pass class indices, or class probabilities shaped like the logits"
            )
        classes = torch.zeros(sample_shape, dtype=torch.long, device=student_logits.device)
    else:
        classes = target_classes(target, student_logits)
    keep = None
    if validate_args:
        _check_values_can_be_read()
        check_values(student_logits, teacher_logits)
        if isinstance(temperature, Tensor):
            check_temperature_values(temperature)
        if soft_target:
            check_probability_target(target)  # type: ignore[arg-type]
        elif target is not None:
            keep = check_classes(classes, student_logits.shape[1], ignore_index)
    rows_classes = classes if classes.dim() == 1 else classes.reshape(-1)
    if keep is not None:
        keep = keep.reshape(-1)
        rows_classes = torch.where(keep, rows_classes, 0)
    if isinstance(temperature, Tensor) and temperature.dim() > 1:
        temperature = temperature.reshape(-1)
    return Rows(
        student=_as_rows(student_logits, dense),
        teacher=_as_rows(teacher_logits, dense),
        classes=rows_classes,
        sample_shape=sample_shape,
        temperature=temperature,
        keep=keep,
        ignore_index=None if validate_args or soft_target or target is None else ignore_index,
    )
