#!/usr/bin/env python3
"""Build ``conv2former/assets/fashion-mnist-subset.tar.gz``: a small, balanced Fashion-MNIST subset (ImageFolder tree).

Source: Debian's ``dataset-fashion-mnist`` package (Zalando's Fashion-MNIST, MIT licence), which ships the official
gzip'd idx-ubyte files in ``/usr/share/datasets/fashion-mnist``::

    apt-get install -y dataset-fashion-mnist
    python scripts/make_fashion_mnist_subset.py         # writes conv2former/assets/fashion-mnist-subset.tar.gz
    python scripts/make_fashion_mnist_subset.py --src DIR --out FILE --train-per-class 600 --val-per-class 100 --seed 0

Archive layout (members sorted, fixed mtime/owner/mode, gzip header without name or time, so identical inputs give a
byte-identical archive)::

    LICENSE                         Fashion-MNIST's MIT licence notice
    train/<class>/<index>.png       from the official training split (60000 images)
    val/<class>/<index>.png         from the official test split (10000 images)

``<index>`` is the image's zero-padded index in its official split; images are 28x28 8-bit grayscale PNGs. The images of
each class are chosen by sorting that class's indices by ``sha256(f'{seed}:{split}:{index}')`` and taking the first N:
deterministic, and independent of numpy's random generators.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
MTIME = 1591315200  # 2020-06-05 00:00 UTC, the Debian package's file date (any fixed value keeps builds reproducible)
DEFAULT_SRC = Path('/usr/share/datasets/fashion-mnist')
DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'conv2former' / 'assets' / 'fashion-mnist-subset.tar.gz'
LICENSE = """\
Fashion-MNIST subset (600 train + 100 val images per class), built by scripts/make_fashion_mnist_subset.py
from Debian's dataset-fashion-mnist package (https://github.com/zalandoresearch/fashion-mnist).

The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip'd idx-ubyte file (header: 0, 0, 0x08 = uint8, ndim; then ndim big-endian uint32 sizes)."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte idx file (header {raw[:4].hex()})')
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f'{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, found {data.size}')
    return data.reshape(shape)


def select(labels: np.ndarray, per_class: int, seed: int, split: str) -> list[int]:
    """The first ``per_class`` indices of each class, ordered by a seeded hash of (split, index)."""
    chosen = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c).tolist()
        if len(idx) < per_class:
            raise ValueError(f'{split}: class {CLASS_NAMES[c]} has {len(idx)} images, fewer than {per_class}')
        idx.sort(key=lambda i: hashlib.sha256(f'{seed}:{split}:{i}'.encode()).digest())
        chosen += sorted(idx[:per_class])
    return chosen


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode='L').save(buf, format='PNG', optimize=True)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, '', ''
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def build(src: Path, out: Path, train_per_class: int, val_per_class: int, seed: int) -> dict[str, bytes | None]:
    members: dict[str, bytes | None] = {'LICENSE': LICENSE.encode()}
    for split, prefix, per_class in (('train', 'train', train_per_class), ('val', 't10k', val_per_class)):
        images = read_idx(src / f'{prefix}-images-idx3-ubyte.gz')
        labels = read_idx(src / f'{prefix}-labels-idx1-ubyte.gz')
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(f'{src}: unexpected {prefix} shapes: images {images.shape}, labels {labels.shape}')
        width = len(str(len(labels) - 1))
        members[split] = None
        for c in CLASS_NAMES:
            members[f'{split}/{c}'] = None
        for i in select(labels, per_class, seed, split):
            members[f'{split}/{CLASS_NAMES[labels[i]]}/{i:0{width}d}.png'] = png_bytes(images[i])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + '.tmp')
    with open(tmp, 'wb') as f, gzip.GzipFile(filename='', mode='wb', fileobj=f, compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode='w', format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                add(tar, name, members[name])
    tmp.replace(out)
    return members


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--src', type=Path, default=DEFAULT_SRC, help=f'folder of the idx .gz files (default {DEFAULT_SRC})')
    p.add_argument('--out', type=Path, default=DEFAULT_OUT, help='output .tar.gz (default: the bundled asset)')
    p.add_argument('--train-per-class', type=int, default=600)
    p.add_argument('--val-per-class', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    members = build(a.src, a.out, a.train_per_class, a.val_per_class, a.seed)
    n = sum(v is not None for k, v in members.items() if k != 'LICENSE')
    digest = hashlib.sha256(a.out.read_bytes()).hexdigest()
    print(f'wrote {a.out} ({a.out.stat().st_size} bytes, {n} images, sha256 {digest})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
