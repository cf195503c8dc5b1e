"""The kernel benchmark (`aekt bench`) and its baselines: oracles, saved-bytes accounting, JSON schema."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aekt_plugin
from aekt_plugin import bench
from aekt_plugin._baselines import dkd_mdistiller, kd_plain
from aekt_plugin.bench import cli as bench_cli
from aekt_plugin.bench import memory, offpath, report, targets, timing
from aekt_plugin.bench.methods import make_cases, make_inputs
from aekt_plugin.bench.timing import pinned_threads, summarise

# --------------------------------------------------------------------------------------------------------
# Baselines against independent computations
# --------------------------------------------------------------------------------------------------------


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax written out (no torch.softmax/log_softmax), float64."""
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_plain_is_temperature_squared_kl_of_teacher_to_student(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    v = 3 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    p, q = _softmax_rows(z / temperature), _softmax_rows(v / temperature)
    expected = temperature**2 * (q * (q.log() - p.log())).sum(dim=1).mean()
    torch.testing.assert_close(kd_plain(z, v, temperature), expected, rtol=1e-12, atol=1e-12)


def _dkd_by_hand(
    z: list[list[float]], v: list[list[float]], t: list[int], alpha: float, beta: float, T: float
) -> float:
    """DKD with plain Python floats, (D1) of docs/derivations.md with a = α, b = β:
    T²·mean(α·KL(b^T‖b^S) + β·KL(q̂‖p̂))."""
    total = 0.0
    for zs, vs, target in zip(z, v, t, strict=True):
        ez = [math.exp(x / T) for x in zs]
        ev = [math.exp(x / T) for x in vs]
        p = [e / sum(ez) for e in ez]
        q = [e / sum(ev) for e in ev]
        tckd = q[target] * math.log(q[target] / p[target]) + (1 - q[target]) * math.log(
            (1 - q[target]) / (1 - p[target])
        )
        nckd = 0.0
        for j in range(len(zs)):
            if j != target:
                p_hat, q_hat = p[j] / (1 - p[target]), q[j] / (1 - q[target])
                nckd += q_hat * math.log(q_hat / p_hat)
        total += T * T * (alpha * tckd + beta * nckd)
    return total / len(z)


def test_dkd_mdistiller_matches_a_hand_computation_on_a_tiny_example() -> None:
    z = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5]]
    v = [[2.5, 0.0, 1.0, -1.0], [-0.3, 0.8, 0.4, 2.0]]
    t = [0, 3]
    value = dkd_mdistiller(
        torch.tensor(z, dtype=torch.float64),
        torch.tensor(v, dtype=torch.float64),
        torch.tensor(t),
        alpha=0.7,
        beta=3.0,
        temperature=2.0,
    )
    assert value.item() == pytest.approx(_dkd_by_hand(z, v, t, 0.7, 3.0, 2.0), rel=1e-10)


def test_dkd_mdistiller_gradient_is_the_closed_form_g1_g2() -> None:
    """(G1)–(G2) of docs/derivations.md with a = α, b = β, divided by B: ∂L/∂z_t = T·α·(p_t - q_t),
    ∂L/∂z_j = T·[-α(p_t - q_t)·p̂_j + β(p̂_j - q̂_j)]."""
    gen = torch.Generator().manual_seed(2)
    B, C, T, alpha, beta = 5, 7, 3.0, 1.5, 4.0
    z = torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    v = 2 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    t = torch.randint(0, C, (B,), generator=gen)
    (grad,) = torch.autograd.grad(dkd_mdistiller(z, v, t, alpha=alpha, beta=beta, temperature=T), z)

    p, q = _softmax_rows(z.detach() / T), _softmax_rows(v / T)
    rows = torch.arange(B)
    p_t, q_t = p[rows, t], q[rows, t]
    p_hat, q_hat = p / (1 - p_t[:, None]), q / (1 - q_t[:, None])
    gap = (alpha * (p_t - q_t))[:, None]
    expected = T * (-gap * p_hat + beta * (p_hat - q_hat))
    expected[rows, t] = T * gap[:, 0]
    torch.testing.assert_close(grad, expected / B, rtol=1e-9, atol=1e-12)


def test_dkd_mdistiller_gives_no_gradient_to_the_teacher_when_it_is_detached() -> None:
    z = torch.randn(3, 5, requires_grad=True)
    v = torch.randn(3, 5)
    dkd_mdistiller(z, v, torch.tensor([0, 1, 4])).backward()
    assert z.grad is not None and v.grad is None


# --------------------------------------------------------------------------------------------------------
# Saved-for-backward accounting
# --------------------------------------------------------------------------------------------------------


def test_saved_bytes_counts_each_save_and_deduplicates_storage() -> None:
    x = torch.randn(4, 3, requires_grad=True)  # 48 bytes
    # x * x saves both operands, which are the same input tensor.
    saved = bench.count_saved_bytes(lambda t: (t * t).sum(), x)
    assert (saved.saved_tensors, saved.saved_bytes, saved.saved_bytes_unique, saved.saved_bytes_new) == (
        2,
        96,
        48,
        0,
    )


def test_saved_bytes_counts_a_new_result_tensor() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # 96 bytes
    saved = bench.count_saved_bytes(lambda t: t.exp().sum(), x)  # exp saves its result, a new tensor
    assert (saved.saved_tensors, saved.saved_bytes, saved.saved_bytes_unique, saved.saved_bytes_new) == (
        1,
        96,
        96,
        96,
    )


class _StashOnCtx(torch.autograd.Function):
    """Hides a tensor from saved_tensors_hooks by storing it as a ctx attribute."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.stash = x * 2.0
        return x.sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.stash / 2.0


def test_saved_bytes_finds_tensors_stashed_on_ctx() -> None:
    x = torch.randn(5, 2, requires_grad=True)  # 40 bytes
    saved = bench.count_saved_bytes(_StashOnCtx.apply, x)
    assert (saved.saved_tensors, saved.ctx_attr_bytes) == (0, 40)


def test_saved_bytes_rejects_an_output_without_graph() -> None:
    with pytest.raises(ValueError, match="grad_fn"):
        bench.count_saved_bytes(lambda t: t.detach().sum(), torch.randn(2, 2, requires_grad=True))


# --------------------------------------------------------------------------------------------------------
# Timing statistics, targets, threads
# --------------------------------------------------------------------------------------------------------


def test_ratios_are_paired_per_round_not_ratios_of_medians() -> None:
    # In round 2 the machine was slow while "b" ran: pairing keeps that round's ratio apart.
    summary = summarise({"a": [1.0, 1.0, 3.0], "b": [1.0, 3.0, 3.0]}, ["b"])
    a = summary["a"]
    assert (a["median_s"], a["p25_s"], a["p75_s"], a["min_s"]) == (1.0, 1.0, 2.0, 1.0)
    assert a["ratio_b"] == 1.0  # per-round ratios 1, 1/3, 1; the ratio of the medians is 1/3
    assert a["ratio_b_p25"] == pytest.approx(2 / 3) and a["ratio_b_p75"] == 1.0


def test_every_round_runs_each_block_once_in_a_fresh_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "calibrate", lambda *args, **kwargs: 1)
    log: list[str] = []
    steps = {name: (lambda name=name: log.append(name)) for name in "abcd"}
    times, calls = timing.interleaved_timing(
        steps, rounds=12, untimed_calls=0, min_block_s=0.0, device=torch.device("cpu")
    )
    rounds = [log[i : i + 4] for i in range(0, len(log), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    assert {name: len(t) for name, t in times.items()} == dict.fromkeys("abcd", 12)
    assert calls == dict.fromkeys("abcd", 1)


def test_pinned_threads_restores_the_thread_count_even_on_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), pinned_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def _fused_figures(*, vs_kd: float, vs_dkd: float, vs_ref: float, kept: int, kd_kept: int) -> dict:
    return {
        "aekt_fused": {
            "ratio_kd_plain": vs_kd,
            "ratio_dkd_mdistiller": vs_dkd,
            "ratio_aekt_reference": vs_ref,
            "saved_bytes_unique": kept,
            "ctx_attr_bytes": 0,
        },
        "kd_plain": {"saved_bytes_unique": kd_kept, "ctx_attr_bytes": 0},
    }


@pytest.mark.parametrize(
    ("shape", "tier", "vs_kd", "vs_dkd"),
    [
        ((64, 100), "overhead", 2.0, 0.5),
        ((511, 256), "overhead", 2.0, 0.5),
        ((512, 256), "memory", 1.15, 0.35),
        ((1024, 1000), "memory", 1.15, 0.35),
    ],
)
def test_targets_have_the_limits_of_the_shape_tier(shape, tier, vs_kd, vs_dkd) -> None:
    batch, classes = shape
    bound = 2 * batch * classes * 4 + 64 * batch  # two fp32 B×C tensors + O(B)
    at_limit = _fused_figures(vs_kd=vs_kd, vs_dkd=vs_dkd, vs_ref=0.5, kept=bound, kd_kept=bound)
    assert targets.shape_tier(batch, classes) == tier
    checks = targets.judge(batch, classes, at_limit, 4)
    assert [c["limit"] for c in checks] == [vs_kd, vs_dkd, 0.5, 1.0, 1.0]
    assert all(c["passed"] for c in checks)
    over = _fused_figures(vs_kd=vs_kd + 0.01, vs_dkd=vs_dkd, vs_ref=0.51, kept=bound + 1, kd_kept=bound)
    failed = [c["name"] for c in targets.judge(batch, classes, over, 4) if not c["passed"]]
    assert failed == [
        "time / kd_plain",
        "time / aekt_reference",
        "saved bytes / kd_plain",
        "saved bytes / (2·B·C·elem + O(B))",
    ]


def test_targets_say_when_they_are_only_indicative() -> None:
    cpu = torch.device("cpu")
    assert "indicative" not in targets.judged_on(cpu, torch.float32, 1)
    assert "indicative" in targets.judged_on(cpu, torch.float32, 2)
    assert "indicative" in targets.judged_on(cpu, torch.bfloat16, 1)


def test_importing_the_benchmark_adds_only_the_standard_library() -> None:
    """``aekt`` imports a subcommand's module to run it; ``aekt_plugin.bench`` must not pull in optional
    packages (numpy, tqdm, matplotlib) or torch's benchmark utilities (setuptools) on import."""
    code = (
        "import sys, aekt_plugin; before = set(sys.modules); import aekt_plugin.bench;"
        "new = set(sys.modules) - before;"
        "bad = sorted(m for m in new if m.split('.')[0] not in sys.stdlib_module_names"
        " and not m.startswith('aekt_plugin.'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------
# ATen calls
# --------------------------------------------------------------------------------------------------------


def test_aten_calls_count_each_operator_once_and_include_the_backward() -> None:
    x = torch.randn(4, 3)
    assert bench.count_aten_calls(lambda: x.exp().sum()) == 2
    leaf = x.clone().requires_grad_(True)
    forward = bench.count_aten_calls(lambda: (leaf * leaf).sum())
    assert bench.count_aten_calls(lambda: torch.autograd.grad((leaf * leaf).sum(), leaf)) > forward


def test_aten_calls_leave_out_a_first_call_that_fills_a_cache() -> None:
    cache: list[torch.Tensor] = []

    def step() -> None:
        if not cache:
            cache.append(torch.ones(3) * 2)  # two calls, the first time only
        (cache[0] + 1).sum()

    assert bench.count_aten_calls(step) == 2


@pytest.mark.parametrize("method", ["dkd_mdistiller", "aekt_fused", "aekt_fused+standardize"])
def test_a_replay_of_the_aten_calls_computes_what_the_step_computed(method: str) -> None:
    """The dispatch floor's replay runs the recorded operators again on the same inputs: the gradient it
    ends with equals the real step's, bit for bit, replay after replay (in-place chains, ``out=`` buffers
    and tensor lists resolved to the replay's own results), and the inputs are left as they were."""
    z, v, y = make_inputs(8, 5, device=torch.device("cpu"), dtype=torch.float32, seed=1)
    case = make_cases((method,), z, v, y, temperature=4.0, alpha=1.0, beta=8.0)[method]
    (expected,) = torch.autograd.grad(case.loss(), case.grad_inputs())
    inputs = [x.detach().clone() for x in (z, v, y)]
    replay = bench.calls.record_aten_calls(case.step)
    literals = 0 if method == "dkd_mdistiller" else 2 * 6  # torch.tensor constants: lift_fresh, detach_
    assert len(replay) == bench.count_aten_calls(case.step) - literals
    assert torch.equal(replay(), expected) and torch.equal(replay(), expected)  # the last call: the gradient
    assert all(torch.equal(a, b) for a, b in zip(inputs, (z, v, y)))
    doubled = bench.calls.record_aten_calls(lambda: torch.autograd.grad(case.loss() * 2, case.grad_inputs()))
    assert torch.equal(doubled(), 2 * expected)
    row = z.detach()[:1]  # a sequence of one result (unbind of one row) stays a sequence
    assert torch.equal(bench.calls.record_aten_calls(lambda: row.unbind(0)[0].exp())(), row[0].exp())


@pytest.mark.parametrize("loss", [aekt_plugin.kd_loss, aekt_plugin.dkd_loss, aekt_plugin.aekt_loss])
def test_the_default_path_of_a_fused_loss_pays_for_no_option(loss) -> None:
    """Leaving the options at their defaults dispatches exactly the ATen calls of turning them off:
    ``ignore_index`` (-100 by default) with no target to ignore, a Python-number temperature, no
    standardization."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(16, 10, generator=gen, requires_grad=True)
    v, y = torch.randn(16, 10, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    def calls(**options: object) -> int:
        return bench.count_aten_calls(
            lambda: torch.autograd.grad(loss(z, v, y, validate_args=False, **options), z)
        )

    off = calls(standardize=False, ignore_index=None, temperature=4.0)
    assert calls() == off
    assert calls(standardize=True) > off  # the count does see an option that is on


# --------------------------------------------------------------------------------------------------------
# The benchmark itself: smoke run and JSON schema
# --------------------------------------------------------------------------------------------------------

_METHOD_KEYS = {
    "median_s",
    "p25_s",
    "p75_s",
    "min_s",
    "calls_per_block",
    "calls",
    "saved_tensors",
    "saved_bytes",
    "saved_bytes_unique",
    "saved_bytes_new",
    "ctx_attr_bytes",
    "peak_memory_bytes",
} | {f"ratio_{b}{s}" for b in bench.BASELINES for s in ("", "_p25", "_p75")}


@pytest.fixture(scope="module")
def small_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    parser = bench.add_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--device=cpu",
            "--shapes=16x10",
            "--rounds=3",
            "--untimed-calls=1",
            "--min-block-ms=0.5",
            "--options",
            "--offpath=none",
            "--quiet",
            f"--json={out / 'r.json'}",
            f"--markdown={out / 'r.md'}",
        ]
    )
    assert bench.run_bench(args) == 0  # not --strict: a missed target is reported, not an error
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_bench_json_states_environment_and_settings(small_result: tuple[dict, str]) -> None:
    result, _ = small_result
    assert result["schema"] == bench.SCHEMA
    env = result["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] == 1
    assert env["torch"] == torch.__version__
    assert {"temperature", "alpha", "beta", "rounds", "aekt_defaults", "clock"} <= set(result["settings"])
    assert result["settings"]["clock"].startswith("thread CPU time")  # the default clock at one thread
    assert "aekt_plugin_revision" not in env and "end_to_end" not in result  # benchmarks/kernel.py's


def test_bench_json_has_every_method_with_times_ratios_and_saved_bytes(
    small_result: tuple[dict, str],
) -> None:
    result, _ = small_result
    (entry,) = result["kernel"]
    assert entry["shape"] == [16, 10] and entry["tier"] == "overhead"
    assert list(entry["methods"]) == [*bench.KERNEL_METHODS, *bench.OPTION_METHODS]
    for name, m in entry["methods"].items():
        own_ratio = {f"ratio_aekt_fused{s}" for s in ("", "_p25", "_p75")} if "+" in name else set()
        assert set(m) == _METHOD_KEYS | own_ratio, name
        assert m["min_s"] > 0, name  # the clock advanced over every block
        assert m["peak_memory_bytes"] is None  # CPU
    # The fused kernel keeps exactly one new B×C tensor, the gradient (docs/derivations.md section 7).
    fused = entry["methods"]["aekt_fused"]
    assert fused["saved_bytes_unique"] == fused["saved_bytes_new"] == 16 * 10 * 4
    assert fused["saved_tensors"] == 1 and fused["ctx_attr_bytes"] == 0
    assert [c["name"] for c in entry["targets"]] == [
        "time / kd_plain",
        "time / dkd_mdistiller",
        "time / aekt_reference",
        "time / dkd_fused",
        "saved bytes / kd_plain",
        "saved bytes / (2·B·C·elem + O(B))",
    ]
    assert result["off_path"] == []
    for diffs in entry["agreement"].values():
        assert diffs["loss_abs_diff"] < 1e-4 and diffs["grad_max_abs_diff"] < 1e-5


def test_bench_json_shows_what_each_option_costs(small_result: tuple[dict, str]) -> None:
    result, _ = small_result
    (entry,) = result["kernel"]
    assert set(result["settings"]["options"]) == set(bench.OPTIONS)
    fused = entry["methods"]["aekt_fused"]
    for name in bench.OPTION_METHODS:
        m = entry["methods"][name]
        assert m["ratio_aekt_fused"] > 0
        assert m["calls"] > fused["calls"], name  # the option is on: it adds ATen calls
    learnable = entry["methods"]["aekt_fused+learnable_T"]
    assert learnable["saved_tensors"] == fused["saved_tensors"] + 1  # dL/dT, formed in the forward pass


def test_bench_markdown_names_device_dtype_threads_and_every_method(small_result: tuple[dict, str]) -> None:
    _, table = small_result
    assert "device: **cpu**" in table and "dtype **float32**" in table and "threads **1**" in table
    for name in bench.KERNEL_METHODS:
        assert f"`{name}`" in table
    for name in bench.OPTION_METHODS:
        assert f"`{name}`" in table
    assert "| calls |" in table and "| × without |" in table


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"methods": ["kd_plain", "fast_kd"]}, "methods"),
        ({"methods": ["aekt_fused+turbo"]}, "methods"),
        ({"methods": ["kd_plain+standardize"]}, "methods"),
        ({"shapes": [(0, 10)]}, "shapes"),
        ({"threads": 0}, "threads"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"clock": "sundial"}, "clock"),
    ],
)
def test_benchmark_rejects_bad_arguments_by_name(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        bench.benchmark(rounds=1, **kwargs)


def test_an_option_method_is_timed_with_the_loss_without_it() -> None:
    result = bench.benchmark(
        shapes=[(8, 10)], methods=["kd_plain", "dkd_fused+ignore"], rounds=1, untimed_calls=0, min_block_ms=0
    )
    (entry,) = result["kernel"]
    assert list(entry["methods"]) == ["kd_plain", "dkd_fused", "dkd_fused+ignore"]
    assert "ratio_dkd_fused" in entry["methods"]["dkd_fused+ignore"]
    assert result["settings"]["options"] == {"ignore": bench.OPTIONS["ignore"]}


def test_option_cases_set_what_their_name_says() -> None:
    z, v, y = make_inputs(20, 7, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    names = ["aekt_fused", *bench.OPTION_METHODS]
    cases = make_cases(names, z, v, y, temperature=3.0, alpha=1.0, beta=8.0)
    base = cases["aekt_fused"].loss()
    learnable = cases["aekt_fused+learnable_T"]
    assert [t.shape for t in learnable.grad_inputs()] == [z.shape, torch.Size([])]
    per_sample = cases["aekt_fused+per_sample_T"]
    assert per_sample.args[3].shape == (20,) and not per_sample.args[3].requires_grad
    for same_value in (learnable, per_sample):  # the same temperature, given as a tensor
        torch.testing.assert_close(same_value.loss(), base)
    ignored = cases["aekt_fused+ignore"].args[2]
    assert (ignored == -100).tolist() == [i % 10 == 0 for i in range(20)]
    assert cases["aekt_fused+standardize"].options == {"standardize": True}


def test_a_run_without_the_fused_aekt_judges_nothing_and_does_not_pass() -> None:
    result = bench.benchmark(shapes=[(8, 10)], methods=["kd_plain"], rounds=1, untimed_calls=0, min_block_ms=0)
    assert result["kernel"][0]["targets"] == [] and result["passed"] is False


def test_parse_shapes_reads_bxc_lists_and_names_the_option_on_error() -> None:
    assert bench.parse_shapes("64x100, 512X1000") == [(64, 100), (512, 1000)]
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes("64by100")


def test_run_bench_reports_a_bad_option_by_name_with_exit_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = bench.add_bench_arguments(argparse.ArgumentParser())
    assert bench.run_bench(parser.parse_args(["--quiet", "--shapes=64by100"])) == 2
    assert "--shapes" in capsys.readouterr().err


def test_strict_mode_turns_a_missed_target_into_exit_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_benchmark(**_: object) -> dict:
        return {"passed": False, "kernel": []}

    monkeypatch.setattr(bench_cli, "benchmark", fake_benchmark)
    monkeypatch.setattr(bench_cli, "to_markdown", lambda result: "")
    parser = bench.add_bench_arguments(argparse.ArgumentParser())
    assert bench.run_bench(parser.parse_args(["--quiet", "--strict"])) == 1
    assert bench.run_bench(parser.parse_args(["--quiet"])) == 0


# --------------------------------------------------------------------------------------------------------
# benchmarks/kernel.py: the committed results add the end-to-end training step and the git revision
# --------------------------------------------------------------------------------------------------------


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a few seconds of training steps
def test_kernel_script_adds_the_end_to_end_step_and_the_revision(tmp_path: Path) -> None:
    kernel = _load_script("kernel")
    argv = ["--device=cpu", "--shapes=8x10", "--rounds=2", "--untimed-calls=1", "--min-block-ms=0.5"]
    argv += ["--offpath=none"]
    argv += ["--e2e-batch=8", "--e2e-classes=10", "--e2e-rounds=2", "--quiet"]
    assert kernel.main([*argv, f"--json={tmp_path / 'r.json'}", f"--markdown={tmp_path / 'r.md'}"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["schema"] == bench.SCHEMA
    revision = result["environment"]["aekt_plugin_revision"]
    assert revision is None or re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", revision)
    e2e = result["end_to_end"]
    assert e2e["image_shape"] == [1, 28, 28] and e2e["batch"] == 8 and e2e["num_classes"] == 10
    assert set(e2e["methods"]) == set(kernel.E2E_METHODS)
    aekt = e2e["methods"]["aekt_fused"]
    assert 0 < aekt["loss_share_percent"] < 100
    assert "loss_only_median_s" not in e2e["methods"]["ce_only"]
    assert "End-to-end training step" in (tmp_path / "r.md").read_text()


def test_dispatch_floor_times_every_loss_beside_the_replay_of_its_own_calls(tmp_path: Path) -> None:
    floor = _load_script("dispatch_floor")
    out = tmp_path / "floor.md"
    floor.main(["--shape=8x10", "--rounds=2", f"--markdown={out}"])
    rows = {}  # step -> (median time, ATen calls), from the table's rows
    for line in out.read_text().splitlines():
        if match := re.fullmatch(r"\| `([^`]+)` \| ([0-9.]+) (?:µs|ms) \|.*\| (\d+) \|", line):
            rows[match[1]] = (float(match[2]), int(match[3]))
    names = [*floor.METHODS, "function_round_trip"]
    assert set(rows) == {*names, *(name + floor.FLOOR for name in names)}
    for name in names:
        (real_time, real_calls), (floor_time, floor_calls) = rows[name], rows[name + floor.FLOOR]
        assert real_calls == floor_calls > 0 and real_time > 0 and floor_time > 0
    assert rows["function_round_trip"][1] == 3  # clone; the incoming ones; the multiplication
    inputs = make_inputs(8, 10, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    kd = make_cases(("kd_plain",), *inputs, temperature=4.0, alpha=1.0, beta=8.0)["kd_plain"]
    assert rows["kd_plain"][1] == bench.count_aten_calls(kd.step)


def test_kernel_script_rejects_a_bad_e2e_option_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _load_script("kernel").main(["--e2e-classes=1"])
    assert "--e2e-classes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Off the tuned path: compiled, dense and memory rows, peak memory, FAIL lines
# --------------------------------------------------------------------------------------------------------


def test_extra_peak_memory_counts_what_a_step_allocates_at_once_on_cpu() -> None:
    def step() -> None:
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB while a is alive
        del a, b
        torch.empty(1 << 18)  # 1 MiB once both are freed

    peak = memory.extra_peak_memory(step, torch.device("cpu"))
    assert peak is not None and 6 * 2**20 <= peak < 6 * 2**20 + 4096


def test_offpath_rows_measure_what_they_name_and_judge_their_targets() -> None:
    shapes = {"compiled": (16, 10), "dense": (2, 5, 3, 4), "memory": (8, 20)}
    entries = offpath.offpath_benchmark(
        device=torch.device("cpu"), shapes=shapes, rounds=2, compile_backend="aot_eager"
    )
    rows = {(entry["row"], entry["dtype"]): entry for entry in entries}
    assert list(rows) == [
        ("compiled", "float32"),
        ("dense", "float32"),
        ("memory", "float32"),
        ("memory", "bfloat16"),
    ]
    compiled = rows["compiled", "float32"]
    assert list(compiled["methods"]) == ["kd_plain:compiled", "aekt_fused:compiled", "aekt_fused"]
    assert {c["name"] for c in compiled["targets"]} == {
        "compiled AEKT / compiled kd_plain",
        "compiled AEKT / eager AEKT",
        "eager AEKT / compiled kd_plain",
    }
    assert compiled["agreement"]["aekt_fused:compiled~aekt_fused"]["grad_max_abs_diff"] < 1e-6
    dense = rows["dense", "float32"]
    assert dense["shape"] == [2, 5, 3, 4] and dense["methods"]["aekt_fused"]["ratio_kd_plain"] > 0
    # plain KD keeps two log-softmaxes and makes their gradients: more than the fused loss's .grad
    assert dense["methods"]["kd_plain"]["extra_peak_inputs"] >= 2.0
    assert [c["limit"] for c in rows["memory", "float32"]["targets"]] == [2.0]
    assert [c["limit"] for c in rows["memory", "bfloat16"]["targets"]] == [2.5]


def test_the_offpath_rows_count_in_the_verdict_and_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(offpath.OFFPATH_SHAPES, "memory", (8, 20))
    result = bench.benchmark(shapes=[(8, 10)], rounds=1, untimed_calls=0, min_block_ms=0, offpath=["memory"])
    assert [entry["row"] for entry in result["off_path"]] == ["memory", "memory"]
    checks = [c for entry in result["kernel"] + result["off_path"] for c in entry["targets"]]
    assert result["passed"] == all(c["passed"] for c in checks)
    table = bench.to_markdown(result)
    assert "## memory (8, 20) float32" in table and "## memory (8, 20) bfloat16" in table
    for line in report.failures(result):
        assert f"**FAIL** {line}" in table


def test_a_missed_target_is_named_with_where_and_by_how_much() -> None:
    check = {"name": "compiled AEKT / compiled kd_plain", "value": 1.5, "limit": 1.25, "passed": False}
    line = targets.describe(check, "compiled (4096, 8192) float32")
    assert line == (
        "compiled (4096, 8192) float32: compiled AEKT / compiled kd_plain is 1.500, over its limit 1.25 by "
        "0.250 (+20.0 %)"
    )
    result = {"passed": False, "kernel": [{"shape": [64, 100], "targets": [check]}], "off_path": []}
    assert report.failures(result) == [targets.describe(check, "(64, 100)")]


def test_offpath_targets_are_judged_at_their_limits() -> None:
    figures = {
        "kd_plain:compiled": {},
        "aekt_fused:compiled": {"ratio_kd_plain:compiled": 1.25, "ratio_aekt_fused": 1.0},
        "aekt_fused": {"ratio_kd_plain:compiled": 1.51, "ratio_kd_plain": 1.1, "extra_peak_inputs": 2.0},
    }
    compiled = targets.judge_offpath("compiled", "float32", figures)
    assert [(c["limit"], c["passed"]) for c in compiled] == [(1.25, True), (1.0, True), (1.5, False)]
    dense = targets.judge_offpath("dense", "float32", figures)
    assert [(c["limit"], c["passed"]) for c in dense] == [(2.0, True), (1.1, True)]
    assert targets.judge_offpath("memory", "bfloat16", figures)[0]["limit"] == 2.5
    assert targets.judge_offpath("memory", "float32", {"aekt_fused": {"extra_peak_inputs": None}}) == []


def test_offpath_rows_are_chosen_by_name() -> None:
    assert bench_cli.parse_rows("compiled, memory") == ["compiled", "memory"]
    assert bench_cli.parse_rows("none") == []
    with pytest.raises(ValueError, match="--offpath"):
        bench_cli.parse_rows("compiled,turbo")
    with pytest.raises(ValueError, match="offpath"):
        bench.benchmark(shapes=[(8, 10)], rounds=1, offpath=["turbo"])
