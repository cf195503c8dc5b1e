"""``examples/timm_distill.py`` runs as the README writes it: on data that ships with a dependency, the
comparison paired by seed and summarised with the demo's statistics."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "timm_distill.py"
TINY = "--n-train 256 --n-test 128 --batch-size 32 --epochs 1 --teacher-epochs 1".split()
# the smallest run whose students rise above twice chance (a collapsed run leaves its seed unpaired)
LEARNING = "--n-train 512 --n-test 256 --batch-size 32 --epochs 3 --teacher-epochs 3".split()


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("timm_distill_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_table(lines: list[str]) -> dict[str, float]:
    start = next(i for i, line in enumerate(lines) if line.startswith("model")) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip() or lines[i].startswith("total"))
    return {name.strip(): float(value) for name, value in (line.rsplit(None, 1) for line in lines[start:end])}


@pytest.mark.slow
def test_the_default_run_needs_no_data_outside_the_installed_packages(example, monkeypatch, tmp_path, capsys):
    """The default data set is digits-100, built from scikit-learn's digits: no Fashion-MNIST files."""
    monkeypatch.setattr(example, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    example.main(TINY)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("digits100: 256 train / 128 test images (1, 16, 32), 100 classes")
    rows = _first_table(lines)
    assert set(rows) == {"teacher", "AEKT student (none)", "AEKT student, folded"}
    assert rows["AEKT student, folded"] == rows["AEKT student (none)"]
    assert lines[-1].startswith("total")


@pytest.mark.slow
def test_the_comparison_is_paired_by_seed_with_intervals(example, capsys):
    example.main([*LEARNING, "--mixup", "0.4", "--compare", "--seeds", "2", "--order", "kd_cls"])
    out = capsys.readouterr().out
    rows = _first_table(out.splitlines())
    # the wiring, end to end (these runs learn little; tests/test_timm.py covers learning)
    assert rows["AEKT student, folded"] == rows["AEKT student (kd_cls)"]
    for method in ("CE", "KD", "DKD", "AEKT"):
        assert re.search(rf"^\| {method} \| \d+\.\d\d ± \d+\.\d\d \| 2 \| \d \|$", out, re.M), method
    for pair in ("KD − CE", "DKD − KD", "AEKT − KD", "AEKT − DKD"):
        assert re.search(
            rf"^\| {pair} \| [+-]\d+\.\d\d \| \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \| 2 \| ", out, re.M
        )


@pytest.mark.slow
def test_every_method_of_a_seed_starts_from_the_same_weights(example):
    """With a zero learning rate the students keep their initial weights: equal across methods on one
    seed, different on another; and a run is repeatable."""
    args = example.build_parser().parse_args([*TINY, "--lr", "0"])
    data = example.load_data(args)
    stats = dict(mean=(0.0,), std=(1.0,))
    torch.manual_seed(0)
    teacher = example.make_teacher(data, stats).eval()

    def weights(method: str, seed: int) -> torch.Tensor:
        model, _ = example.train_student(method, seed, data, teacher, stats, args, leave=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    ce = weights("CE", 3)
    assert torch.equal(ce, weights("KD", 3)) and torch.equal(ce, weights("AEKT", 3))
    assert not torch.equal(ce, weights("CE", 4))
    args.lr = 5e-3
    assert torch.equal(weights("DKD", 3), weights("DKD", 3))


def test_fashion_mnist_without_its_files_names_the_fix(example, tmp_path):
    with pytest.raises(SystemExit) as exc:
        example.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    message = str(exc.value.code)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
