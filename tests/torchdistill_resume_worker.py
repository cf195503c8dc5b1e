"""A small torchdistill distillation with the AEKT loss, for the SIGKILL-and-resume test of
test_torchdistill.py.

Usage: ``python tests/torchdistill_resume_worker.py OUT_DIR [--resume] [--pause-at EPOCH:ITER MARKER]``. It
distils on scikit-learn's digits with the shipped sample config's second stage, through torchdistill's own
``DistillationBox`` and the package's box processes, for 3 epochs with ``grad_accum_step=4`` and a warm-up of
25 optimiser steps (still ramping in the second epoch). The loop is torchdistill's example loop plus what a
resumable run saves after each epoch (``OUT_DIR/ckpt.pt``: student, optimizer, RNG state, epoch) and loads
with ``--resume``. ``--pause-at`` writes MARKER and waits in that training iteration, for the test to kill
the process there; the finished run writes ``OUT_DIR/student.pt``.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.registry import get_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", nargs=2, metavar=("EPOCH:ITER", "MARKER"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = resources.files("aekt_plugin") / "configs/torchdistill/digits_aekt_serial.yaml"
    config = yaml_util.load_yaml_file(str(config_path))
    import_dependencies(config["dependencies"])
    train = dict(config["train"]["stage2"], num_epochs=3, log_freq=1000)
    train["optimizer"] = dict(train["optimizer"], grad_accum_step=4)
    train["criterion"]["kwargs"]["sub_terms"]["kd"]["criterion"]["kwargs"]["warmup_steps"] = 25

    set_seed(0)
    models = config["models"]
    teacher = get_model(models["teacher_model"]["key"], **models["teacher_model"]["kwargs"])
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"])
    box = get_distillation_box(teacher, student, config["datasets"], train, torch.device("cpu"), None, False, 1)
    start = 0
    checkpoint = out / "ckpt.pt"
    if args.resume:
        state = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(state["student"])
        box.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["epoch"] + 1
    pause = None
    if args.pause_at:
        epoch_iter, marker = args.pause_at
        pause = (*(int(x) for x in epoch_iter.split(":")), Path(marker))
    for epoch in range(start, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for step, (x, y, supp) in enumerate(box.train_data_loader, 1):
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss=loss)
            if pause is not None and pause[:2] == (epoch, step):
                pause[2].write_text("paused")
                time.sleep(600)  # the test kills the process here
        box.post_epoch_process()
        state = {"student": student.state_dict(), "optimizer": box.optimizer.state_dict()}
        torch.save({**state, "rng": torch.get_rng_state(), "epoch": epoch}, checkpoint)
    torch.save(student.state_dict(), out / "student.pt")


if __name__ == "__main__":
    main()
