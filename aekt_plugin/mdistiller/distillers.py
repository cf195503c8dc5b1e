"""The ``AEKT`` and ``DKD_FUSED`` distillers for mdistiller, and the yacs node that configures them.

Both are built on mdistiller's own ``Distiller`` base when first asked for (:func:`distiller_classes`),
so this module imports mdistiller only then. A distiller's loss is a core loss module made from its
yacs node by :func:`loss_from_node`: every option of the module that the node has a key for, upper-cased
(``T`` for the temperature, as mdistiller's DKD node spells it), so an option added to the core is a
key of the ``AEKT`` node without this module naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation
from ..defaults import DEFAULTS, ONE_PROCESS_TRAINING_OPTIONS
from ..loss import AEKTLoss, DKDLoss
from ..serial import SerialLayer, find_classifier
from ..warmup import KDWarmup
from .._validation import check_non_negative, check_order, warn_if_probabilities, warn_once

__all__ = ["CFG_NODE", "DISTILLER_NAMES", "aekt_node_defaults", "distiller_classes", "loss_from_node"]

CFG_NODE = "AEKT"
"""Name of the yacs config node read by the ``AEKT`` distiller."""

DISTILLER_NAMES = ("AEKT", "DKD_FUSED")
"""The keys :func:`aekt_plugin.mdistiller.register` adds to mdistiller's ``distiller_dict``."""

_CLASS_NAMES = {"AEKT": "AEKT", "DKD_FUSED": "DKDFused"}

# Options that are no choice of an mdistiller run: classification targets are never ignored, the mean is
# the reduction its trainers expect, a training step is the hot loop (no value checks, no host sync), and
# its tools/train.py runs one process (nn.DataParallel), so there is no global batch across ranks.
_FIXED_OPTIONS = ONE_PROCESS_TRAINING_OPTIONS


def _yaml_key(option: str) -> str:
    return "T" if option == "temperature" else option.upper()


def _loss_options(loss_class: Callable[..., nn.Module]) -> dict[str, Any]:
    """The options of ``loss_class`` that a yacs node sets, with their defaults."""
    parameters = inspect.signature(loss_class).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in _FIXED_OPTIONS}


def aekt_node_defaults() -> dict[str, Any]:
    """The keys and typed defaults of the ``AEKT`` node: ``CE_WEIGHT``, every option of
    :class:`aekt_plugin.AEKTLoss` (defaults from :data:`aekt_plugin.DEFAULTS`), ``ORDER`` and ``WARMUP``.

    Types are those mdistiller users write (those of its ``DKD`` node): floats for the weights and the
    temperature, an int number of epochs for ``WARMUP``; yacs rejects an int where a float is expected.
    """
    options = {_yaml_key(name): default for name, default in _loss_options(AEKTLoss).items()}
    return {
        "CE_WEIGHT": float(DEFAULTS.ce_weight),
        **options,
        "ORDER": DEFAULTS.order,  # "cls_kd", "kd_cls" or None (yaml: null)
        "WARMUP": int(DEFAULTS.warmup),
    }


def loss_from_node(loss_class: Callable[..., nn.Module], node: Any, prefix: str) -> nn.Module:
    """``loss_class`` with the options the yacs ``node`` sets, each checked under its yaml name
    (``prefix.KEY``); the options ``node`` has no key for keep their defaults."""
    options = {
        name: _validation.OPTION_CHECKS[name](f"{prefix}.{_yaml_key(name)}", node[_yaml_key(name)])
        for name in _loss_options(loss_class)
        if _yaml_key(name) in node
    }
    return loss_class(**options, **_FIXED_OPTIONS)


def _find_classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(qualified name, module)`` of the ``nn.Linear`` producing ``model``'s logits, if recognisable:
    mdistiller's models name it ``fc`` (ResNets, WRN, MobileNetV1), ``classifier`` (VGG; an
    ``nn.Sequential`` ending in it for MobileNetV2) or ``linear`` (ShuffleNets, CIFAR ResNet50/18)."""
    try:
        (path,) = find_classifier(model)
    except (TypeError, ValueError):
        return None
    return path, model.get_submodule(path)


def _cfg_node(cfg: Any, name: str) -> Any:
    try:
        return cfg[name]
    except KeyError:
        raise KeyError(
            f"the config has no {name!r} node: call aekt_plugin.mdistiller.register() before building "
            "mdistiller's CFG (or a clone of it) and merging a yaml"
        ) from None


def _parse_order(value: object, key: str) -> str | None:
    """The serial-layer order of a yaml value; ``null``, ``"none"`` and ``""`` mean no serial layer."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        value = None
    try:
        return check_order(value)
    except ValueError:
        raise ValueError(f"{key} must be 'cls_kd', 'kd_cls' or null, got {value!r}") from None


def _logits(output: object, who: str) -> Tensor:
    """The logits of an mdistiller model's ``(logits, feats)`` output."""
    logits = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError(
            f"the {who} must return (logits, feats) with logits of shape (B, C) like mdistiller's models, "
            f"got {type(output).__name__}"
        )
    return logits


class _FoldSerialIntoClassifier:
    """State-dict hook on the student: with ``ORDER: kd_cls``, export ``S`` folded into its last Linear.

    mdistiller writes ``student_best`` (and ``student_latest``, ``student_<epoch>``) as
    ``distiller.module.student.state_dict()``. With ``z_cls = S(head(h))`` the bare student must carry
    ``S`` for that file to reproduce the distiller's evaluation outputs, so when the student's state dict
    is taken on its own (empty prefix) the weights of its last Linear ``W_h, c_h`` are replaced by
    ``M W_h`` and ``M c_h + c`` (:meth:`aekt_plugin.SerialLayer.fold`). Taken as part of the distiller
    (prefix ``student.`` or ``module.student.``), as in mdistiller's full checkpoints that ``--resume``
    loads, the raw weights are kept next to the serial layer's own.
    """

    def __init__(self, serial: SerialLayer, classifier_name: str) -> None:
        self.serial = serial
        self.classifier_name = classifier_name

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        if prefix:
            return
        classifier = dict(module.named_modules())[self.classifier_name]
        folded = self.serial.fold(classifier)
        for param in ("weight", "bias"):
            key = f"{self.classifier_name}.{param}"
            if key in state_dict:
                state_dict[key] = getattr(folded, param).detach()


def _register_state_dict_hook(module: nn.Module, hook: _FoldSerialIntoClassifier) -> None:
    register = getattr(module, "register_state_dict_post_hook", None)  # torch >= 2.3
    if register is None:  # pragma: no cover - older torch (mdistiller pins 1.9)
        register = module._register_state_dict_hook
    register(hook)


class _LogitDistiller:
    """What ``AEKT`` and ``DKD_FUSED`` share; mixed in before mdistiller's ``Distiller``.

    Cross-entropy with weight ``CE_WEIGHT`` on the classification logits ``z_cls``, and
    ``min(epoch / WARMUP, 1)`` times the decoupled loss on the distillation logits ``z_kd``; the losses
    come back as ``{"loss_ce", "loss_kd"}``, the two keys mdistiller's DOT trainer reads.

    Trainers that pass no ``epoch`` (mdistiller's ``CRDTrainer``, ``CRDDOT``) get the full loss weight
    (no warm-up) and a ``UserWarning`` saying so.
    """

    cfg_node: ClassVar[str]
    loss_class: ClassVar[Callable[..., nn.Module]]
    student: nn.Module
    teacher: nn.Module
    serial: SerialLayer | None

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: Any) -> None:
        super().__init__(student, teacher)  # type: ignore[call-arg]
        node = _cfg_node(cfg, self.cfg_node)
        prefix = self.cfg_node
        self.ce_loss_weight = check_non_negative(f"{prefix}.CE_WEIGHT", node.CE_WEIGHT)
        self.warmup = check_non_negative(f"{prefix}.WARMUP", node.WARMUP)
        self.kd_warmup = KDWarmup(epochs=self.warmup)
        self._teacher_checked = False
        self.kd_criterion = loss_from_node(self.loss_class, node, prefix)
        order = _parse_order(node.ORDER, f"{prefix}.ORDER") if "ORDER" in node else None
        num_classes = self._check_class_counts(student, teacher, order)
        self.serial = None if order is None else SerialLayer(num_classes, order=order)
        if order == "kd_cls":
            found = _find_classifier(student)
            assert found is not None  # checked by _check_class_counts
            _register_state_dict_hook(student, _FoldSerialIntoClassifier(self.serial, found[0]))  # type: ignore[arg-type]

    def _check_class_counts(self, student: nn.Module, teacher: nn.Module, order: str | None) -> int:
        """The class count ``C``, checked between student and teacher where their last layers are known."""
        found_student, found_teacher = _find_classifier(student), _find_classifier(teacher)
        if found_student and found_teacher and found_student[1].out_features != found_teacher[1].out_features:
            raise ValueError(
                f"student and teacher must predict the same classes: the student's {found_student[0]} has "
                f"{found_student[1].out_features} outputs, the teacher's {found_teacher[0]} has "
                f"{found_teacher[1].out_features}"
            )
        if order == "kd_cls" and found_student is None:
            raise ValueError(
                f"{self.cfg_node}.ORDER: kd_cls folds the serial layer into the student's last nn.Linear "
                "(fc, classifier, linear or head) so that student checkpoints stay loadable, and "
                f"{type(student).__name__} has none; use ORDER: cls_kd or null"
            )
        found = found_student or found_teacher
        if found is None:
            if order is None:
                return 0
            raise ValueError(
                f"{self.cfg_node}.ORDER: {order} needs the class count, read from the last nn.Linear "
                "(fc, classifier, linear or head) of the student or teacher, and neither has one; "
                "use ORDER: null"
            )
        return found[1].out_features

    # -- mdistiller's Distiller API ------------------------------------------------------------------------
    def get_learnable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and, with an ``ORDER``, the serial layer's (``C² + C``)."""
        params = list(super().get_learnable_parameters())  # type: ignore[misc]
        if self.serial is not None:
            params += list(self.serial.parameters())
        return params

    def get_extra_parameters(self) -> int:
        """Parameters trained besides the student's: the serial layer's ``C² + C`` (0 without ``ORDER``).

        None of them costs anything at inference: ``cls_kd`` drops ``S``, ``kd_cls`` folds it into the
        student's last layer in the exported state dict.
        """
        return 0 if self.serial is None else sum(p.numel() for p in self.serial.parameters())

    def forward_train(self, image: Tensor, target: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``(z_cls, {"loss_ce", "loss_kd"})`` for one batch; ``kwargs`` may hold mdistiller's ``epoch``."""
        head = _logits(self.student(image), "student")
        with torch.no_grad():
            logits_teacher = _logits(self.teacher(image), "teacher")
        if not self._teacher_checked:  # once: the loss runs with validate_args=False
            warn_if_probabilities(f"the {self.cfg_node} distiller's teacher logits", logits_teacher)
            self._teacher_checked = True
        z_cls, z_kd = self._split(head)
        loss_ce = self.ce_loss_weight * F.cross_entropy(z_cls, target)
        loss_kd = self._warmup_factor(kwargs.get("epoch")) * self.kd_criterion(z_kd, logits_teacher, target)
        return z_cls, {"loss_ce": loss_ce, "loss_kd": loss_kd}

    def forward_test(self, image: Tensor) -> Tensor:
        """The classification logits ``z_cls`` (what the exported student computes)."""
        return self._split(_logits(self.student(image), "student"))[0]

    def _split(self, head: Tensor) -> tuple[Tensor, Tensor]:
        return (head, head) if self.serial is None else self.serial(head)

    # -- the loss --------------------------------------------------------------------------------------------
    def _warmup_factor(self, epoch: object) -> Tensor | float:
        if epoch is None:
            if self.warmup > 0:
                warn_once(
                    f"mdistiller-no-epoch:{self.cfg_node}",
                    f"{self.cfg_node}: the trainer passes no epoch (mdistiller's CRD trainers), so the "
                    f"{self.cfg_node}.WARMUP of {self.warmup:g} epochs is not applied: loss_kd has full "
                    f"weight from the first step. Set {self.cfg_node}.WARMUP: 0 to silence this warning.",
                )
            return 1.0
        self.kd_warmup.set_epoch(int(epoch) - 1)  # mdistiller counts epochs from 1: min(epoch / WARMUP, 1)
        return self.kd_warmup.factor


class _AEKTDistiller(_LogitDistiller):
    """Adaptive explicit knowledge transfer with the task-separating serial layer (off by default).

    Config node ``AEKT`` (defaults from :data:`aekt_plugin.DEFAULTS`):

    ================  =====  ===================================================================
    key               type   meaning
    ================  =====  ===================================================================
    CE_WEIGHT         float  weight of the cross-entropy on ``z_cls``
    T, ALPHA, ...     ...    the options of :class:`aekt_plugin.AEKTLoss`, upper-cased (``T`` is the
                             temperature, as in mdistiller's DKD node): ``ALPHA``, ``BETA``,
                             ``MAX_WEIGHT`` (``.inf`` for none), ``NORMALIZE_WEIGHT``, ``STANDARDIZE``
    ORDER             str    ``cls_kd``, ``kd_cls`` or ``null`` (no serial layer)
    WARMUP            int    epochs of the linear warm-up ``min(epoch/WARMUP, 1)`` of ``loss_kd``
    ================  =====  ===================================================================
    """

    cfg_node = CFG_NODE
    loss_class = AEKTLoss


class _DKDFusedDistiller(_LogitDistiller):
    """mdistiller's DKD (Zhao et al., CVPR 2022) on the fused log-space kernel: ``T²·(α·TCKD + β·NCKD)``.

    Reads mdistiller's own ``DKD`` node (``CE_WEIGHT``, ``ALPHA``, ``BETA``, ``T``, ``WARMUP``), so a DKD
    config runs unchanged with ``DISTILLER.TYPE: DKD_FUSED``. Same value as mdistiller's ``dkd_loss`` on
    moderate logits; finite where that returns ``inf``.
    """

    cfg_node = "DKD"
    loss_class = DKDLoss


_MIXINS: dict[str, type] = {"AEKT": _AEKTDistiller, "DKD_FUSED": _DKDFusedDistiller}
_CLASS_CACHE: dict[type, dict[str, type]] = {}


def distiller_classes(base: type) -> dict[str, type]:
    """The distiller classes on top of mdistiller's ``Distiller`` ``base`` (built once per base), named as
    ``aekt_plugin.mdistiller.AEKT`` and ``aekt_plugin.mdistiller.DKDFused``."""
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = {
            key: type(
                _CLASS_NAMES[key],
                (mixin, base),
                {"__module__": __package__, "__qualname__": _CLASS_NAMES[key], "__doc__": mixin.__doc__},
            )
            for key, mixin in _MIXINS.items()
        }
    return _CLASS_CACHE[base]
