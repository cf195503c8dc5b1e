"""Every Python code block of README.md runs as written.

The blocks use a few names for the reader's own data and models -- ``images``, ``labels``, ``model``,
``teacher``, ``loader`` -- which the test provides as tiny stand-ins (3×32×32 images, 100 classes); the
rest of each block runs exactly as printed, in a fresh namespace, in the order of the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _stand_ins() -> dict[str, object]:
    torch.manual_seed(0)

    def classifier() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 100),
        )

    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 100, (8,))
    return {
        "images": images,
        "labels": labels,
        "model": classifier(),
        "teacher": classifier().eval(),
        "loader": [(images, labels), (images.flip(-1), labels)],
    }


def test_the_readme_has_python_blocks() -> None:
    assert len(_blocks()) >= 6


@pytest.mark.parametrize(("line", "code"), _blocks(), ids=[f"README.md:{line}" for line, _ in _blocks()])
def test_readme_python_block_runs_as_written(line: int, code: str, tmp_path, monkeypatch) -> None:
    if "timm" in code:
        pytest.importorskip("timm")
    if "torchdistill" in code:
        pytest.importorskip("torchdistill")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_block_{line}", **_stand_ins()}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code


_NUMBER = re.compile(r"[+\-−]?\d+(?:\.\d+)?")


def _layout(printed: str) -> list[str]:
    """What must match between the README's copy of the demo's output and a real run: every line with its
    numbers and the teacher's model name masked, and each table row that holds results reduced to its first
    cell (the method or the pair) and its number of cells (values and verdicts depend on the run)."""
    shape = []
    for line in printed.strip().splitlines():
        if line.startswith("|") and _NUMBER.search(line):
            cells = line.strip().strip("|").split("|")
            shape.append(f"| {cells[0].strip()} | ({len(cells)} cells)")
        else:
            shape.append(_NUMBER.sub("N", re.sub(r"^teacher \([^,]+,", "teacher (MODEL,", line)))
    return shape


def _readme_demo_output() -> str:
    (block,) = re.findall(r"^```text\n(teacher \(.*?)^```", README.read_text(), re.S | re.M)
    return block


def test_layout_masks_values_but_not_structure() -> None:
    row = "| KD − CE | +5.43 | [+4.69, +6.17] | 10 | KD better |"
    assert _layout(row) == _layout(row.replace("+5.43", "−0.20").replace("KD better", "within noise"))
    assert _layout(row) != _layout("| DKD − KD | +5.43 | [+4.69, +6.17] | 10 | KD better |")
    assert _layout(row) != _layout(row.replace(" 10 |", ""))
    assert _layout("done in 41 s") == _layout("done in 7 s") != _layout("done in 41 s, cached")


@pytest.mark.slow
def test_the_readme_shows_what_aekt_demo_prints(tiny_demo, capsys) -> None:
    """The README's copy of `aekt demo`'s output has the layout the command prints (on the tiny setting:
    the same lines, header and rows, whatever the numbers)."""
    from aekt_plugin import cli

    assert cli.main(["demo", "--seeds", "2", "--no-progress"]) == 0
    assert _layout(capsys.readouterr().out) == _layout(_readme_demo_output())
