"""Effective receptive field (ERF), measured as in RepLKNet (Ding et al., CVPR 2022) and its successors.

For each image: take a stage's output, sum the ReLU of its values at the spatial centre over channels,
back-propagate to the input, keep the ReLU of the input gradient summed over colour channels. The ERF is the
average of these maps over the images. Its size is summarised by high-contribution area ratios: for a threshold
t, the smallest centred square holding t of the map's total, as a fraction of the image area.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .common import StageOutput, eval_transform, load_image_tensor

__all__ = ['THRESHOLDS', 'erf_map', 'area_ratios', 'log_scaled', 'plot_erf', 'plot_erf_grid', 'ratio_table']

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
LOG_DECADES = 4  # the plots show log10(map / max) over this many decades


def centre_gradient(stage: StageOutput, x: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ReLU(d Σ_c ReLU(f_c(centre)) / d input), summed over colour channels: (H, W)."""
    x = x.detach().requires_grad_(True)
    feat = stage(x)
    h, w = feat.shape[-2:]
    centre = torch.relu(feat[:, :, h // 2, w // 2]).sum()
    if not centre.requires_grad:
        raise ValueError('the stage output does not depend on the input (no gradient path)')
    (grad,) = torch.autograd.grad(centre, x)
    return torch.relu(grad).sum(dim=(0, 1))


def erf_map(stage: StageOutput, images: Sequence[Path], data_config: dict, img_size: int, batch_size: int = 8,
            device: str | torch.device = 'cpu', progress: bool = True) -> np.ndarray:
    """The ERF (float64, ``img_size`` x ``img_size``) averaged over ``images``, resized whole to ``img_size``."""
    if batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {batch_size}')
    transform = eval_transform(data_config, img_size)
    total = torch.zeros(img_size, img_size, dtype=torch.float64)
    bar = tqdm(total=len(images), desc='ERF', unit='img', disable=not progress)
    for start in range(0, len(images), batch_size):
        batch = torch.stack([load_image_tensor(p, transform)[0] for p in images[start:start + batch_size]])
        total += centre_gradient(stage, batch.to(device)).double().cpu()
        bar.update(len(batch))
    bar.close()
    return (total / len(images)).numpy()


def area_ratios(erf: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> tuple[dict, dict]:
    """``({t: area ratio}, {t: side in pixels})``: for each t, the smallest square centred at (H//2, W//2) (clipped to
    the map) whose sum reaches t x the total, as a fraction of the map's area, and its side (1, 3, 5, ...; the
    clipped extent when it runs past the border)."""
    erf = np.asarray(erf, dtype=np.float64)
    if erf.ndim != 2 or erf.size == 0:
        raise ValueError(f'expected a non-empty 2-D map, got shape {erf.shape}')
    if (erf < 0).any() or not np.isfinite(erf).all():
        raise ValueError('the map must be finite and non-negative')
    total = erf.sum()
    if total <= 0:
        raise ValueError('the map is all zeros: the stage output does not respond to the input')
    h, w = erf.shape
    cy, cx = h // 2, w // 2
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = erf.cumsum(0).cumsum(1)
    max_r = max(cy, cx, h - 1 - cy, w - 1 - cx)
    radii = np.arange(max_r + 1)
    y0, y1 = np.maximum(cy - radii, 0), np.minimum(cy + radii + 1, h)
    x0, x1 = np.maximum(cx - radii, 0), np.minimum(cx + radii + 1, w)
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    ratios, sides = {}, {}
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f'thresholds must be in (0, 1], got {t}')
        r = int(np.argmax(sums >= t * total * (1 - 1e-12)))  # the full map always reaches t
        ratios[str(t)] = float((y1[r] - y0[r]) * (x1[r] - x0[r]) / (h * w))
        sides[str(t)] = int(max(y1[r] - y0[r], x1[r] - x0[r]))
    return ratios, sides


def log_scaled(erf: np.ndarray, decades: int = LOG_DECADES) -> np.ndarray:
    """log10(map / max), clipped to ``-decades``: 0 at the strongest pixel."""
    peak = float(erf.max())
    if peak <= 0:
        return np.full(erf.shape, -float(decades))
    return np.log10(np.maximum(erf / peak, 10.0 ** -decades))


def _show(ax, erf: np.ndarray, title: str):
    im = ax.imshow(log_scaled(erf), cmap='RdYlGn', vmin=-LOG_DECADES, vmax=0, interpolation='nearest')
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_erf(erf: np.ndarray, path: Path, title: str) -> Path:
    """Save the log-scaled ERF with a colour bar."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = _show(ax, erf, title)
    fig.colorbar(im, ax=ax, label='log10(contribution / max)')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_erf_grid(maps: Sequence[np.ndarray], titles: Sequence[str], path: Path) -> Path:
    """Several ERFs side by side on one colour scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 3.4), squeeze=False)
    im = None
    for ax, erf, title in zip(axes[0], maps, titles):
        im = _show(ax, erf, title)
    fig.colorbar(im, ax=list(axes[0]), label='log10(contribution / max)', shrink=0.85)
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)
    return path


def ratio_table(rows: Sequence[tuple[str, dict]]) -> str:
    """Markdown table: one row per (label, erf.json contents)."""
    ts = [str(t) for t in THRESHOLDS]
    lines = ['| run | model | stage | img size | images | ' + ' | '.join(f'r({t})' for t in ts) + ' | '
             + ' | '.join(f'side({t})' for t in ts) + ' |',
             '|' + '---|' * (5 + 2 * len(ts))]
    for label, r in rows:
        lines.append(f'| {label} | {r["model"]} | {r["stage"]} | {r["img_size"]} | {r["num_images"]} | '
                     + ' | '.join(f'{r["area_ratio"][t]:.4f}' for t in ts) + ' | '
                     + ' | '.join(str(r['side'][t]) for t in ts) + ' |')
    return '\n'.join(lines) + '\n'
