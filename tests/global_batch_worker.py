"""One rank of a 2-process gloo DDP step for test_distributed.py: ``python tests/global_batch_worker.py
OUT_DIR RANK``.

For each case of :data:`CASES` every rank builds the same float64 linear student, computes the case's loss
on its own shard of a common data set (see :func:`shard`; the shards differ in size, in their share of
ignored targets and in how confident the teacher is) and back-propagates through DDP, with
``global_batch=True`` and without it. ``rank{r}.pt`` holds, per case, the synchronised gradient and the
rank's loss value. The test compares them with one process on the concatenated batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import aekt_plugin

WORLD_SIZE = 2
FEATURES, CLASSES = 6, 5

CASES = {
    "aekt": (aekt_plugin.aekt_loss, {"beta": 2.0}),
    "aekt masked": (aekt_plugin.aekt_loss, {"beta": 2.0, "ignore_index": -1}),
    "aekt masked, no value checks": (aekt_plugin.aekt_loss, {"ignore_index": -1, "validate_args": False}),
    "aekt unbounded, sum": (aekt_plugin.aekt_loss, {"max_weight": float("inf"), "reduction": "sum"}),
    "dkd masked": (aekt_plugin.dkd_loss, {"beta": 2.0, "ignore_index": -1}),
    "kd": (aekt_plugin.kd_loss, {"temperature": 2.0}),
    "aekt module, compiled": (aekt_plugin.aekt_loss, {"beta": 2.0, "ignore_index": -1}),
}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, teacher logits and targets of the whole batch (40 samples, 11 ignored)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, FEATURES, generator=gen, dtype=torch.float64)
    teacher = torch.randn(40, CLASSES, generator=gen, dtype=torch.float64)
    teacher[16:] *= 6.0  # the second rank's teacher is far more confident: shards that are not iid
    y = torch.randint(0, CLASSES, (40,), generator=gen)
    y[[0, 3, 5, 16, 18, 20, 22, 25, 30, 33, 39]] = -1
    return x, teacher, y


def shard(rank: int) -> slice:
    return slice(0, 16) if rank == 0 else slice(16, 40)  # 16 and 24 samples, 3 and 8 ignored


def student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES).double()


def loss_of(case: str, model: nn.Module, x, teacher, y, **extra) -> torch.Tensor:
    function, options = CASES[case]
    target = y if "ignore_index" in options else y.clamp_min(0)
    logits = model(x)
    if case.endswith("compiled"):
        criterion = torch.compile(aekt_plugin.AEKTLoss(**options, **extra), backend="aot_eager")
        return criterion(logits, teacher, target)
    return function(logits, teacher, target, **options, **extra)


def main(out_dir: str, rank: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        x, teacher, y = (t[shard(rank)] for t in data())
        results = {}
        for case in CASES:
            for global_batch in (True, False):
                model = nn.parallel.DistributedDataParallel(student())
                loss = loss_of(case, model, x, teacher, y, global_batch=global_batch)
                loss.backward()
                results[case, global_batch] = {
                    "grad": [p.grad.clone() for p in model.parameters()],
                    "loss": loss.detach().clone(),
                }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
