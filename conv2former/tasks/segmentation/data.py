"""Semantic-segmentation datasets and transforms (torchvision conventions).

Items are ``(image, mask)``: a ``tv_tensors.Image`` and a ``tv_tensors.Mask`` int64 ``[H, W]`` of class indices or
``ignore_index``. Data may be a folder or a ``.tar``/``.tar.gz`` archive of one (see :data:`SEGMENTATION_LAYOUTS`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.utils.data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ...data import (IMG_EXTENSIONS, INDEX_MODES, FileLister, first_items as _first, load_rgb, pair as _pair,
                     resolve_data_dir, split_names)

__all__ = ['CAMVID_CLASSES', 'SegmentationDataset', 'build_segmentation_dataset', 'segmentation_transforms']

_logger = logging.getLogger(__name__)

CAMVID_CLASSES = ['Sky', 'Building', 'Pole', 'Road', 'Pavement', 'Tree', 'SignSymbol', 'Fence', 'Car', 'Pedestrian',
                  'Bicyclist']
SEGMENTATION_LAYOUTS = ('CamVid: <root>/<split>/ + <root>/<split>annot/; '
                        'ADE20k: <root>/images/{training,validation}/ + <root>/annotations/{training,validation}/; '
                        'generic: <root>/<split>/images/ + <root>/<split>/masks/ (or labels/, annotations/), '
                        'or <root>/images/<split>/ + <root>/masks/<split>/ (or labels/, annotations/)')
LABEL_DIRS = ('masks', 'labels', 'annotations')
LABEL_EXTENSIONS = ('.png', '.bmp', '.tif', '.tiff')


# ------------------------------------------------------------------------------------------- semantic segmentation
class SegmentationDataset(torch.utils.data.Dataset):
    """``(image, label)`` file pairs → ``(tv_tensors.Image uint8, tv_tensors.Mask int64)``, then ``transforms``.

    Labels are single-channel index images (mode L or P: the stored index is the value). ``label_map`` sends raw
    stored values to class indices or ``ignore_index`` (e.g. CamVid's void ``{11: 255}``); the other values are taken
    as is, or, with ``reduce_zero_label`` (mmseg, ADE20k), 0 → ignore_index and v → v - 1. Each loaded label is
    checked: same size as its image, values in ``0..num_classes-1`` or ``ignore_index``.
    """

    def __init__(
            self,
            pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
            class_names: Sequence[str],
            ignore_index: int = 255,
            reduce_zero_label: bool = False,
            label_map: dict[int, int] | None = None,
            transforms: Callable | None = None,
    ):
        self.pairs = [(Path(image), Path(label)) for image, label in pairs]
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise ValueError('class_names is empty; a segmentation dataset needs at least one class')
        if 0 <= ignore_index < len(self.class_names):
            raise ValueError(f'ignore_index={ignore_index} is a class index (0..{len(self.class_names) - 1}); '
                             'use a value outside the class range, e.g. 255')
        self.ignore_index, self.reduce_zero_label = ignore_index, reduce_zero_label
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, index: int) -> Path:
        return self.pairs[index][0]

    def label_path(self, index: int) -> Path:
        return self.pairs[index][1]

    def load_label(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The mapped, validated int64 ``[H, W]`` label of item ``index``; ``image_size`` (W, H) is checked."""
        image_path, label_path = self.pairs[index]
        try:
            with PIL.Image.open(label_path) as im:
                im.load()
                if im.mode not in INDEX_MODES:
                    raise ValueError(f'{label_path}: label image has mode {im.mode}; expected a single-channel index '
                                     'PNG (mode L or P, one class index per pixel), not colour-coded labels')
                raw = np.asarray(im).astype(np.int64)
        except (OSError, SyntaxError) as e:
            raise OSError(f'{label_path}: cannot read label image: {e}') from e
        if image_size is not None and image_size != (raw.shape[1], raw.shape[0]):
            raise ValueError(f'label {label_path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but image {image_path} is '
                             f'{image_size[0]}x{image_size[1]}')
        if self.reduce_zero_label:
            label = raw - 1
            label[(raw == 0) | (raw == self.ignore_index)] = self.ignore_index
        else:
            label = raw.copy()
        for old, new in self.label_map.items():
            label[raw == old] = new
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            how = (' after reduce_zero_label' if self.reduce_zero_label else '') + \
                  (' after label_map' if self.label_map else '')
            raise ValueError(f'{label_path}: label values {_first(values, 10)}{how} are outside the valid range '
                             f'0..{self.num_classes - 1} ({self.num_classes} classes) and are not ignore_index='
                             f'{self.ignore_index}')
        return label

    def __getitem__(self, index: int):
        pil = load_rgb(self.pairs[index][0])
        label = self.load_label(index, pil.size)
        image, mask = tv_tensors.Image(F.pil_to_tensor(pil)), tv_tensors.Mask(torch.from_numpy(label))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(pairs={len(self)}, classes={self.num_classes}, '
                f'ignore_index={self.ignore_index}, reduce_zero_label={self.reduce_zero_label})')


def _find_segmentation_layout(root: Path, split: str) -> tuple[str, Path, Path]:
    """(layout name, image folder, label folder) of ``split`` under ``root``."""
    names = split_names(split)
    for s in names:
        if (root / s).is_dir() and (root / f'{s}annot').is_dir():
            return 'camvid', root / s, root / f'{s}annot'
    if any((root / 'images' / s).is_dir() and (root / 'annotations' / s).is_dir() for s in ('training', 'validation')):
        for s in names:
            if s in ('training', 'validation') and (root / 'images' / s).is_dir():
                return 'ade20k', root / 'images' / s, root / 'annotations' / s
    for s in names:
        for label_dir in LABEL_DIRS:
            if (root / s / 'images').is_dir() and (root / s / label_dir).is_dir():
                return 'generic', root / s / 'images', root / s / label_dir
            if (root / 'images' / s).is_dir() and (root / label_dir / s).is_dir():
                return 'generic', root / 'images' / s, root / label_dir / s
    raise FileNotFoundError(f'no {split!r} split in a known segmentation layout under {root} (split folder names '
                            f'tried: {", ".join(names)}); expected {SEGMENTATION_LAYOUTS}')


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Files under ``folder`` (recursively, hidden ones skipped, each real file once: ``data.FileLister``) keyed by
    their relative path without suffix."""
    found: dict[str, Path] = {}
    for path in FileLister(folder).list(folder, extensions):
        key = path.relative_to(folder).with_suffix('').as_posix()
        if key not in found or path.suffix.lower() == '.png':  # prefer a PNG label over other formats
            found[key] = path
    return found


def _pair_files(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    images = _files_by_stem(image_dir, IMG_EXTENSIONS)
    labels = _files_by_stem(label_dir, LABEL_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f'no images in {image_dir} (searched with label folder {label_dir}; extensions '
                                f'{", ".join(IMG_EXTENSIONS)})')
    unlabelled = sorted(k for k in images if k not in labels)
    if unlabelled:
        raise ValueError(f'{len(unlabelled)} of {len(images)} images in {image_dir} have no label in {label_dir} '
                         f'(expected <same name>.png): {_first(unlabelled)}')
    extra = len(set(labels) - set(images))
    if extra:
        _logger.info('%d label files in %s have no image in %s; ignored', extra, label_dir, image_dir)
    return [(images[k], labels[k]) for k in sorted(images)]


def _ade_object_info(path: Path) -> list[str] | None:
    """Class names from ADEChallengeData2016's objectInfo150.txt (tab-separated, name last; first synonym kept)."""
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text(encoding='utf-8').splitlines() if ln.strip()]
    return [ln.split('\t')[-1].split(';')[0].strip() for ln in lines[1:]] or None


def _resolve_class_names(root: Path, given: Sequence[str] | None, num_classes: int | None,
                 default: list[str] | None) -> list[str]:
    classes_txt = root / 'classes.txt'
    if given:
        names = [str(c) for c in given]
    elif classes_txt.is_file():
        names = [ln.strip() for ln in classes_txt.read_text(encoding='utf-8').splitlines() if ln.strip()]
    elif default:
        names = list(default)
    elif num_classes:
        names = [f'class_{i}' for i in range(num_classes)]
    else:
        raise ValueError(f'class names of {root} are unknown: add {classes_txt} (one name per line), or pass '
                         'class_names or num_classes')
    if num_classes is not None and num_classes != len(names):
        raise ValueError(f'num_classes={num_classes} but {len(names)} class names were found ({_first(names)})')
    return names


def build_segmentation_dataset(
        data: str | os.PathLike,
        split: str,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        transforms: Callable | None = None,
) -> SegmentationDataset:
    """The ``split`` (train/training, val/valid/validation, test) of the segmentation dataset at ``data``.

    Layouts (see :data:`SEGMENTATION_LAYOUTS`): CamVid (default classes :data:`CAMVID_CLASSES`, void 11 →
    ignore_index), ADE20k (``reduce_zero_label`` defaults to True) and generic. Class names: ``class_names``, else
    ``<root>/classes.txt``, else the layout's default (CamVid; ADE20k's objectInfo150.txt), else ``num_classes``
    generic names. Images and labels are paired by file name without extension.
    """
    root = resolve_data_dir(data, cache_dir, layout=SEGMENTATION_LAYOUTS)
    layout, image_dir, label_dir = _find_segmentation_layout(root, split)
    default = {'camvid': CAMVID_CLASSES, 'ade20k': _ade_object_info(root / 'objectInfo150.txt')}.get(layout)
    names = _resolve_class_names(root, class_names, num_classes, default)
    if reduce_zero_label is None:
        reduce_zero_label = layout == 'ade20k'
    void = len(CAMVID_CLASSES)  # CamVid's void id, unless the caller made it a class
    label_map = {void: ignore_index} if layout == 'camvid' and len(names) <= void else None
    return SegmentationDataset(_pair_files(image_dir, label_dir), names, ignore_index=ignore_index,
                               reduce_zero_label=reduce_zero_label, label_map=label_map, transforms=transforms)


class _RandomShortSideScale(v2.Transform):
    """Resize so the short side is ``base_size`` (None: the input's own short side) times a factor drawn uniformly
    from ``scale_range``, keeping the aspect ratio. Images bilinear (antialiased); masks nearest."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), base_size: int | None = None):
        super().__init__()
        self.scale_range, self.base_size = (float(scale_range[0]), float(scale_range[1])), base_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sizes = {tuple(F.get_size(x)) for x in flat_inputs
                 if isinstance(x, (tv_tensors.Image, tv_tensors.Mask, PIL.Image.Image))}
        if len(sizes) != 1:
            raise ValueError(f'image and mask sizes differ (HxW: {sorted(sizes)}) or no image was given')
        height, width = sizes.pop()
        factor = float(torch.empty(()).uniform_(*self.scale_range))
        scale = (self.base_size or min(height, width)) * factor / min(height, width)
        return {'size': [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params['size'], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def segmentation_transforms(
        train: bool,
        crop_size: int | tuple[int, int] = (512, 512),
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: int | None = None,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
) -> v2.Compose:
    """``(image, mask) → (image, mask)`` for semantic segmentation; images become float32 normalized with the ImageNet
    mean/std of timm, masks stay int64. Train: random short-side rescale (:class:`_RandomShortSideScale`), random
    crop to ``crop_size`` (H, W) padding the image with 0 and the mask with ``ignore_index`` where needed, horizontal
    flip, optional photometric distortion. Eval: only the conversion and normalization (the size is kept)."""
    steps: list[Callable] = []
    if train:
        crop = _pair(crop_size, 'crop_size')
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f'scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}')
        if base_size is not None and base_size < 1:
            raise ValueError(f'base_size must be a positive short-side length or None, got {base_size!r}')
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f'hflip is a probability, got {hflip}')
        if (low, high) != (1.0, 1.0) or base_size is not None:
            steps.append(_RandomShortSideScale((low, high), base_size))
        steps.append(v2.RandomCrop(crop, pad_if_needed=True,
                                   fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if photometric:
            steps.append(v2.RandomPhotometricDistort())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return v2.Compose(steps)
