"""``conv2former segment train | eval | predict``."""
from __future__ import annotations

import argparse

from ...engine.options import positive_int
from ..dense_cli import add_task_parsers
from .options import SegmentationOptions


def _add_args(p: argparse.ArgumentParser, command: str) -> None:
    """Inference flags of eval / predict: absent ones keep the model folder's saved settings."""
    p.add_argument('--crop-size', type=positive_int, nargs='+', default=None, metavar='PX')
    p.add_argument('--eval-mode', choices=['whole', 'slide'], help='whole image, or sliding crop-size windows')
    p.add_argument('--eval-stride', type=positive_int, nargs='+', metavar='PX', help='sliding-window stride H [W]')
    p.add_argument('--eval-scales', type=float, nargs='+', help='multi-scale inference factors, e.g. 0.75 1 1.25')
    p.add_argument('--eval-flip', action=argparse.BooleanOptionalAction, default=None,
                   help='average with the horizontally flipped image')


def add_parsers(sub) -> None:
    add_task_parsers(sub, 'segment', 'segmentation', 'semantic segmentation (UperNet, segmentation_models_pytorch)',
                     SegmentationOptions, _add_args)
