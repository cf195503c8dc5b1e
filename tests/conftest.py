"""Shared test settings: one CPU thread (two make small ops 1000x slower on 2-core machines), a
hypothesis profile without deadlines (the CI machine is shared and its timings are noisy), and the tiny
model and demo settings the demo tests train in seconds."""

import os
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
