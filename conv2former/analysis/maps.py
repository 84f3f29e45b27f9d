"""Modulation maps: the map A = DWConv_kxk(GELU(W1 x)) that a Conv2Former block multiplies with V."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .common import eval_transform, load_image_tensor
from .plotting import overlay_grid

__all__ = ['ModBlock', 'modulation_blocks', 'select_blocks', 'modulation_maps', 'plot_maps']


class ModBlock:
    """One ConvModulation module: ``stage`` and ``index`` (block within the stage), ``name`` of its block."""

    def __init__(self, stage: int, index: int, name: str, module: nn.Module):
        self.stage, self.index, self.name, self.module = stage, index, name, module

    @property
    def tag(self) -> str:
        return f'{self.stage}.{self.index}'


def modulation_blocks(model: nn.Module) -> list[ModBlock]:
    """Every convolutional-modulation module of ``model``, grouped by stage (isotropic models: one stage, 0)."""
    from ..models.layers import ConvModulation
    found = []
    counts: dict[int, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ConvModulation):
            continue
        parts = name.split('.')
        stage = int(parts[1]) if parts[0] == 'stages' and len(parts) > 1 and parts[1].isdigit() else 0
        index = counts.get(stage, 0)
        counts[stage] = index + 1
        found.append(ModBlock(stage, index, name.rsplit('.', 1)[0], module))
    if not found:
        raise ValueError(f'{type(model).__name__} has no convolutional modulation blocks (ConvModulation): '
                         '`analyze maps` needs a Conv2Former model')
    return found


def select_blocks(blocks: Sequence[ModBlock], specs: Sequence[str] | None) -> list[ModBlock]:
    """Blocks named ``STAGE.BLOCK`` (negative indices count from the end; ``STAGE`` alone: its last block);
    default: the last block of every stage."""
    by_stage: dict[int, list[ModBlock]] = {}
    for b in blocks:
        by_stage.setdefault(b.stage, []).append(b)
    if not specs:
        return [v[-1] for _, v in sorted(by_stage.items())]
    chosen = []
    layout = ', '.join(f'stage {s}: {len(v)} blocks' for s, v in sorted(by_stage.items()))
    for spec in specs:
        try:
            parts = [int(p) for p in spec.split('.')]
            if len(parts) not in (1, 2):
                raise ValueError
        except ValueError:
            raise ValueError(f'--blocks entry {spec!r} is not STAGE or STAGE.BLOCK (e.g. 3 or 2.-1)') from None
        stage, index = parts[0], parts[1] if len(parts) == 2 else -1
        stages = sorted(by_stage)
        if not -len(stages) <= stage < len(stages):
            raise ValueError(f'--blocks {spec!r}: stage {stage} is out of range ({layout})')
        stage_blocks = by_stage[stages[stage]]
        if not -len(stage_blocks) <= index < len(stage_blocks):
            raise ValueError(f'--blocks {spec!r}: block {index} is out of range ({layout})')
        chosen.append(stage_blocks[index])
    return chosen


@torch.no_grad()
def modulation_maps(model: nn.Module, blocks: Sequence[ModBlock], images: Sequence[Path], data_config: dict,
                    img_size: int | None, top_channels: int = 3, device: str | torch.device = 'cpu',
                    progress: bool = True) -> list[dict]:
    """Per image: the RGB image, the logits and, per block, A (C, h, w) with its channel-mean of |A| and the
    ``top_channels`` channels of largest mean |A|."""
    if top_channels < 0:
        raise ValueError(f'--top-channels must be >= 0, got {top_channels}')
    transform = eval_transform(data_config, img_size)
    captured: dict[str, torch.Tensor] = {}

    def make_hook(block: ModBlock):
        def hook(module, inputs):
            captured[block.name] = module.modulation(inputs[0]).float()
        return hook

    handles = [b.module.register_forward_pre_hook(make_hook(b)) for b in blocks]
    results = []
    try:
        for path in tqdm(images, desc='modulation maps', unit='img', disable=not progress):
            x, rgb = load_image_tensor(path, transform)
            captured.clear()
            logits = model(x.unsqueeze(0).to(device))
            per_block = []
            for b in blocks:
                a = captured[b.name][0].cpu()
                strength = a.abs().mean(dim=(1, 2))
                k = min(top_channels, a.shape[0])
                top = strength.topk(k).indices.tolist()
                per_block.append(dict(block=b, a=a, mean_abs=a.abs().mean(0), top=top,
                                      top_strength=[float(strength[c]) for c in top]))
            results.append(dict(image=path, rgb=rgb, logits=logits[0].float().cpu(), blocks=per_block))
    finally:
        for h in handles:
            h.remove()
    return results


def upsample(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized bilinearly to ``size`` and min-max normalised to [0, 1]."""
    up = F.interpolate(m[None, None].float(), size=size, mode='bilinear', align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    return ((up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)).numpy()


def plot_maps(results: Sequence[dict], path: Path, label_fn) -> Path:
    """One row per (image, block): the image, channel-mean |A| and the strongest channels' |A|, overlaid."""
    rows = []
    for r in results:
        pred = int(r['logits'].argmax())
        for i, blk in enumerate(r['blocks']):
            b, size = blk['block'], r['rgb'].shape[:2]
            title = f'{Path(r["image"]).name}\npred {label_fn(pred)}' if i == 0 else ''
            panels = [(r['rgb'], None, title or ' '),
                      (r['rgb'], upsample(blk['mean_abs'], size), f'block {b.tag}: mean |A|')]
            panels += [(r['rgb'], upsample(blk['a'][c].abs(), size), f'ch {c} (|A| {s:.2g})')
                       for c, s in zip(blk['top'], blk['top_strength'])]
            rows.append(panels)
    return overlay_grid(rows, path)
