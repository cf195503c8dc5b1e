""":class:`AEKTStudent`: AEKT's serial layer in series with any timm classifier, keeping timm's model API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import group_parameters
from timm.optim import auto_group_layers
from torch import Tensor, nn

from .._validation import check_bool, check_order
from ..defaults import DEFAULTS
from ..serial import SerialStudent

__all__ = ["AEKTStudent", "create_student"]

# Attributes read from the wrapped model only where it has them (``hasattr`` stays honest).
_FORWARDED_IF_PRESENT = (
    "head_hidden_size",
    "forward_intermediates",
    "feature_info",
    "global_pool",
    "embed_dim",
)


def _infer_in_chans(model: nn.Module) -> int:
    """``in_chans`` of a timm model: its attribute, else its first conv, else ``pretrained_cfg``."""
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        try:
            conv = model.get_submodule(first_conv)
        except AttributeError:
            conv = None
        if isinstance(conv, nn.Conv2d):
            return conv.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    input_size = cfg.get("input_size")
    return int(input_size[0]) if input_size else 3


def _example_input(model: nn.Module, in_chans: int) -> Tensor:
    """One input the model accepts, for :func:`~aekt_plugin.serial.check_fold`: the patch embedding's
    fixed image size where there is one, else ``pretrained_cfg["input_size"]``."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (in_chans, 224, 224))[1:]
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    parameter = next(model.parameters(), None)
    like = {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, int(height), int(width), generator=generator).to(**like)


def _check_timm_classifier(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm classifier (an nn.Module), got {type(model).__name__}")
    missing = [
        name
        for name in ("num_classes", "get_classifier", "reset_classifier", "forward_features", "forward_head")
        if not hasattr(model, name)
    ]
    if missing:
        raise TypeError(
            f"model {type(model).__name__} lacks timm's classifier API ({', '.join(missing)}); "
            "AEKTStudent wraps models made by timm.create_model"
        )
    num_classes = model.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"model {type(model).__name__} has no classifier (num_classes={num_classes!r}); "
            "create it with num_classes >= 1 or call reset_classifier(num_classes) first"
        )
    if getattr(model, "distilled_training", False):
        raise ValueError(
            f"model {type(model).__name__} has distilled_training enabled and returns two heads' logits; "
            "call model.set_distilled_training(False) first: AEKTStudent then treats the mean of its heads "
            "(the model's inference output) as the classifier, and its own set_distilled_training() "
            "supplies the distillation logits"
        )
    return model


class AEKTStudent(SerialStudent):
    r"""A timm classifier with AEKT's serial layer in series with its classifier.

    With ``h`` the pooled features and ``head(h)`` the wrapped model's logits:

    * ``order="cls_kd"``: ``z_cls = head(h)``, ``z_kd = S(z_cls)``; eval output is exactly the model's.
    * ``order="kd_cls"``: ``z_kd = head(h)``, ``z_cls = S(z_kd)``; :meth:`fold` merges ``S`` into the head.
    * ``order=None``: no serial layer, ``z_cls = z_kd = head(h)``.

    ``S(x) = W x + c`` starts as the identity (``residual=True``: ``x + W x + c`` with ``W = 0``).

    The wrapper keeps timm's model API (``num_classes``, ``num_features``, ``in_chans``, ``pretrained_cfg``,
    ``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``; ``head_hidden_size`` and
    ``forward_intermediates`` where the model has them), so ``timm.optim.create_optimizer_v2`` and
    ``timm.data.resolve_data_config`` work on it. As in DeiT's ``VisionTransformerDistilled``,
    :meth:`set_distilled_training` switches a training-mode ``forward`` to return ``(z_cls, z_kd)``; an
    eval-mode ``forward`` always returns ``z_cls`` as a plain tensor.

    Args:
        model: a timm classifier (``timm.create_model(..., num_classes >= 1)``). DeiT-distilled models are
            accepted with ``distilled_training`` off: the mean of their two heads (their inference output)
            is the classifier.
        order: ``"cls_kd"`` (``S`` is dropped at inference, so the wrapped model is what you deploy),
            ``"kd_cls"`` (``S`` is folded into the classifier by :meth:`fold`) or ``None`` (no serial
            layer). With ``"kd_cls"`` the wrapper runs the model once when it is built and refuses a model
            whose output is not exactly its classifier's (VOLO adds an auxiliary head's maximum), where
            folding would change the output. The default is ``aekt_plugin.DEFAULTS.order``, ``None``:
            the accuracy benchmark found no gain from the serial layer, so :class:`AEKTDistillationTask`
            takes the plain timm model as well; the wrapper is for measuring the separation and for
            reading :meth:`relation_matrix`.
        residual: the residual parameterisation of ``S``.
        serial_weight_decay: ``False`` lists ``S``'s parameters in :meth:`no_weight_decay`, so timm's
            optimizer factory exempts them from weight decay.
        example_input: the input of that check (default: one random image of the patch embedding's
            fixed size or of ``pretrained_cfg["input_size"]``).

    Examples::

        >>> import timm
        >>> student = AEKTStudent(timm.create_model("resnet10t", num_classes=10), order="kd_cls")
        >>> student.set_distilled_training(True)
        >>> z_cls, z_kd = student.train()(torch.randn(2, 3, 32, 32))
        >>> student.eval()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> deployable = student.fold()  # a plain timm model, S folded into its fc
    """

    def __init__(
        self,
        model: nn.Module,
        order: str | None = DEFAULTS.order,
        *,
        residual: bool = False,
        serial_weight_decay: bool = True,
        example_input: Tensor | None = None,
    ) -> None:
        check_order(order)
        if isinstance(model, AEKTStudent):
            raise TypeError("model is already an AEKTStudent; wrap the timm model once")
        _check_timm_classifier(model)
        check_bool("serial_weight_decay", serial_weight_decay)
        in_chans = _infer_in_chans(model)
        if order == "kd_cls" and example_input is None:
            example_input = _example_input(model, in_chans)
        super().__init__(
            model, order, residual=residual, num_classes=model.num_classes, example_input=example_input
        )
        self.serial_weight_decay = serial_weight_decay
        self.in_chans = in_chans
        self.distilled_training = False

    # --- timm's model vocabulary -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FORWARDED_IF_PRESENT:
                model = self._modules.get("model")
                if model is not None and hasattr(model, name):
                    return getattr(model, name)
            raise

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self.model.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.model.pretrained_cfg = cfg

    def get_classifier(self) -> nn.Module:
        """The wrapped model's classifier (the serial layer is :attr:`serial`)."""
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """Reset the wrapped model's classifier and the serial layer to the identity of ``num_classes``."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes must be an int >= 1 for an AEKTStudent, got {num_classes!r}; "
                "for a feature extractor call fold() first and reset the plain model"
            )
        self.model.reset_classifier(num_classes, *args, **kwargs)
        if self.serial is not None:
            self.serial.reset(num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, make ``forward`` return ``(z_cls, z_kd)`` (DeiT's switch of the same name)."""
        self.distilled_training = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """The wrapped model's exemptions, prefixed; plus ``S`` when ``serial_weight_decay=False``."""
        names = {f"model.{name}" for name in getattr(self.model, "no_weight_decay", lambda: ())()}
        if self.serial is not None and not self.serial_weight_decay:
            names |= {f"serial.{name}" for name, _ in self.serial.named_parameters()}
        return names

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int] | dict:
        """Layer groups for layer-wise lr decay: the plain model's, with ``S`` in the last (head) group.

        A model without a ``group_matcher`` gets timm's own fallback grouping (``auto_group_layers``, by
        ``pretrained_cfg["classifier"]``), so the wrapper's groups and lr scales are the plain model's.
        """
        if hasattr(self.model, "group_matcher"):
            layer_map = group_parameters(self.model, self.model.group_matcher(coarse=coarse), reverse=True)
        else:
            layer_map = auto_group_layers(self.model)
        head_layer = max(layer_map.values(), default=0)

        def _matcher(name: str) -> int:
            if name.startswith("model."):
                return layer_map.get(name[len("model.") :], head_layer)
            return head_layer

        return _matcher

    # --- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def _check_head(self, head: object) -> Tensor:
        if isinstance(head, (tuple, list)):
            raise TypeError(
                f"{type(self.model).__name__} returned {len(head)} outputs instead of logits; "
                "turn off its own distilled training (model.set_distilled_training(False))"
            )
        if not isinstance(head, Tensor) or head.ndim != 2:
            shape = tuple(head.shape) if isinstance(head, Tensor) else type(head).__name__
            raise TypeError(f"{type(self.model).__name__} must return (B, num_classes) logits, got {shape}")
        if head.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self.model).__name__} returned {head.shape[1]} values per sample but has "
                f"num_classes={self.num_classes}: its output is not the classifier's logits"
            )
        return head

    def _split_head(self, head: object) -> tuple[Tensor, Tensor]:
        return super()._split_head(self._check_head(head))

    def _route(self, head: object) -> Tensor | tuple[Tensor, Tensor]:
        z_cls, z_kd = self._split_head(head)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return z_cls, z_kd
        return z_cls

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled features if ``pre_logits``; else ``z_cls``, or ``(z_cls, z_kd)`` in distilled training."""
        if pre_logits:
            return self.model.forward_head(x, pre_logits=True)
        return self._route(self.model.forward_head(x))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self._route(self.model(x))

    def forward_split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_cls, z_kd)`` in any mode (the task's eval-mode path)."""
        return self.split(x)

    # --- the serial layer --------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain timm model for deployment whose output equals this wrapper's eval output.

        ``S`` is folded into the final linear classifier with :meth:`SerialLayer.fold`: for ``"kd_cls"``,
        ``S(A h + b) = (M A) h + (M b + c)``, exact up to rounding; for ``"cls_kd"`` ``S`` is simply dropped.
        DeiT-distilled's two heads are each folded, which is exact because the model averages them.
        The returned model has the wrapped model's class, state-dict keys and train/eval mode; this
        wrapper is not modified.

        A model that cannot be folded (its classifier is not an ``nn.Linear`` or a timm head ending in
        one, or its output is not exactly the classifier's) is refused when a ``"kd_cls"`` wrapper is
        built, not here; ``"cls_kd"`` needs no folding.
        """
        return super().fold()

    def extra_repr(self) -> str:
        return f"order={self.order!r}, distilled_training={self.distilled_training}"


def create_student(
    model_name: str,
    *,
    order: str | None = DEFAULTS.order,
    residual: bool = False,
    serial_weight_decay: bool = True,
    **timm_kwargs: Any,
) -> AEKTStudent:
    """``timm.create_model(model_name, **timm_kwargs)`` wrapped in an :class:`AEKTStudent`.

    Examples::

        >>> student = create_student("resnet10t", order="cls_kd", num_classes=10, in_chans=1)
    """
    check_order(order)
    model = timm.create_model(model_name, **timm_kwargs)
    return AEKTStudent(model, order=order, residual=residual, serial_weight_decay=serial_weight_decay)


