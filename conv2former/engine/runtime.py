"""Run machinery shared by every trainer (classification, detection, segmentation): seeding, run-folder logging and
metric files, TensorBoard, and the messages for a diverged loss or a CUDA out-of-memory error."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import signal
import sys
import threading
from datetime import datetime
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

import yaml

from ..fileio import StorageError, atomic_write_text, folder_problems
from .distributed import DistEnv
from .options import as_dict
from .runlock import RunFolderBusy, RunLock
from .state import STATE_FILE, find_resume_checkpoint, list_checkpoints, load_train_state

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def warn_slow_amp(amp: Optional[str], device: torch.device) -> None:
    """Warn that float16 autocast on a CPU is emulated (several times slower than float32)."""
    if amp == 'fp16' and torch.device(device).type == 'cpu':
        logging.getLogger('conv2former').warning(
            '--amp fp16 on CPU is emulated and several times slower than fp32; drop --amp (or use --amp bf16) on CPU')


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint; the message says how to resume it."""


class StopRequest:
    """While active (a ``with`` block in the main thread): the first SIGINT / SIGTERM only sets ``signal`` (the loop
    checkpoints and stops at the end of the current step); a second one aborts the process at once (exit 130)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> 'StopRequest':
        self._pid = os.getpid()  # forked data-loader workers inherit the handler: they leave the decision to us
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.signal is not None:
            print(f'\n{signal.Signals(signum).name} again: aborting now (the last checkpoint is kept)', file=sys.stderr,
                  flush=True)
            os._exit(130)
        self.signal = signum
        logging.getLogger('conv2former.train').warning(
            '%s received: stopping after the current step with a checkpoint (again to abort at once)',
            signal.Signals(signum).name)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (seed, rank, epoch, index, ...): independent streams per combination."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def seed_cpu(seed: int) -> None:
    """The CPU generators (Python, NumPy, torch's default generator): what a sample's transform draws from.
    ``torch.manual_seed`` also queues the accelerators' seeding, recording a stack trace each time in CUDA builds of
    torch (140 us on this machine, against 1 us): once per sample that was 15% of the data path."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


def seed_all(seed: int) -> None:
    """Every generator: the CPU's (``seed_cpu``) and the accelerators' (``torch.manual_seed``)."""
    seed_cpu(seed)
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Seeds every RNG per (seed, epoch, index) before the transform: augmentation is the same whatever the
    number of workers, and after a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_cpu(derive_seed(self.seed, self.epoch, index))
        return self.dataset[index]

    @property
    def batched(self) -> bool:
        """Batches are one gather from memory (the tensor cache): loaded in the training process, since worker
        processes would add more inter-process copying than they take off it."""
        return getattr(self.dataset, 'batched', False)

    def __getitems__(self, indices: list):
        """A whole batch at once from datasets that draw no random numbers (``batched = True``, e.g. the tensor
        cache: its collate passes the batch through); else the samples one by one, each seeded."""
        if self.batched:
            return self.dataset.__getitems__(indices)
        return [self[i] for i in indices]


def write_metrics(run_dir: Path, history: list, lr_points: list) -> None:
    """``metrics.jsonl`` / ``metrics.csv`` (one row per epoch) and ``lr_schedule.jsonl``, each written atomically."""
    atomic_write_text(run_dir / 'metrics.jsonl', ''.join(json.dumps(row) + '\n' for row in history))
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[-1]), extrasaction='ignore')
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(run_dir / 'metrics.csv', buf.getvalue())
    lr_lines = ''.join(json.dumps(dict(step=s, lr=lr)) + '\n' for s, lr in lr_points)
    atomic_write_text(run_dir / 'lr_schedule.jsonl', lr_lines)


def tensorboard_writer(run_dir: Path, env: DistEnv):
    """A TensorBoard writer on rank 0 when the tensorboard package is installed, else None."""
    if not env.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / 'tensorboard'))


class RunLog:
    """The run's ``log.txt`` (rank 0): records are held in memory while the run is set up and written once its
    folder is (``open``), so a start that fails leaves no file behind; ``close`` detaches it."""

    def __init__(self, env: DistEnv):
        self.root = logging.getLogger('conv2former')
        self.root.setLevel(logging.INFO)
        self.memory = MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1) if env.is_main else None
        self.file = None
        if self.memory is not None:
            self.root.addHandler(self.memory)

    def open(self, run_dir: Path) -> None:
        """Append to ``run_dir/log.txt`` from now on, starting with the records held so far."""
        if self.memory is None:
            return
        self.file = logging.FileHandler(run_dir / 'log.txt')
        self.file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
        self.memory.setTarget(self.file)
        self.memory.flush()
        self.root.removeHandler(self.memory)
        self.root.addHandler(self.file)

    def close(self) -> None:
        for handler in (self.memory, self.file):
            if handler is not None:
                self.root.removeHandler(handler)
                handler.close()


def diverged(loss: torch.Tensor, epoch: int, batch: int, step: int, lr: float,
             last_checkpoint: Optional[Path]) -> TrainingDiverged:
    return TrainingDiverged(
        f'loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}, step {step} (lr {lr:.3g}); last good '
        f'checkpoint: {last_checkpoint or "none yet"}. Try a lower --lr/--blr, --clip-grad 1.0, or --amp bf16 '
        f'instead of fp16.')


def out_of_memory(what: str, batch_size: int, grad_accum_steps: int, amp: Optional[str]) -> RuntimeError:
    return RuntimeError(
        f'CUDA out of memory at batch size {batch_size} per process ({what}, amp={amp}). Try -b '
        f'{max(1, batch_size // 2)} --grad-accum-steps {grad_accum_steps * 2} (same global batch), '
        f'--grad-checkpointing, --amp bf16.')


def find_run(resume) -> tuple[Path, Optional[dict]]:
    """(run folder, the run's saved options or None) of ``--resume RUN`` (a run folder or one of its checkpoints)."""
    path = Path(resume)
    run_dir = path.parent.parent if (path / STATE_FILE).is_file() else path  # <run>/checkpoints/<name>
    if not list_checkpoints(run_dir):
        find_resume_checkpoint(path)  # raises the error that says what a resumable folder holds
    config = run_dir / 'config.yaml'
    return run_dir, yaml.safe_load(config.read_text()) if config.is_file() else None


def _lock(lock: RunLock, run_dir: Path, env: DistEnv) -> None:
    """Rank 0 takes the run folder's lock; every rank fails if it cannot."""
    error = None
    if env.is_main:
        try:
            lock.acquire(run_dir)
        except RunFolderBusy as e:
            error = e
    if not env.all_true(error is None):
        raise error or RunFolderBusy(f'{run_dir} is in use by another run (refused on rank 0)')
    lock.run_dir = run_dir  # on every rank: the folder is taken


def start_run(options, env: DistEnv, model_id: str, default_name: str, lock: RunLock
              ) -> tuple[Path, Optional[Path], Optional[dict]]:
    """Resolve the run folder (``resume`` or ``output/experiment``, else ``default_name-<date>-<time>``), take its
    lock when it exists, refuse to overwrite a run or to resume another model's, seed. Nothing is written yet (see
    ``open_run``). Returns (run folder, checkpoint resumed from or None, its training state or None)."""
    if options.resume:
        run_dir, _ = find_run(options.resume)
        with writing(run_dir, None):
            _lock(lock, run_dir, env)
        resume_from = find_resume_checkpoint(options.resume)
        for folder in (run_dir / 'best', run_dir / 'last'):
            problems = folder_problems(folder) if folder.is_dir() else []
            if problems:
                logging.getLogger('conv2former.train').warning(
                    '%s; %s/ is written again when %s', problems[0], folder.name,
                    'an epoch beats the best so far' if folder.name == 'best' else 'the run ends')
        state = load_train_state(resume_from)
        if state['model'] != model_id:
            raise ValueError(f'--resume {resume_from} is a {state["model"]} run, but this run is {model_id}')
    else:
        resume_from, state = None, None
        run_dir = Path(options.output) / (options.experiment or f'{default_name}-{datetime.now():%Y%m%d-%H%M%S}')
        if run_dir.is_dir():
            with writing(run_dir, None):
                _lock(lock, run_dir, env)
        _refuse_existing(run_dir)
    seed_all(derive_seed(options.seed, env.rank))
    return run_dir, resume_from, state


def _refuse_existing(run_dir: Path) -> None:
    if list_checkpoints(run_dir):
        raise ValueError(f'{run_dir} already holds a run: continue it with --resume {run_dir}, or choose another '
                         f'--experiment / --output')


def open_run(run_dir: Path, options, env: DistEnv, run_log: RunLog, lock: RunLock) -> None:
    """Once the run is set up: create its folder (and take its lock), write ``config.yaml`` (what runs) and start
    ``log.txt``."""
    with writing(run_dir, None):
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if lock.run_dir is None:
            _lock(lock, run_dir, env)
            if not options.resume:  # another run may have started and checkpointed here since start_run looked
                _refuse_existing(run_dir)
        if env.is_main:
            atomic_write_text(run_dir / 'config.yaml', yaml.safe_dump(as_dict(options), sort_keys=True))
            run_log.open(run_dir)
    env.barrier()


def _written_path(path: Path) -> str:
    """The path a write was for: ``<dir>/.<name>.tmp-<tag>/<file>`` (an atomic write's temporary folder, removed
    after a failure) is reported as ``<dir>/<name> (<file>)``."""
    parts = list(path.parts)
    for i, part in enumerate(parts):
        if part.startswith('.') and '.tmp-' in part:
            inner = Path(*parts[i + 1:]).name if i + 1 < len(parts) else ''
            final = Path(*parts[:i]) / part.lstrip('.').split('.tmp-')[0]
            return f'{final} ({inner})' if inner else str(final)
    return str(path)


@contextlib.contextmanager
def writing(run_dir: Path, last_checkpoint: Optional[Path] = None):
    """Turn an OSError of a write in the block (read-only or full disk, permissions) into one ``StorageError``
    line that names the path, the OS error, the last good checkpoint and how to go on."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        path = _written_path(Path(e.filename)) if e.filename else run_dir
        reason = e.strerror or str(e) or type(e).__name__
        last = last_checkpoint or (list_checkpoints(run_dir) or [None])[-1]
        then = (f'the last good checkpoint, {last}, is intact: make room or fix permissions, then resume with '
                f'--resume {run_dir}' if last else 'no checkpoint was written yet')
        raise StorageError(f'cannot write {path}: {reason}; {then}') from None


def optimizer_step(optimizer, scaler, model: torch.nn.Module, clip_grad: Optional[float]) -> None:
    """Unscale and clip (if asked), step through the grad scaler, zero the gradients."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
