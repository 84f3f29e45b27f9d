"""``conv2former detect train`` / ``conv2former segment train``: one loop for both dense tasks.

The run machinery is the classification trainer's (torchrun DDP, AMP, per-sample seeding, atomic checkpoints with
exact mid-epoch resume, metric files, TensorBoard, report.md); what differs per task (model, data, loss, metrics,
overlays) comes from ``tasks.engine``. The optimizer is AdamW with layer-wise lr decay over the backbone (the
ConvNeXt/Swin detection and segmentation recipe); the schedule is timm's, stepped per optimizer update.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..fileio import atomic_write_text
from ..report import write_report
from ..training.checkpoint import (checkpoint_name, find_resume_checkpoint, list_checkpoints, save_checkpoint)
from ..training.distributed import DistEnv, cleanup_distributed, init_distributed
from ..training.runtime import (AMP_DTYPES, SeededDataset, config_dict, derive_seed, diverged, optimizer_step,
                                out_of_memory, resume_training, seed_all, start_run,
                                tensorboard_writer, train_state, write_metrics)
from .engine import TASKS, build_task_model, write_task_folder
from .optim import layer_decay_param_groups

_logger = logging.getLogger('conv2former.tasks')


def train_task(cfg: argparse.Namespace) -> dict:
    """Train a detector (``cfg.task == 'detect'``) or segmenter, evaluate, checkpoint, report. Returns final
    metrics with the run folder."""
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, TASKS[cfg.task](cfg), env)
    finally:
        cleanup_distributed()


def _train(cfg: argparse.Namespace, task, env: DistEnv) -> dict:
    device = env.device
    model_id = f'{cfg.task}:{cfg.model}:{cfg.backbone}'
    run_dir, resume_from, state = start_run(cfg, env, model_id, f'{cfg.model}-{cfg.backbone}')

    if env.is_main:  # rank 0 extracts archives first, the others then find them in the cache
        train_ds, val_ds = task.datasets()
    env.barrier()
    if not env.is_main:
        train_ds, val_ds = task.datasets()
    for split, ds in (('train', train_ds), ('val', val_ds)):
        counts = {k: v for k, v in getattr(ds, 'stats', {}).items() if v}
        if counts and env.is_main:
            _logger.warning('%s data clean-up: %s', split, counts)
    class_names = train_ds.class_names
    model_config = task.model_config(class_names)
    model = build_task_model(model_config, None if state else cfg.pretrained_backbone)
    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * env.world_size
    steps_per_epoch = len(train_ds) // (cfg.batch_size * env.world_size) // cfg.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f'{len(train_ds)} training images make no full step of global batch {global_batch}: '
                         f'lower -b or --grad-accum-steps')
    micro_per_epoch = steps_per_epoch * cfg.grad_accum_steps
    epochs = math.ceil(cfg.iters / steps_per_epoch) if cfg.iters else cfg.epochs
    groups = layer_decay_param_groups(model, task.backbone(model), cfg.backbone, cfg.weight_decay, cfg.layer_decay)
    optimizer = create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs, decay_milestones=list(cfg.decay_milestones),
        decay_rate=cfg.decay_rate, warmup_epochs=cfg.warmup_iters / steps_per_epoch,
        warmup_lr=cfg.lr * cfg.warmup_ratio, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scheduler.step_update(0)  # apply the warm-up start and the layer lr scales before the first step
    amp_dtype = AMP_DTYPES.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')

    start_epoch, start_batch, step, history, lr_points, best = 0, 0, 0, [], [], None
    if state is not None:
        start_epoch, start_batch, step, history, lr_points, best = resume_training(
            resume_from, state, env, cfg.batch_size, model, optimizer, scheduler, scaler)

    # torchvision's detectors leave heads unused on batches without positives: DDP must allow that
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                          find_unused_parameters=cfg.task == 'detect') if env.distributed else model
    seeded_train = SeededDataset(train_ds, cfg.seed)
    sampler = DistributedSampler(seeded_train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    lr_every = max(1, num_epochs * steps_per_epoch // 1000)
    show = env.is_main and cfg.progress
    if env.is_main:
        _logger.info('training %s on %s (%s): %d classes, %d train / %d val images, %d steps/epoch x %d epochs, '
                     'global batch %d, lr %.3g', cfg.model, cfg.backbone, cfg.data, len(class_names), len(train_ds),
                     len(val_ds), steps_per_epoch, num_epochs, global_batch, cfg.lr)

    def checkpoint(epoch: int, next_batch: int) -> Path:
        snapshot = train_state(model_id, epoch, next_batch, step, env, cfg.batch_size, optimizer, scheduler, scaler,
                               history, lr_points, best)
        return save_checkpoint(run_dir, checkpoint_name(epoch, step),
                               lambda folder: write_task_folder(model, folder, model_config), snapshot,
                               keep=cfg.checkpoint_hist)

    def evaluate() -> dict | None:
        return task.evaluate(model, val_ds, env, amp_dtype=amp_dtype, progress=show, workers=cfg.workers)

    tb = tensorboard_writer(run_dir, env)
    last_eval = None
    for epoch in range(start_epoch, num_epochs):
        seeded_train.epoch = epoch
        sampler.set_epoch(epoch)
        skip = start_batch if epoch == start_epoch else 0
        indices = list(sampler)[skip * cfg.batch_size:micro_per_epoch * cfg.batch_size]
        loader = DataLoader(seeded_train, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                            drop_last=True, collate_fn=task.collate, pin_memory=device.type == 'cuda')
        train_model.train()
        loss_sum, loss_count, t0, seen = 0.0, 0, time.perf_counter(), 0
        bar = tqdm(total=micro_per_epoch, initial=skip, disable=not show, desc=f'epoch {epoch + 1}/{num_epochs}',
                   unit='batch', dynamic_ncols=True)
        for i, batch in enumerate(loader, start=skip):
            seed_all(derive_seed(cfg.seed, env.rank, epoch, i, 1))
            boundary = (i + 1) % cfg.grad_accum_steps == 0
            sync = contextlib.nullcontext() if boundary or not env.distributed else train_model.no_sync()
            try:
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = task.loss(train_model, batch, device)
                    if not env.all_true(bool(torch.isfinite(loss))):
                        last = find_resume_checkpoint(run_dir) if list_checkpoints(run_dir) else None
                        raise diverged(loss, epoch, i, step, optimizer.param_groups[0]['lr'], last)
                    scaler.scale(loss / cfg.grad_accum_steps).backward()
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(f'{cfg.model} on {cfg.backbone}', cfg.batch_size, cfg.grad_accum_steps,
                                    cfg.amp) from None
            loss_sum += loss.item()
            loss_count += 1
            seen += cfg.batch_size * env.world_size
            bar.update(1)
            if not boundary:
                continue
            optimizer_step(optimizer, scaler, model, cfg.clip_grad)
            step += 1
            scheduler.step_update(num_updates=step)
            current_lr = max(g['lr'] for g in optimizer.param_groups)
            if step % lr_every == 0 or step == 1:
                lr_points.append((step, current_lr))
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f'{loss_sum / loss_count:.4f}', lr=f'{current_lr:.2e}', img_s=f'{rate:.1f}')
            if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and i + 1 < micro_per_epoch:
                if env.is_main:
                    checkpoint(epoch, i + 1)
                env.barrier()
        bar.close()
        epoch_time = time.perf_counter() - t0
        row = dict(epoch=epoch, step=step, lr=max(g['lr'] for g in optimizer.param_groups),
                   train_loss=env.all_reduce_mean(loss_sum / max(loss_count, 1)), epoch_time=epoch_time,
                   img_per_sec=seen / max(epoch_time, 1e-9))
        row.update({key: None for _, key, _ in task.columns if key not in row})
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == num_epochs:
            last_eval = evaluate()
            if last_eval is not None:
                row.update({k: v for k, v in last_eval.items() if not isinstance(v, dict)})
        history.append(row)
        if env.is_main:
            _logger.info('epoch %d: %s', epoch + 1, json.dumps(row))
            value = row.get(task.best_metric)
            improved = value is not None and (best is None or value > best['value'])
            if improved:
                best = dict(epoch=epoch, metric=task.best_metric, value=value)
            checkpoint(epoch + 1, 0)
            if improved:
                write_task_folder(model, run_dir / 'best', model_config)
            write_metrics(run_dir, history, lr_points)
            if tb is not None:
                for key, value in row.items():
                    if key != 'epoch' and isinstance(value, (int, float)):
                        tb.add_scalar(key, value, epoch + 1)
                tb.flush()
        env.barrier()

    if tb is not None:
        tb.close()
    final = dict(history[-1]) if history else {}
    if best is not None:
        final.update(best_epoch=best['epoch'], **{f'best_{best["metric"]}': best['value']})
    if env.is_main:
        write_task_folder(model, run_dir / 'last', model_config)
        images = {}
        if cfg.overlays:
            paths = task.overlays(model, val_ds, run_dir / 'overlays', cfg.overlays, device)
            images = {p.stem: p.relative_to(run_dir).as_posix() for p in paths}
        results = dict(final, model=cfg.model, backbone=cfg.backbone, data=str(cfg.data), val_split=cfg.val_split)
        if last_eval is not None:
            results.update(last_eval)
        atomic_write_text(run_dir / 'results.json', json.dumps(results, indent=2, default=str))
        write_report(run_dir, config_dict(cfg), {k: v for k, v in final.items() if not isinstance(v, dict)},
                     title=f'Conv2Former {cfg.task} run ({cfg.model} on {cfg.backbone})', columns=task.columns,
                     metric_curves=task.curves, metric_label=task.metric_label, images=images)
        _logger.info('run folder: %s', run_dir)
    return dict(final, run_dir=str(run_dir))
