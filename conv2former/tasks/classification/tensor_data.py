"""A tensor-resident data path for small classification datasets (``--data-cache``).

The images are decoded once into a uint8 cache on disk (``images.npy``, memory-mapped when read), keyed by the
content of the image files, the class list, the split's preprocessing and the size; a changed file makes a new
cache. The training split is stored squashed to ``img_size`` x ``img_size``; the validation split exactly as the
evaluation transform gives it (resize + center crop), so validation preprocessing is done once.

Training batches are drawn from memory as uint8 and augmented batch-wise on the training device by
``batch_augment.BatchAugment`` (crop, flip, RandAugment or colour jitter, normalisation, random erasing, as timm's PIL
transform does them). Its random draws come from the global generators, which the engine seeds per (seed, rank,
epoch, batch index) before every batch: augmentation is reproducible and a resumed run continues bit-identically (on
CPU). Its numbers need not equal the PIL pipeline's. Mixup/CutMix run afterwards, as in the PIL path.

Unreadable images are skipped when the cache is built and counted (``num_skipped``/``skipped``) as in the PIL path;
``strict`` raises instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ...data import default_cache_dir
from .batch_augment import BatchRandAugment
from .data import ImageFolderDataset

__all__ = ['TensorImageDataset', 'build_tensor_cache', 'cached_datasets']

_logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def _cache_key(listing: ImageFolderDataset, root: Path, class_names: list, recipe: str) -> str:
    """sha256 over the cache format, classes, preprocessing and every image's relative path, label and bytes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, class_names, recipe]).encode())
    for i, (path, target) in enumerate(listing.samples):
        h.update(f'\0{os.path.relpath(path, root)}\0{target}\0'.encode())
        h.update(listing.read_bytes(i))
    return h.hexdigest()[:16]


def _decode_all(listing: ImageFolderDataset, prepare: Callable, size: int, folder: Path, strict: bool,
                desc: str) -> list:
    """Decode every sample into ``folder/images.npy`` (N, H, W, 3 uint8); returns the skipped (path, reason)."""
    samples = listing.samples
    images = np.lib.format.open_memmap(folder / 'images.npy', mode='w+', dtype=np.uint8,
                                       shape=(len(samples), size, size, 3))
    targets, skipped = [], []
    for i, (path, target) in enumerate(tqdm(samples, desc=desc, unit='img', dynamic_ncols=True, mininterval=2)):
        try:
            arr = np.asarray(prepare(listing.decode(i)), dtype=np.uint8)
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
    once (atomically) under ``<cache>/tensor-cache``; ``recipe`` describes ``prepare`` in the key. ``split_dir`` may
    also be a dataset already listed (e.g. ``shards.ShardDataset``)."""
    listing = split_dir if isinstance(split_dir, ImageFolderDataset) else \
        ImageFolderDataset(split_dir, class_names=class_names, strict=strict)
    root = listing.root
    key = _cache_key(listing, root, listing.class_names, f'{recipe}@{size}')
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / 'tensor-cache'
    target = base / f'{root.parent.name}-{root.name}-{size}px-{key}'
    if (target / 'meta.json').is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=base))
    try:
        unreadable = _decode_all(listing, prepare, size, tmp, strict, f'caching {root.name} at {size}px')
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

    batched = True  # __getitems__ gives whole batches (collate with ``pass_batch``): load without workers

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        if self.mean is not None:
            image = (image.float() - self.mean) / self.std
        return image, int(self.targets[index])

    def __getitems__(self, indices: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W), int64 (B,)) of ``indices`` in one gather from the memory map: uint8 channels-last
        (training: ``BatchAugment`` takes it from there), or normalised float32 (validation)."""
        order = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.images[order]).permute(0, 3, 1, 2)  # channels-last, as BatchAugment wants
        if self.mean is not None:
            images = ((images.float() - self.mean) / self.std).contiguous()
        return images, torch.from_numpy(self.targets[order])


def pass_batch(batch):
    """The collate function of batches that ``TensorImageDataset.__getitems__`` already assembled."""
    return batch


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
    """(train, val) tensor-cache datasets of the ImageFolder tree (or WebDataset shards) ``root`` for
    ``data_config`` (timm's: input_size, interpolation, crop_pct, mean, std): train squashed to the input size, val
    as the evaluation transform gives."""
    from ...data import find_split
    from ...shards import build_shard_datasets, is_shard_source
    size, interp = data_config['input_size'][-1], data_config['interpolation']
    if is_shard_source(root):  # WebDataset shards: their listings stand for the split folders
        train_dir, val_dir, _ = build_shard_datasets(root, strict=strict)
    else:
        train_dir, val_dir = find_split(root, 'train'), find_split(root, 'val')
    train = TensorImageDataset(build_tensor_cache(train_dir, size, _squash(size, interp), f'squash-{interp}',
                                                  strict=strict, cache_dir=cache_dir))
    val_recipe = f'eval-{interp}-crop{data_config["crop_pct"]}-{data_config.get("crop_mode", "center")}'
    val = TensorImageDataset(build_tensor_cache(val_dir, size, _eval_steps(data_config), val_recipe,
                                                class_names=train.class_names, strict=strict, cache_dir=cache_dir),
                             mean=data_config['mean'], std=data_config['std'])
    return train, val


def check_cache_options(options) -> None:
    """Refuse what the tensor path cannot do (rather than silently dropping it): timm sources, auto-augment policies
    other than RandAugment's."""
    from .data import is_timm_source
    if is_timm_source(options.data):
        raise ValueError(f'--data-cache needs an ImageFolder tree or archive, not the timm source {options.data}')
    if options.aa:
        BatchRandAugment(options.aa, 224, (0.5, 0.5, 0.5))  # raises for policies or ops it does not run
