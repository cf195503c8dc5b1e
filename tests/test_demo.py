"""The demo's contract: data construction, collapse detection, statistics, results schema, a tiny run."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aekt_plugin.demo import data as D
from aekt_plugin.demo.report import format_table, read_results, write_results
from aekt_plugin.demo.stats import paired_difference, summarize, t_quantile
from aekt_plugin.demo.train import MethodConfig, TrainConfig, cache_dir, is_collapsed, train_student

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ data
def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    """IDX files where each image's pixels encode its pool and index, so pairs can be traced back."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 100)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = 1 if split == "train" else 2  # which pool
        images[:, 0, 1] = np.arange(n) % 256  # index within the pool
        images[:, 0, 2] = labels
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_read_idx_round_trips_shape_and_values(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "x.gz"), arr)


def test_read_idx_rejects_a_truncated_file(tmp_path: Path) -> None:
    arr = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", arr)
    raw = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "y.gz", "wb") as fh:
        fh.write(raw[:-1])
    with pytest.raises(ValueError, match="expected 6 values"):
        D.read_idx(tmp_path / "y.gz")


def test_make_pairs_labels_are_ten_left_plus_right() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=300)
    images = np.repeat(labels[:, None, None], 28 * 28, axis=1).reshape(300, 28, 28).astype(np.uint8)
    pair_images, pair_labels, src = D.make_pairs(images, labels, 500, seed=3)
    assert pair_images.shape == (500, 28, 56)
    np.testing.assert_array_equal(pair_labels, 10 * labels[src[:, 0]] + labels[src[:, 1]])
    # the left half is the left image, the right half the right image
    np.testing.assert_array_equal(pair_images[:, 0, 0], labels[src[:, 0]])
    np.testing.assert_array_equal(pair_images[:, 0, 28], labels[src[:, 1]])
    assert len(np.unique(pair_labels)) > 90  # the 100 classes are drawn uniformly


def test_make_pairs_is_deterministic_in_its_seed() -> None:
    labels = np.arange(100) % 10
    images = np.random.default_rng(0).integers(0, 255, (100, 28, 28)).astype(np.uint8)
    a = D.make_pairs(images, labels, 50, seed=7)
    b = D.make_pairs(images, labels, 50, seed=7)
    c = D.make_pairs(images, labels, 50, seed=8)
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2])


def test_fmnist100_never_mixes_train_and_test_images(fake_fmnist: Path) -> None:
    s = D.load_fmnist100(root=fake_fmnist, n_train=300, n_val=40, n_test=150, seed=0)
    assert s.num_classes == 100 and s.input_shape == (1, 28, 56)
    assert (s.x_train.shape[0], s.x_val.shape[0], s.x_test.shape[0]) == (300, 40, 150)
    pool = lambda x: (x[:, 0, 0, [0, 28]] * 255).round()  # noqa: E731 - the pool marker of both halves
    assert torch.all(pool(s.x_train) == 1) and torch.all(pool(s.x_val) == 1)
    assert torch.all(pool(s.x_test) == 2)
    for x, y in ((s.x_train, s.y_train), (s.x_test, s.y_test)):
        left, right = (x[:, 0, 0, 2] * 255).round().long(), (x[:, 0, 0, 30] * 255).round().long()
        torch.testing.assert_close(y, 10 * left + right)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist(root=tmp_path)


def test_load_dataset_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.load_dataset("cifar100")


def test_digits_splits_are_disjoint_and_stratified() -> None:
    s = D.load_digits(n_val=100, n_test=540, seed=0)
    assert s.x_train.shape[0] + s.x_val.shape[0] + s.x_test.shape[0] == 1797
    assert torch.bincount(s.y_test, minlength=10).tolist() == [54] * 10
    flat = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    # digits has a few duplicate images; the splits are disjoint by index, so overlaps stay rare
    assert len(flat(s.x_train) & flat(s.x_test)) < 5


def test_digits100_pairs_come_from_disjoint_pools_of_digits() -> None:
    """No digit image is shared between the training, validation and test pairs, and every pair's class
    is ``10·left + right`` of the digits it shows."""
    from sklearn.datasets import load_digits

    s = D.load_digits100(n_train=600, n_val=300, n_test=400, seed=0)
    assert (s.num_classes, s.input_shape) == (100, (1, 8, 16))
    assert (s.x_train.shape[0], s.x_val.shape[0], s.x_test.shape[0]) == (600, 300, 400)
    bunch = load_digits()
    index = {bunch.images[i].astype(np.float32).tobytes(): i for i in range(len(bunch.target))}
    used = {}
    for split, x, y in (
        ("train", s.x_train, s.y_train),
        ("val", s.x_val, s.y_val),
        ("test", s.x_test, s.y_test),
    ):
        halves = (x[:, 0, :, :8] * 16).round().numpy(), (x[:, 0, :, 8:] * 16).round().numpy()
        left = np.array([index[h.astype(np.float32).tobytes()] for h in halves[0]])
        right = np.array([index[h.astype(np.float32).tobytes()] for h in halves[1]])
        np.testing.assert_array_equal(y.numpy(), 10 * bunch.target[left] + bunch.target[right])
        used[split] = set(left) | set(right)
    assert (
        not used["train"] & used["test"]
        and not used["train"] & used["val"]
        and not used["val"] & used["test"]
    )
    assert len(used["test"]) > 300 and len(used["train"]) > 600  # the pairs cover most of their pools


def test_digits100_is_deterministic_in_its_seed() -> None:
    a, b = D.load_digits100(seed=3), D.load_digits100(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, D.load_digits100(seed=4).y_train)


# ------------------------------------------------------------------------------------------ collapse
@pytest.mark.parametrize("num_classes", [10, 100])
def test_accuracy_near_chance_is_collapsed(num_classes: int) -> None:
    chance = 1.0 / num_classes
    assert is_collapsed(chance, num_classes)
    assert is_collapsed(1.5 * chance, num_classes)
    assert is_collapsed(float("nan"), num_classes)
    assert not is_collapsed(3 * chance, num_classes)


def test_a_student_killed_by_its_loss_is_flagged() -> None:
    """A learning rate that blows the weights up leaves the student at chance; the record says so."""
    s = D.load_digits(seed=0)
    cfg = TrainConfig(model="tiny", epochs=1, lr=1e4, warmup_epochs=0)
    _, rec = train_student(s, None, MethodConfig("CE", loss="ce"), cfg, seed=0, progress=False)
    assert rec["collapsed"]
    assert summarize([rec])["CE"]["n_collapsed"] == 1


# ------------------------------------------------------------------------------------------ statistics
def test_t_quantile_matches_known_values() -> None:
    assert t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.000, abs=2e-3)
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0)


def _runs(method: str, accs: list[float], collapsed: tuple[int, ...] = ()) -> list[dict]:
    return [
        {"method": method, "seed": i, "accuracy": a, "collapsed": i in collapsed} for i, a in enumerate(accs)
    ]


def test_paired_difference_interval_from_first_principles() -> None:
    a = [0.80, 0.82, 0.81, 0.83, 0.79]
    offsets = [0.01, 0.03, 0.02, 0.02, 0.02]
    b = [x - o for x, o in zip(a, offsets, strict=True)]
    d = paired_difference(_runs("A", a) + _runs("B", b), "A", "B")
    mean = sum(offsets) / 5
    sd = math.sqrt(sum((o - mean) ** 2 for o in offsets) / 4)
    half = 2.776 * sd / math.sqrt(5)
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(mean)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-4)
    assert not d["within_noise"]


def test_pairing_removes_shared_seed_noise() -> None:
    """Seed effects much larger than the method effect: unpaired stds overlap, the paired interval
    does not."""
    seed_effect = [0.0, 0.05, -0.04, 0.03, -0.02, 0.06]
    runs = _runs("A", [0.7 + e + 0.01 for e in seed_effect]) + _runs(
        "B", [0.7 + e + 0.001 * i for i, e in enumerate(seed_effect)]
    )
    s = summarize(runs)
    assert abs(s["A"]["mean"] - s["B"]["mean"]) < s["A"]["std"]
    assert not paired_difference(runs, "A", "B")["within_noise"]


def test_difference_straddling_zero_is_within_noise() -> None:
    runs = _runs("A", [0.5, 0.52, 0.48, 0.5]) + _runs("B", [0.51, 0.5, 0.49, 0.5])
    d = paired_difference(runs, "A", "B")
    assert d["ci_low"] < 0 < d["ci_high"] and d["within_noise"]
    assert "within noise" in format_table(runs, compare=[("A", "B")])


def test_collapsed_runs_are_counted_not_averaged() -> None:
    runs = _runs("A", [0.8, 0.01, 0.82], collapsed=(1,)) + _runs("B", [0.7, 0.71, 0.69])
    s = summarize(runs)
    assert s["A"]["n"] == 3 and s["A"]["n_collapsed"] == 1 and s["A"]["collapsed_seeds"] == [1]
    assert s["A"]["mean"] == pytest.approx(0.81)
    d = paired_difference(runs, "A", "B")
    assert d["seeds"] == [0, 2]
    assert "| A | 81.00 ± 1.41 | 3 | 1 |" in format_table(runs)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_demo_writes_schema_conforming_results(tmp_path: Path, tiny_demo, capsys) -> None:
    from aekt_plugin.demo import run_demo

    out = tmp_path / "out"
    result = run_demo(["--seeds", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| KD |" in printed and "AEKT − DKD" in printed
    blob = json.loads((out / "results.json").read_text())
    assert set(blob) >= {"protocol", "runs"}
    assert [r["method"] for r in blob["runs"]] == ["CE", "CE", "KD", "KD", "DKD", "DKD", "AEKT", "AEKT"]
    for r in blob["runs"]:
        assert {"method", "seed", "accuracy", "collapsed", "config"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seed"] in (0, 1)
    import aekt_plugin

    aekt_cfg = blob["protocol"]["methods"]["AEKT"]
    for k in ("max_weight", "normalize_weight", "order"):
        expected = getattr(aekt_plugin.DEFAULTS, k)
        assert aekt_cfg[k] == ("inf" if expected == math.inf else expected)
    assert blob["protocol"]["threads"] == 1
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text() == result["table"]
    # the teacher was cached under the user's cache dir, and a second run reuses it
    cached = list((cache_dir() / "teachers").glob("digits100-*.pt"))
    assert len(cached) == 1
    from aekt_plugin import cli  # the `aekt demo` entry point hands its parsed namespace to run_demo

    assert cli.main(["demo", "--seeds", "1", "--no-progress"]) == 0
    assert "(cached)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_demo_shows_what_distillation_does(capsys) -> None:
    """``aekt demo`` as shipped (digits-100, real teacher), on two seeds: KD and DKD are clearly above CE."""
    from aekt_plugin.demo import run_demo
    from aekt_plugin.demo.stats import summarize

    result = run_demo(["--seeds", "2", "--no-progress", "--no-cache"])
    means = {m: s["mean"] for m, s in summarize(result["runs"]).items()}
    assert result["protocol"]["dataset"] == "digits100"
    assert means["KD"] > means["CE"] + 0.02 and means["DKD"] > means["CE"] + 0.02
    assert means["AEKT"] > means["CE"] + 0.02
    assert "KD − CE" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("missing", "shown", "argv"),
    [
        ("numpy", "numpy", ["--no-progress"]),
        ("sklearn", "scikit-learn", ["--no-progress"]),
        ("tqdm", "tqdm", []),  # the progress bars need it
        ("matplotlib", "matplotlib", ["--no-progress", "--out", "OUT"]),  # the plot needs it
    ],
)
def test_a_missing_demo_package_is_one_line_naming_the_extra(
    tmp_path: Path, run_without, missing: str, shown: str, argv: list[str]
) -> None:
    """Without the demo extra, ``aekt demo`` says which extra to install -- one line, exit status 2, no
    traceback -- before any training."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    done = run_without(
        (missing,),
        f"from aekt_plugin import cli\nsys.exit(cli.main(['demo', *{argv!r}]))\n",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    # torch itself warns at import when numpy is missing; what the demo adds is its one line
    line = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert line.startswith("aekt demo: error: ") and 'pip install "aekt-plugin[demo]"' in line
    assert repr(shown) in line
    assert "teacher" not in done.stdout  # nothing was trained
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_demo_reads_fashion_mnist_from_data_dir(tiny_demo, fake_fmnist: Path, capsys) -> None:
    from aekt_plugin.demo import run_demo

    result = run_demo(
        ["--dataset", "fmnist100", "--data-dir", str(fake_fmnist), "--seeds", "1", "--no-progress"]
    )
    assert result["protocol"]["data"]["root"] == str(fake_fmnist)
    assert result["protocol"]["splits"]["input_shape"] == [1, 28, 56]
    assert [r["method"] for r in result["runs"]] == ["CE", "KD", "DKD", "AEKT"]
    assert "| AEKT |" in capsys.readouterr().out


def test_demo_without_fashion_mnist_files_names_the_fix(tiny_demo, tmp_path: Path, capsys) -> None:
    from aekt_plugin.demo import run_demo

    with pytest.raises(SystemExit) as exc:
        run_demo(["--dataset", "fmnist100", "--data-dir", str(tmp_path / "empty"), "--no-progress"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "apt-get install dataset-fashion-mnist" in line and "--data-dir" in line and str(tmp_path) in line
    assert captured.out == ""  # nothing was trained


def test_data_dir_is_refused_for_a_dataset_that_reads_no_files(tmp_path: Path, capsys) -> None:
    from aekt_plugin.demo import run_demo

    with pytest.raises(SystemExit) as exc:
        run_demo(["--dataset", "digits100", "--data-dir", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    assert "--data-dir applies to fashion-mnist and fmnist100" in capsys.readouterr().err


def test_results_round_trip_non_finite_accuracy(tmp_path: Path) -> None:
    runs = _runs("A", [0.5, float("nan")], collapsed=(1,))
    write_results(tmp_path / "r.json", {"p": 1}, runs)
    back = read_results(tmp_path / "r.json")
    assert math.isnan(back["runs"][1]["accuracy"]) and back["summary"]["A"]["n_collapsed"] == 1


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from aekt_plugin.demo import run_demo

    for bad in (["--threads", "0"], ["--epochs", "-1"], ["--seeds", "x"], ["--dataset", "cifar100"]):
        with pytest.raises(SystemExit) as exc:
            run_demo(bad)
        assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err
    import argparse

    with pytest.raises(ValueError, match="--threads"):  # a namespace built by hand is checked too
        run_demo(argparse.Namespace(threads=0, epochs=None))
