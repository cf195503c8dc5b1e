"""The demo's data and models for torchdistill: what the digits sample config
(``aekt_plugin/configs/torchdistill/digits_aekt_serial.yaml``) names under ``dependencies:``.

Importing this module registers the model ``aekt_demo_cnn`` (the small CNNs of
:mod:`aekt_plugin.demo.models`) with torchdistill; :func:`demo_dataset` is a dataset factory for a
``datasets:`` entry. Needs the ``torchdistill`` and ``demo`` extras.
"""

from __future__ import annotations

from typing import Any

import torch.utils.data
from torch import nn
from torchdistill.models.registry import MODEL_DICT, register_model

from .data import load_dataset
from .models import make_model

__all__ = ["demo_dataset"]


def demo_dataset(name: str = "digits", split: str = "train", **kwargs: Any) -> torch.utils.data.TensorDataset:
    """One split of a demo data set (:func:`aekt_plugin.demo.data.load_dataset`) as an in-memory
    ``TensorDataset`` of ``(image (1, H, W) float in [0, 1], label int64)``, for a torchdistill
    ``datasets:`` entry (``!import_call`` with ``key: 'aekt_plugin.demo.torchdistill.demo_dataset'``).

    Args:
        name: ``'digits100'``, ``'digits'`` (scikit-learn), ``'fashion-mnist'`` or ``'fmnist100'``.
        split: ``'train'``, ``'val'`` or ``'test'``.
        kwargs: passed to the loader (``seed``, ``n_val``, ``n_test``, ...); use the same values for every
            split of one run, so the splits do not overlap.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    splits = load_dataset(name, **kwargs)
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    if x.shape[0] == 0:
        raise ValueError(f"split {split!r} of {name!r} is empty (for 'val' pass n_val > 0)")
    return torch.utils.data.TensorDataset(x, y)


def _demo_cnn(preset: str, num_classes: int, in_chans: int = 1) -> nn.Module:
    """torchdistill model factory for the demo CNNs (:func:`aekt_plugin.demo.models.make_model`)."""
    return make_model(preset, in_chans, num_classes)


if MODEL_DICT.get("aekt_demo_cnn") is not _demo_cnn:
    register_model(key="aekt_demo_cnn")(_demo_cnn)
