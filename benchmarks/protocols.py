r"""The paper-like accuracy protocol: a teacher that fits its training split, augmentation, a long schedule.

The main protocol of ``accuracy.py`` (Fashion-MNIST-100, six epochs, no augmentation, a teacher at 77 %)
is cheap but unlike the regime in which DKD and AEKT were proposed: CIFAR-100 students trained for 240
epochs with random crops and flips, distilled from teachers that sit near 100 % training accuracy. This
module builds a protocol closer to that regime from data this machine has:

* **data**: Fashion-MNIST-100 (two Fashion-MNIST images side by side, class ``10·left + right``) at half
  resolution, 1×14×28, so that a 30-epoch schedule fits a CPU budget;
* **augmentation**: each half is shifted by up to ``pad`` pixels and flipped horizontally on its own (a
  flipped garment keeps its class; flipping the whole pair would swap the halves and change the class);
* **teacher**: a wider CNN trained with the same augmentation until it fits the training split (its
  training accuracy and mean target probability ``q_t`` are reported);
* **teacher logits on the augmented batch**: the teacher's logits are computed once for ``views`` fixed
  augmented copies of every training example (:class:`TeacherViews`); each student step draws one view
  per example, and the student sees exactly the augmented image the teacher's logits belong to;
* **students of three families**: a plain CNN and a depthwise-separable, MobileNet-style CNN
  (:class:`MobileCNN`), with SGD, cosine decay, 30 epochs; on digits-100 also a timm ResNet trained through
  timm's task API (``timm_family.py``).

Nothing here is part of the installed package; it extends :mod:`aekt_plugin.demo`'s training loop through
its ``batches`` hook and model registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm_family import TIMM_RESNET, timm_resnet, timm_step_factory
from torch import Tensor, nn

from aekt_plugin.demo.data import Splits, load_dataset
from aekt_plugin.demo.models import SmallCNN, register_model
from aekt_plugin.demo.protocol import Prepared, Setting
from aekt_plugin.demo.train import BatchFn, StepFactory, TrainConfig, cache_dir, get_teacher, predict_logits

__all__ = [
    "PAPERLIKE",
    "MobileCNN",
    "PairAugment",
    "PaperlikeSetting",
    "TeacherViews",
    "downsample",
    "prepare_paperlike",
]


# --------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class PairAugment:
    """Per-half random shift (up to ``pad`` pixels, zero padding) and horizontal flip of a pair image.

    The parameters of one augmented copy of an example are six integers: for the left and the right half,
    the crop offsets ``(dy, dx)`` in ``[0, 2·pad]`` and a flip bit.
    """

    pad: int = 2
    flip: bool = True

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Parameters ``(n, 6)`` (int64) of ``n`` augmented copies."""
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 4), generator=generator)
        flips = torch.randint(0, 2, (n, 2), generator=generator)
        if not self.flip:
            flips.zero_()
        return torch.stack(
            (shifts[:, 0], shifts[:, 1], flips[:, 0], shifts[:, 2], shifts[:, 3], flips[:, 1]), dim=1
        )

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """Augment pair images ``x`` ``(B, 1, H, 2W)`` with per-example ``params`` ``(B, 6)``."""
        batch, _, height, width2 = x.shape
        width = width2 // 2
        rows = torch.arange(height)
        cols = torch.arange(width)
        sample = torch.arange(batch)[:, None, None]
        halves = []
        for k, half in enumerate((x[..., :width], x[..., width:])):
            padded = F.pad(half[:, 0], (self.pad,) * 4)
            r = rows[None, :] + params[:, 3 * k, None]
            c = cols[None, :] + params[:, 3 * k + 1, None]
            shifted = padded[sample, r[:, :, None], c[:, None, :]]
            flip = params[:, 3 * k + 2].bool()[:, None, None]
            halves.append(torch.where(flip, shifted.flip(-1), shifted))
        return torch.cat(halves, dim=-1).unsqueeze(1)

    def batches(self, x: Tensor, seed: int) -> BatchFn:
        """Freshly augmented training batches without teacher logits (to train the teacher)."""
        generator = torch.Generator().manual_seed(seed + 424_242)

        def batches(indices: Tensor, epoch: int) -> tuple[Tensor, None]:
            return self.apply(x[indices], self.draw(indices.shape[0], generator)), None

        return batches


class TeacherViews:
    """The teacher's logits on ``views`` fixed augmented copies of every training example.

    ``params`` is ``(views, N, 6)`` and ``logits`` ``(views, N, C)``. :meth:`batches` draws, for every
    example of a batch, one of its views with a generator seeded per run, and returns the augmented images
    with the teacher's logits on exactly those images.
    """

    def __init__(self, augment: PairAugment, params: Tensor, logits: Tensor) -> None:
        self.augment = augment
        self.params = params
        self.logits = logits

    @classmethod
    def compute(
        cls, teacher: nn.Module, x: Tensor, augment: PairAugment, views: int, *, seed: int = 0
    ) -> TeacherViews:
        generator = torch.Generator().manual_seed(seed + 77_777)
        params = torch.stack([augment.draw(x.shape[0], generator) for _ in range(views)])
        logits = torch.stack(
            [
                predict_logits(
                    teacher,
                    torch.cat(
                        [augment.apply(x[i : i + 2048], p[i : i + 2048]) for i in range(0, x.shape[0], 2048)]
                    ),
                )
                for p in params
            ]
        )
        return cls(augment, params, logits)

    def batches(self, x: Tensor, seed: int) -> BatchFn:
        generator = torch.Generator().manual_seed(seed + 31_337)
        views = self.params.shape[0]

        def batches(indices: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
            view = torch.randint(0, views, (indices.shape[0],), generator=generator)
            inputs = self.augment.apply(x[indices], self.params[view, indices])
            return inputs, self.logits[view, indices]

        return batches

    def target_probability(self, y: Tensor, temperature: float) -> float:
        """Mean teacher probability of the true class over all views, at ``temperature``."""
        probs = torch.softmax(self.logits / temperature, dim=-1)
        return float(probs.gather(-1, y.expand(self.logits.shape[0], -1)[..., None]).mean())

    def accuracy(self, y: Tensor) -> float:
        """The teacher's accuracy on the augmented views."""
        return float((self.logits.argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------------------------- models
def _separable(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    """Depthwise 3×3 then pointwise 1×1 convolution, each with BatchNorm and ReLU (MobileNetV1's block)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, in_chans, 3, stride, 1, groups=in_chans, bias=False),
        nn.BatchNorm2d(in_chans),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_chans, out_chans, 1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class MobileCNN(nn.Module):
    """A MobileNetV1-style student: a 3×3 stem, then depthwise-separable blocks (the first two of stride
    2), adaptive average pooling to ``pool`` and a linear classifier (timm's model vocabulary)."""

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        pool: tuple[int, int] = (2, 4),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for i in range(1, len(widths)):
            layers.append(_separable(widths[i - 1], widths[i], 2 if i < 3 else 1))
        layers.append(nn.AdaptiveAvgPool2d(pool))
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = widths[-1] * pool[0] * pool[1]
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc


register_model(
    "paperlike-teacher", lambda in_chans, num_classes: SmallCNN(in_chans, num_classes, (64, 128, 256), (2, 4))
)
register_model(
    "paperlike-cnn", lambda in_chans, num_classes: SmallCNN(in_chans, num_classes, (16, 32, 64), (2, 4))
)
register_model("paperlike-mobile", lambda in_chans, num_classes: MobileCNN(in_chans, num_classes))
register_model(
    "paperlike-digits-teacher",
    lambda in_chans, num_classes: SmallCNN(in_chans, num_classes, (32, 64), (2, 4)),
)
register_model(
    "paperlike-digits-cnn", lambda in_chans, num_classes: SmallCNN(in_chans, num_classes, (8, 16), (2, 4))
)
register_model(
    "paperlike-digits-mobile",
    lambda in_chans, num_classes: MobileCNN(in_chans, num_classes, widths=(8, 16, 32, 32), pool=(2, 4)),
)
register_model(TIMM_RESNET, timm_resnet)


# --------------------------------------------------------------------------------------------- the protocol
def downsample(data: Splits, factor: int) -> Splits:
    """Average-pool every image of ``data`` by ``factor`` (Fashion-MNIST-100 at 14×28 for ``factor=2``)."""
    if factor == 1:
        return data
    pool = lambda x: F.avg_pool2d(x, factor) if x.shape[0] else x[..., ::factor, ::factor]  # noqa: E731
    return replace(
        data,
        x_train=pool(data.x_train),
        x_val=pool(data.x_val),
        x_test=pool(data.x_test),
        name=f"{data.name}-{data.x_train.shape[-2] // factor}x{data.x_train.shape[-1] // factor}",
    )


@dataclass(frozen=True)
class PaperlikeSetting:
    """Everything of the paper-like protocol but the loss: data, augmentation, teacher, student families."""

    dataset: str = "fmnist100"
    data: dict[str, Any] = field(
        default_factory=lambda: {"n_train": 10_000, "n_val": 2_000, "n_test": 10_000, "seed": 0}
    )
    downsample: int = 2
    augment: PairAugment = PairAugment(pad=2, flip=True)
    views: int = 16
    teacher: TrainConfig = TrainConfig(model="paperlike-teacher", epochs=80, lr=0.05, warmup_epochs=0)
    students: dict[str, TrainConfig] = field(
        default_factory=lambda: {
            "cnn": TrainConfig(model="paperlike-cnn", epochs=30, lr=0.05, warmup_epochs=1),
            "mobile": TrainConfig(model="paperlike-mobile", epochs=30, lr=0.05, warmup_epochs=1),
        }
    )

    def setting(self, family: str) -> Setting:
        if family not in self.students:
            raise ValueError(f"family must be one of {sorted(self.students)}, got {family!r}")
        return Setting(self.dataset, dict(self.data), self.teacher, self.students[family])

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "downsample": self.downsample,
            "augment": {"pad": self.augment.pad, "flip": self.augment.flip},
            "views": self.views,
            "teacher_logits": "computed once on each of `views` fixed augmented copies of every training "
            "example; each step draws one view per example and trains on that augmented image",
        }


PAPERLIKE = {
    # Fashion-MNIST-100 at 14×28 with per-half shifts and flips; a wide teacher trained 80 epochs.
    "fmnist100": PaperlikeSetting(),
    # Digits-100 (8×16): per-half shifts by one pixel (no flips: a flipped digit is another digit), the
    # teacher trained with the same augmentation, students over 30 epochs.
    "digits100": PaperlikeSetting(
        dataset="digits100",
        data={"n_train": 2_500, "n_val": 2_000, "n_test": 4_000, "seed": 0},
        downsample=1,
        augment=PairAugment(pad=1, flip=False),
        views=16,
        teacher=TrainConfig(
            model="paperlike-digits-teacher", epochs=40, batch_size=64, lr=0.05, warmup_epochs=0
        ),
        students={
            "cnn": TrainConfig(
                model="paperlike-digits-cnn", epochs=30, batch_size=128, lr=0.05, warmup_epochs=1
            ),
            "mobile": TrainConfig(
                model="paperlike-digits-mobile", epochs=30, batch_size=128, lr=0.05, warmup_epochs=1
            ),
            # trained through timm's tasks (timm_family.py); no warm-up, as timm's LogitDistillationTask
            "timm": TrainConfig(model=TIMM_RESNET, epochs=30, batch_size=128, lr=0.05, warmup_epochs=0),
        },
    ),
}
STEP_FACTORIES = {"timm": timm_step_factory}
"""Families whose students train through a toolkit's task: family -> (teacher -> step factory)."""


@dataclass
class PreparedPaperlike(Prepared):
    paperlike: PaperlikeSetting = field(default_factory=PaperlikeSetting)
    views: TeacherViews | None = None
    step_factory: StepFactory | None = None

    def batches(self, seed: int) -> BatchFn:
        assert self.views is not None
        return self.views.batches(self.data.x_train, seed)


def _views_path(teacher_key: str, setting: PaperlikeSetting) -> os.PathLike[str]:
    payload = json.dumps({"teacher": teacher_key, **setting.describe()}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return cache_dir() / "teacher-views" / f"{digest}.pt"


def prepare_paperlike(dataset: str, family: str, *, progress: bool = True) -> PreparedPaperlike:
    """Data, the (cached) augmented-trained teacher and its logits on the fixed views, for ``family``."""
    setting = PAPERLIKE[dataset]
    base = setting.setting(family)
    data = downsample(load_dataset(setting.dataset, **setting.data), setting.downsample)
    key = {"dataset": data.name, **setting.data, **setting.describe()}
    teacher, info = get_teacher(
        data,
        key,
        setting.teacher,
        seed=0,
        progress=progress,
        batches=setting.augment.batches(data.x_train, seed=0),
    )
    path = _views_path(info["key"], setting)
    if os.path.exists(path):
        blob = torch.load(path, weights_only=True)
        views = TeacherViews(setting.augment, blob["params"], blob["logits"])
    else:
        views = TeacherViews.compute(teacher, data.x_train, setting.augment, setting.views)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"params": views.params, "logits": views.logits}, path)
    info = dict(
        info,
        views_accuracy=views.accuracy(data.y_train),
        mean_q_t={f"T={t:g}": views.target_probability(data.y_train, t) for t in (1.0, 4.0)},
    )
    factory = STEP_FACTORIES[family](teacher) if family in STEP_FACTORIES else None
    return PreparedPaperlike(base, data, teacher, info, views.logits[0], setting, views, factory)
