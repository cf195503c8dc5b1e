"""A small mdistiller training with the AEKT distiller, for the SIGKILL-and-resume test of test_mdistiller.py.

Usage: ``python tests/mdistiller_resume_worker.py MDISTILLER_ROOT LOG_DIR [--resume] [--pause-at EPOCH:ITER
MARKER]``. It trains resnet56 -> resnet20 (10 classes) for 4 epochs with mdistiller's own ``base`` trainer on
a fixed in-memory data set (no shuffling, one thread, on the CPU), the serial layer on (``kd_cls``) and a
3-epoch warm-up, so every piece of state the distiller owns changes during the run. ``--resume`` continues
from the trainer's ``latest`` checkpoint, as ``tools/train.py --resume`` does. ``--pause-at`` writes MARKER
and waits in the middle of that training iteration, for the test to kill the process there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("log_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", nargs=2, metavar=("EPOCH:ITER", "MARKER"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sys.path.insert(0, args.root)
    # mdistiller moves models and batches with .cuda(); this run stays on the CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    import aekt_plugin.mdistiller as am

    am.register()
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import CFG
    from mdistiller.models import cifar_model_dict

    cfg = CFG.clone()
    cfg.merge_from_list(
        ["SOLVER.EPOCHS", 4, "SOLVER.LR", 0.05, "LOG.PREFIX", args.log_dir, "LOG.WANDB", False]
        + ["AEKT.ORDER", "kd_cls", "AEKT.WARMUP", 3, "AEKT.BETA", 2.0]
    )
    torch.manual_seed(0)
    teacher = cifar_model_dict["resnet56"][0](num_classes=10).eval()
    student = cifar_model_dict["resnet20"][0](num_classes=10)
    distiller = nn.DataParallel(distiller_dict["AEKT"](student, teacher, cfg))
    data = torch.Generator().manual_seed(1)
    train = [
        (torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data), torch.arange(4))
        for _ in range(3)
    ]
    val = [(torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data))]
    trainer = trainer_dict["base"]("resume_test", distiller, train, val, cfg)
    if args.pause_at:
        epoch_iter, marker = args.pause_at
        pause_epoch, pause_iter = (int(x) for x in epoch_iter.split(":"))
        step_counts: dict[int, int] = {}
        train_iter = trainer.train_iter

        def paused_iter(data, epoch, *rest):
            step_counts[epoch] = step_counts.get(epoch, 0) + 1
            result = train_iter(data, epoch, *rest)
            if (epoch, step_counts[epoch]) == (pause_epoch, pause_iter):
                Path(marker).write_text("paused")
                time.sleep(600)  # the test kills the process here
            return result

        trainer.train_iter = paused_iter
    trainer.train(resume=args.resume)


if __name__ == "__main__":
    main()
