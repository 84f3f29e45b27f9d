"""Shared pieces of the analysis commands: loading a model, picking images, reading a stage's output."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import timm.data
import torch
import torch.nn as nn

from ..data import find_split, load_rgb, resolve_data_dir
from ..tasks.classification.data import ImageFolderDataset

__all__ = [
    'AnalysisModel', 'load_analysis_model', 'select_images', 'eval_transform', 'load_image_tensor', 'stage_info',
    'StageOutput', 'check_img_size', 'write_json',
]


class AnalysisModel:
    """A model in eval mode with what the analyses need to know about it."""

    def __init__(self, model: nn.Module, name: str, checkpoint: str | None, model_kwargs: dict,
                 class_names: list[str] | None, data_config: dict):
        self.model, self.name, self.checkpoint = model, name, checkpoint
        self.model_kwargs, self.class_names, self.data_config = model_kwargs, class_names, data_config

    def label(self, index: int) -> str:
        return str(self.class_names[index]) if self.class_names is not None else str(index)


def load_analysis_model(model_name: str | None, checkpoint: str | None, model_kwargs: dict | None = None,
                        use_ema: bool = False, device: str | torch.device = 'cpu') -> AnalysisModel:
    """``--checkpoint`` (run/model folder, ``.safetensors``, upstream ``.pth``) or ``--model`` alone (random init)."""
    model_kwargs = dict(model_kwargs or {})
    if checkpoint:  # any timm classifier's folder (a ConvNeXt baseline too), or a weights file
        from ..tasks.classification.inference import load_model
        model, class_names, data_config = load_model(checkpoint, model_name, use_ema=use_ema, device=device,
                                                     **model_kwargs)
    elif model_name:
        try:
            model = timm.create_model(model_name, pretrained=False, **model_kwargs)
        except RuntimeError as e:  # timm: unknown model
            raise ValueError(str(e)) from None
        model = model.to(device).eval()
        class_names, data_config = None, timm.data.resolve_data_config(model=model)
    else:
        raise ValueError('give --model NAME (random initialisation) and/or --checkpoint PATH')
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or model_name or type(model).__name__
    return AnalysisModel(model, name, str(checkpoint) if checkpoint else None, model_kwargs, class_names,
                         data_config)


def select_images(images: Sequence[str] | None, data: str | None, split: str, num_images: int) -> list[Path]:
    """``images`` as given (each must exist), else ``num_images`` spread evenly over the sorted ``split`` of
    ``data`` (default: the bundled dataset), so every class is represented when there are enough."""
    if images:
        paths = [Path(p) for p in images]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f'image {p} does not exist or is not a file')
        return paths
    if num_images < 1:
        raise ValueError(f'--num-images must be >= 1, got {num_images}')
    dataset = ImageFolderDataset(find_split(resolve_data_dir(data), split))
    samples = [Path(p) for p, _ in dataset.samples]
    if num_images >= len(samples):
        return samples
    # evenly spaced over the class-sorted list, offset to the middle of each interval
    step = len(samples) / num_images
    return [samples[int(step * (i + 0.5))] for i in range(num_images)]


def eval_transform(data_config: dict, img_size: int | None):
    """Resize the whole image to ``img_size`` (no crop), normalise with the model's mean/std."""
    cfg = dict(data_config)
    if img_size is not None:
        cfg['input_size'] = (cfg['input_size'][0], img_size, img_size)
    cfg['crop_pct'] = 1.0
    return timm.data.create_transform(**{k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std',
                                                              'crop_pct') if k in cfg})


def load_image_tensor(path: Path, transform) -> tuple[torch.Tensor, np.ndarray]:
    """``(normalised CHW tensor, RGB float image in [0, 1] of the same size)`` for one image file."""
    try:
        img = load_rgb(path)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read image {path}: {e}') from None
    x = transform(img)
    size = x.shape[-2:]
    rgb = np.asarray(img.resize((size[1], size[0])), dtype=np.float32) / 255.0
    return x, rgb


def stage_info(model: nn.Module) -> list[dict]:
    """timm ``feature_info`` entries (num_chs, reduction, module) of ``model``; ValueError when it has none."""
    info = getattr(model, 'feature_info', None)
    if hasattr(info, 'get_dicts'):
        info = info.get_dicts()
    if not info:
        raise ValueError(f'{type(model).__name__} exposes no feature stages (timm feature_info); use a timm model '
                         'that supports features_only')
    return list(info)


def resolve_stage(model: nn.Module, stage: int | None) -> tuple[int, dict]:
    """Index and feature_info entry of ``stage`` (None: the last; negatives count from the end).

    An explicit stage needs a hierarchical model (strides that differ between stages).
    """
    info = stage_info(model)
    if stage is None:
        return len(info) - 1, info[-1]
    reductions = [f['reduction'] for f in info]
    if len(set(reductions)) == 1:
        raise ValueError(f'--stage needs a hierarchical model (stages at different strides); '
                         f'{type(model).__name__} is non-hierarchical ({len(info)} feature blocks, all at stride '
                         f'{reductions[0]}); leave --stage out to use its last block')
    if not -len(info) <= stage < len(info):
        raise ValueError(f'--stage {stage} is out of range: the model has {len(info)} stages '
                         f'(0..{len(info) - 1}, or -1..-{len(info)} from the end)')
    stage %= len(info)
    return stage, info[stage]


def min_input_size(model: nn.Module) -> int:
    """The smallest square input the model accepts (its stem's ``min_size``, else its largest stride)."""
    stem_min = getattr(getattr(model, 'stem', None), 'min_size', None)
    if isinstance(stem_min, int):
        return stem_min
    return max(f['reduction'] for f in stage_info(model))


def check_img_size(model: nn.Module, img_size: int, name: str) -> None:
    smallest = min_input_size(model)
    if img_size < smallest:
        raise ValueError(f'--img-size {img_size} is below the smallest input {name} accepts '
                         f'({smallest}x{smallest} pixels: its last stage must keep at least one pixel)')


class _Stop(Exception):
    pass


class StageOutput:
    """Run ``model`` up to the module named ``module`` and return that module's output (NCHW).

    A forward hook captures the output and stops the forward pass there, so later stages cost nothing.
    """

    def __init__(self, model: nn.Module, module: str):
        self.model = model
        try:
            self.module = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f'{type(model).__name__} has no module {module!r} (from its feature_info)') from None
        self.nhwc = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        captured = []

        def hook(_module, _inputs, output):
            captured.append(output)
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f'the forward pass of {type(self.model).__name__} never ran the stage module')
        out = captured[0]
        if out.ndim != 4:
            raise ValueError(f'the stage output has shape {tuple(out.shape)}, not a (batch, channels, height, '
                             'width) feature map; token-sequence models are not supported')
        return out.permute(0, 3, 1, 2) if self.nhwc else out


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + '\n')
    return path
