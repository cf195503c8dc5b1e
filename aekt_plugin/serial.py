r"""Task separation: the serial layer and the student that carries it.

The serial layer ``S: R^C → R^C`` sits in series with the student's classifier and separates the
classification task (cross-entropy on ``z_cls``) from the distillation task (the loss on ``z_kd``):

* ``order="cls_kd"``: ``z_cls = head(h)``, ``z_kd = S(z_cls)``; ``S`` is dropped at inference.
* ``order="kd_cls"``: ``z_kd = head(h)``, ``z_cls = S(z_kd)``; ``S`` can be folded into the head.
* no serial layer (``order=None``): ``z_cls = z_kd = head(h)``.

``S(x) = W x + c`` with ``W = I``, ``c = 0`` at initialisation, or, with ``residual=True``,
``S(x) = x + W x + c`` with ``W = 0``. Read as a ``C×C`` matrix, the effective map is the inter-class
relation the student learned (:meth:`SerialLayer.relation_matrix`).

This module owns the pieces every integration shares: :class:`SerialStudent` (a model with the serial
layer, ``split(x) -> (z_cls, z_kd)``), :func:`find_classifier` and :func:`fold_serial` (the deployable
model with ``S`` folded in, ``docs/derivations.md`` (S1)). The warm-up of the distillation term is
:class:`aekt_plugin.warmup.KDWarmup`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_bool, check_order
from .defaults import DEFAULTS

__all__ = ["SerialLayer", "SerialStudent", "check_fold", "find_classifier", "fold_serial"]

_CLASSIFIER_NAMES = ("fc", "classifier", "linear", "head")


class SerialLayer(nn.Module):
    """The ``C×C`` affine layer in series with a classifier.

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
        product of two affine maps, exact up to rounding, computed in the wider of the two layers' dtypes
        and stored in the classifier's. For ``"cls_kd"``, ``S`` is not used at inference and the classifier
        is copied unchanged. The given classifier is never modified.
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
        dtype = torch.promote_types(classifier.weight.dtype, self.weight.dtype)
        relation = self.relation_matrix().to(dtype)
        head_weight = classifier.weight.to(dtype)
        head_bias = (
            classifier.bias.to(dtype) if classifier.bias is not None else torch.zeros_like(relation[0])
        )
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.empty_like(classifier.weight[:, 0]))
        folded.weight.copy_(relation @ head_weight)
        folded.bias.copy_(relation @ head_bias + self.bias.to(dtype))
        return folded

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, order={self.order!r}, residual={self.residual}"


def _linear_of(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that produces ``module``'s output, if it is one, an ``nn.Sequential`` ending in
    one, or a head whose ``fc`` is one with nothing but a flatten/identity after it (timm's heads)."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
        return module[-1]
    fc = getattr(module, "fc", None)
    if isinstance(fc, nn.Linear) and isinstance(
        getattr(module, "flatten", nn.Identity()), (nn.Identity, nn.Flatten)
    ):
        return fc
    return None


def find_classifier(model: nn.Module) -> list[str]:
    """Dotted paths of the ``nn.Linear`` layer(s) that produce ``model``'s logits.

    Looks at ``model.get_classifier()`` (timm's models; a tuple of heads that the model averages, as in
    DeiT-distilled, gives one path per head), else at the last layer of an ``nn.Sequential``, else at the
    attributes ``fc``, ``classifier``, ``linear`` and ``head``. Each may be an ``nn.Linear``, an
    ``nn.Sequential`` ending in one, or a head whose ``fc`` is one.

    Raises:
        TypeError: no such layer, e.g. a convolutional classifier.
    """
    if callable(getattr(model, "get_classifier", None)):
        found = model.get_classifier()
        parts = list(found) if isinstance(found, (tuple, list)) else [found]
        where = f"{type(model).__name__}.get_classifier()"
    elif isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        return [str(len(model) - 1)]
    else:
        parts = [
            getattr(model, name)
            for name in _CLASSIFIER_NAMES
            if isinstance(getattr(model, name, None), nn.Module)
        ][:1]
        where = f"{type(model).__name__}'s {'/'.join(_CLASSIFIER_NAMES)} attribute"
    linears = [_linear_of(part) for part in parts]
    if not linears or any(linear is None for linear in linears):
        got = ", ".join(type(part).__name__ for part in parts) or "nothing"
        raise TypeError(
            f"the serial layer folds into the nn.Linear that produces the logits, and {where} gives {got}; "
            "use order='cls_kd' (S is dropped at inference) or a model whose classifier is an nn.Linear"
        )
    names = {id(module): name for name, module in model.named_modules()}
    missing = [linear for linear in linears if id(linear) not in names]
    if missing:
        raise TypeError(f"the classifier of {type(model).__name__} is not a submodule of it; cannot fold")
    return [names[id(linear)] for linear in linears]


@torch.no_grad()
def check_fold(model: nn.Module, paths: list[str], example_input: Tensor) -> None:
    """Refuse a model whose logits are not exactly its classifiers' output, where folding ``S`` is wrong.

    Folding ``S`` into the classifier(s) at ``paths`` is exact when the model's output is their output,
    or the mean of several heads' outputs (the mean of per-token logits included): ``S`` is affine and
    commutes with averaging. A head that adds anything else (VOLO's ``0.5 · max(aux_head(...))``, say)
    would make the folded model differ from the wrapped one. The check runs ``model`` once on
    ``example_input`` in eval mode and compares; the model's mode is restored.

    Raises:
        ValueError: the output differs from the classifiers' (the message gives the difference).
    """
    captured: list[Tensor] = []
    handles = [
        model.get_submodule(path).register_forward_hook(lambda _m, _i, out: captured.append(out))
        for path in paths
    ]
    was_training = model.training
    try:
        output = model.eval()(example_input)
    except Exception as exc:  # any failure of the model itself: say what to pass instead
        raise ValueError(
            f"could not run {type(model).__name__} on a test input of shape {tuple(example_input.shape)} to "
            f"check that S folds exactly into its classifier ({type(exc).__name__}: {exc}); pass an input it "
            "accepts as example_input=, or use order='cls_kd'"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(output, Tensor) or len(captured) != len(paths):
        raise ValueError(
            f"{type(model).__name__} did not run its classifier ({', '.join(paths)}) exactly once per head "
            "on a test input, so S cannot be folded into it; use order='cls_kd'"
        )
    heads = [out.flatten(1, -2).mean(1) if out.ndim > 2 else out for out in captured]
    expected = torch.stack(heads).mean(0).to(output.dtype)
    if expected.shape != output.shape:
        raise ValueError(
            f"{type(model).__name__}'s classifier ({', '.join(paths)}) gives {tuple(expected.shape)} but the "
            f"model returns {tuple(output.shape)}, so S cannot be folded into it; use order='cls_kd'"
        )
    scale = float(expected.abs().max()) + 1e-6
    difference = float((output - expected).abs().max())
    if difference > 1e-4 * scale + 1e-6:
        raise ValueError(
            f"{type(model).__name__}'s output is not its classifier's ({', '.join(paths)}): they differ by "
            f"up to {difference:.3g} on a test input (its forward_head adds other terms), so S folded into "
            "the classifier would change the model's output; use order='cls_kd' (S is dropped at inference)"
        )


def fold_serial(model: nn.Module, serial: SerialLayer | None, paths: list[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose output is ``z_cls``: ``S`` folded into each classifier of ``paths`` (default
    :func:`find_classifier`) for ``"kd_cls"``; the plain copy for ``"cls_kd"`` or no serial layer.

    Folding into every head of a model that averages several heads is exact: ``S`` is affine.
    """
    folded = copy.deepcopy(model)
    if serial is None or serial.order == "cls_kd":
        return folded
    for path in paths if paths is not None else find_classifier(model):
        parent_path, _, name = path.rpartition(".")
        parent = folded.get_submodule(parent_path) if parent_path else folded
        setattr(parent, name, serial.fold(getattr(parent, name)))
    return folded


class SerialStudent(nn.Module):
    """A classifier with the serial layer in series with its last linear layer: the trainable module of
    AEKT's task separation, which each toolkit adapter wires in its own way.

    ``split(x)`` returns ``(z_cls, z_kd)``; ``forward(x)`` returns the classification logits ``z_cls``
    (with ``"cls_kd"`` exactly the wrapped model's output). ``fold()`` gives the deployable plain model.

    Args:
        model: any ``nn.Module`` that returns ``(B, C)`` logits.
        order: ``"cls_kd"``, ``"kd_cls"`` or ``None`` (no serial layer: ``z_cls = z_kd``); the default is
            ``DEFAULTS.order``.
        residual: the residual parameterisation of ``S``.
        num_classes: ``C``; read from ``model.num_classes`` or the classifier when omitted.
        example_input: with ``"kd_cls"``, an input the model accepts; the student then checks once, when
            it is built, that the model's output is its classifier's (:func:`check_fold`).

    With ``"kd_cls"`` the classifier is found (:func:`find_classifier`) when the student is built, so a
    model that cannot be folded is refused before any training.

    Examples::

        >>> student = SerialStudent(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), order="kd_cls")
        >>> z_cls, z_kd = student.split(torch.randn(2, 4, 4))
        >>> deployable = student.fold()  # an nn.Sequential with S folded into its Linear
    """

    def __init__(
        self,
        model: nn.Module,
        order: str | None = DEFAULTS.order,
        *,
        residual: bool = False,
        num_classes: int | None = None,
        example_input: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_order(order)
        self.model = model
        self.order = order
        self._classifier_paths = find_classifier(model) if order == "kd_cls" else None
        if self._classifier_paths is not None and example_input is not None:
            check_fold(model, self._classifier_paths, example_input)
        self.serial: SerialLayer | None = None
        if order is not None:
            size = num_classes if num_classes is not None else _num_classes(model, self._classifier_paths)
            self.serial = SerialLayer(size, order=order, residual=residual)
            parameter = next(model.parameters(), None)
            if parameter is not None:
                self.serial.to(device=parameter.device, dtype=parameter.dtype)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_cls, z_kd)`` for the input ``x``."""
        return self._split_head(self.model(x))

    def _split_head(self, head: object) -> tuple[Tensor, Tensor]:
        """``(z_cls, z_kd)`` from the model's output ``head`` (checked to be a logits tensor)."""
        logits = _as_logits(head, type(self.model).__name__)
        if self.serial is None:
            return logits, logits
        return self.serial(logits)

    def forward(self, x: Tensor) -> Tensor:
        """The classification logits ``z_cls`` (``S`` is skipped for ``"cls_kd"``)."""
        if self.serial is None or self.order == "cls_kd":
            return self.model(x)
        return self.split(x)[0]

    def relation_matrix(self) -> Tensor:
        """The learned ``C×C`` class-relation matrix of ``S``."""
        if self.serial is None:
            raise RuntimeError(
                "this student has order=None and therefore no serial layer (no relation matrix)"
            )
        return self.serial.relation_matrix()

    def fold(self) -> nn.Module:
        """A copy of the wrapped model computing ``z_cls``, with ``S`` folded in for ``"kd_cls"``
        (:func:`fold_serial`); this student is not modified."""
        return fold_serial(self.model, self.serial, self._classifier_paths).train(self.training)


def _num_classes(model: nn.Module, paths: list[str] | None) -> int:
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return num_classes
    try:
        path = (paths or find_classifier(model))[0]
    except TypeError:
        raise ValueError(
            f"num_classes: {type(model).__name__} has no num_classes attribute and no recognisable linear "
            "classifier; pass num_classes"
        ) from None
    return model.get_submodule(path).out_features


def _as_logits(output: object, who: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{who} returned {type(output).__name__}, not a logits tensor; the serial layer needs a model "
            "that returns (B, C) logits"
        )
    return output
