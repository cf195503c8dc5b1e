"""The accuracy benchmark's methods compute the losses their names promise.

``benchmarks/accuracy.py`` and ``benchmarks/variants.py`` are scripts, not package modules; a wrong weight
rule there would put a wrong row into a committed table, so the rows are checked against the core here.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import aekt_plugin as ak
from aekt_plugin.demo.run import main_methods
from aekt_plugin.demo.train import MethodConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("accuracy")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(16, 10, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(16, 10, generator=gen, dtype=torch.float64)
    return student, teacher, torch.randint(10, (16,), generator=gen)


def _value_and_grad(loss, student, teacher, target):
    value = loss(student, teacher, target)
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


@pytest.mark.parametrize(
    ("method", "core"),
    [
        (MethodConfig("k", loss="kd", temperature=2.0), lambda s, t, y: ak.kd_loss(s, t, y, temperature=2.0)),
        (
            MethodConfig("d", loss="dkd", beta=3.0, standardize=True),
            lambda s, t, y: ak.dkd_loss(s, t, y, beta=3.0, standardize=True),
        ),
        (
            MethodConfig("a", loss="aekt", alpha=2.0, max_weight=3.0, standardize=True, kd_weight=9.0),
            lambda s, t, y: 9 * ak.aekt_loss(s, t, y, alpha=2.0, beta=2.0, max_weight=3.0, standardize=True),
        ),
    ],
)
def test_a_method_computes_its_core_loss(method, core):
    student, teacher, target = _inputs()
    ours = _value_and_grad(method.loss_fn(), student, teacher, target)
    expected = _value_and_grad(core, student, teacher, target)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_the_search_baseline_variant_is_the_default_aekt(accuracy):
    aekt = next(m for m in main_methods(beta=2.0) if m.name == "AEKT")
    variant = accuracy.VariantMethod(**aekt.to_dict())
    student, teacher, target = _inputs(seed=1)
    ours = _value_and_grad(variant.loss_fn(), student, teacher, target)
    expected = _value_and_grad(aekt.loss_fn(), student, teacher, target)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_a_search_row_changes_the_loss_it_names(accuracy):
    rows, _ = accuracy.search_methods(main_methods(beta=2.0))
    by_name = {m.name: m for m in rows}
    student, teacher, target = _inputs(seed=2)
    aekt = next(m for m in main_methods(beta=2.0) if m.name == "AEKT")
    default = aekt.loss_fn()(student, teacher, target)
    w1 = by_name["AEKT w_max=1"].loss_fn()(student, teacher, target)
    torch.testing.assert_close(w1, ak.aekt_loss(student, teacher, target, beta=2.0, max_weight=1.0))
    assert not torch.allclose(by_name["AEKT γ=2"].loss_fn()(student, teacher, target), default)


def test_the_standardize_rows_differ_from_the_main_rows_only_by_the_option(accuracy):
    main = {m.name: m for m in main_methods(beta=2.0)}
    rows = {m.name: m for m in accuracy.standardize_methods(list(main.values()))}
    for name in ("KD", "DKD", "AEKT"):
        row = rows[name + accuracy.STANDARDIZED]
        assert (
            row.standardize and row.to_dict() | {"name": name, "standardize": False} == main[name].to_dict()
        )
    recipe = rows["KD +std, T=2, ×9"]
    assert (recipe.loss, recipe.temperature, recipe.kd_weight, recipe.standardize) == ("kd", 2.0, 9.0, True)
    assert accuracy.describe(recipe) == "Hinton KD, T=2, standardized logits, KD weight 9"


def test_variants_refuse_the_options_they_would_ignore(accuracy):
    with pytest.raises(ValueError, match="standardize"):
        accuracy.VariantMethod("v", standardize=True)
