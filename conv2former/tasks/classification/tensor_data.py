"""A tensor-resident data path for small classification datasets (``--data-cache``).

The images are decoded once into a uint8 cache on disk (``images.npy``, memory-mapped when read), keyed by the
content of the image files, the class list, the split's preprocessing and the size; a changed file makes a new
cache. The training split is stored squashed to ``img_size`` x ``img_size``; the validation split exactly as the
evaluation transform gives it (resize + center crop), so validation preprocessing is done once.

Training batches are drawn from memory as uint8 and augmented batch-wise on the training device by ``BatchAugment``:
random-resized-crop and horizontal flip in *one* bilinear resampling per image (on the CPU per image on uint8, on an
accelerator one batched ``grid_sample``), and normalisation. The crop boxes and flips are drawn from torch's global CPU generator, which the
engine seeds per (seed, rank, epoch, batch index) before every batch: augmentation is reproducible and a resumed run
continues bit-identically (on CPU). Its numbers need not equal the PIL pipeline's. Mixup/CutMix run afterwards, as in
the PIL path, and random erasing (timm's ``RandomErasing`` on the normalised batch, as timm's GPU prefetcher does it).
Colour jitter and auto-augment are not done by this path (those options are refused).

Unreadable images are skipped when the cache is built and counted (``num_skipped``/``skipped``) as in the PIL path;
``strict`` raises instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...data import _default_cache_dir, load_rgb
from .data import ImageFolderDataset

__all__ = ['BatchAugment', 'TensorImageDataset', 'build_tensor_cache', 'cached_datasets']

_logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def _cache_key(samples: Sequence[tuple[str, int]], root: Path, class_names: list, recipe: str) -> str:
    """sha256 over the cache format, classes, preprocessing and every image file's relative path, label and bytes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, class_names, recipe]).encode())
    for path, target in samples:
        h.update(f'\0{os.path.relpath(path, root)}\0{target}\0'.encode())
        with open(path, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _decode_all(samples, prepare: Callable, size: int, folder: Path, strict: bool, desc: str) -> list:
    """Decode every sample into ``folder/images.npy`` (N, H, W, 3 uint8); returns the skipped (path, reason)."""
    images = np.lib.format.open_memmap(folder / 'images.npy', mode='w+', dtype=np.uint8,
                                       shape=(len(samples), size, size, 3))
    targets, skipped = [], []
    for path, target in tqdm(samples, desc=desc, unit='img', dynamic_ncols=True, mininterval=2):
        try:
            arr = np.asarray(prepare(load_rgb(path)), dtype=np.uint8)
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(f'unreadable image {path}: {e}') from e
            skipped.append((path, str(e)))
            continue
        if arr.shape != (size, size, 3):
            raise ValueError(f'{path}: preprocessing gave shape {arr.shape}, expected {(size, size, 3)}')
        images[len(targets)] = arr
        targets.append(target)
    images.flush()
    del images
    if len(targets) < len(samples):  # drop the unused tail rows of skipped images
        kept = np.load(folder / 'images.npy', mmap_mode='r')[:len(targets)].copy()
        np.save(folder / 'images.npy', kept)
    np.save(folder / 'targets.npy', np.asarray(targets, dtype=np.int64))
    return skipped


def build_tensor_cache(split_dir, size: int, prepare: Callable, recipe: str, class_names: Optional[list] = None,
                       strict: bool = False, cache_dir=None) -> Path:
    """The cache folder of ``split_dir`` preprocessed by ``prepare`` (PIL image -> ``size`` x ``size`` RGB), built
    once (atomically) under ``<cache>/tensor-cache``; ``recipe`` describes ``prepare`` in the key."""
    listing = ImageFolderDataset(split_dir, class_names=class_names, strict=strict)
    root = Path(split_dir)
    key = _cache_key(listing.samples, root, listing.class_names, f'{recipe}@{size}')
    base = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir() / 'tensor-cache'
    target = base / f'{root.parent.name}-{root.name}-{size}px-{key}'
    if (target / 'meta.json').is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=base))
    try:
        unreadable = _decode_all(listing.samples, prepare, size, tmp, strict, f'caching {root.name} at {size}px')
        meta = dict(version=CACHE_VERSION, root=str(root), class_names=listing.class_names, size=size,
                    recipe=recipe, skipped=listing.skipped + unreadable,
                    num_images=len(listing.samples) - len(unreadable))
        (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / 'meta.json').is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class TensorImageDataset(torch.utils.data.Dataset):
    """Images of a tensor cache: ``(uint8 CHW tensor, class index)``, or normalised float CHW when ``mean``/``std``
    are given (validation). ``class_names``, ``num_skipped`` and ``skipped`` as ``ImageFolderDataset``'s."""

    def __init__(self, folder, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        self.folder = Path(folder)
        meta = json.loads((self.folder / 'meta.json').read_text())
        self.class_names, self.size = meta['class_names'], meta['size']
        self.skipped = [tuple(s) for s in meta['skipped']]
        self.num_skipped = len(self.skipped)
        self.targets = np.load(self.folder / 'targets.npy')
        self._images = None
        self.mean = None if mean is None else torch.tensor(mean).view(3, 1, 1) * 255
        self.std = None if std is None else torch.tensor(std).view(3, 1, 1) * 255

    @property
    def images(self) -> np.ndarray:
        if self._images is None:  # opened lazily: DataLoader workers each map the file themselves
            self._images = np.load(self.folder / 'images.npy', mmap_mode='r')
        return self._images

    def __getstate__(self):
        return dict(self.__dict__, _images=None)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def batched(self) -> bool:
        """Training batches are fetched whole (``__getitems__``): no per-sample work, no randomness."""
        return self.mean is None

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        if self.mean is not None:
            image = (image.float() - self.mean) / self.std
        return image, int(self.targets[index])

    def __getitems__(self, indices: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (B, 3, H, W), int64 (B,)) of ``indices`` in one gather from the memory map (collate with
        ``pass_batch``); normalised (validation) datasets give the samples one by one, for the default collate."""
        if not self.batched:
            return [self[i] for i in indices]
        order = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.images[order]).permute(0, 3, 1, 2)  # channels-last, as BatchAugment wants
        return images, torch.from_numpy(self.targets[order])


def pass_batch(batch):
    """The collate function of batches that ``TensorImageDataset.__getitems__`` already assembled."""
    return batch


class BatchAugment:
    """Random-resized-crop + horizontal flip + normalisation of a uint8 (B, 3, H, W) batch on its device. Each crop
    box (integer pixels, drawn as torchvision's ``RandomResizedCrop`` draws them) is resized to ``size`` x ``size``
    by bilinear interpolation (``align_corners=False``, no antialiasing), then flipped with probability ``hflip``.
    Parameters come from torch's global CPU generator (seeded by the engine), so both devices draw the same boxes.

    With ``re_prob`` > 0, timm's random erasing follows on the normalised batch.

    Two implementations of the same resampling: on the CPU each crop is resized by ``F.interpolate`` on its uint8
    channels-last view (torch's vectorised uint8 kernel; ~5x faster than one batched ``grid_sample`` in float on
    two cores), then the batch is normalised; on an accelerator one batched ``grid_sample`` over per-image sampling
    grids, clamped to the crop box as ``F.interpolate`` clamps, normalised before resampling. They agree up to the
    CPU path's rounding to uint8 (<= 1 grey level)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), re_prob: float = 0.0):
        self.size, self.scale, self.hflip, self.re_prob = size, tuple(scale), hflip, re_prob
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def boxes(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4) int64 crop boxes (x0, y0, w, h) inside the image, one try per image then clamped (torchvision
        retries up to 10 times first), and (B,) bool flips."""
        area = torch.empty(batch).uniform_(*self.scale) * height * width
        ratio = torch.exp(torch.empty(batch).uniform_(*self.log_ratio))
        w = torch.sqrt(area * ratio).round().clamp(1, width)
        h = torch.sqrt(area / ratio).round().clamp(1, height)
        x0 = (torch.rand(batch) * (width - w + 1)).floor().clamp(max=width - w)
        y0 = (torch.rand(batch) * (height - h + 1)).floor().clamp(max=height - h)
        flips = torch.rand(batch) < self.hflip
        return torch.stack([x0, y0, w, h], 1).long(), flips

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'BatchAugment expects a uint8 (B, 3, H, W) batch, got {images.dtype} '
                             f'{tuple(images.shape)}')
        boxes, flips = self.boxes(images.shape[0], images.shape[2], images.shape[3])
        if images.device.type == 'cpu':
            scale, shift = self._normalisation(images.device)
            out = self.resize_each(images, boxes, flips).float().mul_(scale).add_(shift)
        else:
            out = self.resample_grid(images, boxes, flips)
        if self.re_prob > 0:  # in place, one patch of per-pixel normal noise per erased image (timm's 'pixel' mode)
            from timm.data.random_erasing import RandomErasing
            RandomErasing(self.re_prob, mode='pixel', max_count=1, device=out.device)(out)
        return out

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of uint8 pixels to normalised values, shaped (1, 3, 1, 1)."""
        scale, shift = 1 / (255 * self.std), -self.mean / self.std
        return scale.to(device).view(1, 3, 1, 1), shift.to(device).view(1, 3, 1, 1)

    def resize_each(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, size, size): every crop resized on its own (the CPU implementation)."""
        views = images.contiguous(memory_format=torch.channels_last)  # the uint8 fast path wants channels-last
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.uint8, device=images.device)
        for i, ((x0, y0, w, h), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
            crop = F.interpolate(views[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=(self.size, self.size),
                                 mode='bilinear', align_corners=False, antialias=False)[0]
            out[i] = crop.flip(-1) if flip else crop
        return out

    def resample_grid(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, size, size) by one batched ``grid_sample`` (the accelerator implementation)."""
        device, (height, width) = images.device, images.shape[2:]
        x0, y0, w, h = boxes.to(device, torch.float32).unbind(1)
        steps = torch.arange(self.size, dtype=torch.float32, device=device) + 0.5

        def axis(start, length, extent):  # pixel coordinates of the output samples, clamped inside the box
            inside = (steps * (length / self.size).unsqueeze(1) - 0.5).clamp(min=0)
            inside = torch.minimum(inside, (length - 1).unsqueeze(1))
            return (2 * (start.unsqueeze(1) + inside) + 1) / extent - 1  # grid_sample's units, align_corners=False
        xs, ys = axis(x0, w, width), axis(y0, h, height)
        xs = torch.where(flips.to(device).unsqueeze(1), xs.flip(1), xs)
        size = (len(images), self.size, self.size)
        grid = torch.stack([xs.unsqueeze(1).expand(size), ys.unsqueeze(2).expand(size)], dim=-1)
        scale, shift = self._normalisation(device)  # bilinear weights sum to 1: normalising first is the same
        return F.grid_sample(torch.addcmul(shift, images, scale), grid, mode='bilinear', padding_mode='border',
                             align_corners=False)


def _squash(size: int, interpolation: str) -> Callable:
    from PIL import Image
    method = getattr(Image.Resampling, interpolation.upper(), Image.Resampling.BILINEAR)
    return lambda img: img.resize((size, size), method)


def _eval_steps(data_config: dict) -> Callable:
    """timm's evaluation transform without ToTensor/Normalize: PIL image -> resized, center-cropped PIL image."""
    from timm.data import create_transform
    steps = [t for t in create_transform(**data_config).transforms
             if type(t).__name__ not in ('ToTensor', 'MaybeToTensor', 'Normalize')]

    def prepare(img):
        for step in steps:
            img = step(img)
        return img
    return prepare


def cached_datasets(root, data_config: dict, strict: bool = False, cache_dir=None
                    ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, val) tensor-cache datasets of the ImageFolder tree ``root`` for ``data_config`` (timm's: input_size,
    interpolation, crop_pct, mean, std): train squashed to the input size, val as the evaluation transform gives."""
    from ...data import find_split
    size, interp = data_config['input_size'][-1], data_config['interpolation']
    train_dir = find_split(root, 'train')
    train = TensorImageDataset(build_tensor_cache(train_dir, size, _squash(size, interp), f'squash-{interp}',
                                                  strict=strict, cache_dir=cache_dir))
    val_recipe = f'eval-{interp}-crop{data_config["crop_pct"]}-{data_config.get("crop_mode", "center")}'
    val = TensorImageDataset(build_tensor_cache(find_split(root, 'val'), size, _eval_steps(data_config), val_recipe,
                                                class_names=train.class_names, strict=strict, cache_dir=cache_dir),
                             mean=data_config['mean'], std=data_config['std'])
    return train, val


def check_cache_options(options) -> None:
    """Refuse options the tensor path does not do (rather than silently dropping them)."""
    from .data import is_timm_source
    if is_timm_source(options.data):
        raise ValueError(f'--data-cache needs an ImageFolder tree or archive, not the timm source {options.data}')
    unsupported = [(flag, value) for flag, value, off in (
        ('--color-jitter', options.color_jitter, 0), ('--aa', options.aa, None))
        if value != off and value is not None]
    if unsupported:
        flag, value = unsupported[0]
        raise ValueError(f'--data-cache augments batches with random-resized-crop, flip and random erasing only; '
                         f'{flag} {value} is not supported there: drop it (or set it off; --recipe small does), or '
                         f'drop --data-cache')
