"""Image-folder data: the bundled Fashion-MNIST subset, dataset archives, robust image loading and ImageFolder datasets.

Layout expected everywhere: ``<root>/<split>/<class>/<image>`` with ``<split>`` one of ``train``/``val`` (or a synonym,
see :func:`find_split`). ``<root>`` may also be a ``.tar``/``.tar.gz``/``.tgz`` archive of such a tree, which
:func:`resolve_data_dir` extracts once into a cache folder. Augmentations are not done here: pass timm transforms.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = [
    'BUNDLED_DATASET', 'IMG_EXTENSIONS', 'ImageFolderDataset', 'TimmSourceDataset', 'build_datasets',
    'build_timm_datasets', 'extract_archive', 'find_split', 'is_timm_source', 'load_rgb', 'resolve_data_dir',
]

_logger = logging.getLogger(__name__)

BUNDLED_DATASET = Path(__file__).resolve().parent / 'assets' / 'fashion-mnist-subset.tar.gz'
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.gif')
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.tar.bz2', '.tbz2', '.tar.xz', '.txz')
SPLIT_SYNONYMS = {
    'train': ('train', 'training'),
    'val': ('val', 'valid', 'validation', 'eval', 'evaluation', 'test'),
}
LAYOUT = '<root>/<split>/<class>/<image> (split: train, val or a synonym)'


# ----------------------------------------------------------------------------------------------------------- archives
def _archive_stem(path: Path) -> str | None:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


def _default_cache_dir() -> Path:
    if os.environ.get('CONV2FORMER_CACHE'):
        return Path(os.environ['CONV2FORMER_CACHE']).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / 'conv2former' / 'datasets'


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Reject anything but plain files and folders with relative, '..'-free names, before extracting anything."""
    for m in members:
        name = m.name
        if (name.startswith(('/', '\\')) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute()):
            raise ValueError(f'{archive}: refusing to extract member with an absolute path: {name!r}')
        if '..' in PurePosixPath(name.replace('\\', '/')).parts:
            raise ValueError(f"{archive}: refusing to extract member with '..' in its path: {name!r}")
        if m.issym() or m.islnk():
            raise ValueError(f'{archive}: refusing to extract link member {name!r} -> {m.linkname!r}')
        if not (m.isfile() or m.isdir()):
            raise ValueError(f'{archive}: refusing to extract special member {name!r} (device, fifo or other)')


def _extract(archive: Path, dest: Path) -> None:
    """Safely extract ``archive`` into the existing folder ``dest``."""
    try:
        with tarfile.open(archive, 'r:*') as tar:
            members = tar.getmembers()
            _check_members(archive, members)
            if hasattr(tarfile, 'data_filter'):  # Python >= 3.11.4 / 3.12: second line of defence
                tar.extractall(dest, members=members, filter='data')
            else:
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f'{archive}: not a readable tar archive ({e}); '
                         f'expected a .tar/.tar.gz/.tgz of {LAYOUT}') from e


def _has_split(root: Path) -> bool:
    names = {p.name.lower() for p in root.iterdir() if p.is_dir()}
    return any(s in names for syn in SPLIT_SYNONYMS.values() for s in syn)


def _split_root(root: Path) -> Path:
    """``root``, or its single top-level folder when only that folder holds the splits."""
    if _has_split(root):
        return root
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')]
    if len(subdirs) == 1 and _has_split(subdirs[0]):
        return subdirs[0]
    return root


def _extract_cached(archive: Path, cache_dir: str | os.PathLike | None) -> Path:
    archive = archive.resolve()
    st = archive.stat()
    key = hashlib.sha256(f'{archive}\0{st.st_size}\0{st.st_mtime_ns}'.encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = base / f'{_archive_stem(archive)}-{key}'
    if target.is_dir():  # only ever created by the atomic rename below, so it is complete
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=base))  # never trusted: a dot-name, random suffix
    try:
        _logger.info('extracting %s to %s', archive, target)
        _extract(archive, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with a concurrent extraction: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target


def extract_archive(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the extracted contents of the ``.tar``/``.tar.gz``/``.tgz`` archive ``path``.

    Extracted once, safely and atomically, into the cache described in :func:`resolve_data_dir` (``cache_dir``, else
    ``$CONV2FORMER_CACHE``, else ``~/.cache/conv2former/datasets``); later calls reuse it. Nothing is descended into.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'archive {path} does not exist or is not a file; expected a .tar/.tar.gz/.tgz file')
    if _archive_stem(path) is None:
        raise ValueError(f'{path} is not a .tar/.tar.gz/.tgz archive '
                         f'(supported suffixes: {", ".join(ARCHIVE_SUFFIXES)})')
    return _extract_cached(path, cache_dir)


def resolve_data_dir(data: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ImageFolder root for ``data``.

    ``None`` is the bundled Fashion-MNIST subset; a directory is returned as is; a ``.tar``/``.tar.gz``/``.tgz``
    archive is extracted once (safely, atomically) into ``<cache>/<archive stem>-<hash of path, size, mtime>``, where
    ``<cache>`` is ``cache_dir``, else ``$CONV2FORMER_CACHE``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) +
    ``/conv2former/datasets``. Links, devices, absolute and '..' member paths are rejected before anything is written;
    a partial extraction (interrupted, or a race with another process) is never used.
    When the archive holds one top-level folder containing the splits, that folder is returned.
    """
    if data is None:
        if not BUNDLED_DATASET.is_file():
            raise FileNotFoundError(f'bundled dataset {BUNDLED_DATASET} is missing (was the package installed without '
                                    'its assets?); pass a data directory or archive instead')
        path = BUNDLED_DATASET
    else:
        path = Path(data).expanduser()
    if path.is_dir():
        return path.resolve()
    if not path.exists():
        raise FileNotFoundError(f'data path {path} does not exist; expected a directory {LAYOUT} '
                                'or a .tar/.tar.gz/.tgz archive of one')
    if not path.is_file() or _archive_stem(path) is None:
        raise ValueError(f'data path {path} is neither a directory nor a .tar/.tar.gz/.tgz archive; '
                         f'expected a directory {LAYOUT} or an archive of one')
    return _split_root(_extract_cached(path, cache_dir))


def find_split(root: Path, split: str) -> Path:
    """The folder of ``split`` ('train', 'val' or a synonym) under ``root``, matching folder names case-insensitively.

    Synonyms as in timm: train/training and val/valid/validation/eval/evaluation/test (tried in that order).
    """
    root = Path(root)
    key = next((k for k, syn in SPLIT_SYNONYMS.items() if split.lower() in syn), None)
    if key is None:
        known = ', '.join(s for v in SPLIT_SYNONYMS.values() for s in v)
        raise ValueError(f'unknown split {split!r}; expected one of {known}')
    if not root.is_dir():
        raise FileNotFoundError(f'data root {root} is not a directory; expected {LAYOUT}')
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    lower = {}
    for name in sorted(subdirs):
        lower.setdefault(name.lower(), subdirs[name])
    for syn in SPLIT_SYNONYMS[key]:
        if syn in subdirs:
            return subdirs[syn]
        if syn in lower:
            return lower[syn]
    raise FileNotFoundError(f"no '{split}' split in {root}: tried folders {', '.join(SPLIT_SYNONYMS[key])}; "
                            f"subfolders found: {', '.join(sorted(subdirs)) or 'none'}; expected {LAYOUT}")


# -------------------------------------------------------------------------------------------------------------- images
def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float image to uint8: 16-bit data by /257; wider ranges by their min-max."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith('I;16') or (mode == 'I' and lo >= 0 and hi <= 65535):
        a = a / 257.0  # 65535 -> 255, exact for 257 * k
    elif mode == 'F' and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:  # 32-bit data outside the 16-bit / unit range: stretch its value range to 0..255
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _white_composite(im: Image.Image) -> Image.Image:
    rgba = im.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of animations).

    Grayscale, 1-bit, palette, CMYK and YCbCr convert directly; alpha (LA, RGBA, PA, palette or grayscale/RGB with
    a transparent colour) is composited on white; 16-bit (I;16*, or I within 0..65535) is divided by 257; other 32-bit
    int and float data are scaled by their value range (floats within 0..1 by 255). Truncated images are not repaired
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone): corrupt, truncated or empty files raise OSError naming
    ``path``; modes PIL cannot convert raise ValueError naming it.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == 'RGB' and 'transparency' not in im.info:
                return im.copy()
            if mode.startswith('I') or mode == 'F':
                return Image.fromarray(_to_uint8(np.asarray(im), mode), mode='L').convert('RGB')
            if 'A' in mode or 'a' in mode or 'transparency' in im.info:
                return _white_composite(im)
            return im.convert('RGB')
    except Image.DecompressionBombError as e:
        raise OSError(f'{path}: refusing to decode a possible decompression bomb: {e}') from e
    except ValueError as e:
        raise ValueError(f'{path}: cannot convert image to RGB: {e}') from e
    except (OSError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as e:
        reason = 'empty (zero-byte) file' if _is_empty(path) else f'{type(e).__name__}: {e}'
        raise OSError(f'{path}: cannot read image: {reason}') from e


def _is_empty(path: Any) -> bool:
    try:
        return os.path.getsize(path) == 0
    except (OSError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------------------ datasets
def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, skipping hidden files and folders (e.g. macOS '._*' files)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        found += [Path(dirpath) / f for f in filenames if not f.startswith('.') and f.lower().endswith(IMG_EXTENSIONS)]
    return found


class ImageFolderDataset(torch.utils.data.Dataset):
    """``<root>/<class>/**/<image>`` → ``(transform(load_rgb(image)), class_index)``.

    Classes are the sorted sub-folder names of ``root`` (hidden ones ignored), or ``class_names`` in the given order
    (which then fixes the class indices and must name exactly those folders). Zero-byte files are skipped when the
    dataset is built; unreadable images are skipped when loaded (with a warning, returning the next readable sample).
    ``strict=True`` raises ValueError for either instead. ``num_skipped`` and ``skipped`` (list of ``(path, reason)``)
    count both kinds, per process: skips seen inside DataLoader worker processes are not reported back.
    """

    def __init__(
            self,
            root: str | os.PathLike,
            transform: Callable[[Image.Image], Any] | None = None,
            class_names: list[str] | None = None,
            strict: bool = False,
    ):
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
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
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        samples = []
        for idx, name in enumerate(self.class_names):
            files = _list_images(self.root / name)
            if not files:
                _logger.warning('class folder %s holds no images (%s)', self.root / name, ', '.join(IMG_EXTENSIONS))
            for f in files:
                if f.stat().st_size == 0:
                    if strict:
                        raise ValueError(f'empty (zero-byte) image file: {f}')
                    self.skipped.append((str(f), 'empty (zero-byte) file'))
                    continue
                samples.append((str(f), idx))
        if not samples:
            raise ValueError(f'no readable images ({", ".join(IMG_EXTENSIONS)}) in {self.root}; '
                             f'expected <root>/<class>/<image>')
        if self.skipped:
            _logger.warning('%s: skipped %d zero-byte file(s), e.g. %s', self.root, len(self.skipped),
                            self.skipped[0][0])
        self.num_skipped: int = len(self.skipped)  # this process only: skips inside DataLoader workers are not seen
        self.samples: list[tuple[str, int]] = sorted(samples)
        self.targets: list[int] = [t for _, t in self.samples]

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
        for i in [(index + k) % n for k in range(n)]:
            if i in self._bad:
                continue
            path, target = self.samples[i]
            try:
                img = load_rgb(path)
            except (OSError, ValueError) as e:
                if self.strict:
                    raise ValueError(f'unreadable image {path}: {e}') from e
                self._bad.add(i)
                self.skipped.append((path, str(e)))
                self.num_skipped += 1
                _logger.warning('skipping unreadable image %s (%s)', path, e)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise RuntimeError(f'no readable image in {self.root} ({n} files tried, all unreadable)')

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, '
                f'classes={len(self.class_names)}, skipped={self.num_skipped})')


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
    val_root = find_split(root, 'val')
    val_classes = sorted(p.name for p in val_root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if val_classes != train.class_names:
        only_train = sorted(set(train.class_names) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train.class_names))
        raise ValueError(f'train and val classes differ in {root}: only in train ({train.root.name}): {only_train}; '
                         f'only in val ({val_root.name}): {only_val}')
    val = ImageFolderDataset(val_root, eval_transform, class_names=train.class_names, strict=strict)
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
    root = Path(root) if root is not None else _default_cache_dir() / name.replace('/', '-')
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
    return TimmSourceDataset(splits[0], train_names), TimmSourceDataset(splits[1], train_names), train_names
