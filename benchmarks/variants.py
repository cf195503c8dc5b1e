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

The serial layer's own learning-rate multiplier, weight decay and residual form are options of
:class:`aekt_plugin.demo.train.MethodConfig` already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aekt_plugin.functional import TargetStats, Weights, decoupled_loss
from aekt_plugin.demo.train import MethodConfig

__all__ = ["VariantMethod"]


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
class VariantMethod(MethodConfig):
    """An AEKT variant of the search: :class:`MethodConfig` plus the options of the module docstring."""

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
        if self.standardize or self.kd_weight != 1.0:
            raise ValueError("the variants take neither standardize nor kd_weight")

    def weights(self, stats: TargetStats) -> Weights:
        log_r = stats.log_ratio[:, 0] * self.gamma
        if self.one_sided:
            log_r = log_r.clamp(min=0.0)
        a = _adaptive(log_r, scale=self.alpha, max_weight=self.max_weight, normalize=self.normalize_weight)
        if self.implicit_gamma == 0.0:
            return Weights(a, self.beta)
        log_s = stats.log_ratio[:, 1] * self.implicit_gamma
        b = _adaptive(log_s, scale=self.beta, max_weight=self.max_weight, normalize=self.normalize_weight)
        return Weights(a, b)

    def loss_fn(self):
        def loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
            return decoupled_loss(
                student_logits, teacher_logits, target, self.weights, temperature=self.temperature, validate_args=False
            )

        return loss

    def build(self, student: nn.Module, num_classes: int) -> nn.Module:
        if not self.detach_head:
            return super().build(student, num_classes)
        import aekt_plugin as ak

        serial = ak.SerialLayer(num_classes, order="cls_kd", residual=self.residual)
        return _DetachedHeadClassifier(student, serial)
