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
    "BASELINES",
    "DEFAULT_SHAPES",
    "KERNEL_METHODS",
    "AGREEMENT_PAIRS",
    "Case",
    "LossFn",
    "loss_functions",
    "make_cases",
    "make_inputs",
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
BASELINES: tuple[str, ...] = ("kd_plain", "dkd_mdistiller", "aekt_reference")
"""The methods every other one is given a paired time ratio against."""

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
    """One :class:`Case` per method name, all on the same inputs."""
    losses = loss_functions(alpha=alpha, beta=beta)
    return {name: Case(losses[name], (student, teacher, target, temperature), {}) for name in names}
