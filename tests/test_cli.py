"""The `aekt` command line and the torch-only import of the core."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aekt_plugin import check, cli


@pytest.mark.slow
def test_import_needs_torch_alone():
    code = (
        "import sys, aekt_plugin, aekt_plugin.reference, aekt_plugin.cli;"
        "toolkits = ('timm', 'torchdistill', 'mdistiller', 'yacs', 'sklearn', 'matplotlib');"
        "bad = [m for m in toolkits if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_python_dash_m_prints_help_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "aekt_plugin", "--version"], check=True, capture_output=True, text=True
    )
    assert out.stdout.startswith("aekt ")
    for command in ("demo", "check", "bench"):
        out = subprocess.run(
            [sys.executable, "-m", "aekt_plugin", command, "--help"],
            check=True,
            capture_output=True,
            text=True,
        )
        assert "usage: aekt " + command in out.stdout


@pytest.mark.slow
def test_check_passes_on_cpu_float32(capsys):
    assert cli.main(["check", "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out
    for row in (
        "ignore_index",
        "standardize",
        "learnable temperature (0-d tensor): dL/dT",
        "per-sample temperatures: dL/dT",
        "under autocast(bfloat16)",
        "torch.func.grad",
        "vmap(grad) per-sample",
        "torch.compile(backend='aot_eager')",
    ):
        assert row in out, row


@pytest.mark.slow
def test_check_needs_neither_numpy_nor_the_demo_packages(run_without):
    """torch runs without numpy; so does `aekt check` (the CLI imports only the subcommand it runs)."""
    done = run_without(
        ("numpy", "sklearn", "matplotlib", "tqdm"),
        "from aekt_plugin import cli\n"
        "sys.exit(cli.main(['check', '--dtype', 'float32', '--compile-backend', 'none']))\n",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 failed" in done.stdout


@pytest.mark.slow
def test_check_fails_with_exit_status_1_when_the_kernel_is_wrong(monkeypatch, capsys):
    broken = [
        check._Loss(
            loss.name, lambda *a, _f=loss.fused, **k: _f(*a, **k) * 1.001, loss.reference, loss.options
        )
        for loss in check.LOSSES
    ]
    monkeypatch.setattr(check, "LOSSES", tuple(broken))
    assert cli.main(["check", "--dtype", "float64", "--failures-only"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    with pytest.raises(SystemExit, match="cuda"):
        cli.main(["check", "--device", "cuda"])
