r"""AEKT for mdistiller (megvii-research/mdistiller), without editing the mdistiller checkout.

mdistiller is a research repository, not a package on an index: users keep a git checkout of it. This
module adapts it in three ways, importing it only when one of them is used:

* :func:`register` puts ``"AEKT"`` and ``"DKD_FUSED"`` into ``mdistiller.distillers.distiller_dict`` and an
  ``AEKT`` node with typed defaults into the yacs ``CFG`` of ``mdistiller.engine.cfg``, so that
  ``DISTILLER.TYPE: AEKT`` works in any mdistiller yaml;
* the distillers themselves (:mod:`aekt_plugin.mdistiller.distillers`), subclasses of mdistiller's
  ``Distiller`` built on first use (``aekt_plugin.mdistiller.AEKT`` and ``aekt_plugin.mdistiller.DKDFused``);
* the console script ``aekt-mdistiller`` (:mod:`aekt_plugin.mdistiller.launcher`), which registers both and
  runs the checkout's own, unchanged ``tools/train.py``; and AEKT configs for every pair mdistiller ships
  DKD configs for (:func:`list_configs`, :func:`read_config`, :func:`config_file`).

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

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any

from .. import configs
from .distillers import _CLASS_NAMES, CFG_NODE, DISTILLER_NAMES, aekt_node_defaults, distiller_classes, loss_from_node

__all__ = [
    "CFG_NODE",
    "DISTILLER_NAMES",
    "MdistillerImportError",
    "config_file",
    "list_configs",
    "loss_from_node",
    "main",
    "read_config",
    "register",
]

_logger = logging.getLogger(__name__)

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
    """A fresh ``AEKT`` yacs node with the typed defaults of :func:`~.distillers.aekt_node_defaults`."""
    from yacs.config import CfgNode

    return CfgNode(aekt_node_defaults())


def register() -> dict[str, type]:
    """Make ``AEKT`` and ``DKD_FUSED`` selectable as ``DISTILLER.TYPE`` in mdistiller.

    Adds both to ``mdistiller.distillers.distiller_dict`` and an ``AEKT`` node to
    ``mdistiller.engine.cfg.CFG`` (``CE_WEIGHT``, the options of :class:`aekt_plugin.AEKTLoss` upper-cased
    — ``T``, ``ALPHA``, ``BETA``, ``MAX_WEIGHT``, ``NORMALIZE_WEIGHT``, ``STANDARDIZE`` —, ``ORDER``,
    ``WARMUP``), so mdistiller's ``show_cfg`` prints it and yacs checks its keys and types when a yaml is
    merged. Call it before merging a yaml that uses them.
    ``DKD_FUSED`` reads mdistiller's own ``DKD`` node.

    Idempotent: a second call changes nothing, and values already set in ``CFG.AEKT`` are kept.

    Returns:
        ``{"AEKT": cls, "DKD_FUSED": cls}``, the distiller classes now in ``distiller_dict``.

    Raises:
        MdistillerImportError: mdistiller or a package it imports (scipy, tensorboardX) is missing.
    """
    distillers, cfg_module, base = _import_mdistiller()
    classes = distiller_classes(base)
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


def __getattr__(name: str) -> type:
    """``aekt_plugin.mdistiller.AEKT`` / ``.DKDFused``: the classes, built when first asked for."""
    for key, class_name in _CLASS_NAMES.items():
        if name == class_name:
            base = _import_mdistiller()[2]
            return distiller_classes(base)[key]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aekt-mdistiller`` (:func:`aekt_plugin.mdistiller.launcher.main`)."""
    from .launcher import main as launch

    return launch(argv)
