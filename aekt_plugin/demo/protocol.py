"""The embedded settings of the demo and the accuracy benchmark: data, teacher, student, schedule.

One :class:`Setting` per data set fixes everything but the loss, so the students of one table
differ only in the method. :func:`prepare` loads the data, gets the cached teacher and its logits on
the training set (computed once; no augmentation, so they are exact for every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Splits, load_dataset
from .train import TrainConfig, get_teacher, predict_logits

__all__ = ["SETTINGS", "Setting", "Prepared", "prepare"]


@dataclass(frozen=True)
class Setting:
    """Data arguments (for :func:`~aekt_plugin.demo.data.load_dataset`), teacher and student schedules."""

    dataset: str
    data: dict[str, Any]
    teacher: TrainConfig
    student: TrainConfig
    teacher_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "data": dict(self.data),
            "teacher": self.teacher.to_dict(),
            "student": self.student.to_dict(),
            "teacher_seed": self.teacher_seed,
        }


SETTINGS: dict[str, Setting] = {
    "digits100": Setting(
        "digits100",
        {"n_train": 2_500, "n_val": 2_000, "n_test": 4_000, "seed": 0},
        TrainConfig(model="digits100-teacher", epochs=15, batch_size=64, lr=0.05, warmup_epochs=0),
        TrainConfig(model="digits100-student", epochs=15, batch_size=128, lr=0.05, warmup_epochs=1),
    ),
    "digits": Setting(
        "digits",
        {"n_val": 0, "n_test": 540, "seed": 0},
        TrainConfig(model="digits-teacher", epochs=30, batch_size=64, lr=0.05, warmup_epochs=0),
        TrainConfig(model="digits-student", epochs=30, batch_size=64, lr=0.05, warmup_epochs=3),
    ),
    "fashion-mnist": Setting(
        "fashion-mnist",
        {"n_train": 10_000, "n_val": 1_000, "n_test": 10_000, "seed": 0},
        TrainConfig(model="fmnist-teacher", epochs=8, lr=0.05, warmup_epochs=0),
        TrainConfig(model="fmnist-student", epochs=6, lr=0.05, warmup_epochs=1),
    ),
    "fmnist100": Setting(
        "fmnist100",
        {"n_train": 10_000, "n_val": 1_000, "n_test": 10_000, "seed": 0},
        TrainConfig(model="fmnist100-teacher", epochs=15, lr=0.05, warmup_epochs=0),
        TrainConfig(model="fmnist100-student", epochs=6, lr=0.05, warmup_epochs=1),
    ),
}


@dataclass
class Prepared:
    setting: Setting
    data: Splits
    teacher: nn.Module
    teacher_info: dict[str, Any]
    teacher_logits: torch.Tensor


def prepare(setting: Setting, *, cache: bool = True, progress: bool = True) -> Prepared:
    """Load the data of ``setting``, get its (cached) teacher and the teacher's training-set logits."""
    data = load_dataset(setting.dataset, **setting.data)
    key = {"dataset": setting.dataset, **setting.data}
    teacher, info = get_teacher(
        data, key, setting.teacher, seed=setting.teacher_seed, cache=cache, progress=progress
    )
    logits = predict_logits(teacher, data.x_train)
    return Prepared(setting, data, teacher, info, logits)
