"""Pre-shrink the downstream miniature's datasets (CPU) so that all three travel to a GPU machine in one call (< 64 MiB).

Reads the archives in SRC (imagenette2-128.tar.gz, pennfudan.tar.gz, camvid.tar.gz, as in /work/shared/datasets) and
writes smaller archives with the same layouts into DEST (default data/downstream, git-ignored):

- imagenette2-<S>.tar.gz: Imagenette (the standard train/val split, all 10 classes) resized from 128 to S px
  (default 64, Lanczos) and re-encoded as JPEG q75; ``--train-per-class N`` keeps the first N train images per class.
- pennfudan.tar.gz: Penn-Fudan, all 170 images with their masks and annotations; JPEGs re-encoded at ``--quality``.
- camvid.tar.gz: CamVid train and val (``--camvid-splits``) at ``--camvid-scale`` (images: Lanczos + JPEG at
  ``--quality``; labels: nearest neighbour, so the class ids stay exact), with the split lists.

Writes DEST/manifest.json (what was kept, sizes, sha256) and prints it. Archives are written atomically.

    python experiments/shrink_datasets.py [--src /work/shared/datasets] [--dest data/downstream]
    python experiments/shrink_datasets.py --smoke --dest DIR   # a few images of each: for the CPU smoke test
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # conv2former.fileio from this checkout

from conv2former.fileio import atomic_path  # noqa: E402

SMOKE = dict(train_per_class=2, val_per_class=1, pennfudan_images=4, camvid_images=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', type=Path, default=Path('/work/shared/datasets'))
    parser.add_argument('--dest', type=Path, default=ROOT / 'data' / 'downstream')
    parser.add_argument('--imagenette-size', type=int, default=64, help='px of the square Imagenette images')
    parser.add_argument('--train-per-class', type=int, default=None, help='Imagenette train images per class')
    parser.add_argument('--val-per-class', type=int, default=None, help='Imagenette val images per class')
    parser.add_argument('--quality', type=int, default=85, help='JPEG quality for Penn-Fudan and CamVid images')
    parser.add_argument('--camvid-scale', type=float, default=0.5, help='CamVid size factor (480x360 -> 240x180)')
    parser.add_argument('--camvid-splits', default='train,val', help='CamVid splits to keep')
    parser.add_argument('--pennfudan-images', type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--camvid-images', type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--smoke', action='store_true', help='a few images of each dataset (the CPU smoke test)')
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    for name in ('imagenette2-128', 'pennfudan', 'camvid'):
        if not (args.src / f'{name}.tar.gz').is_file():
            parser.error(f'{args.src / name}.tar.gz not found (--src: the folder holding the three archives)')
    if not 16 <= args.imagenette_size <= 128 or not 0.1 <= args.camvid_scale <= 1 or not 1 <= args.quality <= 95:
        parser.error('expected 16 <= --imagenette-size <= 128, 0.1 <= --camvid-scale <= 1, 1 <= --quality <= 95')
    return args


def members(archive: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """(member, bytes) of every regular file, streamed in archive order."""
    with tarfile.open(archive, 'r|gz') as tar:
        for info in tar:
            if info.isfile():
                yield info, tar.extractfile(info).read()


def jpeg(data: bytes, size: tuple[int, int] | None, quality: int) -> bytes:
    """The image re-encoded as JPEG (RGB), resized to ``size`` (Lanczos) when given."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert('RGB')
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, 'JPEG', quality=quality)
    return out.getvalue()


def label_png(data: bytes, size: tuple[int, int]) -> bytes:
    """A label map resized with the nearest neighbour (ids unchanged), saved as PNG in its own mode."""
    with Image.open(io.BytesIO(data)) as image:
        if image.size != size:
            image = image.resize(size, Image.Resampling.NEAREST)
        out = io.BytesIO()
        image.save(out, 'PNG', optimize=True)
    return out.getvalue()


def write_archive(path: Path, files: Iterator[tuple[str, bytes]], desc: str) -> dict:
    """Write ``files`` (name, bytes) into the .tar.gz ``path`` atomically; its size, sha256 and file count."""
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, 'w:gz', compresslevel=9) as tar:
        for name, data in tqdm(files, desc=desc, unit=' files', mininterval=2):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            count += 1
    return dict(file=path.name, bytes=path.stat().st_size, mib=round(path.stat().st_size / 2 ** 20, 2),
                files=count, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def keep_first(limit: int | None, key: Callable[[str], str | None]) -> Callable[[str], bool]:
    """A filter keeping the first ``limit`` names per ``key(name)`` (all when limit is None; key None = keep)."""
    seen: Counter = Counter()

    def keep(name: str) -> bool:
        group = key(name)
        if group is None or limit is None:
            return True
        seen[group] += 1
        return seen[group] <= limit
    return keep


def imagenette(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    top = f'imagenette2-{args.imagenette_size}'
    limits = {'train': args.train_per_class, 'val': args.val_per_class}
    keeps = {split: keep_first(limit, lambda name: name.split('/')[2]) for split, limit in limits.items()}
    size = (args.imagenette_size, args.imagenette_size)
    for info, data in members(args.src / 'imagenette2-128.tar.gz'):
        parts = info.name.split('/')  # imagenette2-128/<split>/<wnid>/<file>.JPEG
        if len(parts) == 4 and parts[1] in keeps and keeps[parts[1]](info.name):
            yield '/'.join([top, parts[1], parts[2], Path(parts[3]).stem + '.jpg']), jpeg(data, size, 75)


def first_stems(archive: Path, folders: set[str], limit: int | None) -> set[str] | None:
    """Per folder in ``folders``, the first ``limit`` file stems in name order, as '<folder>/<stem>' (None: all)."""
    if limit is None:
        return None
    with tarfile.open(archive, 'r:gz') as tar:
        names = sorted(Path(name) for name in tar.getnames())
    chosen: dict[str, list[str]] = {}
    for path in names:
        if path.parent.name in folders and len(chosen.setdefault(path.parent.name, [])) < limit:
            chosen[path.parent.name].append(path.stem)
    return {f'{folder}/{stem}' for folder, stems in chosen.items() for stem in stems}


def pennfudan(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    """Every file, JPEGs re-encoded; with a limit (smoke), only the first images and their masks/annotations."""
    archive = args.src / 'pennfudan.tar.gz'
    kept = first_stems(archive, {'JPEGImages'}, args.pennfudan_images)
    for info, data in members(archive):
        path = Path(info.name)
        if kept is not None and path.parent.name in ('JPEGImages', 'PedMasks', 'Annotation') \
                and f"JPEGImages/{path.stem.removesuffix('_mask')}" not in kept:
            continue
        yield info.name, jpeg(data, None, args.quality) if path.suffix == '.jpg' else data


def camvid(args: argparse.Namespace) -> Iterator[tuple[str, bytes]]:
    """The chosen splits, images and labels scaled alike, with their split lists (limited to the kept images)."""
    archive = args.src / 'camvid.tar.gz'
    splits = args.camvid_splits.split(',')
    kept = first_stems(archive, set(splits), args.camvid_images)
    for info, data in members(archive):
        path = Path(info.name)  # CamVid/<split>/<name>.jpg, CamVid/<split>annot/<name>.png, CamVid/<split>.txt
        split = path.parent.name.removesuffix('annot')
        if path.suffix in ('.jpg', '.png'):
            if split not in splits or (kept is not None and f'{split}/{path.stem}' not in kept):
                continue
            with Image.open(io.BytesIO(data)) as image:
                size = tuple(max(1, round(side * args.camvid_scale)) for side in image.size)
            yield info.name, jpeg(data, size, args.quality) if path.suffix == '.jpg' else label_png(data, size)
        elif path.suffix == '.txt' and path.stem in splits and kept is not None:
            lines = [line for line in data.decode().splitlines()
                     if f'{path.stem}/{Path(line.split()[0]).stem}' in kept] if data.strip() else []
            yield info.name, ('\n'.join(lines) + '\n').encode()
        elif path.suffix != '.txt' or path.stem in splits:
            yield info.name, data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    outputs = {f'imagenette2-{args.imagenette_size}.tar.gz': imagenette, 'pennfudan.tar.gz': pennfudan,
               'camvid.tar.gz': camvid}
    manifest = dict(source=str(args.src), settings={k: v for k, v in vars(args).items() if k not in ('src', 'dest')},
                    archives=[write_archive(args.dest / name, make(args), name) for name, make in outputs.items()])
    manifest['total_mib'] = round(sum(a['bytes'] for a in manifest['archives']) / 2 ** 20, 2)
    (args.dest / 'manifest.json').write_text(json.dumps(manifest, indent=1, default=str) + '\n')
    print(json.dumps(manifest, indent=1, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
