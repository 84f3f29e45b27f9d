"""Classification data: ImageFolder trees (``<root>/<split>/<class>/<image>``, or an archive of one) and timm's
map-style dataset sources (``torch/<name>``, ``hfds/<hub id>``). Augmentations are not done here: pass timm
transforms."""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.utils.data
from PIL import Image
from tqdm import tqdm

from ...data import IMG_EXTENSIONS, FileLister, default_cache_dir, find_split, load_rgb

__all__ = ['ImageFolderDataset', 'TimmSourceDataset', 'build_datasets', 'build_timm_datasets', 'is_timm_source']

_logger = logging.getLogger(__name__)


class ImageFolderDataset(torch.utils.data.Dataset):
    """``<root>/<class>/**/<image>`` → ``(transform(load_rgb(image)), class_index)``.

    Classes are the sorted sub-folder names of ``root`` (hidden ones ignored), or ``class_names`` in the given order
    (which then fixes the class indices and must name exactly those folders). Each real file is listed once
    (symbolic links resolved; links to parent, other listed or outside folders left out: ``data.FileLister``) and
    zero-byte files are skipped when the dataset is built; unreadable images are skipped when loaded, with a
    warning: the next readable sample is returned in its place, or with ``mark_unreadable`` (evaluation) a blank
    image with target -1, which ``evaluate`` leaves out of every metric. ``strict=True`` raises ValueError for any
    of these instead. ``num_skipped`` and ``skipped`` (list of ``(path, reason)``) count all of them, including
    skips inside DataLoader worker processes (the unreadable flags live in shared memory).
    """

    def __init__(
            self,
            root: str | os.PathLike,
            transform: Callable[[Image.Image], Any] | None = None,
            class_names: list[str] | None = None,
            strict: bool = False,
            mark_unreadable: bool = False,
    ):
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        self.mark_unreadable = mark_unreadable
        if not self.root.is_dir():
            raise FileNotFoundError(f'dataset folder {self.root} does not exist or is not a directory; '
                                    'expected <root>/<class>/<image>')
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith('.'))
        if not found:
            raise ValueError(f'no class folders in {self.root}; expected <root>/<class>/<image>')
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if sorted(class_names) != found:
                raise ValueError(f'class_names do not match the class folders of {self.root}: given {class_names}, '
                                 f'found {found} (missing folders: {sorted(set(class_names) - set(found))}, '
                                 f'unexpected folders: {sorted(set(found) - set(class_names))})')
        self.class_names: list[str] = list(class_names) if class_names is not None else found
        lister = FileLister(self.root, strict=strict, log=False)
        lister.reserve(self.root / name for name in self.class_names)
        samples, empty = [], []
        for idx, name in enumerate(self.class_names):
            files = lister.list(self.root / name)
            if not files:
                _logger.warning('class folder %s holds no images (%s)', self.root / name, ', '.join(IMG_EXTENSIONS))
            for f in files:
                if f.stat().st_size == 0:
                    if strict:
                        raise ValueError(f'empty (zero-byte) image file: {f}')
                    empty.append((str(f), 'empty (zero-byte) file'))
                    continue
                samples.append((str(f), idx))
        if not samples:
            raise ValueError(f'no readable images ({", ".join(IMG_EXTENSIONS)}) in {self.root}; '
                             f'expected <root>/<class>/<image>')
        if empty:
            _logger.warning('%s: skipped %d zero-byte file(s), e.g. %s', self.root, len(empty), empty[0][0])
        if lister.skipped:
            _logger.warning('%s: left %d symbolic link(s) out, e.g. %s (%s)', self.root, len(lister.skipped),
                            *lister.skipped[0])
        self._listing_skips: list[tuple[str, str]] = lister.skipped + empty  # links left out, zero-byte files
        self.samples: list[tuple[str, int]] = sorted(samples)
        self.targets: list[int] = [t for _, t in self.samples]
        self._bad = multiprocessing.RawArray('b', len(self.samples))  # 1 = unreadable; shared with forked workers

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file skipped so far (links left out of the listing and zero-byte files,
        then those found unreadable)."""
        return self._listing_skips + [(self.samples[i][0], 'unreadable image') for i in self._bad_indices()]

    @property
    def num_skipped(self) -> int:
        return len(self._listing_skips) + len(self._bad_indices())

    def merge_skipped(self, env) -> None:
        """Under torchrun each rank finds the unreadable images of the samples it read: make every rank's count the
        run's (an image is unreadable if any rank found it so). A collective: call on every rank."""
        flags = torch.from_numpy(np.frombuffer(self._bad, dtype=np.int8))
        flags.copy_(env.any_each(flags))

    def _bad_indices(self) -> list[int]:
        return np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8)).tolist()

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f'index {index} out of range for a dataset of {n} samples')
        index %= n
        for k in range(n):  # the next readable sample, indices made one at a time (never a list of all n per call)
            i = (index + k) % n
            img = None if self._bad[i] else self._load(i)
            if img is not None:
                return (self.transform(img) if self.transform is not None else img), self.samples[i][1]
            if self.mark_unreadable:
                blank = Image.new('RGB', (32, 32))
                return (self.transform(blank) if self.transform is not None else blank), -1
        raise RuntimeError(f'no readable image in {self.root} ({n} files tried, all unreadable)')

    def check_readable(self, workers: int = 2, progress: bool = True) -> None:
        """Decode every image once, in ``workers`` threads: with ``strict``, training checks its data this way
        before the run starts (and its folder is made). Raises ValueError naming the first unreadable image."""
        from concurrent.futures import ThreadPoolExecutor

        def problem(i: int) -> str | None:
            try:
                self.decode(i)
            except (OSError, ValueError) as e:
                return str(e)
            return None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            found = pool.map(problem, range(len(self.samples)))
            for checked, error in enumerate(tqdm(found, total=len(self.samples), disable=not progress, unit='img',
                                                 desc=f'checking {self.root.name} (--strict)'), 1):
                if error:
                    raise ValueError(f'unreadable image (--strict; {checked} of {len(self.samples)} checked): '
                                     f'{error}')

    def decode(self, i: int) -> Image.Image:
        """Image ``i`` as RGB (``load_rgb``): OSError / ValueError naming it when it cannot be read."""
        return load_rgb(self.samples[i][0])

    def read_bytes(self, i: int) -> bytes:
        """The encoded image ``i`` as stored."""
        with open(self.samples[i][0], 'rb') as f:
            return f.read()

    def _load(self, i: int) -> Image.Image | None:
        """Image ``i``, or None (flagged as unreadable, with a warning) when it cannot be read."""
        path = self.samples[i][0]
        try:
            return self.decode(i)
        except (OSError, ValueError) as e:
            if self.strict:
                raise ValueError(f'unreadable image (--strict): {e}') from e
            self._bad[i] = 1
            _logger.warning('skipping unreadable image %s (%s)', path, e)
            return None

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, '
                f'classes={len(self.class_names)}, skipped={self.num_skipped})')


def _require_two_classes(class_names: list[str], where: str) -> None:
    if len(class_names) < 2:
        raise ValueError(f'{where} holds one class ({class_names[0]!r}): classification needs at least 2 class '
                         f'folders')


def build_datasets(
        data_dir: str | os.PathLike,
        train_transform: Callable[[Image.Image], Any] | None = None,
        eval_transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
) -> tuple[ImageFolderDataset, ImageFolderDataset, list[str]]:
    """``(train, val, class_names)`` from ``data_dir/<train>`` and ``data_dir/<val>`` (see :func:`find_split`).

    Both splits must hold the same class folders (ValueError listing the differences otherwise).
    """
    root = Path(data_dir)
    train = ImageFolderDataset(find_split(root, 'train'), train_transform, strict=strict)
    _require_two_classes(train.class_names, str(train.root))
    val_root = find_split(root, 'val')
    val_classes = sorted(p.name for p in val_root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if val_classes != train.class_names:
        only_train = sorted(set(train.class_names) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train.class_names))
        raise ValueError(f'train and val classes differ in {root}: only in train ({train.root.name}): {only_train}; '
                         f'only in val ({val_root.name}): {only_val}')
    val = ImageFolderDataset(val_root, eval_transform, class_names=train.class_names, strict=strict,
                             mark_unreadable=True)
    return train, val, train.class_names


# ------------------------------------------------------------------------------------------- timm dataset sources
TIMM_SOURCES = ('torch/', 'hfds/')  # map-style sources of timm.data.create_dataset (iterable ones cannot resume)


def is_timm_source(data) -> bool:
    """True for a timm dataset name such as ``torch/cifar10`` or ``hfds/<hub id>`` (rather than a path)."""
    return isinstance(data, str) and data.lower().startswith(TIMM_SOURCES + ('hfids/', 'tfds/', 'wds/'))


class TimmSourceDataset(torch.utils.data.Dataset):
    """A dataset from ``timm.data.create_dataset`` with this module's interface: RGB conversion, ``transform``,
    ``class_names`` and the (always empty) skip records."""

    def __init__(self, dataset, class_names: list[str], transform: Callable | None = None):
        self.dataset, self.class_names, self.transform = dataset, class_names, transform
        self.num_skipped, self.skipped = 0, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        if isinstance(img, Image.Image) and img.mode != 'RGB':
            img = img.convert('RGB')
        return (self.transform(img) if self.transform is not None else img), int(target)


def _source_class_names(dataset, name: str) -> list[str]:
    classes = getattr(dataset, 'classes', None)
    if classes is None:
        class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
        if class_to_idx:
            classes = [c for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    if not classes:
        raise ValueError(f'cannot tell the class names of {name}; convert it to an ImageFolder tree')
    return [str(c) for c in classes]


def build_timm_datasets(name: str, root: str | os.PathLike | None = None, download: bool = False
                        ) -> tuple[TimmSourceDataset, TimmSourceDataset, list[str]]:
    """``(train, val, class_names)`` of a timm dataset source (``torch/<torchvision name>``, ``hfds/<hub id>``).

    ``root`` defaults to ``<cache>/<name>``; ``download`` lets torchvision fetch what is missing.
    """
    import timm.data
    if not name.lower().startswith(TIMM_SOURCES):
        raise ValueError(f'{name}: only map-style timm sources {TIMM_SOURCES} are supported (iterable ones cannot '
                         f'resume mid-epoch); give an ImageFolder tree or archive instead')
    root = Path(root) if root is not None else default_cache_dir() / name.replace('/', '-')
    splits = []
    for split, is_training in (('train', True), ('validation', False)):
        try:
            splits.append(timm.data.create_dataset(name, root=str(root), split=split, is_training=is_training,
                                                   download=download))
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f'{name} ({split} split) not found under {root}: {e}'
                                    + ('' if download else ' (pass --dataset-download to fetch it)')) from None
    train_names, val_names = (_source_class_names(ds, name) for ds in splits)
    if train_names != val_names:
        raise ValueError(f'{name}: train and validation class names differ: {train_names} vs {val_names}')
    _require_two_classes(train_names, name)
    return TimmSourceDataset(splits[0], train_names), TimmSourceDataset(splits[1], train_names), train_names


def check_auto_augment(policy: str) -> None:
    """Refuse an ``--aa`` string timm cannot parse before any work starts (timm would stop with a bare assertion
    when the first batch is drawn)."""
    from timm.data import auto_augment as aa
    build = aa.rand_augment_transform if policy.startswith('rand') else \
        aa.augment_and_mix_transform if policy.startswith('augmix') else aa.auto_augment_transform
    try:
        build(policy, dict(translate_const=100, img_mean=(124, 116, 104)))
    except Exception as e:  # timm raises AssertionError / KeyError / ValueError for malformed policies
        detail = f' ({e})' if str(e) else ''
        raise ValueError(f"--aa {policy!r} is not a timm auto-augment policy{detail}; expected e.g. "
                         f"'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w4-d2' or 'v0' (AutoAugment)") from None


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as Pillow < 12 gave it (Pillow >= 12 raises for 0 bits)."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def allow_zero_bit_posterize(transform) -> Any:
    """Make the auto-augment steps of a timm transform survive 0-bit posterize: timm's policies draw 0 bits (the
    paper's ``rand-m9-mstd0.5-inc1`` about once per 1,000 images, AutoAugment ``v0`` ~4 %, ``augmix-m9`` ~1 % of
    images), which Pillow >= 12 refuses with a ValueError that stops training. Returns ``transform``, changed in
    place."""
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
    for step in getattr(transform, 'transforms', []):
        if isinstance(step, (RandAugment, AugMixAugment)):
            ops = step.ops
        elif isinstance(step, AutoAugment):
            ops = [op for sub_policy in step.policy for op in sub_policy]
        else:
            continue
        for op in ops:
            if op.name.startswith('Posterize'):
                op.aug_fn = _posterize_any_bits
    return transform
