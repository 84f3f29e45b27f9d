"""The training state as one object, and its checkpoints: a model folder (config.json + model.safetensors
[+ model_ema.safetensors]) plus ``train_state.pt`` (optimizer, scheduler, scaler, position, RNG, history), written
atomically.

A checkpoint is built in a temporary folder and renamed into place, so a crash while writing never leaves a
half-written checkpoint that ``--resume`` would trust; the previous checkpoints stay untouched.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from timm.scheduler import PlateauLRScheduler

from ..fileio import MANIFEST_NAME, DamagedFileError, atomic_folder, folder_problems, require_intact, save_torch
from .distributed import DistEnv

STATE_FILE = 'train_state.pt'
CHECKPOINTS = 'checkpoints'
_NAME = re.compile(r'^epoch-(\d+)-step-(\d+)$')


def checkpoint_name(epoch: int, step: int) -> str:
    return f'epoch-{epoch:04d}-step-{step:08d}'


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        python=random.getstate(),
        numpy=dict(keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                   has_gauss=int(np_state[3]), gauss=float(np_state[4])),
    )
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(
        run_dir: Path,
        name: str,
        write_model: Callable[[Path], object],
        train_state: dict,
        keep: int = 3,
) -> Path:
    """Write ``run_dir/checkpoints/<name>`` atomically (``fileio.atomic_folder``: a manifest of sizes and hashes,
    then one rename) and keep only the newest ``keep`` checkpoints.

    ``write_model(folder)`` writes the model folder (the task's ``write_model``) into the temporary folder that
    becomes the checkpoint; it must not write a manifest of its own (``manifest=False`` inside).
    """
    final = run_dir / CHECKPOINTS / name
    with atomic_folder(final) as tmp:
        write_model(tmp)
        (tmp / MANIFEST_NAME).unlink(missing_ok=True)  # the checkpoint's manifest covers train_state.pt too
        save_torch(train_state, tmp / STATE_FILE)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_position)


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epoch, step) of a checkpoint folder's name."""
    return tuple(int(g) for g in _NAME.match(Path(path).name).groups())


def find_resume_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest intact checkpoint of a run folder. Damaged checkpoints (a file truncated
    or changed since it was written) are passed over with a warning that says what falling back costs."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        require_intact(path)
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(
            f'--resume {path}: no complete checkpoint there (expected a run folder with {CHECKPOINTS}/epoch-*-step-*/'
            f'{STATE_FILE}, or such a checkpoint folder)')
    damaged = []
    for checkpoint in reversed(checkpoints):
        problems = folder_problems(checkpoint)
        if not problems:
            break
        damaged.append((checkpoint, problems[0]))
    else:
        raise DamagedFileError(f'--resume {path}: every checkpoint is damaged: ' +
                               '; '.join(problem for _, problem in damaged))
    if damaged:
        lost = checkpoint_position(damaged[0][0])[1] - checkpoint_position(checkpoint)[1]
        logging.getLogger('conv2former.train').warning(
            'skipping %d damaged checkpoint(s): %s; resuming from %s instead, which repeats %d optimizer step(s)',
            len(damaged), '; '.join(problem for _, problem in damaged), checkpoint.name, lost)
    return checkpoint


def load_train_state(checkpoint_dir: Path) -> dict:
    """The training state, read with ``weights_only=True`` (tensors and plain containers only)."""
    file = Path(checkpoint_dir) / STATE_FILE
    try:
        return torch.load(file, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFileError(f'{file} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else e!r})') \
            from None


def _load_weights(file: Path, device) -> dict:
    try:
        return load_file(str(file), device=str(device))
    except Exception as e:  # noqa: BLE001 - SafetensorError
        raise DamagedFileError(f'{file} is truncated or corrupt ({e})') from None


@dataclasses.dataclass
class TrainState:
    """Everything a run needs to continue bit-for-bit: the model, optimizer, scheduler, grad scaler and EMA, the
    position (epoch, next micro-batch, optimizer step), the loss accumulated so far in the current epoch, the
    history and the best result. ``state_dict``/``load`` save and restore it as a whole (with the RNG states)."""
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    ema: Any = None
    epoch: int = 0
    next_batch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    lr_points: list = dataclasses.field(default_factory=list)
    best: Optional[dict] = None
    epoch_loss: tuple = (0.0, 0, 0)  # (sum, micro-batches, images) of the epoch in progress

    @property
    def epoch_number(self) -> int:
        """The 1-based epoch of the current position, as logs, metrics and checkpoint names count: the epoch in
        progress mid-epoch, else the last one finished."""
        return self.epoch + 1 if self.next_batch else self.epoch

    def state_dict(self, model_id: str, env: DistEnv, batch_size: int) -> dict:
        """The ``train_state.pt`` payload (tensors and plain containers only; the weights go to the model folder)."""
        return dict(model=model_id, epoch=self.epoch, next_batch=self.next_batch, step=self.step,
                    world_size=env.world_size, batch_size=batch_size, optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), history=self.history,
                    lr_points=[list(p) for p in self.lr_points], best=self.best, epoch_loss=list(self.epoch_loss),
                    rng=rng_state())

    def load(self, checkpoint: Path, state: dict, env: DistEnv, batch_size: int) -> None:
        """Restore weights (and EMA weights), optimizer, scheduler, scaler, position and RNG from a checkpoint; a
        mid-epoch checkpoint only into the same processes x batch size."""
        if state['next_batch'] and (state['world_size'], state['batch_size']) != (env.world_size, batch_size):
            raise ValueError(
                f'{checkpoint} stopped mid-epoch with {state["world_size"]} processes x -b {state["batch_size"]}; '
                f'resume it with the same (got {env.world_size} x {batch_size}) or from an epoch-end checkpoint')
        self.model.load_state_dict(_load_weights(checkpoint / 'model.safetensors', env.device))
        ema_file = checkpoint / 'model_ema.safetensors'
        if self.ema is not None and ema_file.is_file():
            self.ema.module.load_state_dict(_load_weights(ema_file, env.device))
        self.optimizer.load_state_dict(state['optimizer'])
        if isinstance(self.scheduler, PlateauLRScheduler):  # the one schedule whose state is progress
            self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        set_rng_state(state['rng'])
        self.epoch, self.next_batch, self.step = state['epoch'], state['next_batch'], state['step']
        # the others are functions of the step, built from this run's options (--epochs may have grown): the learning
        # rate of the next step follows the schedule as it stands now, as timm's train.py rebuilds it on resume
        self.scheduler.step_update(self.step)
        self.history, self.best = state['history'], state['best']
        if self.best is not None and 'value' not in self.best:  # classification checkpoints before the engine
            self.best = dict(epoch=self.best['epoch'], metric='val_top1', value=self.best['val_top1'])
        self.lr_points = [tuple(p) for p in state['lr_points']]
        loss = state.get('epoch_loss')  # absent in checkpoints written before it was recorded
        self.epoch_loss = tuple(loss) if loss and self.next_batch else (0.0, 0, 0)
        logging.getLogger('conv2former.train').info('resumed from %s: epoch %d, batch %d, step %d done', checkpoint,
                                                    self.epoch_number, self.next_batch, self.step)
