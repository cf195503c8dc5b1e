"""Small CNNs for the demo and the accuracy benchmark (timm's model vocabulary, kept minimal)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["SmallCNN", "count_parameters", "make_model", "register_model", "MODEL_PRESETS"]

# name -> (conv widths, pooled grid (h, w) before the classifier)
MODEL_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, int]]] = {
    # digits-100 (8×16): the pooled grid keeps the two digits apart
    "digits100-teacher": ((32, 64), (2, 4)),
    "digits100-student": ((4,), (4, 8)),
    # digits (8×8)
    "digits-teacher": ((32, 64), (2, 2)),
    "digits-student": ((8, 16), (2, 2)),
    # Fashion-MNIST (28×28)
    "fmnist-teacher": ((32, 64, 128), (2, 2)),
    "fmnist-student": ((8, 16, 32), (1, 1)),
    # Fashion-MNIST-100 (28×56): the pooled grid keeps left and right halves apart
    "fmnist100-teacher": ((32, 64, 128), (2, 4)),
    "fmnist100-student": ((8, 16, 32), (2, 4)),
}


class SmallCNN(nn.Module):
    """``len(widths)`` blocks of conv3×3-BN-ReLU, each but the last followed by 2×2 max-pooling,
    then adaptive average pooling to ``pool`` and a linear classifier.

    Args:
        in_chans: input channels.
        num_classes: number of classes ``C``.
        widths: channels of each conv block.
        pool: output grid ``(h, w)`` of the adaptive average pooling (``(1, 2)`` keeps the left and
            right halves of a Fashion-MNIST-100 pair apart).
    """

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32),
        pool: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one conv block")
        layers: list[nn.Module] = []
        prev = in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = w
        layers.append(nn.AdaptiveAvgPool2d(pool))
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = prev * pool[0] * pool[1]
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc


ModelFactory = Callable[[int, int], nn.Module]
"""``factory(in_chans, num_classes)`` builds a classifier."""

_FACTORIES: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Make ``name`` usable as a :class:`~aekt_plugin.demo.train.TrainConfig` model (for benchmarks that
    bring their own architectures)."""
    if name in MODEL_PRESETS:
        raise ValueError(f"{name!r} is a built-in preset")
    _FACTORIES[name] = factory


def make_model(preset: str, in_chans: int, num_classes: int) -> nn.Module:
    """Build a model by name: a :class:`SmallCNN` of :data:`MODEL_PRESETS`, or a registered factory."""
    if preset in _FACTORIES:
        return _FACTORIES[preset](in_chans, num_classes)
    if preset not in MODEL_PRESETS:
        names = sorted([*MODEL_PRESETS, *_FACTORIES])
        raise ValueError(f"model preset must be one of {names}, got {preset!r}")
    widths, pool = MODEL_PRESETS[preset]
    return SmallCNN(in_chans, num_classes, widths, pool)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
