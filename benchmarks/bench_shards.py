"""Sharded data vs ImageFolder (issue 24): the training loader's throughput, memory and time to the first batch on
Imagenette-128, with the engine's own pipeline for every reader: ``SeededDataset`` + ``DistributedSampler`` (global
shuffle) + ``DataLoader`` workers, timm's training transform at 128 px (random-resized crop, flip, colour jitter: the
defaults of ``conv2former train``) after the same ``load_rgb`` decode. The readers are timed in alternation (one
epoch each per round, the order rotated every round) so a change of machine load hits them all; the medians are the
result.

Readers: ``imagefolder`` (one file per image); ``shards`` (ours: ``conv2former.shards.ShardDataset``, wids'
``IndexedTarSamples`` per shard, kept open per worker); ``wids-shardlist`` (wids' own ``ShardListDataset`` with its
default 10-shard LRU, reading the same shards in place). mosaicml-streaming and litdata are tried too: their result
(or why they could not run here) is part of the table.

    python -m benchmarks.bench_shards --data /work/shared/datasets/imagenette2-128.tar.gz \\
        --out benchmarks/results/shards
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_shards.py
    import as_script
    as_script.run(__file__)

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .common import process_tree

RESULTS = Path(__file__).resolve().parent / 'results' / 'shards'
SHARD_IMAGES = 256  # images per shard: 37 training shards, so readers that keep few shards open meet many


def _memory_mib() -> dict:
    """RSS of this process and its workers, split into anonymous and file-backed (mapped shards, libraries)."""
    total = dict(rss=0, anon=0, file=0)
    for pid in process_tree():
        try:
            status = dict(line.split(':', 1) for line in Path(f'/proc/{pid}/status').read_text().splitlines()
                          if ':' in line)
        except OSError:
            continue
        for key, field in (('rss', 'VmRSS'), ('anon', 'RssAnon'), ('file', 'RssFile')):
            total[key] += int(status.get(field, '0 kB').split()[0]) / 1024
    return total


class PeakMemory:
    """The largest process-tree RSS seen while the block runs (sampled every 0.2 s)."""

    def __enter__(self):
        self.peak, self._stop = dict(rss=0.0, anon=0.0, file=0.0), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.2):
            now = _memory_mib()
            if now['rss'] > self.peak['rss']:
                self.peak = now

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _transform(img_size: int):
    """The training transform ``conv2former train`` builds with its default flags for a 128 px Conv2Former."""
    import timm
    from timm.data import resolve_data_config
    from conv2former.tasks.classification.task import ClassificationOptions, train_transform
    model = timm.create_model('conv2former_n', device='meta')
    return train_transform(resolve_data_config(dict(img_size=img_size), model=model), ClassificationOptions())


class WidsShardList(torch.utils.data.Dataset):
    """wids' ShardListDataset over the same shards (read in place: its local name is the shard path), decoded with
    ``load_rgb`` and the same transform."""

    def __init__(self, files, transform):
        import io
        from wids import ShardListDataset
        from conv2former.data import load_rgb
        from conv2former.shards import shard_index
        shards = [dict(url=str(f), nsamples=len(shard_index(f)['keys'])) for f in files]
        self.dataset = ShardListDataset(shards, localname=lambda url: url, transformations=[lambda s: s])
        self.transform, self._io, self._load_rgb = transform, io, load_rgb

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        ext = next(k for k in sample if k in ('.jpg', '.jpeg', '.png', '.webp'))
        return self.transform(self._load_rgb(self._io.BytesIO(sample[ext].getvalue()))), int(sample['.cls'].read())


def _litdata_item(item):
    """One sample for litdata's ``optimize`` (module level: its workers pickle it)."""
    path, label = item
    return dict(image=Path(path).read_bytes(), label=int(label))


def _streaming_readers(train, transform, folder: Path) -> tuple[dict, dict]:
    """mosaicml-streaming and litdata over the same images, converted once to their own formats (MDS, litdata
    chunks) of about ``SHARD_IMAGES`` images per shard; iterable datasets with their own shuffle."""
    import io
    from conv2former.data import load_rgb
    readers, build = {}, {}

    def decoded(sample):
        return transform(load_rgb(io.BytesIO(sample['image']))), int(sample['label'])

    try:
        from streaming import MDSWriter, StreamingDataset
        out = folder / 'mds'
        if not (out / 'index.json').is_file():
            mean = sum(Path(p).stat().st_size for p, _ in train.samples) / len(train.samples)
            with MDSWriter(out=str(out), columns=dict(image='bytes', label='int'),
                           size_limit=int(mean * SHARD_IMAGES)) as sink:
                for i, (_, label) in enumerate(train.samples):
                    sink.write(dict(image=train.read_bytes(i), label=int(label)))

        class MDSImages(StreamingDataset):
            def __getitem__(self, i):
                return decoded(super().__getitem__(i))

        t = time.perf_counter()
        readers['mosaicml-streaming'] = MDSImages(local=str(out), shuffle=True, shuffle_seed=0, batch_size=64)
        build['mosaicml-streaming'] = dict(setup_s=time.perf_counter() - t)
    except Exception as e:  # not installed or failing here: say why in the table
        build['mosaicml-streaming'] = dict(error=f'{type(e).__name__}: {str(e)[:200]}')
    try:
        import litdata
        out = folder / 'litdata'
        if not (out / 'index.json').is_file():
            litdata.optimize(fn=_litdata_item, inputs=[tuple(s) for s in train.samples], output_dir=str(out),
                             chunk_size=SHARD_IMAGES, num_workers=1, verbose=False)

        class LitImages(litdata.StreamingDataset):
            def __getitem__(self, i):
                return decoded(super().__getitem__(i))

        t = time.perf_counter()
        readers['litdata'] = LitImages(str(out), shuffle=True, seed=0)
        build['litdata'] = dict(setup_s=time.perf_counter() - t)
    except Exception as e:
        build['litdata'] = dict(error=f'{type(e).__name__}: {str(e)[:200]}')
    return readers, build


def _epoch(dataset, workers: int, batch_size: int, seed: int, epoch: int, limit: int | None) -> dict:
    """One epoch through the engine's sampler and loader: img/s after the first batch, time to the first batch
    (from creating the loader), peak RSS."""
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
    from conv2former.engine.runtime import SeededDataset
    if isinstance(dataset, IterableDataset):  # streaming libraries: their own shuffle and worker split
        seeded, indices = dataset, None
        if hasattr(dataset, 'set_epoch'):
            dataset.set_epoch(epoch)
    else:
        seeded = SeededDataset(dataset, seed)
        seeded.epoch = epoch
        sampler = DistributedSampler(seeded, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
    with PeakMemory() as memory:
        start = time.perf_counter()
        # fork, as the engine's loaders on Linux (litdata switches the default start method to spawn)
        loader = DataLoader(seeded, batch_size=batch_size, sampler=indices, num_workers=workers, drop_last=True,
                            multiprocessing_context='fork' if workers else None)
        first, count = None, 0
        for b, (images, _) in enumerate(loader):
            count += images.shape[0]
            if first is None:
                first, count = time.perf_counter(), 0
            if limit and b + 1 >= limit:
                break
        end = time.perf_counter()
    return dict(img_per_s=count / max(end - first, 1e-9), first_batch_s=first - start, images=count + batch_size,
                rss_mib=memory.peak['rss'], rss_anon_mib=memory.peak['anon'], rss_file_mib=memory.peak['file'])


def _prepare(data: str, shards_dir: Path, img_size: int):
    """(ImageFolder train split, shards folder): the shards written once by ``conv2former shards`` and reused."""
    from conv2former.data import find_split, resolve_data_dir
    from conv2former.shards import write_shards
    root = resolve_data_dir(data)
    if not (shards_dir / '_info.json').is_file():
        print(f'writing shards of {root} to {shards_dir} ({SHARD_IMAGES} images each)', flush=True)
        write_shards(root, shards_dir, f'{SHARD_IMAGES}-images', splits=['train'], force=True, progress=False)
    return find_split(root, 'train'), shards_dir


def _readers(train_dir: Path, shards_dir: Path, transform, index_dir: Path) -> tuple[dict, dict]:
    """The datasets to time, and for each what building it cost (s; the shard index cold, then from its cache)."""
    from conv2former.shards import ShardDataset, find_shard_split
    from conv2former.tasks.classification.data import ImageFolderDataset
    files = find_shard_split(shards_dir, 'train').files
    build, readers = {}, {}
    t = time.perf_counter()
    readers['imagefolder'] = ImageFolderDataset(train_dir, transform)
    build['imagefolder'] = dict(setup_s=time.perf_counter() - t)
    t = time.perf_counter()
    ShardDataset(files, cache_dir=index_dir)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    readers['shards'] = ShardDataset(files, transform, cache_dir=index_dir)
    build['shards'] = dict(setup_s=time.perf_counter() - t, index_cold_s=cold)
    try:
        t = time.perf_counter()
        readers['wids-shardlist'] = WidsShardList(files, transform)
        build['wids-shardlist'] = dict(setup_s=time.perf_counter() - t)
    except Exception as e:  # report, do not stop the comparison
        build['wids-shardlist'] = dict(error=f'{type(e).__name__}: {e}')
    streams, streams_build = _streaming_readers(readers['imagefolder'], transform, shards_dir.parent / 'other-formats')
    return {**readers, **streams}, {**build, **streams_build}


def _table(report: dict) -> str:
    rows = report['median']
    base = rows['imagefolder']['img_per_s']
    lines = ['| reader | img/s (median) | vs ImageFolder | first batch (s) | setup (s) | peak RSS MiB (anon + file) '
             '| files opened / epoch |', '|---|---|---|---|---|---|---|']
    for name, row in rows.items():
        build = report['build'].get(name, {})
        setup = f'{build.get("setup_s", 0):.2f}' + (f' (index cold {build["index_cold_s"]:.2f})'
                                                     if 'index_cold_s' in build else '')
        lines.append(f'| {name} | {row["img_per_s"]:.0f} | {row["img_per_s"] / base:.2f}x | '
                     f'{row["first_batch_s"]:.2f} | {setup} | {row["rss_mib"]:.0f} ({row["rss_anon_mib"]:.0f} + '
                     f'{row["rss_file_mib"]:.0f}) | {report["files_per_epoch"].get(name, "?")} |')
    for name, error in report['not_run'].items():
        lines.append(f'| {name} | - | - | - | - | - | not run: {error} |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default='/work/shared/datasets/imagenette2-128.tar.gz')
    parser.add_argument('--shards', type=Path, default=Path('data/bench-shards/imagenette2-128'),
                        help='where the shards are written once and reused (git-ignored data/)')
    parser.add_argument('--img-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=3, help='epochs per reader, alternated')
    parser.add_argument('--limit', type=int, default=None, help='batches per epoch (default: the whole epoch)')
    parser.add_argument('--readers', nargs='+', default=None, help='subset of imagefolder shards wids-shardlist')
    parser.add_argument('--out', type=Path, default=RESULTS)
    parser.add_argument('--extra-path', action='append', default=[],
                        help='a folder of libraries installed outside the environment (pip install --no-deps --target '
                             'DIR mosaicml-streaming litdata and their small dependencies: mosaicml-streaming pins '
                             'numpy<2.2 and transformers<5; the three transformers names it imports (BatchFeature, '
                             'BatchEncoding, AutoTokenizer: collate and text datasets only) can be stubbed)')
    args = parser.parse_args(argv)
    import sys
    sys.path[:0] = args.extra_path
    torch.set_num_threads(1)
    train_dir, shards_dir = _prepare(args.data, args.shards, args.img_size)
    transform = _transform(args.img_size)
    with tempfile.TemporaryDirectory() as index_dir:
        readers, build = _readers(train_dir, shards_dir, transform, Path(index_dir))
        readers = {k: v for k, v in readers.items() if not args.readers or k in args.readers}
        runs = {name: [] for name in readers}
        names = list(readers)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                row = _epoch(readers[name], args.workers, args.batch_size, seed=0, epoch=r, limit=args.limit)
                runs[name].append(row)
                print(f'round {r + 1} {name}: {row["img_per_s"]:.0f} img/s, first batch {row["first_batch_s"]:.2f} s, '
                      f'RSS {row["rss_mib"]:.0f} MiB', flush=True)
    n_shards = len(readers['shards'].files) if 'shards' in readers else 0
    n_images = len(readers['imagefolder']) if 'imagefolder' in readers else 0
    report = dict(
        command='python -m benchmarks.bench_shards ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now().isoformat(timespec='seconds'), machine=platform.platform(),
        cpus=os.cpu_count(), torch=torch.__version__, data=args.data, img_size=args.img_size, workers=args.workers,
        batch_size=args.batch_size, rounds=args.rounds, shard_images=SHARD_IMAGES, shards=n_shards, build=build,
        runs=runs, median={name: {k: statistics.median(row[k] for row in rows) for k in rows[0]}
                           for name, rows in runs.items()},
        files_per_epoch={'imagefolder': n_images, 'shards': f'<= {n_shards} x {args.workers} workers',
                         'wids-shardlist': f'>= {n_shards} x {args.workers} (LRU of 10: re-opened and re-indexed on '
                                           'each miss)', 'mosaicml-streaming': f'~{n_shards} (own MDS shards)',
                         'litdata': f'~{n_shards} (own chunks)'},
        not_run={k: v['error'] for k, v in build.items() if 'error' in v})
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f'shards-{platform.node()}-{datetime.date.today().isoformat()}'
    stem.with_suffix('.json').write_text(json.dumps(report, indent=1))
    table = _table(report)
    stem.with_suffix('.md').write_text(f'# Sharded data vs ImageFolder\n\n`{report["command"]}`\n\n{table}\n')
    print(table)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
