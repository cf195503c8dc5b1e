#!/usr/bin/env python3
"""Distil a timm ResNet-18 teacher into a narrow timm ResNet-10-T student with AEKT, timm's way.

A complete training loop on real data that ships with scikit-learn: digits-100, two of its 8×8 digits side
by side whose class is ``10·left + right`` (100 classes, the data set of ``aekt demo``), shown to the models
at 16×32; ``--dataset fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` files instead.

1. train the teacher with ``timm.task.ClassificationTask``;
2. train the student with ``aekt_plugin.timm.AEKTDistillationTask`` -- the two lines that differ from
   timm's ``LogitDistillationTask`` are marked below;
3. fold the serial layer into the student's classifier and check the deployable model's accuracy.

``--compare`` also trains the student with cross-entropy only (timm's ``ClassificationTask``), with timm's
``LogitDistillationTask`` (KD) and with ``DKDDistillationTask``, on several seeds; on each seed every method
starts from the same initial weights and sees the same batches, so the methods are compared paired by seed
(mean ± std, and the paired differences with 95 % intervals; "within noise" when an interval holds 0).

Optimiser and schedule come from ``timm.optim.create_optimizer_v2`` and ``timm.scheduler.create_scheduler_v2``
(stepped per update), normalisation from ``timm.data.resolve_data_config``, soft targets from
``timm.data.Mixup`` (``--mixup``). The models are timm's own architectures in tiny configurations and
start from random weights. Needs ``pip install "aekt-plugin[timm,demo]"``. On one CPU thread::

    python examples/timm_distill.py              # about a minute
    python examples/timm_distill.py --compare    # 4 methods x 5 seeds, a few minutes
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, LogitDistillationTask, TrainingTask
from timm.utils import AverageMeter, accuracy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import aekt_plugin
from aekt_plugin.demo.data import FASHION_MNIST_DIR, Splits, load_digits100, load_fashion_mnist
from aekt_plugin.demo.report import format_table
from aekt_plugin.demo.train import is_collapsed
from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent, DKDDistillationTask

METHODS = ("CE", "KD", "DKD", "AEKT")
# Digits-100's 8×16 pairs are upsampled twice: a ResNet's stride-32 stem and stages leave a 1×1 map at 16×32.
UPSCALE = {"digits100": 2, "fashion-mnist": 1}


def load_data(args: argparse.Namespace) -> Splits:
    """The data set's splits: float images in [0, 1], (N, 1, H, W), upsampled by ``UPSCALE``."""
    sizes = dict(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    if args.dataset == "digits100":
        data = load_digits100(**sizes)
    else:
        try:
            data = load_fashion_mnist(root=args.data_dir, **sizes)
        except FileNotFoundError as exc:
            raise SystemExit(
                f"{exc} (or use the default --dataset digits100, which needs no files)"
            ) from None
    scale = UPSCALE[args.dataset]
    if scale > 1:
        for split in ("train", "val", "test"):
            x = getattr(data, f"x_{split}")
            setattr(
                data, f"x_{split}", F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            )
    return data


def make_teacher(data: Splits, stats: dict) -> nn.Module:
    """A small timm ResNet-18 (channels 16-32-64-128) for 1-channel images, random weights."""
    return timm.create_model(
        "resnet18",
        channels=(16, 32, 64, 128),
        num_classes=data.num_classes,
        in_chans=1,
        pretrained_cfg_overlay=stats,
    )


def make_student(data: Splits, stats: dict) -> nn.Module:
    """A narrow timm ResNet-10-T (channels 8-16-32-64, 86k parameters), random weights.

    (A tiny ViT learned too little in this budget: 30 % after 20 epochs of cross-entropy, against 94 % for
    this ResNet after 6.)"""
    return timm.create_model(
        "resnet10t",
        channels=(8, 16, 32, 64),
        stem_width=8,
        num_classes=data.num_classes,
        in_chans=1,
        pretrained_cfg_overlay=stats,
    )


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] (nan on an empty split)."""
    if len(y) == 0:
        return float("nan")
    model.eval()
    top1 = AverageMeter()
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            top1.update(accuracy(logits, y[start : start + batch_size])[0].item(), len(logits))
    return top1.avg / 100


def train(
    task: TrainingTask,
    model: nn.Module,
    loader: DataLoader,
    args: argparse.Namespace,
    epochs: int,
    desc: str,
    mixup: Mixup | None = None,
    leave: bool = True,
) -> None:
    """timm-style loop: task(input, target) -> dict of losses; LR stepped per update. ``model`` is the
    task's trainable module (``task.get_trainable_module()`` on timm >= 1.0.27)."""
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs, step_on_epochs=False, updates_per_epoch=len(loader)
    )
    num_updates = 0
    bar = tqdm(total=epochs * len(loader), desc=desc, unit="step", dynamic_ncols=True, leave=leave)
    for epoch in range(epochs):
        model.train()
        losses = AverageMeter()
        for input, target in loader:
            if mixup is not None:
                input, target = mixup(input, target)
            result = task(input, target)
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if hasattr(task, "update_ema"):  # timm's per-update hook (timm >= 1.0.27; AEKT's task: any timm)
                task.update_ema(step=num_updates)  # AEKT's warm-up clock reads the update count from it
            losses.update(result["loss"].item(), len(input))
            postfix = {"loss": f"{losses.avg:.3f}", "lr": f"{optimizer.param_groups[0]['lr']:.1e}"}
            if "kd_loss" in result:
                postfix["kd"] = f"{result['kd_loss'].item():.3f}"
            if isinstance(task, (AEKTDistillationTask, DKDDistillationTask)):
                postfix["warm"] = f"{task.kd_warmup:.2f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update()
        scheduler.step(epoch + 1)
    bar.close()


def make_task(
    method: str, model: nn.Module, teacher: nn.Module, args: argparse.Namespace, updates_per_epoch: int
) -> tuple[TrainingTask, nn.Module]:
    """The task that trains ``model`` with ``method``, and the module it trains."""
    if method == "CE":
        return ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False), model
    if method == "KD":  # timm's own task: T²·KL, no warm-up
        task = LogitDistillationTask(
            model, teacher, nn.CrossEntropyLoss(), temperature=args.temperature, verbose=False
        )
        return task, model
    if method == "DKD":  # AEKT's task with DKD's loss: same options, same warm-up clock
        task = DKDDistillationTask(
            model,
            teacher,
            temperature=args.temperature,
            beta=args.beta,
            warmup_epochs=args.warmup_epochs,
            updates_per_epoch=updates_per_epoch,
            verbose=False,
        )
        return task, model
    student = AEKTStudent(model, order=None if args.order == "none" else args.order)  # change 1 of 2: wrap
    task = AEKTDistillationTask(  # change 2 of 2: swap the task (was LogitDistillationTask)
        student,
        teacher,
        temperature=args.temperature,
        beta=args.beta,
        warmup_epochs=args.warmup_epochs,
        updates_per_epoch=updates_per_epoch,
        verbose=False,
    )
    return task, student


def train_student(
    method: str,
    seed: int,
    data: Splits,
    teacher: nn.Module,
    stats: dict,
    args: argparse.Namespace,
    leave: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one student; returns the trained module and its record (``method``, ``seed``, test
    ``accuracy`` and ``val_accuracy`` in [0, 1], ``collapsed``). The seed fixes the initial weights, the
    batch order and Mixup's draws, so every method of one seed starts alike."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # timm's Mixup draws its mixing weights with numpy
    model = make_student(data, stats)
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    mixup = None
    if args.mixup > 0:
        mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.0, num_classes=data.num_classes)
    task, trained = make_task(method, model, teacher, args, len(loader))
    train(task, trained, loader, args, args.epochs, f"{method} student, seed {seed}", mixup, leave)
    record = {
        "method": method,
        "seed": seed,
        "accuracy": evaluate(trained, data.x_test, data.y_test),
        "val_accuracy": evaluate(trained, data.x_val, data.y_val),
    }
    record["collapsed"] = is_collapsed(record["accuracy"], data.num_classes)
    return trained, record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=tuple(UPSCALE), default="digits100")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST_DIR), help="Fashion-MNIST's IDX files")
    parser.add_argument("--n-train", type=int, default=2500)
    parser.add_argument(
        "--n-val", type=int, default=0, help="validation examples (carved from training data)"
    )
    parser.add_argument("--n-test", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument(
        "--order",
        choices=("none", "cls_kd", "kd_cls"),
        default=str(aekt_plugin.DEFAULTS.order).lower(),
        help="serial layer: none (the package default, which the accuracy benchmark chose), or cls_kd/kd_cls "
        "to try task separation (kd_cls shows fold() of S into the head)",
    )
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--beta", type=float, default=2.0, help="NCKD weight; 2 is safe on small problems")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="KD warm-up, counted in updates")
    parser.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (soft targets) if > 0")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train CE (ClassificationTask), KD (timm's LogitDistillationTask) and DKD students, paired "
        "by seed with the AEKT student",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the comparison (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("threads", "seeds", "epochs", "teacher_epochs", "n_train", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = load_data(args)
    # The data set's statistics go into pretrained_cfg, as for any timm model trained on new data: the data
    # config and the distillation tasks' student -> teacher renormalisation both read them from there.
    stats = dict(mean=(data.x_train.mean().item(),), std=(data.x_train.std().item(),))
    torch.manual_seed(0)
    teacher = make_teacher(data, stats)
    cfg = resolve_data_config({}, model=teacher)
    for split in ("train", "val", "test"):
        setattr(data, f"x_{split}", (getattr(data, f"x_{split}") - cfg["mean"][0]) / cfg["std"][0])
    print(
        f"{args.dataset}: {len(data.y_train)} train / {len(data.y_test)} test images {data.input_shape}, "
        f"{data.num_classes} classes, timm {timm.__version__}, {args.threads} thread(s)"
    )
    teacher_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    teacher_task = ClassificationTask(teacher, nn.CrossEntropyLoss(), verbose=False)
    train(teacher_task, teacher, teacher_loader, args, args.teacher_epochs, "teacher")
    results = {"teacher": evaluate(teacher, data.x_test, data.y_test)}

    student, record = train_student("AEKT", 0, data, teacher, stats, args)
    results[f"AEKT student ({args.order})"] = record["accuracy"]
    deployable = student.fold()  # a plain timm ResNet (with kd_cls: S folded into its fc)
    results["AEKT student, folded"] = evaluate(deployable, data.x_test, data.y_test)
    width = max(map(len, results))
    print(f"\n{'model':<{width}}  test top-1 (%)")
    for name, top1 in results.items():
        print(f"{name:<{width}}  {100 * top1:6.2f}")

    if args.compare:
        runs = [record]
        work = [(m, s) for s in range(args.seeds) for m in METHODS if (m, s) != ("AEKT", 0)]
        for method, seed in tqdm(work, desc="comparison", unit="run"):
            runs.append(train_student(method, seed, data, teacher, stats, args, leave=False)[1])
        runs.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
        print()
        print(format_table(runs, title=f"student test accuracy over {args.seeds} seed(s), paired by seed"))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
