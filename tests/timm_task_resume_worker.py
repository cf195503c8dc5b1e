"""A small training with the timm task, for the SIGKILL-and-resume test of test_timm.py.

Usage: ``python tests/timm_task_resume_worker.py OUT_DIR [--resume CHECKPOINT] [--pause-at EPOCH:STEP MARKER]``.
It trains a tiny ResNet student against a tiny teacher with :class:`AEKTDistillationTask` for 4 epochs of 3
updates, the way timm's ``train.py`` does: ``create_optimizer_v2`` (here over the task's trainable
parameters, so the loss's learnable temperature is trained too), the task's EMA, timm's
``CheckpointSaver`` after every epoch and ``resume_task_checkpoint``/``load_task_ema_checkpoint`` on
``--resume``. A 2-epoch warm-up, the serial layer (``kd_cls``), a learnable temperature and the EMA all
change during the run, so every piece of state the task owns must come back for the resumed run to end
where the uninterrupted one does. ``--pause-at`` writes MARKER and waits after that update, for the test
to kill the process there. The final state goes to ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver
from torch import nn

from aekt_plugin import AEKTLoss
from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent

EPOCHS, UPDATES_PER_EPOCH, CLASSES = 4, 3, 5


def build() -> tuple[AEKTDistillationTask, torch.optim.Optimizer]:
    torch.manual_seed(0)
    tiny = dict(channels=(4, 8, 16, 32), num_classes=CLASSES, in_chans=1)
    teacher = timm.create_model("resnet10t", **tiny).eval()
    student = AEKTStudent(timm.create_model("resnet10t", **tiny), order="kd_cls")
    distill_loss = AEKTLoss(beta=2.0, temperature=nn.Parameter(torch.tensor(3.0)))
    task = AEKTDistillationTask(
        student, teacher, nn.CrossEntropyLoss(), distill_loss=distill_loss,
        warmup_epochs=2, updates_per_epoch=UPDATES_PER_EPOCH,
    )
    task.setup_ema(decay=0.5)
    optimizer = create_optimizer_v2(task.trainable_module, "momentum", lr=0.05, weight_decay=1e-4)
    optimizer.add_param_group({"params": [distill_loss.temperature], "weight_decay": 0.0})
    return task, optimizer


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 1, 32, 32, generator=data), torch.randint(0, CLASSES, (6,), generator=data))
        for _ in range(UPDATES_PER_EPOCH)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--resume", default="")
    parser.add_argument("--pause-at", nargs=2, metavar=("EPOCH:STEP", "MARKER"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    task, optimizer = build()
    saver = CheckpointSaver(
        model=task.trainable_module, optimizer=optimizer, checkpoint_dir=str(args.out_dir),
        recovery_dir=str(args.out_dir), max_history=EPOCHS, task=task,
    )
    start_epoch = 0
    if args.resume:
        start_epoch = resume_task_checkpoint(task, args.resume, optimizer=optimizer)
        load_task_ema_checkpoint(task, args.resume)
    pause = None
    if args.pause_at:
        epoch_step, marker = args.pause_at
        pause = (*(int(x) for x in epoch_step.split(":")), Path(marker))
    loader = batches()
    for epoch in range(start_epoch, EPOCHS):
        task.train()
        for step, (x, y) in enumerate(loader):
            num_updates = epoch * UPDATES_PER_EPOCH + step + 1
            loss = task(x, y)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            task.update_ema(step=num_updates)  # as train.py: this also advances the task's warm-up clock
            if pause is not None and (epoch, step) == pause[:2]:
                pause[2].write_text("paused")
                time.sleep(600)  # the test kills the process here
        saver.save_checkpoint(epoch, metric=float(epoch))
    torch.save(
        {
            "student": task.trainable_module.state_dict(),
            "ema": task.get_trainable_module(ema=True).state_dict(),
            "task_state": task.get_task_state(),
            "optimizer": optimizer.state_dict(),
        },
        args.out_dir / "final.pt",
    )


if __name__ == "__main__":
    main()
