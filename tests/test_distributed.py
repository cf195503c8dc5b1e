"""``global_batch=True``: under torch.distributed, DDP's averaged gradient is the gradient of one process on
the concatenated batch (two gloo processes over a file rendezvous on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aekt_plugin
from global_batch_worker import CASES, WORLD_SIZE, data, loss_of, student

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("global_batch")
    worker = Path(__file__).with_name("global_batch_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        subprocess.Popen([sys.executable, str(worker), str(out), str(rank)], env=env, stderr=subprocess.PIPE)
        for rank in range(WORLD_SIZE)
    ]
    errors = [p.communicate(timeout=600)[1].decode() for p in processes]
    assert all(p.returncode == 0 for p in processes), "\n".join(errors)[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _whole_batch(case: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = student()
    loss = loss_of(case, model, *data())
    loss.backward()
    return [p.grad for p in model.parameters()], loss.detach()


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_with_the_global_batch_equal_the_whole_batchs(ranks, case):
    expected_grad, expected_loss = _whole_batch(case)
    for rank in ranks:
        for got, want in zip(rank[case, True]["grad"], expected_grad, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # each rank's value is its share of the global loss times the world size: their mean is the loss
    mean_of_ranks = sum(rank[case, True]["loss"] for rank in ranks) / WORLD_SIZE
    torch.testing.assert_close(mean_of_ranks, expected_loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["aekt", "aekt masked", "dkd masked"])
def test_without_the_global_batch_each_rank_normalises_its_own_shard(ranks, case):
    """What the option is for: per-rank normalisation or per-rank kept counts move DDP's gradient."""
    expected_grad, _ = _whole_batch(case)
    got = ranks[0][case, False]["grad"]
    relative = max(float((g - w).norm() / w.norm()) for g, w in zip(got, expected_grad, strict=True))
    assert relative > 0.01


def test_shards_of_unequal_size_need_the_global_mean_even_for_kd(ranks):
    """KD couples no samples, but a per-rank mean of shards of 16 and 24 samples weights a sample of the
    smaller shard more; the global mean weights every sample alike."""
    expected_grad, _ = _whole_batch("kd")
    for flag in (True, False):
        got = ranks[0]["kd", flag]["grad"]
        close = all(torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in zip(got, expected_grad, strict=True))
        assert close is flag


def test_a_single_process_is_unaffected():
    x, teacher, y = data()
    y = y.clamp_min(0)
    logits = student()(x)
    for function in (aekt_plugin.aekt_loss, aekt_plugin.dkd_loss):
        assert torch.equal(function(logits, teacher, y, global_batch=True), function(logits, teacher, y))
