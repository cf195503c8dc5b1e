"""Two-process gloo DDP step through ``AEKTDistillationTask.prepare_distributed`` (run by test_timm.py).

Usage: ``python tests/timm_ddp_worker.py OUT_DIR RANK`` for RANK in 0 and 1, started together. Each rank
builds the same seeded student and teacher, computes the gradient of one process on both ranks' batches
together, then one DDP step on its own batch, and saves ``rank{r}.pt`` with that whole-batch gradient, the
DDP-synchronised gradients and the parameters after one SGD step. The student is a tiny ViT, whose
LayerNorm keeps samples apart: they meet only in the loss. The test checks that DDP's gradient is the whole batch's (the task switched
its AEKT loss to the global batch) and that the replicas stayed identical.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

WORLD_SIZE = 2


def _build():
    import timm

    from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent

    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, in_chans=1, num_classes=5)
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", **vit)
    student = AEKTStudent(timm.create_model("vit_tiny_patch16_224", **vit), order="kd_cls")
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
        batches = []
        for r in range(WORLD_SIZE):
            gen = torch.Generator().manual_seed(100 + r)
            batches.append((torch.randn(6, 1, 32, 32, generator=gen), torch.randint(0, 5, (6,), generator=gen)))
        x, y = batches[rank]

        whole_student, whole_task = _build()
        whole_task.train()
        whole_task(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))["loss"].backward()
        whole = _grads(whole_student)

        student, task = _build()
        task.train()
        task.prepare_distributed(device_ids=[torch.device("cpu")])  # as timm's train.py passes them
        ddp = task.get_trainable_module()
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        result = task(x, y)
        result["loss"].backward()
        synced = _grads(student)
        optimizer.step()
        torch.save(
            {
                "whole": whole,
                "synced": synced,
                "global_batch": task.distill_loss.global_batch,
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
