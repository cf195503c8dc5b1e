#!/usr/bin/env python3
"""A contract double of timm's ``train.py`` (pytorch-image-models) for ``aekt-timm``'s tests in CI.

Written from what ``aekt_plugin.timm.launcher`` relies on (see README.md here), not copied from timm: the
same module-level names (``config_parser``, ``parser``, ``_parse_args``, ``main``, and the
``create_loader`` / ``LogitDistillationTask`` it calls through its namespace), the same flags and defaults
for what the tests pass, and the same order of events in ``main()``: model, datasets and loaders, loss,
task (``LogitDistillationTask(..., loss_type=...)``), optimizer, ``resume_task_checkpoint``, EMA and
``load_task_ema_checkpoint``, ``task.compile``, ``task.prepare_distributed(device_ids=[device])``, the
``CheckpointSaver(task=task)``, the scheduler from the loader's length; per update
``task.update_ema(step=num_updates)``. Everything else comes from the installed timm library.
"""
import argparse
import json
import logging
import os
from contextlib import suppress
from datetime import datetime
from functools import partial

import torch
import torch.nn as nn
import yaml

from timm import utils
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, LogitDistillationTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler

_logger = logging.getLogger('train')

config_parser = parser = argparse.ArgumentParser(description='Training Config', add_help=False)
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')

parser = argparse.ArgumentParser(description='contract double of timm train.py')
parser.add_argument('data', nargs='?', metavar='DIR', const=None)
group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR')
group.add_argument('--dataset', metavar='NAME', default='')
group.add_argument('--train-split', metavar='NAME', default='train')
group.add_argument('--val-split', metavar='NAME', default='validation')
group.add_argument('--dataset-download', action='store_true', default=False)
group.add_argument('--input-img-mode', default=None, type=str)
group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='resnet50', type=str)
group.add_argument('--pretrained', action='store_true', default=False)
group.add_argument('--initial-checkpoint', default='', type=str)
group.add_argument('--resume', default='', type=str)
group.add_argument('--no-resume-opt', action='store_true', default=False)
group.add_argument('--num-classes', type=int, default=None)
group.add_argument('--gp', default=None, type=str)
group.add_argument('--img-size', type=int, default=None)
group.add_argument('--in-chans', type=int, default=None)
group.add_argument('--input-size', default=None, nargs=3, type=int)
group.add_argument('--crop-pct', default=None, type=float)
group.add_argument('--mean', type=float, nargs='+', default=None)
group.add_argument('--std', type=float, nargs='+', default=None)
group.add_argument('--interpolation', default='', type=str)
group.add_argument('-b', '--batch-size', type=int, default=128)
group.add_argument('-vb', '--validation-batch-size', type=int, default=None)
group.add_argument('--grad-accum-steps', type=int, default=1)
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
group.add_argument('--torchcompile-mode', type=str, default=None)
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')
group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default='cuda', type=str)
group.add_argument('--amp', action='store_true', default=False)
group.add_argument('--amp-dtype', default='float16', type=str)
group.add_argument('--no-ddp-bb', action='store_true', default=False)
group = parser.add_argument_group('Optimizer and schedule parameters')
group.add_argument('--opt', default='sgd', type=str)
group.add_argument('--momentum', type=float, default=0.9)
group.add_argument('--weight-decay', type=float, default=2e-5)
group.add_argument('--sched', type=str, default='cosine')
group.add_argument('--sched-on-updates', action='store_true', default=False)
group.add_argument('--lr', type=float, default=None)
group.add_argument('--lr-base', type=float, default=0.1)
group.add_argument('--lr-base-size', type=int, default=256)
group.add_argument('--warmup-lr', type=float, default=1e-5)
group.add_argument('--min-lr', type=float, default=0)
group.add_argument('--epochs', type=int, default=300)
group.add_argument('--start-epoch', default=None, type=int)
group.add_argument('--warmup-epochs', type=int, default=5)
group.add_argument('--cooldown-epochs', type=int, default=0)
group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action='store_true', default=False)
group.add_argument('--mixup', type=float, default=0.0)
group.add_argument('--cutmix', type=float, default=0.0)
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
group.add_argument('--mixup-prob', type=float, default=1.0)
group.add_argument('--mixup-switch-prob', type=float, default=0.5)
group.add_argument('--mixup-mode', type=str, default='batch')
group.add_argument('--smoothing', type=float, default=0.1)
group.add_argument('--train-interpolation', type=str, default='random')
group.add_argument('--drop', type=float, default=0.0)
group.add_argument('--drop-path', type=float, default=None)
group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False)
group.add_argument('--model-ema-force-cpu', action='store_true', default=False)
group.add_argument('--model-ema-decay', type=float, default=0.9998)
group.add_argument('--model-ema-warmup', action='store_true')
group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42)
group.add_argument('--log-interval', type=int, default=50)
group.add_argument('--checkpoint-hist', type=int, default=10)
group.add_argument('-j', '--workers', type=int, default=4)
group.add_argument('--pin-mem', action='store_true', default=False)
group.add_argument('--no-prefetcher', action='store_true', default=False)
group.add_argument('--output', default='', type=str)
group.add_argument('--experiment', default='', type=str)
group.add_argument('--eval-metric', default='top1', type=str)
# Knowledge distillation: the names, types and defaults of the real train.py (no choices on the loss).
parser.add_argument('--kd-model-name', default=None, type=str)
parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'])
parser.add_argument('--kd-loss-type', default='kl', type=str)
parser.add_argument('--distill-loss-weight', default=None, type=float)
parser.add_argument('--task-loss-weight', default=None, type=float)
parser.add_argument('--kd-temperature', default=4.0, type=float)


def _parse_args():
    args_config, remaining = config_parser.parse_known_args()
    if args_config.config:
        with open(args_config.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    args = parser.parse_args(remaining)
    return args, yaml.safe_dump(args.__dict__, default_flow_style=False)


def _set_loader_epoch(loader, epoch):
    sampler = getattr(loader, 'sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def main():
    utils.setup_default_logging()
    args, args_text = _parse_args()
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = utils.init_distributed_device(args)
    utils.random_seed(args.seed, args.rank)

    in_chans = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    model = create_model(
        args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
        checkpoint_path=args.initial_checkpoint, **args.model_kwargs,
    )
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    model.to(device=device)

    amp_autocast, loss_scaler = suppress, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)

    if args.data and not args.data_dir:
        args.data_dir = args.data
    img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train = create_dataset(
        args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
        download=args.dataset_download, batch_size=args.batch_size, seed=args.seed, input_img_mode=img_mode,
    )
    dataset_eval = create_dataset(
        args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
        download=args.dataset_download, batch_size=args.batch_size, input_img_mode=img_mode,
    ) if args.val_split else None

    mixup_fn = collate_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes,
        )
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    common = dict(
        mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem, device=device,
        distributed=args.distributed, use_prefetcher=args.prefetcher, img_dtype=torch.float32,
    )
    train_interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, interpolation=train_interpolation, num_workers=args.workers, collate_fn=collate_fn,
        **common,
    )
    if not args.lr:
        args.lr = args.lr_base * args.batch_size * args.world_size * args.grad_accum_steps / args.lr_base_size
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], num_workers=args.workers, crop_pct=data_config['crop_pct'],
        **common,
    ) if dataset_eval is not None else None

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device=device)

    if args.kd_model_name is not None:
        if args.kd_distill_type != 'logit':
            raise NotImplementedError('the double has logit distillation only')
        task = LogitDistillationTask(
            student_model=model, teacher_model=args.kd_model_name, criterion=train_loss_fn,
            loss_type=args.kd_loss_type, distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature,
            device=device, dtype=None, verbose=utils.is_primary(args),
        )
    else:
        task = ClassificationTask(model=model, criterion=train_loss_fn, device=device, verbose=utils.is_primary(args))
    model = task.get_trainable_module()
    eval_model = task.get_eval_model()
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args),
        )
    if args.model_ema:
        task.setup_ema(
            decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
            device='cpu' if args.model_ema_force_cpu else None,
        )
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        model, eval_model = task.get_trainable_module(), task.get_eval_model()
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device], broadcast_buffers=not args.no_ddp_bb)
        model = task.get_trainable_module()

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    saver = output_dir = None
    if utils.is_primary(args):
        exp_name = args.experiment or '-'.join(
            [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])]
        )
        output_dir = utils.get_outdir(args.output if args.output else './output/train', exp_name)
        saver = utils.CheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=eval_metric == 'loss', max_history=args.checkpoint_hist, task=task,
        )
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch,
    )
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    results = []
    for epoch in range(start_epoch, num_epochs):
        _set_loader_epoch(loader_train, epoch)
        train_metrics = train_one_epoch(
            epoch, model, loader_train, optimizer, args, task=task, device=device, lr_scheduler=lr_scheduler,
            amp_autocast=amp_autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn,
        )
        if args.distributed:
            utils.distribute_bn(model, args.world_size, True)
        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = validate(eval_model, loader_eval, validate_loss_fn, args, device, amp_autocast)
            if task.has_ema() and not args.model_ema_force_cpu:
                eval_metrics = validate(task.get_eval_model(ema=True), loader_eval, validate_loss_fn, args, device,
                                        amp_autocast)
        latest_metric = (eval_metrics or train_metrics)[eval_metric]
        if saver is not None:
            saver.save_checkpoint(epoch, metric=latest_metric)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)
        results.append({'epoch': epoch, 'train': train_metrics, 'validation': eval_metrics})

    if args.distributed:
        torch.distributed.destroy_process_group()
    if utils.is_primary(args):
        print(f'--result\n{json.dumps(results, indent=4)}')


def train_one_epoch(epoch, model, loader, optimizer, args, task, device, lr_scheduler=None, amp_autocast=suppress,
                    loss_scaler=None, mixup_fn=None):
    has_no_sync = args.distributed and hasattr(task.get_trainable_module(), 'no_sync')
    losses_m = utils.AverageMeter()
    task.get_trainable_module().train()
    accum_steps = args.grad_accum_steps
    last_accum_steps = len(loader) % accum_steps
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)

        def _forward():
            with amp_autocast():
                loss = task(input, target)['loss']
            return loss / accum_steps if accum_steps > 1 else loss

        def _backward(loss):
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    optimizer.step()

        if has_no_sync and not need_update:
            with task.no_sync():
                loss = _forward()
                _backward(loss)
        else:
            loss = _forward()
            _backward(loss)
        losses_m.update(loss.item() * accum_steps, input.shape[0])
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if utils.is_primary(args) and (batch_idx // args.grad_accum_steps % args.log_interval == 0 or last_batch):
            _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{len(loader)}]  Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})')
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
    loss_avg = losses_m.avg
    if args.distributed:
        loss_avg = utils.reduce_tensor(torch.tensor([loss_avg], device=device), args.world_size).item()
    return {'loss': loss_avg}


def validate(model, loader, loss_fn, args, device, amp_autocast=suppress):
    losses_m, top1_m = utils.AverageMeter(), utils.AverageMeter()
    model.eval()
    with torch.inference_mode():
        for input, target in loader:
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output, target)
            acc1, = utils.accuracy(output, target, topk=(1,))
            if args.distributed:
                loss, acc1 = utils.reduce_tensor(loss.data, args.world_size), utils.reduce_tensor(acc1, args.world_size)
            losses_m.update(loss.item(), output.shape[0])
            top1_m.update(acc1.item(), output.shape[0])
    if utils.is_primary(args):
        _logger.info(f'Test: Loss {losses_m.avg:.3f}  Acc@1 {top1_m.avg:.3f}')
    return {'loss': losses_m.avg, 'top1': top1_m.avg}


if __name__ == '__main__':
    main()
