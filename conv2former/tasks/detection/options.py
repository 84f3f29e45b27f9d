"""Options of ``conv2former detect train`` (no heavy imports: the command line is built from them)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ...engine.options import non_negative_float, option, positive_int, redefault
from ..dense import DenseOptions
from .model import DETECTORS
from .recipes import DETECTION_RECIPES


@dataclasses.dataclass
class DetectionOptions(DenseOptions):
    """``conv2former detect train`` / ``conv2former.train(task='detection', ...)``."""
    recipe: Optional[str] = redefault(DenseOptions, 'recipe', None, choices=tuple(sorted(DETECTION_RECIPES)))
    model: str = option('maskrcnn', '--model', choices=DETECTORS, help='detector', group='model')
    sched: str = redefault(DenseOptions, 'sched', 'multistep')
    decay_rate: float = option(0.1, '--decay-rate', type=non_negative_float, help='multistep: lr factor',
                               group='optimisation')
    warmup_iters: int = option(500, '--warmup-iters', type=int, group='optimisation')
    photometric: bool = option(False, '--photometric', kind='bool', help='random photometric distortion',
                               group='data and augmentation')
    min_size: tuple = option(tuple(range(480, 801, 32)), '--min-size', type=positive_int, nargs='+',
                             group='data and augmentation',
                             help='short side(s): one picked per batch when training; the last is the test size')
    max_size: int = option(1333, '--max-size', type=positive_int, help='long side limit', group='data and augmentation')
    holdout: int = option(50, '--holdout', type=int, help='Penn-Fudan: images held out as val',
                          group='data and augmentation')
    skip_empty: bool = option(False, '--skip-empty', kind='flag', help='skip training images without annotations',
                              group='data and augmentation')

    def finalize(self, training: bool = True) -> None:
        super().finalize(training)
        self.min_size = tuple(self.min_size)
