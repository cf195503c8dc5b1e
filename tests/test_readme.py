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
