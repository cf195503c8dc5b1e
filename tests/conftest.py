"""Shared test settings: one CPU thread (two make small ops 1000x slower on 2-core machines), a
hypothesis profile without deadlines (the CI machine is shared and its timings are noisy), and the tiny
model and demo settings the demo tests train in seconds."""

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, settings

from aekt_plugin.demo.models import SmallCNN, register_model

torch.set_num_threads(1)

register_model("tiny", lambda in_chans, num_classes: SmallCNN(in_chans, num_classes, (4, 8), (1, 2)))

settings.register_profile(
    "aekt",
    deadline=None,
    max_examples=int(os.environ.get("AEKT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") is not None,
)
settings.load_profile("aekt")


@pytest.fixture()
def tiny_demo(tmp_path, monkeypatch):
    """``aekt demo``'s settings shrunk to tiny models and two epochs, with a private teacher cache."""
    from aekt_plugin.demo.protocol import SETTINGS

    for name, setting in list(SETTINGS.items()):
        data = dict(setting.data)
        if "n_train" in data:
            data.update(n_train=300, n_val=50, n_test=200)
        tiny = replace(
            setting,
            data=data,
            teacher=replace(setting.teacher, model="tiny", epochs=2),
            student=replace(setting.student, model="tiny", epochs=2, warmup_epochs=0.5),
        )
        monkeypatch.setitem(SETTINGS, name, tiny)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return SETTINGS


@pytest.fixture(autouse=True)
def _one_time_warnings_start_fresh(monkeypatch):
    """The package's one-time warnings (``_validation.warn_once``) fire again in every test."""
    from aekt_plugin import _validation

    monkeypatch.setattr(_validation, "_WARNED", set())


_BLOCK_IMPORTS = """\
import sys, importlib.abc, importlib.machinery
class Missing(importlib.abc.Loader):  # as if the package were not installed
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Block())
"""


def _run_without(
    packages: Sequence[str], code: str, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = f"BLOCKED = {tuple(packages)!r}\n" + _BLOCK_IMPORTS + code
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture()
def run_without():
    """``run_without(packages, code, env=None)``: run ``code`` in a fresh interpreter in which importing
    any of ``packages`` fails, as if they were not installed."""
    return _run_without
