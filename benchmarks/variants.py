r"""AEKT design-space variants for the accuracy search, kept out of the package until one earns its place.

Every variant is still a member of the decoupled family ``L = T²(a·TCKD + b·NCKD)`` with stop-gradient
weights, computed by the package's fused kernel through a custom weight rule; only ``a``, ``b`` or the
student head differ from :func:`aekt_plugin.aekt_loss`. With ``r = q_t/p_t`` and ``s = (1-q_t)/(1-p_t)``:

==================  ====================================================================================
option              weight
==================  ====================================================================================
``gamma``           ``a = α·min(r^γ, w_max)`` (``γ = 1``: AEKT)
``one_sided``       ``a = α·min(max(r, 1)^γ, w_max)``: the ratio only raises the weight where ``p_t < q_t``
``implicit_gamma``  ``b = β·min(s^γ_b, w_max)`` (``γ_b = 0``: AEKT's constant ``β``)
``normalize_weight``  each adaptive weight divided by its batch mean (the package's option, for ``b`` too)
``detach_head``     ``order="cls_kd"`` only: ``z_kd = S(W̄ h + c̄)`` with the classifier's weights detached,
                    so the distillation gradient reaches the backbone only through ``S`` and the
                    classifier itself learns from the cross-entropy alone
==================  ====================================================================================

The serial layer's own forms are :class:`SerialVariant`'s options: ``residual`` (``z_kd = z_cls + S·z_cls``
with ``S`` zero-initialised), ``s_weight_decay`` (whether ``S`` is weight-decayed) and ``s_lr_scale`` (the
multiplier of ``S``'s learning rate). Both classes extend the demo's
:class:`aekt_plugin.demo.train.MethodConfig`, whose ``options`` are the loss options in effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aekt_plugin.functional import TargetStats, Weights, decoupled_loss
from aekt_plugin.demo.train import MethodConfig

__all__ = ["SerialVariant", "VariantMethod", "method_from_dict"]


def _adaptive(log_weight: Tensor, *, scale: float, max_weight: float, normalize: bool) -> Tensor:
    log_weight = log_weight.clamp(max=math.log(max_weight))
    if normalize:
        return torch.softmax(log_weight, dim=0) * (scale * log_weight.shape[0])
    return log_weight.exp() * scale


class _DetachedHeadClassifier(nn.Module):
    """``cls_kd`` with the classifier detached on the distillation path (see the module docstring)."""

    def __init__(self, student: nn.Module, serial: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.serial = serial

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.student.forward_head(self.student.forward_features(x), pre_logits=True)
        classifier = self.student.get_classifier()
        z_cls = classifier(features)
        bias = None if classifier.bias is None else classifier.bias.detach()
        z_kd = self.serial.transform(F.linear(features, classifier.weight.detach(), bias))
        return z_cls, z_kd

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


@dataclass(frozen=True)
class SerialVariant(MethodConfig):
    """:class:`MethodConfig` with the serial layer's benchmark-only forms (the module docstring)."""

    residual: bool = False
    s_weight_decay: bool = True
    s_lr_scale: float = 1.0

    def build(self, student: nn.Module, num_classes: int) -> nn.Module:
        from aekt_plugin.serial import SerialStudent

        return SerialStudent(student, self.order, residual=self.residual, num_classes=num_classes)

    def param_groups(self, student: nn.Module, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        groups = super().param_groups(student, model, weight_decay)
        if len(groups) == 2:  # the serial layer's
            groups[1].update(weight_decay=weight_decay if self.s_weight_decay else 0.0, lr_scale=self.s_lr_scale)
        return groups


@dataclass(frozen=True)
class VariantMethod(SerialVariant):
    """An AEKT variant of the search: :class:`SerialVariant` plus the options of the module docstring."""

    gamma: float = 1.0
    one_sided: bool = False
    implicit_gamma: float = 0.0
    detach_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss != "aekt":
            raise ValueError("a VariantMethod is an AEKT variant (loss='aekt')")
        if self.detach_head and self.order != "cls_kd":
            raise ValueError("detach_head needs order='cls_kd'")
        if self.option("standardize") or self.kd_weight != 1.0:
            raise ValueError("the variants take neither standardize nor kd_weight")

    def weights(self, stats: TargetStats) -> Weights:
        log_r = stats.log_ratio[:, 0] * self.gamma
        if self.one_sided:
            log_r = log_r.clamp(min=0.0)
        options = self.options
        bound, normalize = options["max_weight"], options["normalize_weight"]
        a = _adaptive(log_r, scale=options["alpha"], max_weight=bound, normalize=normalize)
        if self.implicit_gamma == 0.0:
            return Weights(a, options["beta"])
        log_s = stats.log_ratio[:, 1] * self.implicit_gamma
        b = _adaptive(log_s, scale=options["beta"], max_weight=bound, normalize=normalize)
        return Weights(a, b)

    def loss_fn(self):
        def loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
            return decoupled_loss(
                student_logits,
                teacher_logits,
                target,
                self.weights,
                temperature=self.option("temperature"),
                validate_args=False,
            )

        return loss

    def build(self, student: nn.Module, num_classes: int) -> nn.Module:
        if not self.detach_head:
            return super().build(student, num_classes)
        import aekt_plugin as ak

        serial = ak.SerialLayer(num_classes, order="cls_kd", residual=self.residual)
        return _DetachedHeadClassifier(student, serial)


def method_from_dict(record: Mapping[str, Any]) -> MethodConfig:
    """A method back from its JSON record: a :class:`VariantMethod` where it has variant options, a
    :class:`SerialVariant` where the serial layer has a benchmark form, else a plain :class:`MethodConfig`."""
    for cls in (VariantMethod, SerialVariant):
        own = {f.name for f in fields(cls)} - {f.name for f in fields(MethodConfig)}
        if any(record.get(name, f.default) != f.default for f in fields(cls) if (name := f.name) in own):
            return cls.from_dict(record)
    return MethodConfig.from_dict(record)
