"""Everything written to or read from disk as files: atomic writes (a temporary file or folder next to the target,
renamed over it only once complete) and model folders.

A *model folder* holds ``config.json`` + ``model.safetensors`` [+ ``model_ema.safetensors``]. Classifiers use timm's
``local-dir`` layout (``config.json`` from timm's ``save_config_for_hf``, plus ``label_names`` and ``model_args``);
detectors and segmenters a *task folder* (``config.json`` with ``task``, ``model``, ``backbone``, ``class_names``
and what rebuilds the model). A run folder holds ``best/`` and ``last/`` model folders. Weights are only ever read
with safetensors (or, for foreign files, ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models._hub import load_model_config_from_path, save_config_for_hf

from .models import load_state_dict_file, unwrap_state_dict

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
MANIFEST_NAME = 'manifest.json'  # size and sha256 of every other file of a folder, written last
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


class StorageError(OSError):
    """Writing failed (read-only or full disk, permissions): the message names the path and the OS error."""


class DamagedFileError(ValueError):
    """A file of a checkpoint or model folder is truncated or corrupt."""


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's own I/O, so a full disk is an OSError naming errno 28."""
    try:
        with open(path, 'wb') as f:
            f.write(data)
    except OSError as e:  # a failed write() names no file: name it
        raise OSError(e.errno, e.strerror, str(path)) from None


def save_tensors(tensors: Mapping[str, torch.Tensor], path) -> None:
    """safetensors file of ``tensors`` (serialised in memory, then written: see ``write_bytes``)."""
    write_bytes(path, safetensors.torch.save(dict(tensors)))


def save_torch(obj, path) -> None:
    """``torch.save`` of ``obj`` (in memory first: torch's own writer reports a full disk as 'basic_ios::clear')."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and sha256 of every file in ``folder`` (not recursive)."""
    files = {p.name: dict(bytes=p.stat().st_size, sha256=_sha256(p))
             for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(dict(format=1, files=files), indent=1))


def _structure_problem(path: Path) -> str | None:
    """Why a safetensors or torch zip file without a manifest entry cannot be whole (cheap checks), or None."""
    size = path.stat().st_size
    if path.suffix == '.safetensors':
        with path.open('rb') as f:
            head = f.read(8)
            if len(head) < 8:
                return f'{size} bytes, shorter than a safetensors header'
            n = struct.unpack('<Q', head)[0]
            try:
                header = json.loads(f.read(n)) if n < size else None
            except ValueError:
                header = None
        if header is None:
            return f'safetensors header unreadable ({size} bytes)'
        end = 8 + n + max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
        if size < end:
            return f'{size} of {end} bytes'
    elif path.suffix in ('.pt', '.pth', '.tar') and not zipfile.is_zipfile(path):
        return f'not a complete torch archive ({size} bytes)'
    return None


def folder_problems(folder: Path, names=None) -> list[str]:
    """What is wrong with the files of ``folder`` (``names``: only these), one line each; empty if intact.

    A folder with a ``manifest.json`` is checked against it (missing file, size, sha256); older folders without one
    get a structural check of their safetensors / torch files."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    try:
        files = json.loads(manifest.read_text())['files'] if manifest.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return [f'{manifest} is unreadable']
    problems = []
    if files is None:
        for path in sorted(folder.glob('*')):
            if (names is None or path.name in names) and path.is_file():
                problem = _structure_problem(path)
                if problem:
                    problems.append(f'{path} is truncated or corrupt ({problem})')
        return problems
    for name, expected in files.items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f'{path} is missing')
            continue
        size = path.stat().st_size
        if size != expected['bytes']:
            problems.append(f'{path} is truncated or corrupt ({size} of {expected["bytes"]} bytes)')
        elif _sha256(path) != expected['sha256']:
            problems.append(f'{path} is truncated or corrupt (its sha256 differs from the one recorded when written)')
    return problems


def _intact_alternative(folder: Path, names) -> Path | None:
    """The nearest intact copy of a run's model folder: for ``best/`` or ``last/`` the other one, then the run's
    checkpoints (newest first); for a checkpoint, the older checkpoints, then ``last/``."""
    folder = Path(folder)
    run = folder.parent.parent if folder.parent.name == 'checkpoints' else folder.parent
    checkpoints = sorted((run / 'checkpoints').glob('epoch-*-step-*'), reverse=True)
    candidates = [run / 'last', run / 'best'] + checkpoints if folder.parent.name != 'checkpoints' else \
        [c for c in checkpoints if c.name < folder.name] + [run / 'last']
    for candidate in candidates:
        if candidate != folder and (candidate / CONFIG_NAME).is_file() and not folder_problems(candidate, names):
            return candidate
    return None


def require_intact(folder: Path, names=None) -> None:
    """Raise ``DamagedFileError`` naming the damaged file (and an intact copy of the run's weights, if there is
    one) when ``folder`` fails ``folder_problems``."""
    problems = folder_problems(folder, names)
    if problems:
        alternative = _intact_alternative(folder, names)
        more = f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''
        hint = (f'; intact weights of the same run (possibly of another epoch): {alternative}' if alternative else
                '; no intact copy found beside it')
        raise DamagedFileError(f'{problems[0]}{more}{hint}')


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
def atomic_folder(path, manifest: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path``. If the block succeeds, a ``manifest.json`` (sizes and
    hashes, see ``folder_problems``) is added, its files are synced to disk and it replaces ``path`` (an existing
    folder is swapped out and deleted only afterwards); otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f'cannot write a folder to {path}: it exists and is not a folder')
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f'{os.getpid()}-{secrets.token_hex(4)}'
    tmp = path.parent / f'.{path.name}.tmp-{tag}'
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
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


def remove_partial_writes(folder: Path) -> list[Path]:
    """Clean up after writes that a crash interrupted, in ``folder``: temporary ``.<name>.tmp-*`` folders and
    ``.<name>.<pid>.<hex>.tmp`` files are removed; a ``.<name>.old-*`` folder is put back when ``<name>`` is
    missing (the crash fell between the two renames of a swap), else removed. Only call this while no other
    process writes there. Returns what was removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith('.'):
            continue
        if '.tmp-' in name or (name.endswith('.tmp') and entry.is_file()):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        elif '.old-' in name or '.stale-' in name:
            target = folder / name[1:].rsplit('.old-' if '.old-' in name else '.stale-', 1)[0]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, target)
        else:
            continue
        touched.append(entry)
    return touched


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


# constructor keywords that belong to a run, not to the architecture a model folder rebuilds
RUN_ONLY_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'drop_rate', 'drop_path_rate')


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

    model_args = {k: v for k, v in (model_args or {}).items() if k not in RUN_ONLY_KWARGS}
    with atomic_folder(out_dir) as tmp:
        model_config = dict(label_names=label_names) if label_names else None
        save_config_for_hf(model, str(tmp / CONFIG_NAME), model_config=model_config,
                           model_args=dict(model_args or {}))
        save_tensors(_cpu_tensors(model.state_dict()), tmp / WEIGHTS_NAME)
        # make sure the two fields this project reads are at the top level, whatever timm's version does
        cfg_file = tmp / CONFIG_NAME
        cfg = json.loads(cfg_file.read_text())
        cfg['model_args'] = {**json.loads(json.dumps(dict(model_args or {}))), **cfg.get('model_args', {})}
        if label_names:
            cfg['label_names'] = label_names
        cfg_file.write_text(json.dumps(cfg, indent=2))
        if ema is not None:
            save_tensors(ema, tmp / EMA_WEIGHTS_NAME)
    return out_dir

def write_task_folder(model: nn.Module, folder: str | Path, config: dict,
                      ema_state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a detector or segmenter, atomically."""
    model = unwrap_module(model)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_tensors(_cpu_tensors(model.state_dict()), tmp / WEIGHTS_NAME)
        if ema_state_dict is not None:
            save_tensors(_cpu_tensors(unwrap_state_dict(ema_state_dict)), tmp / EMA_WEIGHTS_NAME)
    return Path(folder)


def read_task_folder(path: str | Path) -> tuple[dict, dict, Path]:
    """(config, weights, folder) of a task folder, or of a run folder's ``best/`` (else ``last/``) one."""
    folder = find_model_folder(Path(path))
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f'{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}')
    require_intact(folder, (CONFIG_NAME, WEIGHTS_NAME))
    config = json.loads((folder / CONFIG_NAME).read_text())
    return config, load_state_dict_file(folder / WEIGHTS_NAME), folder


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


def drop_state_dict_ref(model: nn.Module) -> None:
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
    if weights is None or Path(weights).parent == folder:
        require_intact(folder, (CONFIG_NAME, Path(weights).name if weights is not None else WEIGHTS_NAME))
    if 'pretrained_cfg_overlay' in (cfg.get('model_args') or {}):
        return _load_folder_with_overlay_arg(folder, weights, model_kwargs)
    if weights is not None and Path(weights) != folder / WEIGHTS_NAME:
        # read it like any other weights file (safely, keys and shapes checked by checkpoint_filter_fn)
        overlay = dict(model_kwargs.pop('pretrained_cfg_overlay', None) or {}, source='', file=str(weights))
        model = timm.create_model(f'local-dir:{folder}', pretrained=True, pretrained_cfg_overlay=overlay,
                                  **model_kwargs)
        drop_state_dict_ref(model)
        return model
    return timm.create_model(f'local-dir:{folder}', pretrained=True, **model_kwargs)


def _load_folder_with_overlay_arg(folder: Path, weights: Path | None, model_kwargs: dict) -> nn.Module:
    """Folders written before model_args were filtered hold the run's ``pretrained_cfg_overlay`` keyword among them
    (e.g. a ConvNeXt baseline trained with ``crop_pct``); timm's ``local-dir:`` loader would pass it twice. Built
    from the same config here, the overlay folded into the pretrained cfg."""
    pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
    pretrained_cfg = dict(pretrained_cfg, **(model_args.pop('pretrained_cfg_overlay') or {}))
    if weights is not None:
        pretrained_cfg.update(source='', file=str(weights))
    model_kwargs = dict(model_kwargs)
    pretrained_cfg.update(model_kwargs.pop('pretrained_cfg_overlay', None) or {})
    model = timm.create_model(arch, pretrained=True, pretrained_cfg=pretrained_cfg, **{**model_args, **model_kwargs})
    drop_state_dict_ref(model)
    return model


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Classifier outputs of an (unwrapped) checkpoint, ours or upstream layout; 0 when it has no classifier."""
    for key in _CLASSIFIER_KEYS:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 0


def pretrained_overlay(path: str | Path) -> dict:
    """timm ``pretrained_cfg_overlay`` for initial weights: a run or model folder or a weights file (ours or
    upstream), read without unpickling; its ``num_classes`` lets timm re-initialise a classifier of another size."""
    path = Path(path)
    if path.is_dir():  # a model folder, or a run folder's best/ (else last/)
        path = find_model_folder(path)
        require_intact(path, (WEIGHTS_NAME,))
        path = path / WEIGHTS_NAME
    state_dict = unwrap_state_dict(load_state_dict_file(path))
    return dict(state_dict=state_dict, num_classes=infer_num_classes(state_dict))
