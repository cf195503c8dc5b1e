"""The accuracy benchmark's methods compute the losses their names promise.

``benchmarks/accuracy.py`` and ``benchmarks/variants.py`` are scripts, not package modules; a wrong weight
rule there would put a wrong row into a committed table, so the rows are checked against the core here.
"""

from __future__ import annotations

import importlib
import inspect
import math
import json
import sys
from dataclasses import replace
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
        yield importlib.import_module("accuracy")  # imports its sibling ``protocols`` too
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
        (
            MethodConfig("k", loss="kd", options={"temperature": 2.0}),
            lambda s, t, y: ak.kd_loss(s, t, y, temperature=2.0),
        ),
        (
            MethodConfig("d", loss="dkd", options={"beta": 3.0, "standardize": True}),
            lambda s, t, y: ak.dkd_loss(s, t, y, beta=3.0, standardize=True),
        ),
        (
            MethodConfig(
                "a", loss="aekt", options={"alpha": 2.0, "max_weight": 3.0, "standardize": True}, kd_weight=9.0
            ),
            lambda s, t, y: 9 * ak.aekt_loss(s, t, y, alpha=2.0, max_weight=3.0, standardize=True),
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
    variant = accuracy.VariantMethod.from_dict(aekt.to_dict())
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
            row.option("standardize")
            and row.to_dict() | {"name": name, "standardize": False} == main[name].to_dict()
        )
    recipe = rows["KD +std, T=2, ×9"]
    options = recipe.options
    assert (recipe.loss, options["temperature"], recipe.kd_weight, options["standardize"]) == ("kd", 2.0, 9.0, True)
    assert accuracy.describe(recipe) == "Hinton KD, T=2, standardized logits, KD weight 9"


def test_a_method_is_the_core_loss_with_the_options_it_names(accuracy):
    """A method stores the loss options in effect: those it names, the core's defaults for the rest; its
    record round-trips, also from an older record that listed every loss's options."""
    method = MethodConfig("DKD", loss="dkd", options={"beta": 2.0})
    assert dict(method.options) == aekt_plugin_options("dkd_loss") | {"beta": 2.0}
    assert MethodConfig.from_dict(method.to_dict()) == method
    old = {"name": "KD", "loss": "kd", "temperature": 4.0, "alpha": 1.0, "beta": 2.0, "max_weight": "inf",
           "normalize_weight": True, "order": None, "residual": False, "s_weight_decay": True, "s_lr_scale": 1.0,
           "ce_weight": 1.0, "standardize": False, "kd_weight": 1.0}
    assert accuracy.method_from_dict(old) == MethodConfig("KD", loss="kd")
    serial = accuracy.method_from_dict(old | {"loss": "aekt", "order": "kd_cls", "s_lr_scale": 0.1})
    assert isinstance(serial, accuracy.SerialVariant) and serial.s_lr_scale == 0.1
    assert serial.option("max_weight") == math.inf
    with pytest.raises(TypeError, match="'max_weight'"):
        MethodConfig("DKD", loss="dkd", options={"max_weight": 2.0})
    with pytest.raises(ValueError, match="takes no loss options"):
        MethodConfig("CE", loss="ce", options={"temperature": 2.0})


def aekt_plugin_options(function: str) -> dict:
    parameters = inspect.signature(getattr(ak, function)).parameters.values()
    fixed = {"reduction", "ignore_index", "validate_args", "global_batch", "process_group"}
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in fixed}


def test_variants_refuse_the_options_they_would_ignore(accuracy):
    with pytest.raises(ValueError, match="standardize"):
        accuracy.VariantMethod("v", options={"standardize": True})


# ------------------------------------------------------------- a tiny run of the benchmark, end to end


@pytest.fixture()
def tiny_benchmark(accuracy, tiny_demo, tmp_path, monkeypatch):
    """``benchmarks/accuracy.py`` on tiny models and data, writing into ``tmp_path``."""
    import protocols

    setting = protocols.PAPERLIKE["digits100"]
    tiny_train = replace(setting.students["cnn"], model="tiny", epochs=2, warmup_epochs=0.5)
    monkeypatch.setitem(
        protocols.PAPERLIKE,
        "digits100",
        replace(
            setting,
            data={"n_train": 300, "n_val": 50, "n_test": 200, "seed": 0},
            views=2,
            teacher=replace(setting.teacher, model="tiny", epochs=2),
            students={
                "cnn": tiny_train,
                "mobile": tiny_train,
                "timm": replace(setting.students["timm"], epochs=1),
            },
        ),
    )
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    return accuracy


def _runs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"]


def test_a_paper_like_table_records_every_run_and_the_gate(tiny_benchmark, capsys):
    argv = ["--table", "paperlike-digits100-cnn", "--seeds", "2", "--no-progress"]
    assert tiny_benchmark.main(argv) == 0
    path = tiny_benchmark.RESULTS / "paperlike_digits100_cnn_accuracy.json"
    runs = _runs(path)
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("CE", "KD", "DKD", "AEKT") for s in (0, 1)
    )
    for run in runs:
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["val_accuracy"] <= 1 and 0 <= run["train_accuracy"] <= 1
        assert run["revision"]
    protocol = json.loads(path.read_text())["protocol"]
    assert protocol["paperlike"]["views"] == 2 and "train_accuracy" in protocol["teacher_result"]
    assert "calibration gate" in capsys.readouterr().out
    assert (tiny_benchmark.RESULTS / "paperlike_digits100_cnn_accuracy.png").stat().st_size > 0
    # --resume trains nothing that is already in the JSON
    assert tiny_benchmark.main([*argv, "--resume"]) == 0
    assert _runs(path) == runs


def test_the_search_confirm_and_standardize_groups_write_their_own_tables(tiny_benchmark):
    common = ["--table", "digits100", "--no-progress"]
    assert tiny_benchmark.main([*common, "--methods", "search", "--seeds", "1"]) == 0
    search = _runs(tiny_benchmark.RESULTS / "digits100_search.json")
    names = {r["method"] for r in search}
    assert "CE" not in names and {"KD", "DKD", "AEKT", "AEKT γ=2", "DKD α=4"} <= names
    assert "validation accuracy" in (tiny_benchmark.RESULTS / "digits100_search.md").read_text()

    serial = "AEKT S kd_cls, identity, lr×0.1, wd"  # a name with commas: semicolons separate
    confirm = [
        *common,
        "--methods",
        "confirm",
        "--seeds",
        "100-101",
        "--candidates",
        f"AEKT w_max=1; {serial}",
    ]
    assert tiny_benchmark.main(confirm) == 0
    runs = _runs(tiny_benchmark.RESULTS / "digits100_confirm.json")
    assert {r["method"] for r in runs} == {"CE", "KD", "DKD", "AEKT", "AEKT w_max=1", serial}
    assert {r["seed"] for r in runs} == {100, 101}
    assert "AEKT w_max=1 − DKD" in (tiny_benchmark.RESULTS / "digits100_confirm.md").read_text()

    assert tiny_benchmark.main([*common, "--methods", "standardize", "--seeds", "1"]) == 0
    table = (tiny_benchmark.RESULTS / "digits100_standardize.md").read_text()
    for line in ("KD +std − KD", "DKD +std − DKD", "AEKT +std − AEKT", "KD +std, T=2, ×9 − KD"):
        assert line in table


def test_the_verdict_gathers_each_protocols_paired_differences(accuracy, tmp_path, capsys):
    from aekt_plugin.demo.report import write_results

    verdict = importlib.import_module("verdict")

    def run(method, seed, accuracy, collapsed=False):
        return {"method": method, "seed": seed, "accuracy": accuracy, "collapsed": collapsed}

    kd = [0.70, 0.72, 0.71, 0.69]
    runs = [run("KD", s, a) for s, a in enumerate(kd)]
    runs += [run("DKD", s, a + 0.01 + 0.001 * s) for s, a in enumerate(kd)]  # +1.0 to +1.3 points
    runs += [run("AEKT", s, a + 0.01 + (0.004 if s % 2 else -0.004)) for s, a in enumerate(kd)]
    runs += [run(verdict.SERIAL, s, 0.01, collapsed=s == 0) for s in range(4)]
    write_results(tmp_path / "digits100_confirm.json", {}, runs)
    write_results(tmp_path / "fmnist100_standardize.json", {}, runs[:4])  # KD only: nothing to compare

    assert verdict.main(["--results", str(tmp_path)]) == 0
    rows = {(r["comparison"], r["protocol"]): r for r in verdict.collect(tmp_path)}
    assert set(rows) == {
        (c, "digits-100 (demo)")
        for c in ("DKD − KD", "AEKT − DKD", "AEKT + serial S (kd_cls, S lr×0.1) − DKD")
    }
    dkd = rows[("DKD − KD", "digits-100 (demo)")]
    assert dkd["mean"] == pytest.approx(1.15) and dkd["ci_low"] > 0 and not dkd["within_noise"]
    aekt = rows[("AEKT − DKD", "digits-100 (demo)")]
    assert aekt["within_noise"] and aekt["ci_low"] < 0 < aekt["ci_high"]
    serial = rows[("AEKT + serial S (kd_cls, S lr×0.1) − DKD", "digits-100 (demo)")]
    assert serial["seeds"] == [1, 2, 3] and serial["mean"] < -60  # the collapsed seed is left out
    table = (tmp_path / "verdict.md").read_text()
    assert "| DKD − KD | digits-100 (demo) | +1.15 |" in table and "better" in table and "worse" in table
    assert (tmp_path / "verdict.png").stat().st_size > 0
    assert "not measured yet" in capsys.readouterr().err


def test_the_calibration_grid_compares_dkd_with_kd_at_each_temperature(tiny_benchmark):
    argv = [
        "--table",
        "paperlike-digits100-mobile",
        "--methods",
        "calibrate",
        "--seeds",
        "2",
        "--no-progress",
    ]
    assert tiny_benchmark.main(argv) == 0
    runs = _runs(tiny_benchmark.RESULTS / "paperlike_digits100_mobile_calibrate.json")
    assert len(runs) == 2 * 2 * (1 + 4)  # seeds × temperatures × (KD + four β)
    table = (tiny_benchmark.RESULTS / "paperlike_digits100_mobile_calibrate.md").read_text()
    assert "validation accuracy" in table
    assert "DKD T=2 β=8 − KD T=2" in table and "DKD T=4 β=1 − KD T=4" in table


def test_a_temperature_chosen_on_the_grid_writes_a_table_of_its_own(tiny_benchmark):
    argv = ["--table", "digits100", "--temperature", "2", "--beta", "1", "--seeds", "2", "--no-progress"]
    assert tiny_benchmark.main(argv) == 0
    blob = json.loads((tiny_benchmark.RESULTS / "digits100_T2_b1_accuracy.json").read_text())
    methods = blob["protocol"]["methods"]
    assert methods["KD"]["temperature"] == methods["AEKT"]["temperature"] == 2.0
    assert methods["DKD"]["beta"] == 1.0 and len(blob["runs"]) == 8
    assert not (tiny_benchmark.RESULTS / "digits100_accuracy.json").exists()


def test_an_unknown_candidate_is_named(tiny_benchmark, capsys):
    with pytest.raises(SystemExit):
        tiny_benchmark.main(["--table", "digits100", "--methods", "confirm", "--candidates", "AEKT γ=3"])
    assert "AEKT γ=3" in capsys.readouterr().err


# ------------------------------------------------------------- the timm family: every row through a timm task
@pytest.mark.parametrize("loss", ["ce", "kd", "dkd", "aekt"])
def test_a_timm_family_step_computes_the_core_loss_through_the_task(accuracy, loss):
    import timm_family

    torch.manual_seed(0)
    teacher, student = timm_family.timm_resnet(1, 10).eval(), timm_family.timm_resnet(1, 10)
    options = {"ce": {}, "kd": {"temperature": 2.0}}.get(loss, {"temperature": 2.0, "beta": 3.0})
    method = MethodConfig("m", loss=loss, options=options, ce_weight=0.5)
    model, step = timm_family.timm_step_factory(teacher)(student, method, 10, 5, 0.0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 16, generator=gen), torch.randint(10, (6,), generator=gen)
    with torch.no_grad():
        v = teacher(x)
    model.train()
    losses = step(x, y, v)
    z = student(x)  # training-mode BatchNorm reads the batch only: the same logits as in the step
    core = method.loss_fn()
    expected_kd = torch.zeros(()) if core is None else core(z, v, y)
    expected_ce = torch.nn.functional.cross_entropy(z, y) * (1.0 if loss == "ce" else 0.5)
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    torch.testing.assert_close(losses["loss_kd"], expected_kd)
    torch.testing.assert_close(losses["loss"], expected_ce + expected_kd)
    losses["loss"].backward()
    assert all(p.grad is not None for p in student.parameters()) and teacher.conv1.weight.grad is None


def test_the_timm_family_refuses_what_its_tasks_cannot_run(accuracy):
    import timm_family
    from variants import SerialVariant, VariantMethod

    factory = timm_family.timm_step_factory(timm_family.timm_resnet(1, 10))
    for method, match in [
        (VariantMethod("g", gamma=2.0), "gamma=2.0"),
        (MethodConfig("s", loss="kd", options={"standardize": True}), "standardize"),
        (SerialVariant("w", loss="dkd", order="cls_kd", s_lr_scale=0.1), "own learning rate"),
    ]:
        with pytest.raises(ValueError, match=match):
            factory(timm_family.timm_resnet(1, 10), method, 10, 5, 0.0)
    model, _ = factory(timm_family.timm_resnet(1, 10), VariantMethod("default"), 10, 5, 0.0)
    assert model.get_classifier().out_features == 10  # the default variant is plain AEKT: accepted


def test_a_timm_family_table_runs_through_the_tasks(tiny_benchmark):
    argv = ["--table", "paperlike-digits100-timm", "--seeds", "1", "--no-progress"]
    assert tiny_benchmark.main(argv) == 0
    blob = json.loads((tiny_benchmark.RESULTS / "paperlike_digits100_timm_accuracy.json").read_text())
    assert sorted(r["method"] for r in blob["runs"]) == ["AEKT", "CE", "DKD", "KD"]
    assert {r["params"] for r in blob["runs"]} == {28444}  # timm's ResNet, not the demo's CNN
    assert blob["protocol"]["student"]["warmup_epochs"] == 0
