"""Every adapter takes the distillation loss as a core module: a core option reaches the loss through
each toolkit, and no adapter names the options it passes on."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import aekt_plugin
from aekt_plugin import AEKTLoss, aekt_loss

PACKAGE = Path(aekt_plugin.__file__).parent
ADAPTERS = sorted(
    [*PACKAGE.glob("timm/*.py"), *PACKAGE.glob("mdistiller/*.py"), PACKAGE / "torchdistill.py"]
)
# Options an adapter may name: the temperature (mdistiller spells it T) and those fixed by a toolkit's
# conventions or its distributed mode (its reduction, no ignored samples, no value checks in the hot loop,
# the global batch of a distributed run).
TOOLKIT_VOCABULARY = {"temperature", "reduction", "ignore_index", "validate_args", "global_batch", "process_group"}
CORE_ONLY = {
    p.name
    for p in inspect.signature(aekt_loss).parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.name not in TOOLKIT_VOCABULARY
}
OPTIONS = {"standardize": True, "max_weight": 2.0, "normalize_weight": False}


def _code_words(path: Path) -> set[str]:
    """Identifiers and non-docstring strings of a module: what its code, not its prose, names."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.keyword, ast.arg)) and node.arg:
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(node.value.replace(".", " ").split())
    return words


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_adapter_names_a_core_option(path):
    assert {"standardize", "max_weight", "normalize_weight", "alpha", "beta"} <= CORE_ONLY
    named = _code_words(path) & (CORE_ONLY | {option.upper() for option in CORE_ONLY})
    assert not named, f"{path.name} names core options {sorted(named)}; pass them through the loss module"


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen), torch.randint(0, 7, (6,), generator=gen)


def test_core_options_reach_the_loss_through_torchdistill():
    pytest.importorskip("torchdistill")
    from torchdistill.losses.registry import get_mid_level_loss

    import aekt_plugin.torchdistill  # noqa: F401  (registers the keys)

    z, v, y = _inputs()
    loss = get_mid_level_loss({"key": "AEKTLoss", "kwargs": {"beta": 2.0, **OPTIONS}})
    torch.testing.assert_close(loss({".": {"output": z}}, {".": {"output": v}}, y), aekt_loss(z, v, y, beta=2.0, **OPTIONS))


def test_core_options_reach_the_loss_through_timm():
    timm = pytest.importorskip("timm")
    from aekt_plugin.timm import AEKTDistillationTask

    def model(seed: int):
        torch.manual_seed(seed)
        return timm.create_model("resnet10t", num_classes=7, in_chans=1, channels=(4, 8, 16, 32))

    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(2))
    for task in (
        AEKTDistillationTask(model(0), model(1), warmup_epochs=0, verbose=False, **OPTIONS),
        AEKTDistillationTask(model(0), model(1), warmup_epochs=0, verbose=False, distill_loss=AEKTLoss(**OPTIONS)),
    ):
        result = task.eval()(x, y)
        with torch.no_grad():
            v = task.teacher(x)
        torch.testing.assert_close(result["kd_loss"], aekt_loss(result["output"], v, y, **OPTIONS))


def test_core_options_reach_the_loss_through_the_mdistiller_node():
    pytest.importorskip("yacs")
    from yacs.config import CfgNode

    from aekt_plugin.mdistiller.distillers import aekt_node_defaults, loss_from_node

    node = CfgNode(aekt_node_defaults())
    node.merge_from_list(["STANDARDIZE", "True", "MAX_WEIGHT", "2.0", "NORMALIZE_WEIGHT", "False"])
    loss = loss_from_node(AEKTLoss, node, "AEKT")
    z, v, y = _inputs(seed=3)
    torch.testing.assert_close(loss(z, v, y), aekt_loss(z, v, y, validate_args=False, **OPTIONS))
    assert set(aekt_node_defaults()) >= {option.upper() for option in CORE_ONLY}
    with pytest.raises(ValueError, match=r"AEKT\.MAX_WEIGHT"):
        node.MAX_WEIGHT = -1.0
        loss_from_node(AEKTLoss, node, "AEKT")
