"""Data sets of the demo and of the accuracy benchmark.

Four tasks, none downloaded at run time:

* ``digits100`` (the demo's default): two of scikit-learn's 8×8 handwritten digits side by side (1×8×16),
  class ``10·left + right`` -- 100 classes built from data shipped inside the scikit-learn wheel. The
  1,797 digits are first split into disjoint training, validation and test pools, and each split's pairs
  are drawn from its own pool only, so no digit image is shared between splits.
* ``digits``: scikit-learn's 8×8 handwritten digits (1797 images, 10 classes).
* ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` IDX files (60k/10k, 28×28, 10 classes),
  parsed with numpy.
* ``fmnist100``: Fashion-MNIST-100. Each example is two Fashion-MNIST images side by side
  (1×28×56) and its class is ``10·left + right`` -- 100 classes with real inter-class structure.
  Training pairs are drawn from the 60k training images and test pairs from the 10k test images,
  with a fixed seed, so the two never share an image.

Every loader returns a :class:`Splits` of float tensors in ``[0, 1]`` (N, 1, H, W) and int64 labels;
the validation split is carved from the training data, never from the test data.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FILE_DATASETS",
    "Splits",
    "load_dataset",
    "load_digits",
    "load_digits100",
    "load_fashion_mnist",
    "load_fmnist100",
    "make_pairs",
    "read_idx",
]

DATASETS = ("digits100", "digits", "fashion-mnist", "fmnist100")
FILE_DATASETS = ("fashion-mnist", "fmnist100")
"""The data sets read from Fashion-MNIST's IDX files (their loaders take ``root=``, the files' directory)."""
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_APT_HINT = "sudo apt-get install dataset-fashion-mnist"


@dataclass
class Splits:
    """Train / validation / test tensors of one task."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict[str, object]:
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "n_train": int(self.x_train.shape[0]),
            "n_val": int(self.x_val.shape[0]),
            "n_test": int(self.x_test.shape[0]),
        }


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a (gzipped) IDX file into a numpy array of unsigned bytes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    expected = int(np.prod(dims))
    if arr.size != expected:
        raise ValueError(f"{path}: expected {expected} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


def _split_val(
    x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not 0 <= n_val < x.shape[0]:
        raise ValueError(f"n_val must be in [0, {x.shape[0]}), got {n_val}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def load_digits(*, n_val: int = 0, n_test: int = 540, seed: int = 0) -> Splits:
    """scikit-learn's digits, 1×8×8 images scaled to ``[0, 1]``, a seeded stratified test split."""
    from ._deps import require

    datasets = require("sklearn.datasets")
    bunch = datasets.load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    gen = np.random.default_rng(seed)
    test_idx: list[int] = []
    classes = np.unique(bunch.target)
    per_class = n_test // len(classes)
    for c in classes:
        idx = np.flatnonzero(bunch.target == c)
        test_idx.extend(gen.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    x_test, y_test = x[torch.from_numpy(test_mask)], y[torch.from_numpy(test_mask)]
    x_tr, y_tr = x[torch.from_numpy(~test_mask)], y[torch.from_numpy(~test_mask)]
    x_tr, y_tr, x_val, y_val = _split_val(x_tr, y_tr, n_val, seed + 1)
    return Splits(x_tr, y_tr, x_val, y_val, x_test, y_test, 10, "digits")


def _digit_pools(labels: np.ndarray, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Split the indices of ``labels`` into disjoint pools, stratified by class: pool ``k`` takes about
    ``sizes[k] / 10`` digits of each class, and the last pool takes what is left."""
    gen = np.random.default_rng(seed)
    pools: list[list[int]] = [[] for _ in range(len(sizes) + 1)]
    for c in range(10):
        idx = gen.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, size in enumerate(sizes):
            take = round(size / 10)
            pools[k].extend(idx[start : start + take].tolist())
            start += take
        pools[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(pool, dtype=np.int64)) for pool in pools]


def load_digits100(
    *,
    n_train: int = 2_500,
    n_val: int = 2_000,
    n_test: int = 4_000,
    val_digits: int = 300,
    test_digits: int = 500,
    seed: int = 0,
) -> Splits:
    """Digits-100: two of scikit-learn's digits side by side (1×8×16), class ``10·left + right``.

    The 1,797 digits are split, stratified by class, into a test pool of ``test_digits``, a validation pool
    of ``val_digits`` and a training pool (the rest, about 1,000); ``n_train``, ``n_val`` and ``n_test``
    pairs are drawn from their own pool only (:func:`make_pairs`), so no digit image appears in two splits.
    """
    from ._deps import require

    if not (0 <= val_digits and 0 < test_digits and val_digits + test_digits < 1_500):
        raise ValueError(
            f"val_digits and test_digits must leave digits to train on, got {val_digits} and {test_digits}"
        )
    bunch = require("sklearn.datasets").load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    test_pool, val_pool, train_pool = _digit_pools(labels, (test_digits, val_digits), seed)

    def pairs(pool: np.ndarray, n: int, pair_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n == 0:
            return torch.zeros(0, 1, 8, 16), torch.zeros(0, dtype=torch.int64)
        x, y, _ = make_pairs(images[pool], labels[pool], n, pair_seed)
        return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)

    x_tr, y_tr = pairs(train_pool, n_train, seed + 1)
    x_val, y_val = pairs(val_pool, n_val, seed + 2)
    x_te, y_te = pairs(test_pool, n_test, seed + 3)
    return Splits(x_tr, y_tr, x_val, y_val, x_te, y_te, 100, "digits100")


def _fashion_mnist_arrays(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root} (missing: {', '.join(missing)}); "
            f"install them with: {_APT_HINT}, or point --data-dir (root= in Python) at their directory"
        )
    return tuple(read_idx(root / names[k]) for k in ("x_train", "y_train", "x_test", "y_test"))  # type: ignore[return-value]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def load_fashion_mnist(
    *,
    root: str | os.PathLike[str] = FASHION_MNIST_DIR,
    n_train: int | None = None,
    n_val: int = 0,
    n_test: int | None = None,
    seed: int = 0,
) -> Splits:
    """10-class Fashion-MNIST from Debian's IDX files; optional seeded subsets of train and test."""
    xtr, ytr, xte, yte = _fashion_mnist_arrays(Path(root))
    gen = np.random.default_rng(seed)
    if n_train is not None:
        idx = gen.choice(len(ytr), size=n_train + n_val, replace=False)
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None:
        idx = gen.choice(len(yte), size=n_test, replace=False)
        xte, yte = xte[idx], yte[idx]
    x_tr, y_tr = _to_tensor(xtr), torch.from_numpy(ytr.astype(np.int64))
    x_tr, y_tr, x_val, y_val = _split_val(x_tr, y_tr, n_val, seed + 1)
    return Splits(
        x_tr,
        y_tr,
        x_val,
        y_val,
        _to_tensor(xte),
        torch.from_numpy(yte.astype(np.int64)),
        10,
        "fashion-mnist",
    )


def make_pairs(
    images: np.ndarray, labels: np.ndarray, n_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n_pairs`` side-by-side pairs from one pool of images.

    Returns ``(pair_images (n, h, 2w), pair_labels (n,), source_indices (n, 2))`` for ``(h, w)`` images, where
    ``pair_labels = 10·labels[left] + labels[right]``. The pair class is drawn uniformly from the 100
    classes, then an image of each half's class, so every class is equally frequent.
    """
    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    gen = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    if any(len(idx) == 0 for idx in by_class):
        raise ValueError("labels must contain all 10 classes to build pairs")
    pair_class = gen.integers(0, 100, size=n_pairs)
    left_cls, right_cls = pair_class // 10, pair_class % 10
    left = np.array([by_class[c][gen.integers(len(by_class[c]))] for c in left_cls])
    right = np.array([by_class[c][gen.integers(len(by_class[c]))] for c in right_cls])
    pair_images = np.concatenate([images[left], images[right]], axis=-1)
    pair_labels = 10 * labels[left].astype(np.int64) + labels[right].astype(np.int64)
    return pair_images, pair_labels, np.stack([left, right], axis=1)


def load_fmnist100(
    *,
    root: str | os.PathLike[str] = FASHION_MNIST_DIR,
    n_train: int = 10_000,
    n_val: int = 0,
    n_test: int = 5_000,
    seed: int = 0,
) -> Splits:
    """Fashion-MNIST-100: pairs of images side by side (1×28×56), class ``10·left + right``.

    Training and validation pairs are drawn from the 60k training images and test pairs from the
    10k test images, with fixed seeds, so no image appears on both sides of the split.
    """
    xtr, ytr, xte, yte = _fashion_mnist_arrays(Path(root))
    ptr, ltr, _ = make_pairs(xtr, ytr, n_train + n_val, seed)
    pte, lte, _ = make_pairs(xte, yte, n_test, seed + 10_007)
    x_tr, y_tr = _to_tensor(ptr), torch.from_numpy(ltr)
    x_tr, y_tr, x_val, y_val = _split_val(x_tr, y_tr, n_val, seed + 1)
    return Splits(x_tr, y_tr, x_val, y_val, _to_tensor(pte), torch.from_numpy(lte), 100, "fmnist100")


def load_dataset(name: str, **kwargs: object) -> Splits:
    """Load one of :data:`DATASETS` by name (keyword arguments go to its loader)."""
    loaders = {
        "digits100": load_digits100,
        "digits": load_digits,
        "fashion-mnist": load_fashion_mnist,
        "fmnist100": load_fmnist100,
    }
    if name not in loaders:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return loaders[name](**kwargs)  # type: ignore[operator]
