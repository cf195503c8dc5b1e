r"""AEKT for mdistiller (megvii-research/mdistiller), without editing the mdistiller checkout.

mdistiller is a research repository, not a package on an index: users keep a git checkout of it. This
module adapts it in three ways, importing it only when one of them is used:

* :func:`register` puts ``"AEKT"`` and ``"DKD_FUSED"`` into ``mdistiller.distillers.distiller_dict`` and an
  ``AEKT`` node with typed defaults into the yacs ``CFG`` of ``mdistiller.engine.cfg``, so that
  ``DISTILLER.TYPE: AEKT`` works in any mdistiller yaml;
* the distillers themselves, subclasses of mdistiller's ``Distiller`` built on first use
  (``aekt_plugin.mdistiller.AEKT`` and ``aekt_plugin.mdistiller.DKDFused``);
* the console script ``aekt-mdistiller`` (:func:`main`), which registers both and runs the checkout's own,
  unchanged ``tools/train.py``; it also ships AEKT configs for every pair mdistiller ships DKD configs for
  (:func:`list_configs`, :func:`read_config`, :func:`config_file`).

The objective of one training step, with ``z_cls, z_kd`` the classification and distillation logits
(both equal to the student's logits when ``ORDER`` is null, the default) and ``v`` the teacher's logits::

    loss_ce = CE_WEIGHT · CE(z_cls, y)
    loss_kd = min(epoch / WARMUP, 1) · T² · (ALPHA · min(q_t/p_t, MAX_WEIGHT) · TCKD + BETA · NCKD)

``DKD_FUSED`` is mdistiller's ``DKD`` (same ``DKD`` config node, same objective with the weight ``ALPHA``
in place of the ratio) computed by the package's fused log-space kernel: finite where mdistiller's
``dkd_loss`` returns ``inf``, and faster.

Example, from Python (an mdistiller checkout on ``sys.path``)::

    import aekt_plugin.mdistiller
    aekt_plugin.mdistiller.register()
    from mdistiller.engine.cfg import CFG
    CFG.merge_from_file("my_aekt.yaml")          # DISTILLER.TYPE: "AEKT", AEKT: {BETA: 8.0, ...}

or from the shell::

    aekt-mdistiller --mdistiller-root ~/mdistiller --cfg cifar100/res32x4_res8x4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import DEFAULTS, AEKTLoss, DKDLoss, SerialLayer, configs
from ._validation import (
    check_bool,
    check_non_negative,
    check_order,
    check_positive,
    warn_if_probabilities,
    warn_once,
)
from .serial import find_classifier
from .warmup import KDWarmup

__all__ = [
    "CFG_NODE",
    "DISTILLER_NAMES",
    "MdistillerImportError",
    "config_file",
    "list_configs",
    "main",
    "read_config",
    "register",
]

_logger = logging.getLogger(__name__)

CFG_NODE = "AEKT"
"""Name of the yacs config node read by the ``AEKT`` distiller."""

DISTILLER_NAMES = ("AEKT", "DKD_FUSED")
"""The keys :func:`register` adds to mdistiller's ``distiller_dict``."""

_CLASS_NAMES = {"AEKT": "AEKT", "DKD_FUSED": "DKDFused"}

_TOOLKIT = "mdistiller"

_INSTALL_HINTS = {
    "scipy": "pip install scipy  (mdistiller.distillers imports it for OFD)",
    "tensorboardX": "pip install tensorboardX  (mdistiller.engine's trainers import it)",
    "yacs": "pip install yacs  (mdistiller's config system)",
}


class MdistillerImportError(ImportError):
    """mdistiller, or one of the packages it imports, cannot be imported; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------------
# Importing mdistiller and registering AEKT
# --------------------------------------------------------------------------------------------------------


def _import_mdistiller() -> tuple[Any, Any, type]:
    """Import ``mdistiller.distillers`` and ``mdistiller.engine.cfg``, with errors that say the fix.

    Returns the two modules and the ``Distiller`` base class, which lives in ``mdistiller.distillers._base``
    (the package's ``__init__`` does not re-export it).
    """
    try:
        distillers = importlib.import_module("mdistiller.distillers")
        base = importlib.import_module("mdistiller.distillers._base").Distiller
        cfg_module = importlib.import_module("mdistiller.engine.cfg")
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing == "mdistiller":
            raise MdistillerImportError(
                "mdistiller is not importable. It is on no package index: clone it "
                "(git clone https://github.com/megvii-research/mdistiller) and either run "
                "`pip install -e .` in the checkout, or put the checkout on PYTHONPATH, or pass "
                "--mdistiller-root / set MDISTILLER_ROOT for aekt-mdistiller."
            ) from error
        hint = _INSTALL_HINTS.get(missing, f"pip install {missing}")
        raise MdistillerImportError(
            f"mdistiller needs the package {missing!r}, which is missing: {hint}"
        ) from error
    return distillers, cfg_module, base


def _cfg_defaults() -> Any:
    """A fresh ``AEKT`` yacs node whose defaults come from :data:`aekt_plugin.DEFAULTS`.

    Types are those mdistiller users write (those of its ``DKD`` node): floats for the weights and the
    temperature, an int number of epochs for ``WARMUP``; yacs rejects an int where a float is expected.
    """
    from yacs.config import CfgNode

    node = CfgNode()
    node.CE_WEIGHT = float(DEFAULTS.ce_weight)
    node.ALPHA = float(DEFAULTS.alpha)
    node.BETA = float(DEFAULTS.beta)
    node.T = float(DEFAULTS.temperature)
    node.MAX_WEIGHT = float(DEFAULTS.max_weight)
    node.NORMALIZE_WEIGHT = bool(DEFAULTS.normalize_weight)
    node.STANDARDIZE = False
    node.ORDER = DEFAULTS.order  # "cls_kd", "kd_cls" or None (yaml: null)
    node.WARMUP = int(DEFAULTS.warmup)
    return node


def register() -> dict[str, type]:
    """Make ``AEKT`` and ``DKD_FUSED`` selectable as ``DISTILLER.TYPE`` in mdistiller.

    Adds both to ``mdistiller.distillers.distiller_dict`` and an ``AEKT`` node to
    ``mdistiller.engine.cfg.CFG`` (keys ``CE_WEIGHT``, ``ALPHA``, ``BETA``, ``T``, ``MAX_WEIGHT``,
    ``NORMALIZE_WEIGHT``, ``ORDER``, ``WARMUP``), so mdistiller's ``show_cfg`` prints it and yacs checks
    its keys and types when a yaml is merged. Call it before merging a yaml that uses them.
    ``DKD_FUSED`` reads mdistiller's own ``DKD`` node.

    Idempotent: a second call changes nothing, and values already set in ``CFG.AEKT`` are kept.

    Returns:
        ``{"AEKT": cls, "DKD_FUSED": cls}``, the distiller classes now in ``distiller_dict``.

    Raises:
        MdistillerImportError: mdistiller or a package it imports (scipy, tensorboardX) is missing.
    """
    distillers, cfg_module, base = _import_mdistiller()
    classes = _distiller_classes(base)
    registry = distillers.distiller_dict
    for key, cls in classes.items():
        if registry.get(key) is not cls:
            registry[key] = cls
    cfg = cfg_module.CFG
    if CFG_NODE not in cfg:
        frozen = cfg.is_frozen()
        cfg.defrost()
        setattr(cfg, CFG_NODE, _cfg_defaults())
        if frozen:
            cfg.freeze()
    _logger.debug("registered %s in mdistiller", ", ".join(classes))
    return dict(classes)


# --------------------------------------------------------------------------------------------------------
# The distillers
# --------------------------------------------------------------------------------------------------------


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
    loss_class: ClassVar[type[nn.Module]]
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
        # validate_args=False: a training step is the hot loop (no host sync per step); shapes, dtypes and
        # options are still checked. The options are checked here first, under their yaml names.
        self.kd_criterion = self.loss_class(
            temperature=check_positive(f"{prefix}.T", node.T),
            alpha=check_non_negative(f"{prefix}.ALPHA", node.ALPHA),
            beta=check_non_negative(f"{prefix}.BETA", node.BETA),
            validate_args=False,
            **self._read_options(node),
        )
        order = self._order(node)
        num_classes = self._check_class_counts(student, teacher, order)
        self.serial = None if order is None else SerialLayer(num_classes, order=order)
        if order == "kd_cls":
            found = _find_classifier(student)
            assert found is not None  # checked by _check_class_counts
            _register_state_dict_hook(student, _FoldSerialIntoClassifier(self.serial, found[0]))  # type: ignore[arg-type]

    # -- configuration -----------------------------------------------------------------------------------
    def _read_options(self, node: Any) -> dict[str, Any]:
        """Loss options beyond ``T``, ``ALPHA`` and ``BETA`` (none for DKD), checked under yaml names."""
        return {}

    def _order(self, node: Any) -> str | None:
        return None

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
    ALPHA             float  ``α``, scale of the explicit term ``α · min(q_t/p_t, w_max) · TCKD``
    BETA              float  ``β``, weight of the implicit term ``NCKD``
    T                 float  temperature ``T`` (``T²`` is inside the loss)
    MAX_WEIGHT        float  ``w_max``, bound of the ratio weight (``.inf`` for none)
    NORMALIZE_WEIGHT  bool   divide the ratio weight by its batch mean
    STANDARDIZE       bool   logit standardization of student and teacher first (Sun et al., CVPR 2024)
    ORDER             str    ``cls_kd``, ``kd_cls`` or ``null`` (no serial layer)
    WARMUP            int    epochs of the linear warm-up ``min(epoch/WARMUP, 1)`` of ``loss_kd``
    ================  =====  ===================================================================
    """

    cfg_node = CFG_NODE
    loss_class = AEKTLoss

    def _read_options(self, node: Any) -> dict[str, Any]:
        return {
            "max_weight": check_positive(f"{self.cfg_node}.MAX_WEIGHT", node.MAX_WEIGHT, allow_inf=True),
            "normalize_weight": check_bool(f"{self.cfg_node}.NORMALIZE_WEIGHT", node.NORMALIZE_WEIGHT),
            "standardize": check_bool(f"{self.cfg_node}.STANDARDIZE", node.STANDARDIZE),
        }

    def _order(self, node: Any) -> str | None:
        return _parse_order(node.ORDER, f"{self.cfg_node}.ORDER")


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


def _distiller_classes(base: type) -> dict[str, type]:
    """The distiller classes on top of mdistiller's ``Distiller`` ``base`` (built once per base)."""
    if base not in _CLASS_CACHE:
        classes = {}
        for key, mixin in _MIXINS.items():
            name = _CLASS_NAMES[key]
            cls = type(
                name, (mixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": mixin.__doc__}
            )
            classes[key] = cls
        _CLASS_CACHE[base] = classes
    return _CLASS_CACHE[base]


def __getattr__(name: str) -> type:
    """``aekt_plugin.mdistiller.AEKT`` / ``.DKDFused``: the classes, built when first asked for."""
    for key, class_name in _CLASS_NAMES.items():
        if name == class_name:
            base = _import_mdistiller()[2]
            return _distiller_classes(base)[key]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------------------


def list_configs() -> list[str]:
    """Names of the shipped mdistiller configs, ``"<dataset>/<teacher>_<student>"`` like mdistiller's.

    Examples::

        >>> "cifar100/res32x4_res8x4" in list_configs()
        True
    """
    return configs.list_configs(_TOOLKIT)


def read_config(name: str) -> str:
    """The yaml text of the shipped config ``name`` (e.g. ``"cifar100/res32x4_res8x4"``)."""
    return configs.read_config(_TOOLKIT, name)


def config_file(name: str) -> contextlib.AbstractContextManager[Path]:
    """A file-system path to the shipped config ``name``, for yacs' ``merge_from_file``.

    Examples::

        with config_file("cifar100/res32x4_res8x4") as path:
            CFG.merge_from_file(str(path))
    """
    return configs.config_file(_TOOLKIT, name)


# --------------------------------------------------------------------------------------------------------
# The console script
# --------------------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A problem the user fixes; :func:`main` prints it and exits with status 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aekt-mdistiller",
        description=(
            "Train with mdistiller's own tools/train.py, with the AEKT and DKD_FUSED distillers and the "
            "AEKT config node registered; the mdistiller checkout is not modified."
        ),
        epilog=(
            "examples:\n"
            "  aekt-mdistiller --list\n"
            "  aekt-mdistiller --mdistiller-root ~/mdistiller --cfg cifar100/res32x4_res8x4\n"
            "  aekt-mdistiller --cfg my_aekt.yaml SOLVER.BATCH_SIZE 128 AEKT.ORDER kd_cls\n"
            "Run it from where mdistiller's outputs should go (LOG.PREFIX is relative, ./output by default)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cfg",
        default="",
        help="a yaml file, a path relative to the mdistiller checkout, or a shipped config name (see --list)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="resume from the experiment's 'latest' checkpoint"
    )
    parser.add_argument(
        "--mdistiller-root",
        default=None,
        help="the mdistiller git checkout (default: $MDISTILLER_ROOT, else the checkout the current "
        "directory is in, else the one the importable mdistiller package lives in)",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped AEKT configs and exit")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ..., as for mdistiller's tools/train.py",
    )
    return parser


def _describe_config(name: str) -> str:
    """``teacher -> student, β`` of a shipped config, when PyYAML (a yacs dependency) is there."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - yacs needs PyYAML
        return ""
    data = yaml.safe_load(read_config(name))
    distiller, node = data.get("DISTILLER", {}), data.get(CFG_NODE, {})
    pair = f"{distiller.get('TEACHER')} -> {distiller.get('STUDENT')}"
    return f"{pair}, T={node.get('T')}, BETA={node.get('BETA')}"


def _checkout_above(directory: Path) -> Path | None:
    """The mdistiller checkout that contains ``directory`` (or is it), if any."""
    for candidate in (directory, *directory.parents):
        if (candidate / "mdistiller" / "__init__.py").is_file() and (
            candidate / "tools" / "train.py"
        ).is_file():
            return candidate
    return None


def _find_root(option: str | None) -> Path:
    """The mdistiller checkout: ``--mdistiller-root``, else ``$MDISTILLER_ROOT``, else the checkout the
    current directory is in, else the one the importable ``mdistiller`` package lives in."""
    here = _checkout_above(Path.cwd().resolve())
    if option:
        root, source = Path(option).expanduser(), "--mdistiller-root"
    elif os.environ.get("MDISTILLER_ROOT"):
        root, source = Path(os.environ["MDISTILLER_ROOT"]).expanduser(), "$MDISTILLER_ROOT"
    elif here is not None:
        root, source = here, "the current directory"
    else:
        spec = importlib.util.find_spec("mdistiller")
        # A directory named mdistiller without __init__.py (e.g. the checkout itself, seen from its
        # parent directory) is a namespace package with no origin: not the package.
        if spec is None or spec.origin is None or not spec.submodule_search_locations:
            raise _UsageError(
                "cannot find an mdistiller checkout: the current directory is not inside one, mdistiller is "
                "not importable, and neither --mdistiller-root nor $MDISTILLER_ROOT is set. Fix: git clone "
                "https://github.com/megvii-research/mdistiller and run aekt-mdistiller from inside the "
                "checkout, or pass --mdistiller-root PATH (or set MDISTILLER_ROOT=PATH)."
            )
        root, source = Path(spec.origin).parent.parent, "the importable mdistiller"
    root = root.resolve()
    if not (root / "mdistiller" / "__init__.py").is_file():
        raise _UsageError(
            f"{root} (from {source}) is not an mdistiller checkout: it has no mdistiller/__init__.py"
        )
    if not (root / "tools" / "train.py").is_file():
        raise _UsageError(
            f"{root} (from {source}) has no tools/train.py. tools/ is not part of the installed mdistiller "
            "package: point --mdistiller-root (or $MDISTILLER_ROOT) at the git checkout itself."
        )
    return root


def _import_from(root: Path) -> None:
    """Import mdistiller from ``root`` and register AEKT in it."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    register()
    imported = Path(sys.modules["mdistiller"].__file__ or "").resolve().parent
    if imported != (root / "mdistiller").resolve():
        raise _UsageError(
            f"mdistiller was imported from {imported}, not from the checkout {root}; "
            "point --mdistiller-root at the checkout mdistiller is installed from, or uninstall the other one"
        )


@contextlib.contextmanager
def _resolve_cfg(value: str, root: Path) -> Iterator[Path]:
    if not value:
        raise _UsageError("--cfg is required (a yaml file or a shipped name; see aekt-mdistiller --list)")
    for candidate in (Path(value).expanduser(), root / value):
        if candidate.is_file():
            yield candidate.resolve()
            return
    key = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if key not in list_configs():
        raise _UsageError(
            f"--cfg {value!r} is neither a file (here or in {root}) nor a shipped config; "
            f"shipped: {', '.join(list_configs())}"
        )
    with config_file(key) as path:
        yield path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aekt-mdistiller``: register AEKT, then run the checkout's ``tools/train.py``.

    ``--cfg``, ``--resume`` and the trailing ``KEY VALUE`` overrides mean what they mean for mdistiller's
    ``tools/train.py``, which receives them unchanged (``--cfg`` resolved to a file). ``--list`` and
    ``--help`` need no mdistiller.

    Returns:
        the exit status: 0 on success, 2 on a usage or set-up problem (printed with its fix).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name in list_configs():
            print(f"{name:32s} {_describe_config(name)}".rstrip())
        return 0
    try:
        root = _find_root(args.mdistiller_root)
        _import_from(root)
        train_py = root / "tools" / "train.py"
        with _resolve_cfg(args.cfg, root) as cfg_path:
            train_argv = [str(train_py), "--cfg", str(cfg_path)]
            train_argv += ["--resume"] if args.resume else []
            train_argv += list(args.opts)
            saved_argv = sys.argv
            sys.argv = train_argv
            try:
                runpy.run_path(str(train_py), run_name="__main__")
            finally:
                sys.argv = saved_argv
    except (_UsageError, MdistillerImportError) as error:
        print(f"aekt-mdistiller: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
