"""A grid of heat maps overlaid on images (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ['overlay_grid']


def overlay_grid(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None, str]]], path: Path,
                 cell: float = 1.7, alpha: float = 0.5) -> Path:
    """Save a grid; each cell is ``(rgb image in [0, 1], heat map in [0, 1] of the same size or None, title)``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols, cell * len(rows) + 0.3), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, cell_data in zip(ax_row, list(row) + [None] * (ncols - len(row))):
            ax.axis('off')
            if cell_data is None:
                continue
            rgb, heat, title = cell_data
            ax.imshow(rgb)
            if heat is not None:
                ax.imshow(heat, cmap='jet', alpha=alpha, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
