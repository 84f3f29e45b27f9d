"""``conv2former detect train | eval | predict``."""
from __future__ import annotations

import argparse

from ...engine.options import probability
from ..dense_cli import add_task_parsers
from .options import DetectionOptions


def _add_args(p: argparse.ArgumentParser, command: str) -> None:
    if command == 'eval':
        p.add_argument('--holdout', type=int, help="Penn-Fudan: images held out as val (default: the run's, "
                                                   "else 50)")
    else:
        p.add_argument('--score-threshold', type=probability, default=0.5)


def add_parsers(sub) -> None:
    add_task_parsers(sub, 'detect', 'detection', 'object detection and instance segmentation (torchvision detectors '
                     '+ FPN)', DetectionOptions, _add_args)
