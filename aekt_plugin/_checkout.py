"""Where a toolkit's git checkout is, for the launchers that run a script the toolkit's wheel lacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def locate_checkout(
    option: str | None, *, flag: str, env_var: str, is_checkout: Callable[[Path], bool]
) -> tuple[Path, str] | None:
    """``(directory, where it came from)``: the launcher's ``flag`` (its value ``option``), else
    ``$env_var``, else the nearest directory at or above the current one for which ``is_checkout`` holds;
    ``None`` when none of them gives one. The first two are taken as given, for the caller to check."""
    if option:
        return Path(option).expanduser().resolve(), flag
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser().resolve(), f"${env_var}"
    here = Path.cwd().resolve()
    found = next((d for d in (here, *here.parents) if is_checkout(d)), None)
    return None if found is None else (found, "the current directory")
