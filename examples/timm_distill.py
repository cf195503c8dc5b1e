#!/usr/bin/env python3
"""Distil a timm ResNet teacher into a timm ViT student with AEKT, timm's way, on Fashion-MNIST.

A complete training loop on real data that ships with Debian (``dataset-fashion-mnist``; parsed from the
IDX files with numpy) or with scikit-learn (``--dataset digits``):

1. train the teacher with ``timm.task.ClassificationTask``;
2. train the student with ``aekt_plugin.timm.AEKTDistillationTask`` -- the two lines that differ from
   timm's ``LogitDistillationTask`` are marked below (``--compare`` also trains KD with that task and DKD
   with ``DKDDistillationTask``, from the same initial weights);
3. fold the serial layer into the student's classifier and check the deployable model's accuracy.

Optimiser and schedule come from ``timm.optim.create_optimizer_v2`` and ``timm.scheduler.create_scheduler_v2``
(stepped per update), normalisation from ``timm.data.resolve_data_config``, soft targets from
``timm.data.Mixup`` (``--mixup``). The models are timm's own architectures in tiny configurations and
start from random weights. The default run takes about a minute on one CPU thread::

    python examples/timm_distill.py
    python examples/timm_distill.py --dataset digits --epochs 10 --compare
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, LogitDistillationTask
from timm.utils import AverageMeter, accuracy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import aekt_plugin
from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent, DKDDistillationTask

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) of unsigned bytes as a numpy array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        data = fh.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float images in [0, 1], shaped (N, 1, H, W), and int64 labels: train and test subsets."""
    gen = np.random.default_rng(args.seed)
    if args.dataset == "fashion-mnist":
        root = Path(args.data_dir)
        try:
            x_tr, y_tr, x_te, y_te = (
                read_idx(root / f"{split}-{kind}-ubyte.gz")
                for split in ("train", "t10k")
                for kind in ("images-idx3", "labels-idx1")
            )
        except FileNotFoundError as exc:
            raise SystemExit(
                f"{exc.filename} not found: sudo apt-get install dataset-fashion-mnist, or --dataset digits"
            ) from None
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images * (255 / 16)).astype(np.uint8)
        order = gen.permutation(len(images))
        split = len(images) * 3 // 4
        x_tr, y_tr = images[order[:split]], bunch.target[order[:split]]
        x_te, y_te = images[order[split:]], bunch.target[order[split:]]
    train = gen.choice(len(y_tr), size=min(args.n_train, len(y_tr)), replace=False)
    test = gen.choice(len(y_te), size=min(args.n_test, len(y_te)), replace=False)

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        return F.interpolate(t, size=(args.img_size, args.img_size), mode="bilinear", align_corners=False)

    return (
        to_tensor(x_tr[train]),
        torch.from_numpy(y_tr[train].astype(np.int64)),
        to_tensor(x_te[test]),
        torch.from_numpy(y_te[test].astype(np.int64)),
    )


def make_teacher(args: argparse.Namespace, stats: dict) -> torch.nn.Module:
    """A small timm ResNet-18 (narrow channels) for 1-channel images, random weights."""
    return timm.create_model(
        "resnet18", channels=(32, 64, 128, 256), num_classes=10, in_chans=1, pretrained_cfg_overlay=stats
    )


def make_student(args: argparse.Namespace, stats: dict) -> torch.nn.Module:
    """A tiny timm ViT (2 blocks of width 64, 16 patches per image), random weights."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=args.img_size,
        patch_size=args.img_size // 4,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        in_chans=1,
        pretrained_cfg_overlay=stats,
    )


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    top1 = AverageMeter()
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            top1.update(accuracy(logits, y[start : start + batch_size])[0].item(), len(logits))
    return top1.avg


def train(task, model, loader, args, epochs: int, desc: str, mixup: Mixup | None = None) -> None:
    """timm-style loop: task(input, target) -> dict of losses; LR stepped per update. ``model`` is the
    task's trainable module (``task.get_trainable_module()`` on timm >= 1.0.27)."""
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs, step_on_epochs=False, updates_per_epoch=len(loader)
    )
    num_updates = 0
    bar = tqdm(total=epochs * len(loader), desc=desc, unit="step", dynamic_ncols=True)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST))
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
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
        help="also train timm's LogitDistillationTask (KD) and DKDDistillationTask from the same weights",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_data(args)
    # The data set's statistics go into pretrained_cfg, as for any timm model trained on new data: the data
    # config and the distillation tasks' student -> teacher renormalisation both read them from there.
    stats = dict(mean=(x_tr.mean().item(),), std=(x_tr.std().item(),))
    torch.manual_seed(args.seed)
    teacher, student_model = make_teacher(args, stats), make_student(args, stats)
    cfg = resolve_data_config({}, model=student_model)
    x_tr = (x_tr - cfg["mean"][0]) / cfg["std"][0]
    x_te = (x_te - cfg["mean"][0]) / cfg["std"][0]
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        TensorDataset(x_tr, y_tr), batch_size=args.batch_size, shuffle=True, drop_last=True, generator=gen
    )
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.0, num_classes=10) if args.mixup > 0 else None
    print(
        f"{args.dataset}: {len(y_tr)} train / {len(y_te)} test images {tuple(x_tr.shape[1:])}, "
        f"timm {timm.__version__}, {args.threads} thread(s)"
    )

    teacher_task = ClassificationTask(teacher, nn.CrossEntropyLoss(), verbose=False)
    train(teacher_task, teacher, loader, args, args.teacher_epochs, "teacher")
    results = {"teacher": evaluate(teacher, x_te, y_te)}

    student_state = {k: v.clone() for k, v in student_model.state_dict().items()}
    order = None if args.order == "none" else args.order
    student = AEKTStudent(student_model, order=order)  # change 1 of 2: wrap the student
    task = AEKTDistillationTask(  # change 2 of 2: swap the task (was LogitDistillationTask)
        student,
        teacher,
        temperature=args.temperature,
        beta=args.beta,
        warmup_epochs=args.warmup_epochs,
        updates_per_epoch=len(loader),
        verbose=False,
    )
    train(task, student, loader, args, args.epochs, f"AEKT student ({args.order})", mixup)
    results[f"AEKT student ({args.order})"] = evaluate(student, x_te, y_te)
    deployable = student.fold()  # a plain timm VisionTransformer (with kd_cls: S folded into its head)
    results["AEKT student, folded"] = evaluate(deployable, x_te, y_te)

    if args.compare:
        baseline = make_student(args, stats)
        baseline.load_state_dict(student_state)  # same initial weights as the AEKT student
        kd_task = LogitDistillationTask(
            baseline, task.teacher, nn.CrossEntropyLoss(), temperature=args.temperature, verbose=False
        )
        train(kd_task, baseline, loader, args, args.epochs, "KD student (timm)", mixup)
        results["KD student (timm LogitDistillationTask)"] = evaluate(baseline, x_te, y_te)
        dkd_model = make_student(args, stats)
        dkd_model.load_state_dict(student_state)
        dkd_task = DKDDistillationTask(  # AEKT's task with DKD's loss: same options, same warm-up clock
            dkd_model,
            task.teacher,
            temperature=args.temperature,
            beta=args.beta,
            warmup_epochs=args.warmup_epochs,
            updates_per_epoch=len(loader),
            verbose=False,
        )
        train(dkd_task, dkd_model, loader, args, args.epochs, "DKD student", mixup)
        results["DKD student (DKDDistillationTask)"] = evaluate(dkd_model, x_te, y_te)

    width = max(map(len, results))
    print(f"\n{'model':<{width}}  test top-1 (%)")
    for name, top1 in results.items():
        print(f"{name:<{width}}  {top1:6.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
