"""Data access shared by every task: dataset archives (extracted once, safely, into a cache), dataset roots, the one
split-name rule, and robust image loading. The task sub-packages build their datasets on these.

Split names (all tasks): a split matches a folder of exactly that name (case-insensitively) first; failing that, the
first existing synonym — train: training; val: valid, validation, eval, evaluation, test; test: testing.
"""
from __future__ import annotations

import hashlib
import operator
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ['BUNDLED_DATASET', 'IMG_EXTENSIONS', 'FileLister', 'extract_archive', 'find_split', 'list_images',
           'load_rgb', 'resolve_data_dir', 'split_names']

_logger = logging.getLogger(__name__)

BUNDLED_DATASET = Path(__file__).resolve().parent / 'assets' / 'fashion-mnist-subset.tar.gz'
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.gif')
INDEX_MODES = ('L', 'P', 'I', 'I;16', '1')  # image modes that hold label indices
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.tar.bz2', '.tbz2', '.tar.xz', '.txz')
SPLIT_SYNONYMS = {
    'train': ('train', 'training'),
    'val': ('val', 'valid', 'validation', 'eval', 'evaluation', 'test'),
    'test': ('test', 'testing'),
}
LAYOUT = '<root>/<split>/<class>/<image> (split: train, val or a synonym)'


# ----------------------------------------------------------------------------------------------------------- archives
def _archive_stem(path: Path) -> str | None:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


def default_cache_dir() -> Path:
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
    """``root`` if it holds split folders, else its single top-level folder when it holds nothing else."""
    if _has_split(root):
        return root
    entries = [p for p in root.iterdir() if not p.name.startswith('.')]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def _extract_cached(archive: Path, cache_dir: str | os.PathLike | None) -> Path:
    archive = archive.resolve()
    st = archive.stat()
    key = hashlib.sha256(f'{archive}\0{st.st_size}\0{st.st_mtime_ns}'.encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
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


def resolve_data_dir(data: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
                     layout: str = LAYOUT) -> Path:
    """The dataset root for ``data`` (``layout`` describes the expected tree in error messages).

    ``None`` is the bundled Fashion-MNIST subset; a directory is returned as is; a ``.tar``/``.tar.gz``/``.tgz``
    archive is extracted once (safely, atomically) into ``<cache>/<archive stem>-<hash of path, size, mtime>``, where
    ``<cache>`` is ``cache_dir``, else ``$CONV2FORMER_CACHE``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) +
    ``/conv2former/datasets``. Links, devices, absolute and '..' member paths are rejected before anything is written;
    a partial extraction (interrupted, or a race with another process) is never used.
    When the extracted archive has no split folders but a single top-level folder, that folder is returned.
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
        raise FileNotFoundError(f'data path {path} does not exist; expected a directory {layout} '
                                'or a .tar/.tar.gz/.tgz archive of one')
    if not path.is_file() or _archive_stem(path) is None:
        raise ValueError(f'data path {path} is neither a directory nor a .tar/.tar.gz/.tgz archive; '
                         f'expected a directory {layout} or an archive of one')
    return _split_root(_extract_cached(path, cache_dir))


def split_names(split: str) -> tuple[str, ...]:
    """Folder names to try for ``split``, in order: the name itself, then its synonyms (see the module docstring)."""
    key = next((k for k, syn in SPLIT_SYNONYMS.items() if split.lower() == k), None) or \
        next((k for k, syn in SPLIT_SYNONYMS.items() if split.lower() in syn), None)
    if key is None:
        known = ', '.join(dict.fromkeys(s for v in SPLIT_SYNONYMS.values() for s in v))
        raise ValueError(f'unknown split {split!r}; expected one of {known}')
    return tuple(dict.fromkeys((split.lower(),) + SPLIT_SYNONYMS[key]))


def canonical_split(split: str) -> str:
    """'train', 'val' or 'test' for a split name or synonym."""
    first = split_names(split)[0]
    return next(k for k, syn in SPLIT_SYNONYMS.items() if first == k or first in syn)


def find_split(root: Path, split: str, layout: str = LAYOUT) -> Path:
    """The folder of ``split`` under ``root`` by the split-name rule, matching folder names case-insensitively."""
    root = Path(root)
    names = split_names(split)
    if not root.is_dir():
        raise FileNotFoundError(f'data root {root} is not a directory; expected {layout}')
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    lower = {}
    for name in sorted(subdirs):
        lower.setdefault(name.lower(), subdirs[name])
    for syn in names:
        if syn in subdirs:
            return subdirs[syn]
        if syn in lower:
            return lower[syn]
    raise FileNotFoundError(f"no '{split}' split in {root}: tried folders {', '.join(names)}; "
                            f"subfolders found: {', '.join(sorted(subdirs)) or 'none'}; expected {layout}")


def first_items(items, n: int = 5) -> str:
    """The first ``n`` items for an error message, with the total when there are more."""
    items = [str(x) for x in items]
    return ', '.join(items[:n]) + (f', ... ({len(items)} in all)' if len(items) > n else '')


def pair(value, name: str) -> tuple[int, int]:
    """(H, W) from a positive int or one/two of them (CLI flags give one or two sizes)."""
    try:
        values = tuple(operator.index(v) for v in ((value, value) if np.ndim(value) == 0 else value))
    except TypeError:
        values = ()
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f'{name} must be a positive int or (height, width) of them, got {value!r}')
    return values  # type: ignore[return-value]


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


class FileLister:
    """Lists the files below folders of one dataset, each real file once.

    Symbolic links are resolved: a linked folder is entered only if it lies inside the dataset (``root``, or a
    folder listed explicitly, e.g. a class folder that is itself a link) and was not entered before (a link to a
    parent or to another listed folder would list files twice or under the wrong class); a file reached a second
    time through a link is listed once. Everything left out is in ``skipped`` as ``(path, reason)`` and logged as a
    warning naming it (``log``); with ``strict`` it raises ValueError instead. Hidden files and folders are skipped
    silently.
    """

    def __init__(self, root: str | os.PathLike, strict: bool = False, log: bool = True):
        self.root = Path(root)
        self.strict, self.log = strict, log
        self._inside = [Path(os.path.realpath(self.root))]
        self._entered = {self._inside[0]}
        self._files: set = set()
        self.skipped: list[tuple[str, str]] = []

    def reserve(self, folders) -> None:
        """Mark ``folders`` (e.g. every class folder) as listed on their own: a link to one of them is skipped."""
        for folder in folders:
            real = Path(os.path.realpath(folder))
            self._entered.add(real)
            if not self._is_inside(real):
                self._inside.append(real)

    def _is_inside(self, real: Path) -> bool:
        return any(real == r or r in real.parents for r in self._inside)

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise ValueError(f'{path}: {reason} (left out without --strict)')
        if self.log:
            _logger.warning('skipping %s: %s', path, reason)
        self.skipped.append((str(path), reason))

    def _enter(self, folder: Path) -> bool:
        real = Path(os.path.realpath(folder))
        if real in self._entered:
            parent = Path(os.path.realpath(folder.parent))
            what = 'a parent folder' if real == parent or real in parent.parents else 'a folder already listed'
            self._skip(folder, f'symbolic link to {what} ({real})')
            return False
        if not self._is_inside(real):
            self._skip(folder, f'symbolic link to {real}, outside the dataset {self.root}')
            return False
        self._entered.add(real)
        return True

    def list(self, folder: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[Path]:
        """Files below ``folder`` (recursively) whose names end in one of ``extensions``, sorted."""
        folder = Path(folder)
        real = Path(os.path.realpath(folder))
        self._entered.add(real)
        if not self._is_inside(real):
            self._inside.append(real)
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            here = Path(dirpath)
            keep = []
            for name in sorted(dirnames):
                sub = here / name
                if name.startswith('.'):
                    continue
                if sub.is_symlink():
                    if self._enter(sub):
                        keep.append(name)
                else:  # a real sub-folder: new, unless reached before through a link
                    real_sub = Path(os.path.realpath(sub))
                    if real_sub not in self._entered:
                        self._entered.add(real_sub)
                        keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                path = here / name
                if name.startswith('.') or not name.lower().endswith(tuple(extensions)):
                    continue
                real_file = os.path.realpath(path)
                if real_file in self._files:
                    self._skip(path, f'a second path to {real_file}, listed once')
                    continue
                self._files.add(real_file)
                found.append(path)
        return found


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, each real file once (see :class:`FileLister`), skipping hidden
    files and folders (e.g. macOS '._*' files)."""
    return FileLister(folder).list(folder)
