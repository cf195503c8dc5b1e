r"""What ``aekt bench`` measures: the losses, their inputs, and one call of each at one shape.

================== ==================================================================================
``kd_plain``        ``T²·kl_div(log_softmax(z/T), log_softmax(v/T), log_target=True)``, timm's KD
``dkd_mdistiller``  DKD by mdistiller's algorithm (:func:`aekt_plugin._baselines.dkd_mdistiller`)
``aekt_reference``  the readable autograd AEKT of :mod:`aekt_plugin.reference`
``kd_fused``        :func:`aekt_plugin.kd_loss` (fused kernel, ``validate_args=False``)
``dkd_fused``       :func:`aekt_plugin.dkd_loss` (fused kernel, ``validate_args=False``)
``aekt_fused``      :func:`aekt_plugin.aekt_loss` (fused kernel, ``validate_args=False``)
================== ==================================================================================

Every method is timed forward **and** backward: ``torch.autograd.grad(loss, z)`` on ``(B, C)`` student
logits ``z`` (a leaf that requires grad), detached teacher logits ``v`` and int64 targets. The fused and
reference losses use the package defaults for every other option (``max_weight``, ``normalize_weight``).

A fused method with an option, ``<fused>+<option>`` (e.g. ``aekt_fused+ignore``), is the same loss on the
same inputs with one option of the kernel on, to be compared with the loss without it:

================== ==================================================================================
``+standardize``    ``standardize=True``: both logits standardized per sample first
``+learnable_T``    the temperature as a 0-d tensor with ``requires_grad=True``; the step also returns dL/dT
``+per_sample_T``   the temperature as a ``(B,)`` tensor (the same value for every sample)
``+ignore``         every tenth target set to ``ignore_index`` (-100)
================== ==================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import aekt_plugin
from aekt_plugin import reference
from aekt_plugin._baselines import dkd_mdistiller, kd_plain

__all__ = [
    "AGREEMENT_PAIRS",
    "BASELINES",
    "DEFAULT_SHAPES",
    "FUSED_METHODS",
    "KERNEL_METHODS",
    "OPTIONS",
    "OPTION_METHODS",
    "Case",
    "LossFn",
    "is_known",
    "loss_functions",
    "make_cases",
    "make_inputs",
    "split_option",
]

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((64, 100), (256, 100), (512, 1000), (1024, 1000))
KERNEL_METHODS: tuple[str, ...] = (
    "kd_plain",
    "dkd_mdistiller",
    "aekt_reference",
    "kd_fused",
    "dkd_fused",
    "aekt_fused",
)
BASELINES: tuple[str, ...] = ("kd_plain", "dkd_mdistiller", "aekt_reference", "dkd_fused")
"""The methods every other one is given a paired time ratio against (``dkd_fused``: what AEKT's weight rule
costs over a constant one, on the same kernel)."""

FUSED_METHODS: tuple[str, ...] = ("kd_fused", "dkd_fused", "aekt_fused")

OPTIONS: dict[str, str] = {
    "standardize": "standardize=True",
    "learnable_T": "temperature as a 0-d tensor with requires_grad=True (the step also returns dL/dT)",
    "per_sample_T": "temperature as a (B,) tensor",
    "ignore": "every tenth target set to ignore_index=-100",
}
"""The kernel options a fused method can be timed with, ``<fused>+<option>``, and what each sets."""

OPTION_METHODS: tuple[str, ...] = tuple(f"aekt_fused+{option}" for option in OPTIONS)
"""The methods ``aekt bench --options`` adds."""

_IGNORE_INDEX = -100
_IGNORE_EVERY = 10

AGREEMENT_PAIRS: tuple[tuple[str, str], ...] = (
    ("kd_fused", "kd_plain"),
    ("dkd_fused", "dkd_mdistiller"),
    ("aekt_fused", "aekt_reference"),
)
"""(fused, baseline) pairs that compute the same loss: their values and gradients are compared."""

LossFn = Callable[..., Tensor]
"""``fn(student, teacher, target, temperature, **options) -> scalar`` (batch mean)."""


def loss_functions(*, alpha: float, beta: float) -> dict[str, LossFn]:
    """The six losses of :data:`KERNEL_METHODS`, by name; the fused ones also take the kernel's options."""
    return {
        "kd_plain": lambda z, v, y, t: kd_plain(z, v, t),
        "dkd_mdistiller": lambda z, v, y, t: dkd_mdistiller(z, v, y, alpha=alpha, beta=beta, temperature=t),
        "aekt_reference": lambda z, v, y, t: reference.aekt_loss(
            z, v, y, temperature=t, alpha=alpha, beta=beta, validate_args=False
        ),
        "kd_fused": lambda z, v, y, t, **kw: aekt_plugin.kd_loss(
            z, v, y, temperature=t, validate_args=False, **kw
        ),
        "dkd_fused": lambda z, v, y, t, **kw: aekt_plugin.dkd_loss(
            z, v, y, temperature=t, alpha=alpha, beta=beta, validate_args=False, **kw
        ),
        "aekt_fused": lambda z, v, y, t, **kw: aekt_plugin.aekt_loss(
            z, v, y, temperature=t, alpha=alpha, beta=beta, validate_args=False, **kw
        ),
    }


@dataclass(frozen=True)
class Case:
    """One method at one shape: ``case(*case.args)`` is the loss, ``fn(*args, **options)``.

    ``args`` are ``(student, teacher, target, temperature)``. A step is one forward and one backward with
    respect to every argument that requires grad: the student's logits, and a learnable temperature.
    """

    fn: LossFn
    args: tuple[Any, ...]
    options: dict[str, Any]

    def __call__(self, *args: Any) -> Tensor:
        return self.fn(*args, **self.options)

    def loss(self) -> Tensor:
        return self(*self.args)

    def grad_inputs(self) -> tuple[Tensor, ...]:
        return tuple(a for a in self.args if isinstance(a, Tensor) and a.requires_grad)

    def step(self) -> None:
        torch.autograd.grad(self.loss(), self.grad_inputs())


def split_option(name: str) -> tuple[str, str | None]:
    """``"aekt_fused+ignore"`` -> ``("aekt_fused", "ignore")``; ``"kd_plain"`` -> ``("kd_plain", None)``."""
    base, _, option = name.partition("+")
    return base, option or None


def is_known(name: str) -> bool:
    """Whether ``name`` is one of :data:`KERNEL_METHODS` or a fused method with one of :data:`OPTIONS`."""
    base, option = split_option(name)
    return base in KERNEL_METHODS if option is None else base in FUSED_METHODS and option in OPTIONS


def _with_option(
    option: str, target: Tensor, temperature: float
) -> tuple[Tensor, float | Tensor, dict[str, Any]]:
    """``(target, temperature, keyword options)`` of a fused loss call with ``option`` on."""
    if option == "standardize":
        return target, temperature, {"standardize": True}
    if option == "learnable_T":
        return target, torch.tensor(float(temperature), device=target.device, requires_grad=True), {}
    if option == "per_sample_T":
        return target, torch.full(target.shape, float(temperature), device=target.device), {}
    if option == "ignore":
        ignored = target.clone()
        ignored[::_IGNORE_EVERY] = _IGNORE_INDEX
        return ignored, temperature, {}
    raise ValueError(f"unknown option {option!r}; choose from {list(OPTIONS)}")


def make_inputs(
    batch: int, classes: int, *, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits (leaf, requires grad), detached teacher logits and int64 targets, seeded."""
    gen = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(batch, classes, generator=gen)).to(device=device, dtype=dtype)
    teacher = (3.0 * torch.randn(batch, classes, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    student.requires_grad_(True)
    return student, teacher, target


def make_cases(
    names: Sequence[str],
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
) -> dict[str, Case]:
    """One :class:`Case` per method name, all on the same inputs (an option changes only what it sets)."""
    losses = loss_functions(alpha=alpha, beta=beta)
    cases = {}
    for name in names:
        base, option = split_option(name)
        if option is None:
            cases[name] = Case(losses[name], (student, teacher, target, temperature), {})
        else:
            case_target, case_temperature, options = _with_option(option, target, temperature)
            cases[name] = Case(losses[base], (student, teacher, case_target, case_temperature), options)
    return cases
