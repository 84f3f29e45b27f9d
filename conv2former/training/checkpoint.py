"""Training checkpoints: a model folder (timm local-dir: config.json + model.safetensors [+ model_ema.safetensors])
plus ``train_state.pt`` (optimizer, scheduler, scaler, position, RNG, history), written atomically.

A checkpoint is built in a temporary folder and renamed into place, so a crash while writing never leaves a
half-written checkpoint that ``--resume`` would trust; the previous checkpoints stay untouched.
"""
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

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
    """Write ``run_dir/checkpoints/<name>`` atomically and keep only the newest ``keep`` checkpoints.

    ``write_model(folder)`` writes the model folder (classifier: ``inference.write_model_folder``; detector or
    segmenter: ``tasks.engine.write_task_folder``) into a temporary folder that becomes the checkpoint.
    """
    final = run_dir / CHECKPOINTS / name
    tmp = final.with_name(f'.{name}.tmp-{os.getpid()}')
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model(tmp)
    torch.save(train_state, tmp / STATE_FILE)
    if final.exists():  # re-saving the same position (e.g. after a resume): swap, never leave a gap in between
        stale = final.with_name(f'.{name}.stale-{os.getpid()}')
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: tuple(int(g) for g in _NAME.match(p.name).groups()))


def find_resume_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(
            f'--resume {path}: no complete checkpoint there (expected a run folder with {CHECKPOINTS}/epoch-*-step-*/'
            f'{STATE_FILE}, or such a checkpoint folder)')
    return checkpoints[-1]


def load_train_state(checkpoint_dir: Path) -> dict:
    """The training state, read with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location='cpu', weights_only=True)
