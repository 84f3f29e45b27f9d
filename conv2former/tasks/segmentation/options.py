"""Options of ``conv2former segment train`` (no heavy imports: the command line is built from them)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ...data import pair
from ...engine.options import non_negative_float, option, positive_int, redefault
from ..dense import DenseOptions
from .recipes import SEGMENTATION_RECIPES

INFERENCE = 'inference (evaluation)'


def class_name_list(value) -> Optional[list]:
    """Class names from a list, a comma-separated string, or a file with one name per line."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [str(v) for v in value]
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else str(value).split(',')
    return [n.strip() for n in names if n.strip()]


@dataclasses.dataclass
class SegmentationOptions(DenseOptions):
    """``conv2former segment train`` / ``conv2former.train(task='segmentation', ...)``."""
    recipe: Optional[str] = redefault(DenseOptions, 'recipe', None, choices=tuple(sorted(SEGMENTATION_RECIPES)))
    model: str = option('upernet', '--model', choices=('upernet',), help='segmenter', group='model')
    decoder_channels: int = option(512, '--decoder-channels', type=positive_int, group='model')
    sched: str = redefault(DenseOptions, 'sched', 'poly')
    decay_rate: float = option(1.0, '--decay-rate', type=non_negative_float, help='poly: power', group='optimisation')
    warmup_iters: int = option(1500, '--warmup-iters', type=int, group='optimisation')
    warmup_ratio: float = redefault(DenseOptions, 'warmup_ratio', 1e-6)
    photometric: bool = option(True, '--photometric', kind='bool', help='random photometric distortion',
                               group='data and augmentation')
    crop_size: tuple = option((512, 512), '--crop-size', type=positive_int, nargs='+', metavar='PX',
                              help='training crop (and sliding window): H [W]', group='data and augmentation')
    scale_range: tuple = option((0.5, 2.0), '--scale-range', type=float, nargs=2, metavar=('MIN', 'MAX'),
                                help='random rescale factors of the base size', group='data and augmentation')
    base_size: Optional[int] = option(None, '--base-size', type=positive_int, group='data and augmentation',
                                      help="short side before rescaling (default: the image's own)")
    ignore_index: int = option(255, '--ignore-index', type=int, group='data and augmentation')
    reduce_zero_label: Optional[bool] = option(None, '--reduce-zero-label', kind='bool', group='data and augmentation',
                                               help='label 0 is "other": ignore it and shift the rest down (default: '
                                                    'ADE20k layout only)')
    num_classes: Optional[int] = option(None, '--num-classes', type=positive_int, group='data and augmentation',
                                        help='when the layout does not name classes')
    class_names: Optional[list] = option(None, '--class-names', type=str, group='data and augmentation',
                                         help='comma-separated class names or a file with one per line')
    eval_mode: str = option('whole', '--eval-mode', choices=('whole', 'slide'), group=INFERENCE,
                            help='whole image, or sliding crop-size windows')
    eval_stride: Optional[tuple] = option(None, '--eval-stride', type=positive_int, nargs='+', metavar='PX',
                                          group=INFERENCE, help='sliding-window stride H [W] (default: 2/3 of the '
                                                                'crop)')
    eval_scales: tuple = option((1.0,), '--eval-scales', type=float, nargs='+', group=INFERENCE,
                                help='multi-scale inference factors, e.g. 0.5 0.75 1 1.25 1.5 1.75')
    eval_flip: bool = option(False, '--eval-flip', kind='bool', group=INFERENCE,
                             help='average with the horizontally flipped image')

    def finalize(self, training: bool = True) -> None:
        super().finalize(training)
        self.crop_size = pair(self.crop_size, '--crop-size')
        if any(c % 32 for c in self.crop_size):
            raise ValueError(f'--crop-size must be a multiple of 32 (UperNet downsamples 32x), got {self.crop_size}')
        self.eval_stride = pair(self.eval_stride, '--eval-stride') if self.eval_stride else \
            tuple(max(1, c * 2 // 3) for c in self.crop_size)
        self.scale_range = tuple(self.scale_range)
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f'--scale-range must satisfy 0 < MIN <= MAX, got {self.scale_range}')
        self.eval_scales = tuple(self.eval_scales)
        self.class_names = class_name_list(self.class_names)

    def inference_settings(self) -> dict:
        return dict(mode=self.eval_mode, crop_size=list(self.crop_size), stride=list(self.eval_stride),
                    scales=list(self.eval_scales), flip=self.eval_flip)
