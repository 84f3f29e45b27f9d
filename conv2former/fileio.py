"""Everything written to or read from disk as files: atomic writes (a temporary file or folder next to the target,
renamed over it only once complete) and model folders.

A *model folder* holds ``config.json`` + ``model.safetensors`` [+ ``model_ema.safetensors``]. Classifiers use timm's
``local-dir`` layout (``config.json`` from timm's ``save_config_for_hf``, plus ``label_names`` and ``model_args``);
detectors and segmenters a *task folder* (``config.json`` with ``task``, ``model``, ``backbone``, ``class_names``
and what rebuilds the model). A run folder holds ``best/`` and ``last/`` model folders. Weights are only ever read
with safetensors (or, for foreign files, ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from .models import load_state_dict_file, unwrap_state_dict

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
EMA_WEIGHTS_NAME = 'model_ema.safetensors'
# weight files timm's local-dir loader picks before globbing (which could pick model_ema.safetensors instead)
_FOLDER_WEIGHTS = (WEIGHTS_NAME, 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_CLASSIFIER_KEYS = ('head.fc.weight', 'pred.weight')  # ours, upstream


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (parents created); it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')
    return Path(path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open('rb') as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(path) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path``. If the block succeeds, its files are synced to disk and
    it replaces ``path`` (an existing folder is swapped out and deleted only afterwards); otherwise it is removed and
    ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f'cannot write a folder to {path}: it exists and is not a folder')
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f'{os.getpid()}-{secrets.token_hex(4)}'
    tmp = path.parent / f'.{path.name}.tmp-{tag}'
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.parent / f'.{path.name}.old-{tag}'
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after the rename


# ---------------------------------------------------------------------------------------------- model folders
def unwrap_module(model: nn.Module) -> nn.Module:
    """Strip torch.compile and (Distributed)DataParallel wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def write_model_folder(
        model: nn.Module,
        out_dir: str | Path,
        model_args: dict,
        label_names: Sequence[str] | None = None,
        ema_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as a timm ``local-dir`` model folder, atomically.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place; an existing
    ``out_dir`` is replaced only once the new folder is complete. ``config.json`` gets ``model_args`` (constructor
    kwargs that rebuild the architecture) and ``label_names``; ``ema_state_dict`` (same keys as the model) is saved
    as ``model_ema.safetensors``. Returns the folder.
    """
    model = unwrap_module(model)
    out_dir = Path(out_dir)
    num_classes = getattr(model, 'num_classes', None)
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if num_classes is not None and len(label_names) != num_classes:
            raise ValueError(f'{len(label_names)} label_names given for a model with {num_classes} classes')
    ema = None
    if ema_state_dict is not None:
        expected = model.state_dict()
        ema = _cpu_tensors(unwrap_state_dict(ema_state_dict))
        missing = sorted(set(expected) - set(ema))
        unexpected = sorted(set(ema) - set(expected))
        shapes = [k for k in expected if k in ema and ema[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f'ema_state_dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}, '
                f'different shapes {shapes[:8]}')

    with atomic_folder(out_dir) as tmp:
        model_config = dict(label_names=label_names) if label_names else None
        save_config_for_hf(model, str(tmp / CONFIG_NAME), model_config=model_config,
                           model_args=dict(model_args or {}))
        safetensors.torch.save_file(_cpu_tensors(model.state_dict()), str(tmp / WEIGHTS_NAME))
        # make sure the two fields this project reads are at the top level, whatever timm's version does
        cfg_file = tmp / CONFIG_NAME
        cfg = json.loads(cfg_file.read_text())
        cfg['model_args'] = {**json.loads(json.dumps(dict(model_args or {}))), **cfg.get('model_args', {})}
        if label_names:
            cfg['label_names'] = label_names
        cfg_file.write_text(json.dumps(cfg, indent=2))
        if ema is not None:
            safetensors.torch.save_file(ema, str(tmp / EMA_WEIGHTS_NAME))
    return out_dir

def write_task_folder(model: nn.Module, folder: str | Path, config: dict,
                      ema_state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a detector or segmenter, atomically."""
    model = unwrap_module(model)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        safetensors.torch.save_file(_cpu_tensors(model.state_dict()), str(tmp / WEIGHTS_NAME))
        if ema_state_dict is not None:
            safetensors.torch.save_file(_cpu_tensors(unwrap_state_dict(ema_state_dict)), str(tmp / EMA_WEIGHTS_NAME))
    return Path(folder)


def read_task_folder(path: str | Path) -> tuple[dict, dict, Path]:
    """(config, weights, folder) of a task folder, or of a run folder's ``best/`` (else ``last/``) one."""
    folder = find_model_folder(Path(path))
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f'{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}')
    config = json.loads((folder / CONFIG_NAME).read_text())
    return config, safetensors.torch.load_file(str(folder / WEIGHTS_NAME)), folder


def _cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Detached contiguous CPU copies (weights of a channels_last model are strided; safetensors wants contiguous)."""
    return {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}


def find_model_folder(path: Path) -> Path:
    """A model folder, or the ``best/`` (else ``last/``) model folder of a run folder."""
    path = Path(path)
    for folder in (path, path / 'best', path / 'last'):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(
        f'{path} is neither a model folder (no {CONFIG_NAME}) nor a run folder (no best/{CONFIG_NAME} or '
        f'last/{CONFIG_NAME}); expected a folder written by `conv2former train` / `conv2former convert`, '
        f'or a weights file (.safetensors, .pth, .pth.tar) with a model name')


def _drop_state_dict_ref(model: nn.Module) -> None:
    """Release the weights a pretrained_cfg overlay keeps referenced (they are already copied into the model)."""
    for attr in ('pretrained_cfg', 'default_cfg'):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)


def load_classifier_folder(folder: Path, use_ema: bool = False, model_kwargs: dict | None = None,
                           weights: Path | None = None) -> nn.Module:
    """A classifier from a model folder via timm's ``local-dir:`` loader (``use_ema``: its EMA weights instead;
    ``weights``: another weights file, built and preprocessed as the folder's ``config.json`` says)."""
    cfg_file = folder / CONFIG_NAME
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {cfg_file}: {e}') from None
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    if not arch:
        raise ValueError(f'{cfg_file} names no architecture; expected a config.json written by timm save_for_hf')
    if not any((folder / name).is_file() for name in _FOLDER_WEIGHTS):
        raise FileNotFoundError(f'{folder} has {CONFIG_NAME} but no weights: expected {WEIGHTS_NAME}')
    model_kwargs = dict(model_kwargs or {})
    if use_ema:
        weights = folder / EMA_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f'use_ema: {folder} has no {EMA_WEIGHTS_NAME} (the run kept no EMA weights)')
    if weights is not None and Path(weights) != folder / WEIGHTS_NAME:
        # read it like any other weights file (safely, keys and shapes checked by checkpoint_filter_fn)
        overlay = dict(model_kwargs.pop('pretrained_cfg_overlay', None) or {}, source='', file=str(weights))
        model = timm.create_model(f'local-dir:{folder}', pretrained=True, pretrained_cfg_overlay=overlay,
                                  **model_kwargs)
        _drop_state_dict_ref(model)
        return model
    return timm.create_model(f'local-dir:{folder}', pretrained=True, **model_kwargs)


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Classifier outputs of an (unwrapped) checkpoint, ours or upstream layout; 0 when it has no classifier."""
    for key in _CLASSIFIER_KEYS:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 0


def pretrained_overlay(path: str | Path) -> dict:
    """timm ``pretrained_cfg_overlay`` for initial weights: a model folder or a weights file (ours or upstream), read
    without unpickling; its ``num_classes`` lets timm re-initialise a classifier of another size."""
    path = Path(path)
    state_dict = unwrap_state_dict(load_state_dict_file(path / WEIGHTS_NAME if path.is_dir() else path))
    return dict(state_dict=state_dict, num_classes=infer_num_classes(state_dict))
