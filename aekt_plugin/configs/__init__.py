"""The configs shipped as package data, ``aekt_plugin/configs/<toolkit>/**/*.yaml``, read through
:mod:`importlib.resources` so they work from a wheel, a zip or a source tree alike.

Examples::

    >>> from aekt_plugin import configs
    >>> "cifar100/res32x4_res8x4" in configs.list_configs("mdistiller")
    True
    >>> text = configs.read_config("mdistiller", "cifar100/res32x4_res8x4")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["TOOLKITS", "config_file", "list_configs", "read_config"]

TOOLKITS = ("mdistiller", "torchdistill")
_SUFFIX = ".yaml"


def _toolkit_root(toolkit: str) -> Traversable:
    if toolkit not in TOOLKITS:
        raise ValueError(f"toolkit must be one of {TOOLKITS}, got {toolkit!r}")
    return resources.files(__name__).joinpath(toolkit)


def _walk(directory: Traversable, prefix: str) -> Iterator[str]:
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _walk(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(_SUFFIX):
            yield prefix + entry.name[: -len(_SUFFIX)]


def list_configs(toolkit: str) -> list[str]:
    """Names of the shipped configs of ``toolkit``: paths below its folder, without ``.yaml``."""
    return list(_walk(_toolkit_root(toolkit), ""))


def _resource(toolkit: str, name: str) -> Traversable:
    key = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    available = list_configs(toolkit)
    if key not in available:
        raise ValueError(f"no shipped {toolkit} config named {name!r}; shipped: {', '.join(available)}")
    resource = _toolkit_root(toolkit)
    for part in f"{key}{_SUFFIX}".split("/"):
        resource = resource.joinpath(part)
    return resource


def read_config(toolkit: str, name: str) -> str:
    """The yaml text of the shipped config ``name`` of ``toolkit``."""
    return _resource(toolkit, name).read_text(encoding="utf-8")


@contextlib.contextmanager
def config_file(toolkit: str, name: str) -> Iterator[Path]:
    """A file-system path to a shipped config, for loaders that want a path (yacs' ``merge_from_file``)."""
    with resources.as_file(_resource(toolkit, name)) as path:
        yield Path(path)
