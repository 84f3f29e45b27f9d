"""Detection and instance-segmentation datasets and transforms (torchvision conventions).

Items are ``(image, target)``: a ``tv_tensors.Image`` uint8 ``[3, H, W]`` and a dict with ``boxes``
(``tv_tensors.BoundingBoxes``, XYXY float32), ``labels`` (int64, contiguous 1..K, 0 = background), ``masks``
(``tv_tensors.Mask`` uint8 ``[N, H, W]``, only with ``masks=True``), ``image_id``, ``area`` and ``iscrowd``. Data may
be a folder or a ``.tar``/``.tar.gz`` archive of one (see :data:`DETECTION_LAYOUTS`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import pycocotools.mask as mask_utils
import torch
import torch.utils.data
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ...data import IMG_EXTENSIONS, INDEX_MODES, canonical_split, first_items as _first, load_rgb, resolve_data_dir

__all__ = ['CocoDetectionDataset', 'PennFudanDataset', 'build_detection_dataset', 'collate_detection',
           'detection_transforms']

_logger = logging.getLogger(__name__)

BACKGROUND = '__background__'
DETECTION_LAYOUTS = ('Penn-Fudan: <root>/PedMasks/<name>_mask.png + <root>/JPEGImages/ (or PNGImages/); '
                     'COCO: <root>/annotations/instances_<split>*.json + images in <root>/images/<split>*/ '
                     'or <root>/<split>*/')
STAT_KEYS = ('boxes_clipped', 'boxes_dropped', 'crowd_excluded', 'images_without_annotations', 'images_skipped')


# ---------------------------------------------------------------------------------------------- instance datasets
@dataclass
class _Instance:
    box: tuple[float, float, float, float]  # XYXY, clipped to the image
    label: int  # contiguous 1..K
    area: float
    iscrowd: bool
    segmentation: Any = None  # COCO polygons or RLE (sized like the image), or None


@dataclass
class _ImageRecord:
    path: Path
    image_id: int
    height: int
    width: int
    instances: list[_Instance]


def _coco_silently(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as a uint8 ``[H, W]`` 0/1 mask."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # pycocotools reads a 4-number list as a box
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation['counts'], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def _encode_mask(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


def _labels_and_instance_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """For SanitizeBoundingBoxes: the per-instance tensors of the target (labels, and area / iscrowd when present)."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    if not isinstance(target, dict) or 'labels' not in target:
        raise ValueError('detection transforms expect (image, target) with a target dict holding "labels"')
    return tuple(target[k] for k in ('labels', 'area', 'iscrowd') if isinstance(target.get(k), torch.Tensor))


class _InstanceDataset(torch.utils.data.Dataset):
    """Shared item building, COCO ground truth and bookkeeping of the detection datasets."""

    class_names: list[str]
    masks: bool
    transforms: Callable | None
    stats: dict[str, int]
    _records: list[_ImageRecord]

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> Path:
        return self._records[index].path

    def _check_size(self, record: _ImageRecord, image: PIL.Image.Image) -> None:
        if image.size != (record.width, record.height):
            raise ValueError(f'{record.path}: decoded image is {image.width}x{image.height} (WxH) but its annotations '
                             f'say {record.width}x{record.height}')

    def __getitem__(self, index: int):
        record = self._records[index]
        pil = load_rgb(record.path)
        self._check_size(record, pil)
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        instances = [x for x in record.instances if not x.iscrowd]
        boxes = torch.tensor([x.box for x in instances], dtype=torch.float32).reshape(-1, 4)
        target = {
            'boxes': tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY,
                                              canvas_size=(record.height, record.width)),
            'labels': torch.tensor([x.label for x in instances], dtype=torch.int64),
            'image_id': record.image_id,
            'area': torch.tensor([x.area for x in instances], dtype=torch.float32),
            'iscrowd': torch.zeros(len(instances), dtype=torch.int64),
        }
        if self.masks:
            masks = np.zeros((len(instances), record.height, record.width), np.uint8)
            for i, x in enumerate(instances):
                masks[i] = _decode_segmentation(x.segmentation, record.height, record.width)
            target['masks'] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self) -> COCO:
        """COCO ground truth of exactly this dataset's images: category ids = labels 1..K, crowd regions kept
        (iscrowd=1), clipped boxes in xywh, ``segmentation`` when ``masks=True``, annotation ids 1..N."""
        images, annotations = [], []
        for record in self._records:
            images.append({'id': record.image_id, 'file_name': record.path.name, 'height': record.height,
                           'width': record.width})
            for x in record.instances:
                x1, y1, x2, y2 = x.box
                ann = {'id': len(annotations) + 1, 'image_id': record.image_id, 'category_id': x.label,
                       'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': float(x.area), 'iscrowd': int(x.iscrowd)}
                if self.masks and x.segmentation is not None:
                    ann['segmentation'] = x.segmentation
                annotations.append(ann)
        categories = [{'id': i, 'name': name, 'supercategory': ''} for i, name in enumerate(self.class_names) if i]
        return _coco_silently({'info': {}, 'licenses': [], 'images': images, 'annotations': annotations,
                               'categories': categories})

    def __repr__(self) -> str:
        stats = ', '.join(f'{k}={v}' for k, v in self.stats.items() if v)
        return (f'{type(self).__name__}(images={len(self)}, classes={len(self.class_names) - 1}, masks={self.masks}'
                + (f', {stats}' if stats else '') + ')')


class CocoDetectionDataset(_InstanceDataset):
    """A COCO instances JSON and its image folder, cleaned for torchvision detectors.

    Categories sorted by id become labels 1..K (``class_names[0]`` is ``'__background__'``). Crowd annotations are
    left out of the targets (``crowd_excluded``) but kept in :meth:`coco_gt`; boxes are clipped to the image
    (``boxes_clipped``) and dropped when empty (``boxes_dropped``); images without usable annotations are kept as
    negatives, or skipped with ``skip_empty=True`` (``images_skipped``). Masks are decoded from polygons or RLE.
    """

    def __init__(
            self,
            image_dir: str | os.PathLike,
            ann_file: str | os.PathLike,
            masks: bool = True,
            skip_empty: bool = False,
            transforms: Callable | None = None,
    ):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.masks, self.skip_empty, self.transforms = masks, skip_empty, transforms
        if not self.ann_file.is_file():
            raise FileNotFoundError(f'COCO annotation file {self.ann_file} does not exist')
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f'COCO image folder {self.image_dir} does not exist or is not a folder')
        try:
            dataset = json.loads(self.ann_file.read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{self.ann_file}: not a readable JSON file ({e})') from e
        missing = [k for k in ('images', 'annotations', 'categories')
                   if not isinstance(dataset, dict) or not isinstance(dataset.get(k), list)]
        if missing:
            raise ValueError(f'{self.ann_file}: not a COCO instances file (missing lists: {missing}); expected keys '
                             'images, annotations, categories')
        coco = _coco_silently(dataset)
        if len(coco.imgs) != len(dataset['images']):
            raise ValueError(f'{self.ann_file}: duplicate image ids in "images"')
        category_ids = sorted(coco.cats)
        self.category_ids: list[int] = category_ids
        self.class_names = [BACKGROUND] + [str(coco.cats[c]['name']) for c in category_ids]
        label_of = {c: i + 1 for i, c in enumerate(category_ids)}
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._records = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            if not isinstance(image_id, int) or any(info.get(k) is None for k in ('file_name', 'height', 'width')):
                raise ValueError(f'{self.ann_file}: image {info} needs an integer id, file_name, height and width')
            height, width = int(info['height']), int(info['width'])
            instances = [self._instance(ann, label_of, height, width) for ann in coco.imgToAnns.get(image_id, [])]
            instances = [x for x in instances if x is not None]
            if not any(not x.iscrowd for x in instances):
                self.stats['images_without_annotations'] += 1
                if skip_empty:
                    self.stats['images_skipped'] += 1
                    continue
            self._records.append(_ImageRecord(self.image_dir / info['file_name'], int(image_id), height, width,
                                              instances))
        unknown_images = sorted({a.get('image_id') for a in dataset['annotations']} - set(coco.imgs), key=str)
        if unknown_images:
            raise ValueError(f'{self.ann_file}: annotations refer to image ids not in "images": '
                             f'{_first(unknown_images)}')
        absent = [r.path for r in self._records if not r.path.is_file()]
        if absent:
            raise FileNotFoundError(f'{len(absent)} image files of {self.ann_file} are missing under {self.image_dir}: '
                                    f'{_first(absent, 3)}')

    def _instance(self, ann: dict, label_of: dict[int, int], height: int, width: int) -> _Instance | None:
        where = f'{self.ann_file}: annotation id {ann.get("id")} (image id {ann.get("image_id")})'
        if ann.get('category_id') not in label_of:
            raise ValueError(f'{where} has category_id {ann.get("category_id")!r}, which is not in "categories" '
                             f'(known ids: {sorted(label_of)})')
        bbox = ann.get('bbox')
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f'{where} has bbox {bbox!r}; expected [x, y, width, height]')
        iscrowd = bool(ann.get('iscrowd', 0))
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, dict):
            size = list(segmentation.get('size', ()))
            if 'counts' not in segmentation:
                raise ValueError(f'{where}: RLE segmentation has no "counts"')
            if size != [height, width]:
                raise ValueError(f'{where}: RLE mask size {size} (HxW) differs from the image size '
                                 f'{[height, width]} given for image id {ann.get("image_id")}')
        elif isinstance(segmentation, list):
            if any(not isinstance(p, list) or len(p) % 2 for p in segmentation):
                raise ValueError(f'{where}: segmentation is not a list of [x1, y1, x2, y2, ...] polygons')
            if not any(len(p) >= 6 for p in segmentation):
                segmentation = _encode_mask(np.zeros((height, width), np.uint8))  # no polygon with >= 3 points
        elif self.masks:
            raise ValueError(f'{where} has no segmentation (got {segmentation!r}); pass masks=False for box-only data')
        if iscrowd:
            self.stats['crowd_excluded'] += 1
        x, y, w, h = (float(v) for v in bbox)
        box = (min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
               min(max(y + h, 0.0), height))
        if box[2] <= box[0] or box[3] <= box[1]:
            if not iscrowd:
                self.stats['boxes_dropped'] += 1
            return None
        if not iscrowd and box != (x, y, x + w, y + h):
            self.stats['boxes_clipped'] += 1
        area = float(ann['area']) if ann.get('area') is not None else (box[2] - box[0]) * (box[3] - box[1])
        return _Instance(box, label_of[ann['category_id']], area, iscrowd, segmentation)


def _instance_boxes(ids: np.ndarray) -> list[tuple[int, tuple[float, float, float, float]]]:
    """``(value, XYXY box)`` of each non-zero value of an instance-id map, with the convention of
    ``torchvision.ops.masks_to_boxes`` (x2/y2 = last covered column/row), computed with numpy for speed."""
    values = np.flatnonzero(np.bincount(ids.ravel())) if ids.dtype.kind in 'ub' else np.unique(ids)
    out = []
    for value in values[values != 0].tolist():
        mask = ids == value
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        out.append((value, (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))))
    return out


class PennFudanDataset(_InstanceDataset):
    """Penn-Fudan pedestrians: ``<root>/JPEGImages/`` (or ``PNGImages/``) and ``<root>/PedMasks/<name>_mask.png``.

    Instances are the distinct non-zero values of the mask; one class, 'person'. Boxes are those of
    ``torchvision.ops.masks_to_boxes``, with its convention kept (x2/y2 = the last covered pixel column/row, no +1);
    instances one pixel wide or high are dropped (``boxes_dropped``). ``area`` is the mask's pixel count.
    ``split``: the sorted image list is permuted with ``torch.randperm`` seeded by ``seed``; the last ``holdout``
    images are 'val', the rest 'train' ('all': every image). ``image_id`` is the 1-based position in the sorted list,
    so ids agree across splits. All masks are read once at construction.
    """

    def __init__(
            self,
            root: str | os.PathLike,
            split: str = 'train',
            holdout: int = 50,
            seed: int = 1,
            masks: bool = True,
            transforms: Callable | None = None,
    ):
        self.root, self.masks, self.transforms = Path(root), masks, transforms
        try:
            self.split = 'all' if split == 'all' else canonical_split(split)
        except ValueError:
            self.split = None
        if self.split not in ('train', 'val', 'all'):
            raise ValueError(f"unknown Penn-Fudan split {split!r}; expected 'train', 'val' (or a synonym) or 'all'")
        image_dir = next((self.root / d for d in ('JPEGImages', 'PNGImages') if (self.root / d).is_dir()), None)
        mask_dir = self.root / 'PedMasks'
        if image_dir is None or not mask_dir.is_dir():
            raise FileNotFoundError(f'{self.root} is not a Penn-Fudan folder: expected <root>/JPEGImages/ (or '
                                    'PNGImages/) and <root>/PedMasks/<name>_mask.png')
        paths = sorted(p for p in image_dir.iterdir()
                       if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in IMG_EXTENSIONS)
        n = len(paths)
        if not n:
            raise ValueError(f'no images in {image_dir} (extensions {", ".join(IMG_EXTENSIONS)})')
        if self.split != 'all' and not 0 < holdout < n:
            raise ValueError(f'holdout={holdout} must leave images in both splits: expected 1..{n - 1} for the '
                             f'{n} images of {image_dir}')
        self.num_images = n  # of every split: the split is a slice of one fixed order
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = {'train': order[:n - holdout], 'val': order[n - holdout:], 'all': order}[self.split]
        self.class_names = [BACKGROUND, 'person']
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._records = [self._record(paths[i], mask_dir, i + 1) for i in sorted(chosen)]

    def _record(self, image_path: Path, mask_dir: Path, image_id: int) -> _ImageRecord:
        mask_path = mask_dir / f'{image_path.stem}_mask.png'
        if not mask_path.is_file():
            raise ValueError(f'image {image_path} has no mask file: expected {mask_path}')
        try:
            with PIL.Image.open(image_path) as im:
                image_size = im.size
            with PIL.Image.open(mask_path) as im:
                if im.mode not in INDEX_MODES:
                    raise ValueError(f'{mask_path}: mode {im.mode} is not an instance-index mask (expected a '
                                     'single-channel PNG, 0 = background, k = k-th person)')
                ids = np.asarray(im)
        except (OSError, SyntaxError) as e:
            raise OSError(f'cannot read {image_path} or its mask {mask_path}: {e}') from e
        if image_size != (ids.shape[1], ids.shape[0]):
            raise ValueError(f'mask {mask_path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but image {image_path} is '
                             f'{image_size[0]}x{image_size[1]}')
        instances = []
        for value, box in _instance_boxes(ids):
            if box[2] <= box[0] or box[3] <= box[1]:
                self.stats['boxes_dropped'] += 1
                continue
            value_mask = ids == value
            segmentation = _encode_mask(value_mask) if self.masks else None
            instances.append(_Instance(box, 1, float(np.count_nonzero(value_mask)), False, segmentation))
        if not instances:
            self.stats['images_without_annotations'] += 1
        return _ImageRecord(image_path, image_id, ids.shape[0], ids.shape[1], instances)


def _coco_files(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, instances json) of ``split`` in a COCO-style tree."""
    ann_dir = root / 'annotations'
    found = sorted(p.name for p in ann_dir.glob('instances_*.json'))
    matches = sorted(ann_dir.glob(f'instances_{split}*.json'))
    exact = ann_dir / f'instances_{split}.json'
    if exact.is_file():
        ann_file = exact
    elif len(matches) == 1:
        ann_file = matches[0]
    elif matches:
        raise ValueError(f'split {split!r} matches several annotation files in {ann_dir}: '
                         f'{", ".join(p.name for p in matches)}; give the full split name (e.g. '
                         f'{matches[0].stem[len("instances_"):]!r})')
    else:
        splits = [name[len('instances_'):-len('.json')] for name in found]
        hint = (f"; available splits: {', '.join(splits)} (a dataset with a single split, such as COCO128's "
                "train2017, is used for both train and val)") if splits else ''
        raise FileNotFoundError(f'no annotations/instances_{split}*.json in {root}; json files found: '
                                f'{", ".join(found) or "none"}{hint}')
    tag = ann_file.stem[len('instances_'):]
    candidates = [root / 'images' / tag, root / tag]
    for base in (root / 'images', root):
        if base.is_dir():
            candidates += sorted(p for p in base.glob(f'{split}*') if p.is_dir() and p.name != 'annotations')
    image_dir = next((p for p in candidates if p.is_dir()), None)
    if image_dir is None and (root / 'images').is_dir() and any(
            p.suffix.lower() in IMG_EXTENSIONS for p in (root / 'images').iterdir()):
        image_dir = root / 'images'
    if image_dir is None:
        raise FileNotFoundError(f'no image folder for {ann_file.name} in {root}: tried images/{tag}/, {tag}/, '
                                f'images/{split}*/, {split}*/')
    return image_dir, ann_file


def build_detection_dataset(
        data: str | os.PathLike,
        split: str,
        masks: bool = True,
        skip_empty: bool = False,
        holdout: int = 50,
        cache_dir: str | os.PathLike | None = None,
        transforms: Callable | None = None,
) -> CocoDetectionDataset | PennFudanDataset:
    """The ``split`` of the detection dataset at ``data`` (folder or archive): Penn-Fudan when ``PedMasks/`` exists
    (split train/val/all with ``holdout``; ``skip_empty`` does not apply), else COCO (``annotations/instances_<split>
    *.json``; splits like 'train', 'val', 'train2017')."""
    root = resolve_data_dir(data, cache_dir, layout=DETECTION_LAYOUTS)
    if (root / 'PedMasks').is_dir():
        return PennFudanDataset(root, split, holdout=holdout, masks=masks, transforms=transforms)
    if (root / 'annotations').is_dir():
        image_dir, ann_file = _coco_files(root, split)
        return CocoDetectionDataset(image_dir, ann_file, masks=masks, skip_empty=skip_empty, transforms=transforms)
    raise FileNotFoundError(f'{root} is not a known detection layout; expected {DETECTION_LAYOUTS}')


def detection_transforms(train: bool, hflip: float = 0.5, photometric: bool = False) -> v2.Compose:
    """Detection transforms: (train) random horizontal flip and optional photometric distortion, then float [0, 1]
    images and SanitizeBoundingBoxes (labels, area, iscrowd and masks filtered with the boxes). No resizing or
    normalization: torchvision's detectors do both inside the model."""
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f'hflip is a probability, got {hflip}')
    steps: list[Callable] = []
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if train and photometric:
        steps.append(v2.RandomPhotometricDistort())
    steps += [v2.ToDtype(torch.float32, scale=True),
              v2.SanitizeBoundingBoxes(labels_getter=_labels_and_instance_fields)]
    return v2.Compose(steps)


def collate_detection(batch: Sequence[tuple[Any, dict]]) -> tuple[list[Any], list[dict]]:
    """``[(image, target), ...]`` → ``([images], [targets])``, the input format of torchvision detectors."""
    return [image for image, _ in batch], [target for _, target in batch]
