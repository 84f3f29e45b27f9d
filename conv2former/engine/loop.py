"""The training engine, one loop for every task: ``fit(task)`` sets the run up, runs ``train_one_epoch`` and
``end_epoch`` (evaluation, checkpoint, metric files) per epoch, and ``finish`` writes the final model and report.

Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs). Every random draw
is seeded from (seed, rank, epoch, batch/sample index), so a run resumed from a checkpoint continues bit-for-bit (on
CPU) where it stopped. What differs between tasks (data, model, loss, optimizer groups, metrics, result files)
comes from the task object (``engine.task.Task``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .distributed import DistEnv, cleanup_distributed, init_distributed
from .options import as_dict
from .report import write_report
from .runlock import RunLock
from .runtime import (AMP_DTYPES, Interrupted, RunLog, SeededDataset, StopRequest, TrainingDiverged, derive_seed,
                      diverged, open_run, optimizer_step, out_of_memory, seed_all, start_run, tensorboard_writer,
                      warn_slow_amp, write_metrics, writing)
from .state import TrainState, checkpoint_name, find_resume_checkpoint, list_checkpoints, save_checkpoint
from .task import Task

_logger = logging.getLogger('conv2former.train')


@dataclasses.dataclass
class Run:
    """One training run in progress: the task, where it writes, its data and its training state."""
    task: Any
    env: DistEnv
    run_dir: Path
    train_ds: Dataset
    val_ds: Dataset
    state: TrainState
    train_model: nn.Module  # what the loop calls: compiled and/or DDP-wrapped
    model: nn.Module        # the bare model: saved, evaluated, EMA'd
    seeded_train: SeededDataset
    sampler: DistributedSampler
    steps_per_epoch: int
    num_epochs: int
    amp_dtype: Optional[torch.dtype]
    last_eval: Optional[dict] = None
    tb: Any = None
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)

    @property
    def options(self):
        return self.task.options

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.options.grad_accum_steps

    @property
    def lr_every(self) -> int:
        """Steps between two recorded lr points (about 1000 over the run)."""
        return max(1, self.num_epochs * self.steps_per_epoch // 1000)

    @property
    def show(self) -> bool:
        return self.env.is_main and self.options.progress

    def lr(self) -> float:
        return max(g['lr'] for g in self.state.optimizer.param_groups)


def fit(task: Task) -> dict:
    """Train ``task`` to the end (or on from its ``resume`` checkpoint); returns the final metrics and ``run_dir``."""
    env = init_distributed(task.options.device)
    run_log, run, lock = RunLog(env), None, RunLock()
    try:
        with StopRequest() as stop:
            run = setup(task, env, run_log, lock)
            run.stop = stop
            for epoch in range(run.state.epoch, run.num_epochs):
                row = train_one_epoch(run, epoch)
                end_epoch(run, epoch, row)
                if epoch + 1 < run.num_epochs and _stop_agreed(run):
                    raise interrupted(run)
            return finish(run)
    except RuntimeError:
        if run is None or run.stop.signal is None or not env.distributed:
            raise
        # a peer is gone (torchrun stops the others with SIGTERM): keep what the last completed step left
        if env.is_main:
            checkpoint(run)
        raise interrupted(run) from None
    finally:
        run_log.close()
        lock.release()
        cleanup_distributed()


def _stop_agreed(run: Run) -> bool:
    """Whether any rank got SIGINT / SIGTERM (every rank gets the same answer)."""
    return not run.env.all_true(run.stop.signal is None)


def interrupted(run: Run) -> Interrupted:
    """The exception that ends a run stopped by a signal, its message (logged) naming the resume command."""
    st, name = run.state, run.task.name
    command = f'conv2former {name + " " if name else ""}train --resume {run.run_dir}'
    message = f'interrupted at epoch {st.epoch_number} step {st.step}; resume with: {command}'
    if run.env.is_main:
        _logger.warning(message)
    return Interrupted(message)


def _load_data(task: Task, env: DistEnv) -> tuple[Dataset, Dataset]:
    """The task's datasets; rank 0 extracts (or downloads) first, the others then find them in the cache."""
    if env.is_main:
        train_ds, val_ds = task.datasets()
    env.barrier()
    if not env.is_main:
        train_ds, val_ds = task.datasets()
    if env.is_main:
        task.log_data(train_ds, val_ds)
    return train_ds, val_ds


def _steps_per_epoch(options, num_train: int, world_size: int) -> int:
    global_batch = options.batch_size * options.grad_accum_steps * world_size
    steps = num_train // (options.batch_size * world_size) // options.grad_accum_steps
    if steps < 1:
        raise ValueError(f'{num_train} training images make no full step of global batch {global_batch} '
                         f'(-b {options.batch_size} x {world_size} processes x {options.grad_accum_steps} '
                         f'accumulation): lower -b or --grad-accum-steps')
    return steps


def _prepare_model(task: Task, env: DistEnv, resuming: bool, class_names) -> nn.Module:
    model = task.build_model(class_names, resuming=resuming)
    if task.options.sync_bn:
        if env.device.type != 'cuda':
            raise ValueError('--sync-bn needs CUDA (PyTorch has no CPU SyncBatchNorm); drop it on CPU')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(env.device)


def setup(task: Task, env: DistEnv, run_log: RunLog, lock: RunLock) -> Run:
    """Data, model, optimizer, schedule, scaler, EMA; restore the checkpoint when resuming; then the run folder
    (a setup that fails leaves no folder and never touches an existing run's files). ``lock`` keeps other
    processes out of the run folder until the run ends."""
    o = task.options
    run_dir, resume_from, saved = start_run(o, env, task.model_id, task.run_name, lock)
    warn_slow_amp(o.amp, env.device)
    train_ds, val_ds = _load_data(task, env)
    model = _prepare_model(task, env, saved is not None, train_ds.class_names)
    steps_per_epoch = _steps_per_epoch(o, len(train_ds), env.world_size)
    optimizer = task.optimizer(model, env.world_size)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **task.schedule(steps_per_epoch), step_on_epochs=False,
                                                updates_per_epoch=steps_per_epoch)
    scheduler.step_update(0)  # the warm-up start and the layer-decay lr scales hold from the first step on
    scaler = torch.amp.GradScaler(env.device.type, enabled=o.amp == 'fp16')
    ema = ModelEmaV3(model, decay=task.ema_decay) if task.ema_decay is not None else None
    state = TrainState(model, optimizer, scheduler, scaler, ema)
    if saved is not None:
        state.load(resume_from, saved, env, o.batch_size)
    train_model = model
    if task.compile_backend:
        train_model = torch.compile(model, backend=task.compile_backend)
    if env.distributed:
        # detectors leave heads unused on batches without positives: DDP must allow that where the task says so
        train_model = DistributedDataParallel(
            train_model, device_ids=[env.device.index] if env.device.type == 'cuda' else None,
            find_unused_parameters=task.find_unused_parameters)
    seeded_train = SeededDataset(train_ds, o.seed)
    sampler = DistributedSampler(seeded_train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=o.seed, drop_last=True)
    if env.is_main:
        _logger.info('training %s on %s: %d classes, %d train / %d val images, %d steps/epoch x %d epochs, global '
                     'batch %d, lr %.3g', task.model_id, o.data or 'the bundled dataset (Fashion-MNIST subset)',
                     len(train_ds.class_names), len(train_ds),
                     len(val_ds), steps_per_epoch, num_epochs, o.batch_size * o.grad_accum_steps * env.world_size,
                     max(g.get('initial_lr', g['lr']) for g in optimizer.param_groups))
    open_run(run_dir, o, env, run_log, lock)
    return Run(task, env, run_dir, train_ds, val_ds, state, train_model, model, seeded_train, sampler,
               steps_per_epoch, num_epochs, AMP_DTYPES.get(o.amp), tb=tensorboard_writer(run_dir, env))


def _forward_backward(run: Run, batch, boundary: bool) -> torch.Tensor:
    """Loss of one micro-batch and its backward pass (gradients synchronised across ranks only at a step)."""
    o, env = run.options, run.env
    sync = contextlib.nullcontext() if boundary or not env.distributed else run.train_model.no_sync()
    try:
        with sync:
            with torch.autocast(env.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                loss = run.task.loss(run.train_model, batch, env.device)
            run.state.scaler.scale(loss / o.grad_accum_steps).backward()
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(run.task.run_name, o.batch_size, o.grad_accum_steps, o.amp) from None
    return loss.detach()


def _optimizer_step(run: Run, step_losses: list, epoch: int, batch: int) -> tuple[float, bool]:
    """Check the step's losses are finite on every rank (one host sync per step), then step the optimizer,
    schedule and EMA. Returns the summed loss of the step's micro-batches and whether any rank was asked to stop
    (SIGINT / SIGTERM), agreed in the same collective."""
    st = run.state
    total = float(torch.stack(step_losses).double().sum())
    finite, go_on = run.env.all_true_each(math.isfinite(total), run.stop.signal is None)
    if not finite:
        last = find_resume_checkpoint(run.run_dir) if list_checkpoints(run.run_dir) else None
        raise diverged(torch.tensor(total), epoch, batch, st.step, run.lr(), last)
    optimizer_step(st.optimizer, st.scaler, run.model, run.options.clip_grad)
    st.step += 1
    st.scheduler.step_update(num_updates=st.step)
    if st.ema is not None:
        st.ema.update(run.model, step=st.step)
    if st.step % run.lr_every == 0 or st.step == 1:
        st.lr_points.append((st.step, run.lr()))
    return total, not go_on


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One epoch (from the resume position when resuming): forward/backward per micro-batch, an optimizer step per
    ``grad_accum_steps``, periodic mid-epoch checkpoints. Returns the epoch's metrics row."""
    o, env, st = run.options, run.env, run.state
    run.seeded_train.epoch = epoch
    run.sampler.set_epoch(epoch)
    skip = st.next_batch if epoch == st.epoch else 0
    indices = list(run.sampler)[skip * o.batch_size:run.micro_per_epoch * o.batch_size]
    workers = 0 if run.seeded_train.batched else o.workers
    loader = DataLoader(run.seeded_train, batch_size=o.batch_size, sampler=indices, num_workers=workers,
                        drop_last=True, collate_fn=run.task.collate, pin_memory=env.device.type == 'cuda')
    run.train_model.train()
    loss_sum, loss_count, seen = st.epoch_loss if skip else (0.0, 0, 0)
    t0, images_now, step_losses = time.perf_counter(), 0, []
    bar = tqdm(total=run.micro_per_epoch, initial=skip, disable=not run.show, unit='batch', dynamic_ncols=True,
               desc=f'epoch {epoch + 1}/{run.num_epochs}')
    for i, batch in enumerate(loader, start=skip):
        seed_all(derive_seed(o.seed, env.rank, epoch, i, 1))
        boundary = (i + 1) % o.grad_accum_steps == 0
        step_losses.append(_forward_backward(run, batch, boundary))
        images_now += o.batch_size * env.world_size
        bar.update(1)
        if not boundary:
            continue
        total, stop = _optimizer_step(run, step_losses, epoch, i)
        loss_sum, loss_count, step_losses = loss_sum + total, loss_count + len(step_losses), []
        st.epoch, st.next_batch, st.epoch_loss = epoch, i + 1, (loss_sum, loss_count, seen + images_now)
        rate = images_now / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f'{loss_sum / loss_count:.4f}', lr=f'{run.lr():.2e}', img_s=f'{rate:.1f}')
        periodic = o.checkpoint_steps and st.step % o.checkpoint_steps == 0 and i + 1 < run.micro_per_epoch
        if periodic or stop:
            if env.is_main:
                checkpoint(run)
            env.barrier()
        if stop:
            bar.close()
            raise interrupted(run)
    bar.close()
    epoch_time = time.perf_counter() - t0
    return dict(epoch=epoch + 1, step=st.step, lr=run.lr(),
                train_loss=env.all_reduce_mean(loss_sum / max(loss_count, 1)),
                epoch_time=epoch_time, img_per_sec=images_now / max(epoch_time, 1e-9))


def checkpoint(run: Run) -> Path:
    """Write the training state as a checkpoint at its current position (rank 0 only)."""
    st = run.state
    ema = st.ema.module.state_dict() if st.ema is not None else None
    with writing(run.run_dir):
        return save_checkpoint(run.run_dir, checkpoint_name(st.epoch_number, st.step),
                               lambda folder: run.task.write_model(run.model, folder, ema),
                               st.state_dict(run.task.model_id, run.env, run.options.batch_size),
                               keep=run.options.checkpoint_hist)


def _check_finite(run: Run, epoch: int, row: dict) -> None:
    """Stop the run, as a non-finite training loss does, when the evaluation's loss / metric or the weights are not
    finite: such an epoch is never checkpointed or kept as the best."""
    bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)
           and (k == run.task.best_metric or 'loss' in k)}
    weights_finite = all(bool(torch.isfinite(p).all()) for p in run.model.parameters())
    if not run.env.all_true(not bad and weights_finite):  # every rank stops, whichever found it
        what = ', '.join(f'{k} {v}' for k, v in bad.items()) or (
            'the weights hold NaN or inf' if not weights_finite else 'another rank found NaN or inf')
        last = list_checkpoints(run.run_dir)
        raise TrainingDiverged(
            f'{what} at the end of epoch {epoch + 1} (step {run.state.step}, lr {run.lr():.3g}); last good '
            f'checkpoint: {last[-1] if last else "none yet"}. Try a lower --lr/--blr, --clip-grad 1.0, or --amp bf16 '
            f'instead of fp16.')


def evaluate(run: Run, model: nn.Module, progress: bool) -> Optional[dict]:
    """The task's metrics of ``model`` on the validation set (None on ranks > 0 for tasks that gather to rank 0)."""
    return run.task.evaluate(model, run.val_ds, run.env, amp_dtype=run.amp_dtype, progress=progress)


def end_epoch(run: Run, epoch: int, row: dict) -> None:
    """Evaluate (every ``eval_every`` epochs and at the end), keep the best model, checkpoint, write metrics."""
    task, st, env = run.task, run.state, run.env
    row.update({key: None for _, key, _ in task.columns or () if key not in row})
    if (epoch + 1) % run.options.eval_every == 0 or epoch + 1 == run.num_epochs:
        run.last_eval = evaluate(run, run.model, run.show)
        if run.last_eval is not None:
            row.update({k: v for k, v in run.last_eval.items() if v is None or isinstance(v, (int, float))})
        if st.ema is not None:
            ema_eval = evaluate(run, st.ema.module, False)
            row[task.ema_metric] = ema_eval[task.best_metric] if ema_eval else None
    _check_finite(run, epoch, row)
    st.history.append(row)
    st.epoch, st.next_batch, st.epoch_loss = epoch + 1, 0, (0.0, 0, 0)
    if env.is_main:
        _logger.info('epoch %d: %s', epoch + 1, json.dumps(row))
        value = row.get(task.best_metric)
        improved = value is not None and math.isfinite(value) and (st.best is None or value > st.best['value'])
        if improved:  # best/ before the checkpoint: a crash in between repeats the epoch, which writes it again
            st.best = dict(epoch=epoch + 1, metric=task.best_metric, value=value)
            with writing(run.run_dir):
                task.write_model(run.model, run.run_dir / 'best',
                                 st.ema.module.state_dict() if st.ema is not None else None)
        last = checkpoint(run)
        with writing(run.run_dir, last):
            write_metrics(run.run_dir, st.history, st.lr_points)
        if run.tb is not None:
            for key, value in row.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    run.tb.add_scalar(key, value, epoch + 1)
            run.tb.flush()
    env.barrier()


def finish(run: Run) -> dict:
    """Write ``last/``, the task's result files and ``report.md``; returns the final metrics with ``run_dir``."""
    task, st = run.task, run.state
    if run.tb is not None:
        run.tb.close()
    task.merge_data_counts(run.env)  # datasets that count skipped files per rank merge the counts
    final = dict(st.history[-1]) if st.history else {}
    if st.best is not None:
        final.update(best_epoch=st.best['epoch'], **{task.best_key: st.best['value']})
    if run.env.is_main:
        with writing(run.run_dir):
            write_metrics(run.run_dir, st.history, st.lr_points)  # again: a crash may have come right before them
            task.write_model(run.model, run.run_dir / 'last',
                             st.ema.module.state_dict() if st.ema is not None else None)
            images = task.finish(run.model, run.val_ds, run.run_dir, final, run.last_eval)
            write_report(run.run_dir, as_dict(task.options),
                         {k: v for k, v in final.items() if not isinstance(v, dict)}, title=task.title,
                         columns=task.columns, metric_curves=task.curves, metric_label=task.metric_label,
                         images=images)
        _logger.info('run folder: %s', run.run_dir)
    return dict(final, run_dir=str(run.run_dir))
