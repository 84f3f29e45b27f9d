"""WebDataset tar shards as a map-style classification dataset, and ``conv2former shards`` that writes them.

A *shard* is a plain tar file whose members are grouped into samples by key (``<key>.<ext>``, consecutive members
with the same key): an image (``.jpg``, ``.jpeg``, ``.png``, ``.webp`` or another image suffix) plus its label as
``<key>.cls`` (integer text) or ``<key>.json`` (``{"label": 3}``, or timm's fields ``cls`` / ``target``). That is
what ``webdataset.ShardWriter`` writes and what timm publishes (``timm/imagenet-1k-wds``, ``imagenet-22k-wds``).

``--data`` names shards as

- a folder with split sub-folders holding ``*.tar`` (``train/``, ``val/`` or their synonyms, as for ImageFolders),
- a folder of ``*.tar`` whose file names carry the split (``imagenet1k-train-0000.tar``,
  ``imagenet1k-validation-0000.tar``: timm's layout), or whose ``_info.json`` lists each split's files,
- a brace pattern (``shards/train-{000000..000127}.tar``), a comma-separated list of ``.tar`` files or one
  ``.tar`` shard: the training split; its validation split is looked for beside it (same folder, or the sibling
  split folder).

Class names come from ``classes.txt`` (one per line) or ``_info.json`` / ``dataset_info.json`` / ``info.json``
(``classes``, ``class_names``, ``label_names``, ``names`` or Hugging Face's ``features.label.names``) in the split's
folder or above it; without one, the names are the label indices.

Reading: each shard is indexed once (its samples, their image member and label; cached under
``<cache>/shard-index`` keyed by path, size and modification time) and read through webdataset's indexed tar reader
``wids`` (memory-mapped, random access), so the engine's ``DistributedSampler`` + per-sample seeding give the same
exact resume, exactly-once-per-epoch and worker-independent shuffle as for ImageFolders. Each data-loader worker
opens a shard once per epoch (files opened per epoch: shards x workers, not one per image).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .data import IMG_EXTENSIONS, SPLIT_SYNONYMS, default_cache_dir, find_split, first_items, load_rgb, split_names

__all__ = ['ShardDataset', 'ShardImage', 'build_shard_datasets', 'find_shard_split', 'is_shard_source',
           'shard_split_dataset', 'split_images', 'write_shards']

_logger = logging.getLogger(__name__)

INDEX_VERSION = 1
LABEL_FIELDS = ('label', 'cls', 'target')  # integer fields of a sample's .json (timm's writer: 'label')
INFO_FILES = ('_info.json', 'dataset_info.json', 'info.json')
CLASS_KEYS = ('classes', 'class_names', 'label_names', 'names')
SHARD_LAYOUT = ('WebDataset shards: a folder with train/ and val/ (or synonyms) holding *.tar, a folder of '
                '<name>-train-*.tar / <name>-validation-*.tar, or a brace pattern such as '
                "'shards/train-{000000..000127}.tar'; each sample <key>.jpg|jpeg|png|webp with <key>.cls or "
                '<key>.json {"label": N}')
EXTRA = 'pip install "conv2former[shards]"'


def _indexed_tar():
    """wids' random-access tar reader class."""
    try:
        from wids.wids import IndexedTarSamples
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f'reading WebDataset shards needs the wids package: {EXTRA}') from None
    return IndexedTarSamples


# ------------------------------------------------------------------------------------------------ finding shards
def _is_pattern(text: str) -> bool:
    return '{' in text and '}' in text and '..' in text


def _expand(text: str) -> list[Path]:
    """The files of a brace pattern or comma-separated list, each checked to exist."""
    from braceexpand import braceexpand
    names = [n for part in text.split(',') if part.strip() for n in braceexpand(part.strip())] \
        if not _is_pattern(text) else list(braceexpand(text))
    files = [Path(n).expanduser() for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of the {len(files)} shards of {text} do not exist: '
                                f'{first_items(missing)}')
    not_tar = [str(f) for f in files if f.suffix.lower() != '.tar']
    if not_tar:
        raise ValueError(f'{first_items(not_tar)}: not .tar shards; expected {SHARD_LAYOUT}')
    return files


def _looks_like_shard(path: Path) -> bool:
    """A .tar whose first members are ``<key>.cls`` / ``<key>.json`` labels beside images (an ImageFolder archive
    holds ``<split>/<class>/<image>`` and no label files)."""
    import tarfile
    try:
        with tarfile.open(path, 'r:') as tar:
            for _, member in zip(range(16), tar):
                if member.isfile() and member.name.lower().endswith(('.cls', '.json')):
                    return True
    except (tarfile.TarError, OSError):
        return False
    return False


def _tars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob('*.tar') if p.is_file() and not p.name.startswith('.'))


def is_shard_source(data) -> bool:
    """True for a ``--data`` value that names WebDataset shards (see the module docstring)."""
    if data is None:
        return False
    text = str(data)
    if _is_pattern(text) or (',' in text and all(p.strip().lower().endswith('.tar') for p in text.split(',') if p)):
        return True
    path = Path(text).expanduser()
    if path.is_file():
        return path.suffix.lower() == '.tar' and _looks_like_shard(path)
    if not path.is_dir():
        return False
    if _tars(path):
        return True
    for split in ('train', 'val'):
        try:
            if _tars(find_split(path, split)):
                return True
        except FileNotFoundError:
            continue
    return False


def _split_of_name(name: str) -> str | None:
    """'train' / 'val' / 'test' for a shard file name that carries a split word (``imagenet1k-validation-0001``)."""
    tokens = set(re.split(r'[-_.]', name.lower()))
    for split, synonyms in SPLIT_SYNONYMS.items():
        if split in tokens or tokens & set(synonyms[1:]):
            return split
    return None


def _read_info(folder: Path) -> dict:
    for name in INFO_FILES:
        path = folder / name
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f'{path}: not readable JSON ({e})') from None
            if isinstance(info, dict):
                return info
    return {}


def _split_in_folder(folder: Path, split: str) -> list[Path]:
    """The shards of ``split`` in ``folder``: a split sub-folder of *.tar, the files ``_info.json`` lists for it, or
    the *.tar whose names carry the split word. Empty when none."""
    try:
        files = _tars(find_split(folder, split))
        if files:
            return files
    except FileNotFoundError:
        pass
    names = split_names(split)
    splits = _read_info(folder).get('splits')
    if isinstance(splits, dict):
        for name in names:
            entry = next((v for k, v in splits.items() if k.lower() == name), None)
            if isinstance(entry, dict) and entry.get('filenames'):
                files = [folder / f for f in entry['filenames']]
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise FileNotFoundError(f'{folder}: {len(missing)} of the {len(files)} {name} shards its info '
                                            f'file lists do not exist: {first_items(missing)}')
                return files
    wanted = names[0] if names[0] in SPLIT_SYNONYMS else next(k for k, v in SPLIT_SYNONYMS.items() if names[0] in v)
    return [p for p in _tars(folder) if _split_of_name(p.stem) == wanted]


@dataclass
class ShardSplit:
    files: list[Path]
    folder: Path        # where its class names are looked for (and above)
    description: str


def find_shard_split(data, split: str) -> ShardSplit:
    """The shards of ``split`` of the ``--data`` value ``data`` (folder, pattern, list or one .tar)."""
    text = str(data)
    path = Path(text).expanduser()
    if path.is_dir():
        files = _split_in_folder(path, split)
        tars = _tars(path)
        if not files and tars and not any(_split_of_name(p.stem) for p in tars):
            return ShardSplit(tars, path, f'{path} ({len(tars)} shards)')  # a folder of one split's shards
        if not files:
            raise FileNotFoundError(f"no '{split}' shards in {path}: tried sub-folders {', '.join(split_names(split))}"
                                    f" holding *.tar, the splits of {'/'.join(INFO_FILES)}, and *.tar named with the "
                                    f"split; expected {SHARD_LAYOUT}")
        folder = files[0].parent
        return ShardSplit(files, folder, f'{path} ({split}: {len(files)} shards)')
    files = _expand(text) if not path.is_file() else [path]
    if split == 'train' or split == _split_of_name(files[0].stem):
        return ShardSplit(files, files[0].parent, f'{text} ({len(files)} shards)')
    # the other split of a pattern: beside it, or in the sibling split folder
    folder = files[0].parent
    found = [f for f in _split_in_folder(folder, split) if f not in files]
    if not found and _split_of_name(folder.name):
        found = _split_in_folder(folder.parent, split)
    if not found:
        raise FileNotFoundError(f"no '{split}' shards beside {text}: looked in {folder} and {folder.parent} for "
                                f"*.tar named with {', '.join(split_names(split))} or in such folders; expected "
                                f"{SHARD_LAYOUT}")
    return ShardSplit(found, found[0].parent, f'{found[0].parent} ({split}: {len(found)} shards)')


def _names_from_info(info: dict) -> list[str] | None:
    for key in CLASS_KEYS:
        if isinstance(info.get(key), list) and info[key]:
            return [str(n) for n in info[key]]
    label = info.get('features', {}).get('label', {}) if isinstance(info.get('features'), dict) else {}
    if isinstance(label, dict) and isinstance(label.get('names'), list):
        return [str(n) for n in label['names']]
    return None


def class_names_beside(folder: Path, levels: int = 2) -> tuple[list[str] | None, Path | None]:
    """Class names from ``classes.txt`` or an info file in ``folder`` or up to ``levels`` folders above it."""
    for here in [folder, *list(folder.parents)[:levels]]:
        classes = here / 'classes.txt'
        if classes.is_file():
            names = [line.strip() for line in classes.read_text().splitlines() if line.strip()]
            if names:
                return names, classes
        names = _names_from_info(_read_info(here))
        if names:
            return names, here
    return None, None


# ------------------------------------------------------------------------------------------------ the index
def _label(members: dict) -> tuple[int | None, str | None]:
    """(label, None) of a sample's members, or (None, why there is none)."""
    if '.cls' in members:
        text = members['.cls'].strip()
        try:
            return int(text), None
        except ValueError:
            return None, f'.cls is not an integer ({text[:20]!r})'
    if '.json' in members:
        try:
            meta = json.loads(members['.json'])
        except ValueError as e:
            return None, f'.json is not readable ({e})'
        for field in LABEL_FIELDS:
            value = meta.get(field) if isinstance(meta, dict) else None
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                return (int(value), None) if value >= 0 else (None, f'.json {field} is {value} (no label)')
            if isinstance(value, str) and value.strip().lstrip('-').isdigit():
                return int(value), None
        return None, f'.json has no integer {"/".join(LABEL_FIELDS)} field'
    return None, 'no .cls or .json label'


def _image_ext(exts) -> str | None:
    for ext in exts:
        if ext.lower() in IMG_EXTENSIONS:
            return ext
    return None


def _open_shard(path: Path):
    """wids' memory-mapped indexed reader of ``path`` (its file descriptor closed: the mapping stays valid)."""
    import struct
    reader_class = _indexed_tar()
    try:
        reader = reader_class(path=str(path))
    except (ValueError, OSError) as e:  # mmap refuses empty files
        if path.stat().st_size == 0:
            raise ValueError(f'{path}: empty (zero-byte) shard') from None
        raise ValueError(f'{path}: not a readable tar shard ({e})') from None
    except (struct.error, IndexError, UnicodeDecodeError, AssertionError) as e:  # wids' header walk on a damaged tar
        raise ValueError(f'{path}: not a readable tar shard, truncated or damaged ({type(e).__name__}: {e}); '
                         f'expected a tar file of <key>.<ext> members') from None
    reader.stream.close()
    return reader


def _index_shard(path: Path) -> dict:
    """Per sample of the shard (in its order): key, image member suffix (or None), label (or None) and why."""
    reader = _open_shard(path)
    try:
        names = list(reader.reader.names())
        mapped = reader.reader.mmapped_file
        size = len(mapped)
        end = max((offset + 512 + (length + 511) // 512 * 512 for _, offset, length in reader.reader.by_index),
                  default=0)
        if end > size or size < 1024 or mapped[size - 1024:] != bytes(1024):  # no end-of-archive blocks
            raise ValueError(f'{path}: truncated or damaged shard ({size} bytes, no tar end-of-archive after its '
                             f'{len(reader.samples)} readable samples); download or write it again')
        keys, images, labels, problems = [], [], [], []
        for group in reader.samples:
            members, key = {}, None
            for i in group:
                name, offset, length = reader.reader.by_index[i]
                stem, ext = re.match(r'^((?:.*/)?.*?)(\..*)$', names[i]).groups()
                key = key or stem
                if ext.lower() in ('.cls', '.json'):
                    members[ext.lower()] = bytes(reader.reader.mmapped_file[offset + 512:offset + 512 + length])
                else:
                    members[ext] = None
            image = _image_ext(members)
            label, why = _label(members)
            if image is None and why is None:
                why = f'no image member ({", ".join(sorted(members))})'
            keys.append(key)
            images.append(image)
            labels.append(label if why is None else None)
            problems.append(why)
    finally:
        reader.close()
    return dict(version=INDEX_VERSION, keys=keys, images=images, labels=labels, problems=problems)


def _index_path(shard: Path, cache_dir) -> Path:
    st = shard.stat()
    key = hashlib.sha256(f'{INDEX_VERSION}\0{shard.resolve()}\0{st.st_size}\0{st.st_mtime_ns}'.encode()).hexdigest()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / 'shard-index'
    return base / f'{shard.stem}-{key[:16]}.json'


def shard_index(shard: Path, cache_dir=None) -> dict:
    """The index of ``shard``, read from the cache or built (and cached) now."""
    cached = _index_path(shard, cache_dir)
    if cached.is_file():
        try:
            index = json.loads(cached.read_text())
            if index.get('version') == INDEX_VERSION:
                return index
        except (OSError, ValueError):
            pass
    index = _index_shard(shard)
    try:
        from .fileio import atomic_write_text
        atomic_write_text(cached, json.dumps(index))
    except OSError as e:  # a read-only cache costs the re-indexing next time, nothing else
        _logger.debug('cannot cache the index of %s: %s', shard, e)
    return index


def index_shards(files: Sequence[Path], cache_dir=None, progress: bool = False, threads: int = 4) -> list[dict]:
    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        found = pool.map(lambda f: shard_index(f, cache_dir), files)
        return list(tqdm(found, total=len(files), disable=not progress or len(files) < 8, unit='shard',
                         desc='indexing shards'))


# ------------------------------------------------------------------------------------------------ the dataset
def _image_folder_base():
    from .tasks.classification.data import ImageFolderDataset
    return ImageFolderDataset


class _SampleList(Sequence):
    """``(f'{shard}:{key}', label)`` per sample, made on demand (a list of strings per image would cost workers
    copy-on-write memory at ImageNet scale)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.targets)

    def __getitem__(self, i):
        return self.dataset.sample_name(i), int(self.dataset.targets[i])


class ShardDataset(_image_folder_base()):
    """Samples of WebDataset shards → ``(transform(image), label)``, with ``ImageFolderDataset``'s interface and
    skip rules: samples without a label (or an image) are left out when the shards are indexed and counted;
    undecodable images are skipped when loaded (the next readable sample instead, or with ``mark_unreadable`` a
    blank image with target -1), counted across workers and ranks. ``strict=True`` raises ValueError instead."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], Any] | None = None,
                 class_names: list[str] | None = None, strict: bool = False, mark_unreadable: bool = False,
                 root: Path | None = None, cache_dir=None, progress: bool = False):
        import multiprocessing
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError(f'no shards given; expected {SHARD_LAYOUT}')
        self.root = Path(root) if root is not None else self.files[0].parent
        self.transform, self.strict, self.mark_unreadable = transform, strict, mark_unreadable
        indexes = index_shards(self.files, cache_dir, progress)
        shard_of, group_of, targets, skips = [], [], [], []
        for s, index in enumerate(indexes):
            for j, (label, problem) in enumerate(zip(index['labels'], index['problems'])):
                if problem is not None:
                    name = f'{self.files[s]}:{index["keys"][j]}'
                    if strict:
                        raise ValueError(f'{name}: {problem} (skipped without --strict)')
                    skips.append((name, problem))
                    continue
                shard_of.append(s)
                group_of.append(j)
                targets.append(label)
        if not targets:
            raise ValueError(f'no labelled samples in the {len(self.files)} shards of {self.root} '
                             f'({len(skips)} left out, e.g. {skips[0] if skips else "none found"}); '
                             f'expected {SHARD_LAYOUT}')
        self._keys = [index['keys'] for index in indexes]
        self._images = [index['images'] for index in indexes]
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.group_of = np.asarray(group_of, dtype=np.int32)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_groups = [len(index['keys']) for index in indexes]
        if class_names is None:
            class_names = [str(i) for i in range(int(self.targets.max()) + 1)]
        self.class_names = [str(c) for c in class_names]
        out_of_range = np.flatnonzero((self.targets < 0) | (self.targets >= len(self.class_names)))
        if out_of_range.size:
            i = int(out_of_range[0])
            raise ValueError(f'{self.sample_name(i)}: label {self.targets[i]} is outside the {len(self.class_names)} '
                             f'class names ({out_of_range.size} samples in all)')
        if skips:
            _logger.warning('%s: left %d sample(s) out, e.g. %s (%s)', self.root, len(skips), *skips[0])
        self._listing_skips = skips
        self.samples = _SampleList(self)
        self._bad = multiprocessing.RawArray('b', len(self.targets))
        self._open: dict = {}

    def __getstate__(self):  # spawned workers open their own shards
        return dict(self.__dict__, _open={})

    def sample_name(self, i: int) -> str:
        s = int(self.shard_of[i])
        return f'{self.files[s]}:{self._keys[s][int(self.group_of[i])]}'

    def _reader(self, s: int):
        reader = self._open.get(s)
        if reader is None:
            reader = self._open[s] = _open_shard(self.files[s])
            if len(reader) != self.num_groups[s]:
                raise ValueError(f'{self.files[s]} holds {len(reader)} samples, its index {self.num_groups[s]}: the '
                                 f'shard changed while in use')
        return reader

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i`` as stored in its shard."""
        s, j = int(self.shard_of[i]), int(self.group_of[i])
        return self._reader(s)[j][self._images[s][j]].getvalue()

    def decode(self, i: int) -> Image.Image:
        """Sample ``i`` decoded exactly as ``load_rgb`` decodes image files; OSError / ValueError naming it."""
        data = self.read_bytes(i)
        name = self.sample_name(i)
        if not data:
            raise OSError(f'{name}: cannot read image: empty (zero-byte) member')
        try:
            return load_rgb(io.BytesIO(data))
        except (OSError, ValueError) as e:
            raise type(e)(f'{name}: {str(e).split(": ", 1)[-1]}') from None

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, shards={len(self.files)}, samples={len(self)}, '
                f'classes={len(self.class_names)}, skipped={self.num_skipped})')


def shard_split_dataset(data, split: str, transform=None, class_names=None, strict: bool = False,
                        mark_unreadable: bool = False, cache_dir=None, progress: bool = False) -> ShardDataset:
    """The ``ShardDataset`` of ``split`` of ``data``; class names from ``class_names``, else beside the shards."""
    found = find_shard_split(data, split)
    if class_names is None:
        class_names, _ = class_names_beside(found.folder)
    return ShardDataset(found.files, transform, class_names=class_names, strict=strict,
                        mark_unreadable=mark_unreadable, root=found.folder, cache_dir=cache_dir, progress=progress)


def build_shard_datasets(data, train_transform=None, eval_transform=None, strict: bool = False, cache_dir=None,
                         progress: bool = False) -> tuple[ShardDataset, ShardDataset, list[str]]:
    """``(train, val, class_names)`` of the shards ``data``: as ``build_datasets`` does for ImageFolders."""
    train_split, val_split = find_shard_split(data, 'train'), find_shard_split(data, 'val')
    overlap = set(train_split.files) & set(val_split.files)
    if overlap:
        raise ValueError(f'{data}: no separate train and val shards (both would read '
                         f'{first_items(sorted(map(str, overlap)))}); expected {SHARD_LAYOUT}')
    names, _ = class_names_beside(train_split.folder)
    val_names, _ = class_names_beside(val_split.folder)
    if names is not None and val_names is not None and names != val_names:
        raise ValueError(f'{data}: the class names beside the train shards ({len(names)}) and the val shards '
                         f'({len(val_names)}) differ')
    names = names or val_names
    train = ShardDataset(train_split.files, train_transform, class_names=names, strict=strict, root=train_split.folder,
                         cache_dir=cache_dir, progress=progress)
    val = ShardDataset(val_split.files, eval_transform, class_names=names, strict=strict, mark_unreadable=True,
                       root=val_split.folder, cache_dir=cache_dir, progress=progress)
    if names is None:  # label indices: as many as the larger split needs
        count = max(len(train.class_names), len(val.class_names))
        names = train.class_names = val.class_names = [str(i) for i in range(count)]
    if len(names) < 2:
        raise ValueError(f'{data} holds one class: classification needs at least 2')
    return train, val, names


# ------------------------------------------------------------------------------------------------ predict / validate
class ShardImage:
    """One sample of a ``ShardDataset`` where ``predict`` takes image files: ``str()`` names it (``shard:key``)."""

    def __init__(self, dataset: ShardDataset, index: int):
        self.dataset, self.index = dataset, index

    def __str__(self) -> str:
        return self.dataset.sample_name(self.index)

    def load_rgb(self) -> Image.Image:
        return self.dataset.decode(self.index)


def split_images(data, split: str) -> list:
    """Every image of ``split`` of ``data``: ``ShardImage`` per sample of shards, else the image files of the
    ImageFolder split (class folders in order)."""
    if is_shard_source(data):
        dataset = shard_split_dataset(data, split)
        return [ShardImage(dataset, i) for i in range(len(dataset))]
    from .data import list_images, resolve_data_dir
    folder = find_split(resolve_data_dir(data), split)
    return [p for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith('.') for p in list_images(d)]


def train_overlap(dataset: ShardDataset, train_data) -> int:
    """How many samples of ``dataset`` lie in the training shards of the run that trained on ``train_data``."""
    if not is_shard_source(train_data):
        return 0
    train = {f.resolve() for f in find_shard_split(train_data, 'train').files}
    shared = [s for s, f in enumerate(dataset.files) if f.resolve() in train]
    return int(np.isin(dataset.shard_of, shared).sum())


# ------------------------------------------------------------------------------------------------ writing shards
_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(kb|mb|gb|tb|kib|mib|gib|tib|b)?\s*$', re.IGNORECASE)
_COUNT = re.compile(r'^\s*(\d+)\s*-?\s*(images?|imgs?|samples?)\s*$', re.IGNORECASE)
_UNITS = dict(b=1, kb=1e3, mb=1e6, gb=1e9, tb=1e12, kib=2 ** 10, mib=2 ** 20, gib=2 ** 30, tib=2 ** 40)


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """``(max bytes, max images)`` per shard from ``'1GB'`` / ``'500MiB'`` or ``'1000-images'``."""
    count = _COUNT.match(str(text))
    if count:
        if int(count.group(1)) < 1:
            raise ValueError(f'--shard-size {text}: needs at least 1 image per shard')
        return None, int(count.group(1))
    size = _SIZE.match(str(text))
    if not size or not size.group(2):
        raise ValueError(f"--shard-size {text!r}: expected a size such as 1GB, 500MB, 256MiB or an image count such "
                         f"as 1000-images")
    nbytes = int(float(size.group(1)) * _UNITS[size.group(2).lower()])
    if nbytes < 10 ** 6:
        raise ValueError(f'--shard-size {text}: shards under 1MB would each hold a few images; expected e.g. 1GB')
    return nbytes, None


class _TimmListing:
    """A timm source split with the listing interface the writer reads (images encoded as PNG)."""

    def __init__(self, dataset, name: str):
        self.dataset, self.class_names, self.root = dataset, dataset.class_names, Path(name.replace('/', '-'))
        self.samples = [(f'{name}:{i}', None) for i in range(len(dataset))]
        self._cache: tuple = (None, None)

    def _item(self, i: int):
        if self._cache[0] != i:
            self._cache = (i, self.dataset[i])
        return self._cache[1]

    def read_bytes(self, i: int) -> bytes:
        buf = io.BytesIO()
        self.decode(i).save(buf, 'PNG')
        return buf.getvalue()

    def decode(self, i: int) -> Image.Image:
        return self._item(i)[0]

    def label(self, i: int) -> int:
        return int(self._item(i)[1])

    def suffix(self, i: int) -> str:
        return '.png'


def _listings(src, splits: Sequence[str], data_dir=None, strict: bool = False) -> dict:
    """``{split: listing}`` of what ``--data`` would read from ``src``."""
    from .tasks.classification.data import ImageFolderDataset, build_timm_datasets, is_timm_source
    if is_timm_source(src):
        train, val, _ = build_timm_datasets(src, data_dir)
        by_split = dict(train=train, val=val)
        missing = [s for s in splits if s not in by_split]
        if missing:
            raise ValueError(f'{src} has the splits train and val, not {", ".join(missing)}')
        return {s: _TimmListing(by_split[s], src) for s in splits}
    listings, names = {}, None
    if is_shard_source(src):
        for split in splits:
            listings[split] = shard_split_dataset(src, split, class_names=names, strict=strict)
            names = names or listings[split].class_names
        return listings
    from .data import resolve_data_dir
    root = resolve_data_dir(src)
    for split in splits:
        listings[split] = ImageFolderDataset(find_split(root, split), class_names=names, strict=strict)
        names = names or listings[split].class_names
    return listings


def _label_of(listing, i: int) -> int:
    return listing.label(i) if isinstance(listing, _TimmListing) else int(listing.samples[i][1])


def _suffix_of(listing, i: int) -> str:
    if isinstance(listing, _TimmListing):
        return '.png'
    if isinstance(listing, ShardDataset):
        return listing._images[int(listing.shard_of[i])][int(listing.group_of[i])].lower()
    return Path(listing.samples[i][0]).suffix.lower()


def _write_split(listing, split: str, folder: Path, max_bytes, max_count, shuffle: bool, seed: int, strict: bool,
                 progress: bool) -> tuple[list[Path], list[int], list]:
    """Write ``listing`` into ``folder/<split>-NNNNNN.tar``; returns (shards, samples per shard, skipped)."""
    import webdataset as wds
    from tqdm import tqdm
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(listing.samples)) if shuffle else range(len(listing.samples))
    skipped, written = [], 0
    kwargs = dict(maxcount=max_count or 10 ** 9, maxsize=max_bytes or 1e15, verbose=0)
    with wds.ShardWriter(str(folder / f'{split}-%06d.tar'), **kwargs) as sink:
        for i in tqdm(order, desc=f'writing {split} shards', unit='img', disable=not progress, dynamic_ncols=True,
                      mininterval=1):
            i, name = int(i), str(listing.samples[int(i)][0])
            try:
                listing.decode(i)  # only readable images go into the shards
                data = listing.read_bytes(i)
            except (OSError, ValueError) as e:
                if strict:
                    raise ValueError(f'unreadable image (--strict): {e}') from None
                skipped.append((name, str(e)))
                continue
            label = _label_of(listing, i)
            sink.write({'__key__': f'{split}{written:08d}', _suffix_of(listing, i).lstrip('.'): data, 'cls': label,
                        'json': dict(label=label, class_name=listing.class_names[label], source=name)})
            written += 1
    files = _tars(folder)
    counts = [sum(p is None for p in _index_shard(f)['problems']) for f in files]
    if sum(counts) != written:  # the count check: every written sample reads back
        raise RuntimeError(f'{folder}: {sum(counts)} samples read back from {len(files)} shards, {written} written')
    return files, counts, skipped


def write_shards(src, out, shard_size: str = '1GB', splits: Sequence[str] | None = None, force: bool = False,
                 data_dir=None, strict: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """Write what ``--data src`` reads as WebDataset shards under ``out/<split>/<split>-NNNNNN.tar`` (each sample
    ``<key>.<image suffix>`` as stored, ``<key>.cls``, ``<key>.json`` with the label, class name and source), with
    ``out/classes.txt`` and a timm-style ``out/_info.json``. Training images are shuffled across shards (``seed``).
    Unreadable images are left out and counted (``strict``: ValueError). Written to a temporary folder beside
    ``out`` and renamed when complete; an existing ``out`` is replaced only with ``force``. Returns a summary."""
    from .fileio import atomic_folder
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ValueError(f'{out} exists; pass --force to replace it (or choose another OUT)')
    max_bytes, max_count = parse_shard_size(shard_size)
    splits = [s.lower() for s in (splits or ('train', 'val'))]
    for split in splits:
        split_names(split)  # ValueError for an unknown split name
    listings = _listings(src, splits, data_dir, strict)
    names = next(iter(listings.values())).class_names
    summary = dict(source=str(src), out=str(out), class_names=names, splits={})
    with atomic_folder(out, manifest=False) as tmp:
        info = dict(name=out.name, classes=names, splits={})
        for split, listing in listings.items():
            files, counts, skipped = _write_split(listing, split, tmp / split, max_bytes, max_count,
                                                  shuffle=split == 'train', seed=seed, strict=strict,
                                                  progress=progress)
            rel = [f'{split}/{f.name}' for f in files]
            info['splits'][split] = dict(name=split, num_samples=sum(counts), filenames=rel, shard_lengths=counts)
            summary['splits'][split] = dict(samples=sum(counts), shards=len(files), skipped=skipped,
                                            source_samples=len(listing.samples))
        (tmp / 'classes.txt').write_text(''.join(f'{n}\n' for n in names))
        (tmp / '_info.json').write_text(json.dumps(info, indent=1))
    return summary


def add_shards_parser(sub) -> None:
    """``conv2former shards SRC OUT``."""
    p = sub.add_parser('shards', help='write WebDataset tar shards from anything --data reads',
                       description=write_shards.__doc__.split('\n\n')[0].replace('``', "'"))
    p.add_argument('src', metavar='SRC', help='ImageFolder tree or archive, WebDataset shards, or a timm source')
    p.add_argument('out', metavar='OUT', type=Path, help='the folder to write (refused if it exists, unless --force)')
    p.add_argument('--shard-size', default='1GB', help="bytes per shard (1GB, 500MB, 256MiB) or images per shard "
                                                      "(1000-images); default 1GB")
    p.add_argument('--split', nargs='+', default=None, metavar='SPLIT',
                   help='splits to write (synonyms accepted; default: train val)')
    p.add_argument('--data-dir', help='root folder of a timm source')
    p.add_argument('--seed', type=int, default=0, help='seed of the training split\'s shuffle across shards')
    p.add_argument('--strict', action='store_true', help='fail on an unreadable image instead of leaving it out')
    p.add_argument('--force', action='store_true', help='replace an existing OUT')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='progress bar')
    p.set_defaults(func=_cmd_shards)


def _cmd_shards(args) -> int:
    summary = write_shards(args.src, args.out, args.shard_size, args.split, force=args.force, data_dir=args.data_dir,
                           strict=args.strict, progress=args.progress, seed=args.seed)
    for split, s in summary['splits'].items():
        print(f'{split}: {s["samples"]} of {s["source_samples"]} images in {s["shards"]} shards'
              + (f' ({len(s["skipped"])} unreadable left out, e.g. {s["skipped"][0][0]})' if s['skipped'] else ''))
    print(f'{len(summary["class_names"])} classes: {summary["out"]}/classes.txt\nshards: {summary["out"]}')
    return 0
