r"""Task separation (SPEC §3): the serial layer and the total objective's warm-up.

The serial layer ``S: R^C → R^C`` sits in series with the student's classifier and separates the
classification task (cross-entropy on ``z_cls``) from the distillation task (the loss on ``z_kd``):

* ``order="cls_kd"``: ``z_cls = head(h)``, ``z_kd = S(z_cls)``; ``S`` is dropped at inference.
* ``order="kd_cls"``: ``z_kd = head(h)``, ``z_cls = S(z_kd)``; ``S`` can be folded into the head.
* no serial layer (``order=None``): ``z_cls = z_kd = head(h)``.

``S(x) = W x + c`` with ``W = I``, ``c = 0`` at initialisation, or, with ``residual=True``,
``S(x) = x + W x + c`` with ``W = 0``. Read as a ``C×C`` matrix, the effective map is the inter-class
relation the student learned (:meth:`SerialLayer.relation_matrix`).

The total objective of one step (mdistiller's conventions) is::

    loss_ce = ce_weight · CE(z_cls, y)
    loss_kd = min(progress / warmup, 1) · L(z_kd, v, y)        # L already contains T²

with ``progress`` counted in epochs or, better on small problems (SPEC §6), optimiser steps.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_bool, check_order

__all__ = ["SerialLayer", "split_logits", "warmup_factor"]


class SerialLayer(nn.Module):
    """The ``C×C`` affine layer of SPEC §3, in series with a classifier.

    Args:
        num_classes: ``C``, the classifier's output size.
        order: ``"cls_kd"`` (cross-entropy before ``S``, distillation after it) or ``"kd_cls"``.
        residual: parameterise ``S(x) = x + W x + c`` with ``W`` initialised to zero instead of
            ``S(x) = W x + c`` with ``W = I``; the two start as the same map but differ under weight decay.

    Shape:
        ``forward`` takes head logits ``(B, C)`` and returns ``(z_cls, z_kd)``, both ``(B, C)``.

    Examples::

        >>> serial = SerialLayer(10, order="kd_cls")
        >>> z_cls, z_kd = serial(torch.randn(4, 10))
        >>> torch.equal(z_cls, z_kd)  # S starts as the identity
        True
    """

    def __init__(self, num_classes: int, *, order: str = "cls_kd", residual: bool = False) -> None:
        super().__init__()
        if check_order(order) is None:
            raise ValueError(
                "order must be 'cls_kd' or 'kd_cls' for a SerialLayer; use no layer for order=None"
            )
        self.order = order
        self.residual = check_bool("residual", residual)
        self.weight = nn.Parameter(torch.empty(0, 0))
        self.bias = nn.Parameter(torch.empty(0))
        self.reset(num_classes)

    @property
    def num_classes(self) -> int:
        return self.bias.shape[0]

    def reset(self, num_classes: int | None = None) -> None:
        """Re-initialise ``S`` to the identity map, for ``num_classes`` classes if given."""
        size = self.num_classes if num_classes is None else num_classes
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        device, dtype = self.weight.device, self.weight.dtype
        weight = torch.zeros(size, size, device=device, dtype=dtype)
        if not self.residual:
            weight.fill_diagonal_(1.0)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype))

    def transform(self, logits: Tensor) -> Tensor:
        """Apply ``S`` alone: ``W x + c`` (``x + W x + c`` when residual)."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"SerialLayer expects logits with {self.num_classes} classes in the last dim, "
                f"got {tuple(logits.shape)}"
            )
        mapped = F.linear(logits, self.weight, self.bias)
        return logits + mapped if self.residual else mapped

    def forward(self, head_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(z_cls, z_kd)`` for the classifier's output ``head_logits``."""
        if self.order == "cls_kd":
            return head_logits, self.transform(head_logits)
        return self.transform(head_logits), head_logits

    @torch.no_grad()
    def relation_matrix(self) -> Tensor:
        """The effective ``C×C`` matrix of ``S`` (``I + W`` when residual): the learned class relations."""
        if self.residual:
            return self.weight + torch.eye(
                self.num_classes, device=self.weight.device, dtype=self.weight.dtype
            )
        return self.weight.detach().clone()

    @torch.no_grad()
    def fold(self, classifier: nn.Linear) -> nn.Linear:
        """A new ``nn.Linear`` whose output is ``z_cls`` at inference, with ``S`` folded in where needed.

        For ``"kd_cls"``, ``S(W_h h + c_h) = (M W_h) h + (M c_h + c)`` with ``M`` the relation matrix: a
        product of two affine maps, exact up to rounding. For ``"cls_kd"``, ``S`` is not used at inference
        and the classifier is copied unchanged. The given classifier is never modified.
        """
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear to fold into, got {type(classifier).__name__}")
        if classifier.out_features != self.num_classes:
            raise ValueError(
                f"classifier has {classifier.out_features} outputs but the serial layer has "
                f"{self.num_classes} classes"
            )
        folded = copy.deepcopy(classifier)
        if self.order == "cls_kd":
            return folded
        relation = self.relation_matrix().to(classifier.weight.dtype)
        head_bias = classifier.bias if classifier.bias is not None else torch.zeros_like(self.bias)
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.empty_like(self.bias))
        folded.weight.copy_(relation @ classifier.weight)
        folded.bias.copy_(relation @ head_bias + self.bias)
        return folded

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, order={self.order!r}, residual={self.residual}"


def split_logits(head_logits: Tensor, serial_layer: SerialLayer | None) -> tuple[Tensor, Tensor]:
    """``(z_cls, z_kd)`` from the classifier's output; both are ``head_logits`` without a serial layer."""
    if serial_layer is None:
        return head_logits, head_logits
    return serial_layer(head_logits)


def warmup_factor(progress: float, warmup: float) -> float:
    """``min(progress / warmup, 1)``, linear from 0; ``warmup <= 0`` means no warm-up (factor 1)."""
    if warmup <= 0:
        return 1.0
    return min(max(float(progress), 0.0) / float(warmup), 1.0)
