"""``conv2former train``: one readable loop over timm's data pipeline, optimizers, schedulers, mixup and EMA.

Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP). Every random draw is seeded from
(seed, rank, epoch, batch/sample index), so an interrupted run resumed from a checkpoint continues bit-for-bit
(on CPU) where it stopped.
"""
import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import build_datasets, build_timm_datasets, is_timm_source, resolve_data_dir
from ..evaluate import evaluate, save_confusion_matrix_png, write_results
from ..inference import pretrained_overlay, write_model_folder
from ..report import write_report
from .checkpoint import checkpoint_name, find_resume_checkpoint, save_checkpoint
from .distributed import DistEnv, cleanup_distributed, init_distributed
from .runtime import (AMP_DTYPES, SeededDataset, config_dict, derive_seed, diverged, optimizer_step,
                      out_of_memory, resume_training, seed_all, start_run, tensorboard_writer,
                      train_state, write_metrics)

_logger = logging.getLogger('conv2former.train')


def resolve_lr(cfg: argparse.Namespace, world_size: int) -> float:
    """--lr if given, else the paper's linear rule: blr x global batch / 1024."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.blr * cfg.batch_size * cfg.grad_accum_steps * world_size / 1024


def build_model(cfg: argparse.Namespace, num_classes: int) -> nn.Module:
    kwargs = dict(cfg.model_kwargs, num_classes=num_classes, drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
    if cfg.pretrained:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=pretrained_overlay(cfg.pretrained))
    if not timm.is_model(cfg.model):
        raise ValueError(f'unknown model {cfg.model!r}; registered Conv2Former models: '
                         f'{timm.list_models("conv2former*")}')
    return timm.create_model(cfg.model, **kwargs)


def train(cfg: argparse.Namespace) -> dict:
    """Train, evaluate every ``--eval-every`` epochs, checkpoint, and write the run's report. Returns final metrics."""
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        cleanup_distributed()


def _train(cfg: argparse.Namespace, env: DistEnv) -> dict:
    device = env.device
    run_dir, resume_from, state = start_run(cfg, env, cfg.model, cfg.model)

    # data: rank 0 extracts (or downloads) first, the others then find it in the cache
    def load_data():
        if is_timm_source(cfg.data):
            return cfg.data, *build_timm_datasets(cfg.data, cfg.data_dir, download=cfg.dataset_download)
        data_dir = resolve_data_dir(cfg.data)
        return data_dir, *build_datasets(data_dir, strict=cfg.strict)

    if env.is_main:
        data_dir, train_ds, val_ds, class_names = load_data()
    env.barrier()
    if not env.is_main:
        data_dir, train_ds, val_ds, class_names = load_data()
    for skipped_path, reason in train_ds.skipped + val_ds.skipped:
        _logger.warning('skipped %s: %s', skipped_path, reason)
    if train_ds.num_skipped or val_ds.num_skipped:
        _logger.warning('skipped %d unreadable images (%d train, %d val); --strict fails instead',
                        train_ds.num_skipped + val_ds.num_skipped, train_ds.num_skipped, val_ds.num_skipped)
    model = build_model(cfg, num_classes=len(class_names))
    data_config = resolve_data_config(
        dict(img_size=cfg.img_size, interpolation=cfg.interpolation), model=model, verbose=env.is_main)
    train_ds.transform = create_transform(
        **data_config, is_training=True, scale=cfg.scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode='pixel', re_count=1)
    val_ds.transform = create_transform(**data_config)
    # saved with every model folder, so validate/predict preprocess exactly as this run evaluated; the pretrained
    # state_dict timm keeps in the cfg is dropped (it would hold a second copy of the weights all run long)
    cfg_without_weights = {k: v for k, v in model.pretrained_cfg.items() if k != 'state_dict'}
    model.pretrained_cfg = model.default_cfg = dict(cfg_without_weights, num_classes=len(class_names), **data_config)
    seeded_train = SeededDataset(train_ds, cfg.seed)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * env.world_size
    micro_per_epoch = len(train_ds) // (cfg.batch_size * env.world_size)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f'{len(train_ds)} training images make no full step of global batch {global_batch} '
                         f'(-b {cfg.batch_size} x {env.world_size} processes x {cfg.grad_accum_steps} accumulation): '
                         f'lower -b or --grad-accum-steps')
    micro_per_epoch = steps_per_epoch * cfg.grad_accum_steps
    lr = resolve_lr(cfg, env.world_size)

    # model, optimizer, schedule, loss
    if cfg.sync_bn:
        if device.type != 'cuda':
            raise ValueError('--sync-bn needs CUDA (PyTorch has no CPU SyncBatchNorm); drop it on CPU, or use '
                             '--model-kwargs stem=patch for a model without BatchNorm')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    amp_dtype = AMP_DTYPES.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                      label_smoothing=cfg.smoothing, num_classes=len(class_names))
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    model_args = dict(cfg.model_kwargs, num_classes=len(class_names))

    # resume
    start_epoch, start_batch, step, history, lr_points, best = 0, 0, 0, [], [], None
    if state is not None:
        start_epoch, start_batch, step, history, lr_points, best = resume_training(
            resume_from, state, env, cfg.batch_size, model, optimizer, scheduler, scaler)
        ema_file = resume_from / 'model_ema.safetensors'
        if ema is not None and ema_file.is_file():
            ema.module.load_state_dict(load_file(str(ema_file), device=str(device)))

    if cfg.compile:
        model = torch.compile(model, backend='inductor' if cfg.compile is True else cfg.compile)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if env.distributed else model
    bare_model = model._orig_mod if hasattr(model, '_orig_mod') else model

    sampler = DistributedSampler(seeded_train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    val_sampler = DistributedSampler(val_ds, num_replicas=env.world_size, rank=env.rank, shuffle=False) \
        if env.distributed else None
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, sampler=val_sampler, num_workers=cfg.workers,
                            pin_memory=device.type == 'cuda')
    lr_every = max(1, num_epochs * steps_per_epoch // 1000)
    show = env.is_main and cfg.progress
    if env.is_main:
        _logger.info('training %s on %s: %d classes, %d train / %d val images, %d steps/epoch, global batch %d, '
                     'lr %.3g', cfg.model, data_dir, len(class_names), len(train_ds), len(val_ds), steps_per_epoch,
                     global_batch, lr)

    def checkpoint(epoch: int, next_batch: int) -> Path:
        snapshot = train_state(cfg.model, epoch, next_batch, step, env, cfg.batch_size, optimizer, scheduler, scaler,
                               history, lr_points, best)

        def write_model(folder: Path) -> None:
            write_model_folder(bare_model, folder, model_args, label_names=class_names,
                               ema_state_dict=ema.module.state_dict() if ema else None)
        return save_checkpoint(run_dir, checkpoint_name(epoch, step), write_model, snapshot,
                               keep=cfg.checkpoint_hist)

    last_eval = None
    tb = tensorboard_writer(run_dir, env)
    for epoch in range(start_epoch, num_epochs):
        seeded_train.epoch = epoch
        sampler.set_epoch(epoch)
        skip = start_batch if epoch == start_epoch else 0
        indices = list(sampler)[skip * cfg.batch_size:micro_per_epoch * cfg.batch_size]
        loader = DataLoader(seeded_train, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                            drop_last=True, pin_memory=device.type == 'cuda')
        train_model.train()
        loss_sum, loss_count, t0, seen = 0.0, 0, time.perf_counter(), 0
        bar = tqdm(total=micro_per_epoch, initial=skip, disable=not show, desc=f'epoch {epoch + 1}/{num_epochs}',
                   unit='batch', dynamic_ncols=True)
        for i, (images, targets) in enumerate(loader, start=skip):
            seed_all(derive_seed(cfg.seed, env.rank, epoch, i, 1))
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                images, targets = mixup(images, targets)
            boundary = (i + 1) % cfg.grad_accum_steps == 0
            sync = contextlib.nullcontext() if boundary or not env.distributed else train_model.no_sync()
            try:
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = criterion(train_model(images), targets)
                    if not env.all_true(bool(torch.isfinite(loss))):
                        last = find_resume_checkpoint(run_dir) if (run_dir / 'checkpoints').is_dir() else None
                        raise diverged(loss, epoch, i, step, optimizer.param_groups[0]['lr'], last)
                    scaler.scale(loss / cfg.grad_accum_steps).backward()
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(f'{cfg.model}, {images.shape[-1]}px', cfg.batch_size, cfg.grad_accum_steps,
                                    cfg.amp) from None
            loss_sum += loss.item()
            loss_count += 1
            seen += images.shape[0] * env.world_size
            bar.update(1)
            if not boundary:
                continue
            optimizer_step(optimizer, scaler, model, cfg.clip_grad)
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(bare_model, step=step)
            current_lr = optimizer.param_groups[0]['lr']
            if step % lr_every == 0 or step == 1:
                lr_points.append((step, current_lr))
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f'{loss_sum / loss_count:.4f}', lr=f'{current_lr:.2e}', img_s=f'{rate:.0f}')
            if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and i + 1 < micro_per_epoch:
                if env.is_main:
                    checkpoint(epoch, i + 1)
                env.barrier()
        bar.close()
        scheduler.step(epoch + 1)
        epoch_time = time.perf_counter() - t0
        row = dict(epoch=epoch, step=step, lr=optimizer.param_groups[0]['lr'],
                   train_loss=env.all_reduce_mean(loss_sum / max(loss_count, 1)), val_loss=None, val_top1=None,
                   val_top5=None, ema_top1=None, epoch_time=epoch_time, img_per_sec=seen / max(epoch_time, 1e-9))
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == num_epochs:
            last_eval = evaluate(bare_model, val_loader, device, len(class_names), amp_dtype=amp_dtype,
                                 channels_last=cfg.channels_last, distributed=env.distributed, progress=show)
            row.update(val_loss=last_eval.loss, val_top1=last_eval.top1, val_top5=last_eval.top5)
            if ema is not None:
                ema_eval = evaluate(ema.module, val_loader, device, len(class_names), amp_dtype=amp_dtype,
                                    channels_last=cfg.channels_last, distributed=env.distributed, progress=False)
                row['ema_top1'] = ema_eval.top1
        history.append(row)
        if env.is_main:
            _logger.info('epoch %d: %s', epoch + 1, json.dumps(row))
            improved = row['val_top1'] is not None and (best is None or row['val_top1'] > best['val_top1'])
            if improved:
                best = dict(epoch=epoch, val_top1=row['val_top1'], val_top5=row['val_top5'])
            checkpoint(epoch + 1, 0)
            if improved:
                write_model_folder(bare_model, run_dir / 'best', model_args, label_names=class_names,
                                   ema_state_dict=ema.module.state_dict() if ema else None)
            write_metrics(run_dir, history, lr_points)
            if tb is not None:
                for key, value in row.items():
                    if key != 'epoch' and value is not None:
                        tb.add_scalar(key, value, epoch + 1)
                tb.flush()
        env.barrier()

    if tb is not None:
        tb.close()
    final = dict(history[-1]) if history else {}
    if best is not None:
        final.update(best_epoch=best['epoch'], best_top1=best['val_top1'])
    if env.is_main:
        write_model_folder(bare_model, run_dir / 'last', model_args, label_names=class_names,
                           ema_state_dict=ema.module.state_dict() if ema else None)
        if last_eval is not None:
            save_confusion_matrix_png(last_eval.confusion, class_names, run_dir / 'confusion_matrix.png')
            write_results(last_eval, class_names, json_path=run_dir / 'results.json',
                          extra=dict(model=cfg.model, img_size=data_config['input_size'][-1]))
        write_report(run_dir, config_dict(cfg), final)
        _logger.info('run folder: %s', run_dir)
    return dict(final, run_dir=str(run_dir))
