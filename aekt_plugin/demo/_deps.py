"""Lazy imports of the demo's optional dependencies, with one clear error message."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DEMO_PACKAGES", "MissingExtraError", "missing_extra", "require"]

_INSTALL_HINT = 'pip install "aekt-plugin[demo]"'
# The import names of the packages the ``demo`` extra installs (setup.cfg), with their distribution names.
DEMO_PACKAGES = {"numpy": "numpy", "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """A package of the ``demo`` extra is not installed; the message says how to install it."""


def _error(module: str) -> MissingExtraError:
    name = module.split(".")[0]
    return MissingExtraError(
        f"the AEKT demo needs the optional package {DEMO_PACKAGES.get(name, name)!r}; "
        f"install the demo extra with: {_INSTALL_HINT}",
        name=name,
    )


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a :class:`MissingExtraError` naming the demo extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise _error(module) from err


def missing_extra(err: ImportError) -> MissingExtraError | None:
    """``err`` as a :class:`MissingExtraError` when it says a package of the demo extra is missing (a plain
    ``import numpy`` fails with ``ModuleNotFoundError``, not through :func:`require`); ``None`` otherwise."""
    if isinstance(err, MissingExtraError):
        return err
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in DEMO_PACKAGES:
        return _error(err.name or "")
    return None
