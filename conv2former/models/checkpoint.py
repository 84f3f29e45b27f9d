"""Checkpoint loading without unpickling code, and the upstream → project key mapping."""
import argparse
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Union

import safetensors.torch
import torch
import torch.nn as nn

__all__ = ['load_state_dict_file', 'unwrap_state_dict', 'remap_upstream_state_dict', 'resolve_pretrained_file']

# upstream (HVision-NKU/Conv2Former) name → ours; applied in order, first match wins
_UPSTREAM_RULES = [
    (r'^downsample_layers\.0\.', 'stem.'),
    (r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^stages\.(\d+)\.(\d+)\.layer_scale_1$', r'stages.\1.blocks.\2.ls1.gamma'),
    (r'^stages\.(\d+)\.(\d+)\.layer_scale_2$', r'stages.\1.blocks.\2.ls2.gamma'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.norm\.', r'stages.\1.blocks.\2.norm1.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.att\.0\.', r'stages.\1.blocks.\2.attn.a_proj.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.att\.2\.', r'stages.\1.blocks.\2.attn.dwconv.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.v\.', r'stages.\1.blocks.\2.attn.v_proj.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.proj\.', r'stages.\1.blocks.\2.attn.proj.'),
    (r'^stages\.(\d+)\.(\d+)\.mlp\.norm\.', r'stages.\1.blocks.\2.norm2.'),
    (r'^stages\.(\d+)\.(\d+)\.mlp\.pos\.', r'stages.\1.blocks.\2.mlp.dwconv.'),
    (r'^stages\.(\d+)\.(\d+)\.mlp\.', r'stages.\1.blocks.\2.mlp.'),
    (r'^head\.0\.', 'head.conv.'),
    (r'^head\.2\.', 'head.norm.'),
    (r'^pred\.', 'head.fc.'),
]
_WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')
_PREFIXES = ('module.', '_orig_mod.')


def load_state_dict_file(path: Union[str, Path]) -> dict:
    """Read a ``.safetensors`` file, or a torch checkpoint with ``weights_only=True`` (never runs pickled code).

    ``argparse.Namespace`` (the ``args`` entry of timm-style training checkpoints) is the one class allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError and the header's decoding errors
            raise ValueError(f'{path} is truncated or corrupt ({type(e).__name__}: {e})') from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f'refused to load {path}: it holds pickled Python objects other than tensors and plain containers, '
            f'and loading it would run their code. Only weights are read (weights_only=True); re-save it as a '
            f'plain state_dict or .safetensors. ({e})') from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f'{path} is truncated, corrupt or not a PyTorch checkpoint / safetensors file: '
                         f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path} holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)')
    return dict(obj)


def unwrap_state_dict(checkpoint: Mapping, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside a training checkpoint, with 'module.' / '_orig_mod.' prefixes stripped.

    Looks in 'state_dict_ema' / 'model_ema' first when ``use_ema`` (timm's default), then 'state_dict', 'model'.
    """
    order = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    for key in order:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    else:
        if not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            nested = [k for k in _WRAPPER_KEYS if k in checkpoint]
            raise ValueError(
                f'checkpoint holds no tensors at its top level nor under {order}; its keys are '
                f'{sorted(checkpoint)[:10]}' + (f' (weights under {nested}: pass use_ema=True)' if nested else ''))
    out = {}
    for k, v in checkpoint.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _is_upstream(state_dict: Mapping) -> bool:
    return any(k.startswith(('downsample_layers.', 'pred.')) for k in state_dict)


def _remap_key(key: str) -> str:
    for pattern, repl in _UPSTREAM_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _adaptable(key: str, model: nn.Module) -> bool:
    """Keys timm adapts when loading: the classifier (num_classes) and the first conv (in_chans)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier', 'head.fc')
    first_conv = cfg.get('first_conv', 'stem.0')
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return key.rsplit('.', 1)[0] in classifiers or key == f'{first_conv}.weight'


def remap_upstream_state_dict(state_dict: Mapping, model: nn.Module, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Map an upstream or project checkpoint onto ``model``'s names and check every key and shape.

    Raises a ValueError listing missing keys, unexpected keys and shape mismatches (classifier and first-conv
    shapes are left to timm's num_classes / in_chans adaptation).
    """
    state_dict = unwrap_state_dict(state_dict, use_ema=use_ema)
    if _is_upstream(state_dict):
        state_dict = {_remap_key(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _adaptable(k, model)]
    unexpected = [k for k in state_dict if k not in expected and not _adaptable(k, model)]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape and not _adaptable(k, model)
    ]
    if missing or unexpected or mismatched:
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)

        def _fmt(title, items):
            more = f' ... and {len(items) - 8} more' if len(items) > 8 else ''
            return f'\n  {len(items)} {title}: ' + ', '.join(items[:8]) + more if items else ''

        raise ValueError(
            f'checkpoint does not match {name} ({len(state_dict)} tensors in the checkpoint, '
            f'{len(expected)} in the model):'
            + _fmt('missing from the checkpoint', missing)
            + _fmt('unexpected in the checkpoint', unexpected)
            + _fmt('with different shapes', mismatched))
    return state_dict


def resolve_pretrained_file(pretrained: bool, kwargs: dict) -> dict:
    """Load a pretrained ``file`` ourselves so timm never unpickles it (timm < 1.0.22 would).

    The released weights are not on a host timm can download from, so ``pretrained=True`` needs a file, a
    ``state_dict``, or a ``local-dir:`` / ``hf-hub:`` model name; without one this raises a ValueError that says
    how to give it.
    """
    if not pretrained:
        return kwargs
    base = kwargs.get('pretrained_cfg')
    base = base.to_dict() if hasattr(base, 'to_dict') else (base if isinstance(base, dict) else {})
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    cfg = dict(base, **overlay)
    if cfg.get('source') in ('local-dir', 'hf-hub') or any(cfg.get(k) is not None for k in ('state_dict', 'url')) \
            or cfg.get('hf_hub_id'):
        return kwargs  # timm reads model.safetensors from the folder / hub, or the given state_dict
    if not cfg.get('file'):
        raise ValueError(
            'Conv2Former weights cannot be downloaded automatically (upstream publishes them on a file host only): '
            "download them, then pass pretrained_cfg_overlay=dict(file='/path/to/conv2former_t.pth.tar') "
            "(an upstream .pth/.pth.tar or a .safetensors file), or create 'local-dir:/path/to/folder'")
    state_dict = load_state_dict_file(cfg['file'])
    return dict(kwargs, pretrained_cfg_overlay=dict(overlay, file=None, state_dict=state_dict))
