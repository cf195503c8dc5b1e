"""Lazy imports of the demo's optional dependencies, with one clear error message."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_INSTALL_HINT = 'pip install "aekt-plugin[demo]"'


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming the demo extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"the AEKT demo needs the optional package {module.split('.')[0]!r}; "
            f"install the demo extra with: {_INSTALL_HINT}"
        ) from err
