"""Two-process gloo DDP step through ``AEKTDistillationTask.prepare_distributed`` (run by test_timm.py).

Usage: ``python tests/timm_ddp_worker.py OUT_DIR RANK`` for RANK in 0 and 1, started together. Each rank
builds the same seeded student and teacher, computes its local (non-DDP) gradient on its own batch, then one
DDP step on the same batch, and saves ``rank{r}.pt`` with the local gradients, the DDP-synchronised gradients
and the parameters after one SGD step. The test checks that DDP averaged the ranks' gradients and kept the
replicas identical.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

WORLD_SIZE = 2


def _build():
    import timm

    from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=5, in_chans=1, channels=(4, 8, 16, 32))
    student = AEKTStudent(
        timm.create_model("resnet10t", num_classes=5, in_chans=1, channels=(4, 8, 16, 32)), order="kd_cls"
    )
    task = AEKTDistillationTask(student, teacher, beta=2.0, warmup_epochs=0, verbose=False)
    return student, task


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _run(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(6, 1, 32, 32, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)

        student, task = _build()
        local_student = copy.deepcopy(student)
        local_task_student, local_task = _build()
        local_task_student.load_state_dict(local_student.state_dict())
        local_task.train()
        local_task(x, y)["loss"].backward()
        local = _grads(local_task_student)

        task.train()
        task.prepare_distributed(device_ids=None)
        ddp = task.get_trainable_module()
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        result = task(x, y)
        result["loss"].backward()
        synced = _grads(student)
        optimizer.step()
        torch.save(
            {
                "local": local,
                "synced": synced,
                "params": {k: v.detach().clone() for k, v in student.named_parameters()},
                "is_ddp": type(ddp).__name__,
                "teacher_grads": [p.grad for p in task.teacher.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _run(int(sys.argv[2]), sys.argv[1])
