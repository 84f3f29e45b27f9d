"""Loader throughput: the PIL pipeline (timm ``create_dataset`` + ``create_transform``, DataLoader workers) vs the
tensor-resident path (``--data-cache``: uint8 cache + ``BatchAugment`` on the device), side by side in one process,
on the ``small`` recipe's augmentation (random-resized-crop scale 0.6-1, flip, bilinear; ``--paper-augment`` adds the
in1k recipe's RandAugment and random erasing to both). The two paths are timed in alternation (PIL, tensor, PIL,
tensor, ...) so a change of machine load hits both; the ratio of the medians is the result. The PIL loader uses
``--workers`` processes, the tensor path loads in the training process as the engine does. A third path, ``engine``,
is the engine's own PIL loader (``ImageFolderDataset`` seeded per sample by ``SeededDataset``) with the same transform
and workers: what ``conv2former train`` reads without ``--data-cache``. Also times kornia's
RandomResizedCrop + flip on the same batches (with ``--paper-augment``: RandAugment alone, kornia's vs ours; when kornia
is installed), and a few training steps of a small Conv2Former fed by each path.

    python -m benchmarks.bench_data_path --data /work/shared/datasets/imagenette2-128.tar.gz \\
        --out experiments/results/data-path
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_data_path.py
    import as_script
    as_script.run(__file__)

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .common import process_tree


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (the DataLoader workers), from
    /proc (Linux): on a shared, loaded machine the work per image is steadier than the wall-clock rate."""
    tick, total = os.sysconf('SC_CLK_TCK'), 0.0
    for pid in process_tree():
        try:
            fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):  # a worker that just ended
            continue
    return total


def _settle(timeout: float = 10.0) -> None:
    """Wait until this process's DataLoader workers are idle (their prefetch queues full): otherwise the previous
    path's workers keep decoding during the next path's timing and it pays for their CPU."""
    end, last = time.perf_counter() + timeout, _cpu_seconds()
    while time.perf_counter() < end:
        time.sleep(0.25)
        now = _cpu_seconds()
        if now - last < 0.03:
            return
        last = now


def _rate(batches, n: int, batch_size: int, step=lambda b: b, cpu: list = None, warmup: int = 1) -> float:
    """Images per second over ``n`` batches of the iterator ``batches``, once the workers of any other loader are
    idle and after ``warmup`` batches (for a loader with workers: those its workers prefetched while idle, so that
    the rate is the steady state's); appends the CPU milliseconds per image to ``cpu``."""
    _settle()
    for _ in range(warmup):
        step(next(batches))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(n):
        step(next(batches))
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if cpu is not None:
        cpu.append(1000 * (_cpu_seconds() - cpu_start) / (n * batch_size))
    return n * batch_size / (time.perf_counter() - start)


def _paper_augment(args, batched: bool = False) -> dict:
    """With ``--paper-augment``: the in1k recipe's RandAugment and random erasing on top of crop + flip, as keywords
    of timm's ``create_transform`` or of ``BatchAugment``."""
    if not args.paper_augment:
        return {}
    policy = 'rand-m9-mstd0.5-inc1'
    return dict(aa=policy, re_prob=0.25) if batched else dict(auto_augment=policy, re_prob=0.25, re_mode='pixel')


def pil_loader(train_dir: Path, args, engine: bool = False):
    """timm's ``create_dataset`` (default) or, with ``engine``, the engine's ``ImageFolderDataset`` in its per-sample
    ``SeededDataset``; either with the same PIL transform and ``--workers`` DataLoader workers."""
    from timm.data import create_dataset, create_transform
    from conv2former.engine.runtime import SeededDataset
    from conv2former.tasks.classification.data import ImageFolderDataset, allow_zero_bit_posterize
    transform = allow_zero_bit_posterize(create_transform(
        args.img_size, is_training=True, scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0, interpolation='bilinear',
        **_paper_augment(args)))
    if engine:
        dataset = SeededDataset(ImageFolderDataset(train_dir, transform), 0)
    else:
        dataset = create_dataset('', root=str(train_dir), is_training=True)
        dataset.transform = transform
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      drop_last=True, persistent_workers=args.workers > 0)


def tensor_path(root: Path, args):
    from conv2former.engine.runtime import SeededDataset
    from conv2former.tasks.classification.batch_augment import BatchAugment
    from conv2former.tasks.classification.tensor_data import cached_datasets, pass_batch
    config = dict(input_size=(3, args.img_size, args.img_size), interpolation='bilinear', crop_pct=0.875,
                  crop_mode='center', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    start = time.perf_counter()
    train, _ = cached_datasets(root, config)
    cache_seconds = time.perf_counter() - start
    # as the engine loads it: batches fetched whole and augmented in the training process (no workers)
    loader = DataLoader(SeededDataset(train, 0), batch_size=args.batch_size, shuffle=True, num_workers=0,
                        drop_last=True, collate_fn=pass_batch)
    return loader, BatchAugment(args.img_size, scale=(0.6, 1.0), hflip=0.5, **_paper_augment(args, True)), \
        cache_seconds


def forever(loader):
    return itertools.chain.from_iterable(itertools.repeat(loader))


def train_rate(batches, args, augment=None) -> float:
    import timm
    model = timm.create_model('conv2former_n', num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        images, targets = batch
        images = augment(images) if augment is not None else images
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return _rate(batches, args.train_steps, args.batch_size, step)


def kornia_rate(batches, args):
    """kornia's RandomResizedCrop + flip on the tensor path's uint8 batches; with ``--paper-augment`` instead
    RandAugment alone on already cropped float batches, kornia's (n=2, m=9: its own policy) vs ours (timm's
    ``rand-m9-mstd0.5-inc1``). None without kornia."""
    try:
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment
    except ImportError:
        return None
    if args.paper_augment:
        from conv2former.tasks.classification.batch_augment import BatchRandAugment
        ours, theirs = BatchRandAugment('rand-m9-mstd0.5-inc1', args.img_size, (0.485, 0.456, 0.406)), \
            RandAugment(n=2, m=9)
        crop = lambda b: b[0][:, :, :args.img_size, :args.img_size].float()  # noqa: E731
        return dict(randaugment_ours=_rate(batches, args.batches, args.batch_size, lambda b: ours(crop(b))),
                    randaugment_kornia=_rate(batches, args.batches, args.batch_size, lambda b: theirs(crop(b) / 255)))
    aug = torch.nn.Sequential(K.RandomResizedCrop((args.img_size,) * 2, scale=(0.6, 1.0), cropping_mode='resample'),
                              K.RandomHorizontalFlip())
    return dict(kornia=_rate(batches, args.batches, args.batch_size, lambda b: aug(b[0].float() / 255)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='/work/shared/datasets/imagenette2-128.tar.gz')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('-j', '--workers', type=int, default=2, help='DataLoader workers of the PIL path (the tensor path '
                   'loads in the training process, as the engine does)')
    p.add_argument('--batches', type=int, default=20, help='timed batches per round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--train-steps', type=int, default=3, help='timed training steps per path (0: skip)')
    p.add_argument('--device', default='cpu', help="where the tensor path augments ('cuda' on a GPU machine; the "
                   "batches are fetched on the host and copied there, as in training)")
    p.add_argument('--paper-augment', action='store_true',
                   help="add the in1k recipe's RandAugment (rand-m9-mstd0.5-inc1) and random erasing (0.25) to both")
    p.add_argument('--out', type=Path, help='write <out>.json')
    args = p.parse_args()
    if args.device != 'cpu' and args.train_steps:
        p.error('--train-steps measures CPU training: give --train-steps 0 with --device')
    from conv2former.data import find_split, resolve_data_dir
    root = resolve_data_dir(args.data)
    loader, augment, cache_seconds = tensor_path(root, args)
    train_dir = find_split(root, 'train')
    pil, tensor = forever(pil_loader(train_dir, args)), forever(loader)
    engine = forever(pil_loader(train_dir, args, engine=True))
    # tensor_fetch: the host's share when the augmentation runs on a GPU (batches fetched, not augmented)
    paths = ('pil', 'engine', 'tensor', 'tensor_fetch')
    rates, cpu_ms = {k: [] for k in paths}, {k: [] for k in paths}
    pil_prefetched = 2 * args.workers  # DataLoader's default prefetch_factor is 2 per worker
    for r in range(args.rounds):
        pil_paths = (('pil', pil), ('engine', engine))
        for key, batches in pil_paths if r % 2 == 0 else pil_paths[::-1]:  # neither always first
            rates[key].append(_rate(batches, args.batches, args.batch_size, cpu=cpu_ms[key],
                                    warmup=pil_prefetched + 1))
        rates['tensor'].append(_rate(tensor, args.batches, args.batch_size,
                                     lambda b: augment(b[0].to(args.device, non_blocking=True)),
                                     cpu=cpu_ms['tensor']))
        rates['tensor_fetch'].append(_rate(tensor, args.batches, args.batch_size, cpu=cpu_ms['tensor_fetch']))
        for key, rate in (kornia_rate(tensor, args) or {}).items():
            rates.setdefault(key, []).append(rate)
        print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.0f} img/s' for k, v in rates.items() if v) +
              '; CPU ms/img ' + ', '.join(f'{k} {v[-1]:.2f}' for k, v in cpu_ms.items()), flush=True)
    result = dict(args={k: str(v) for k, v in vars(args).items()}, cache_build_seconds=cache_seconds,
                  rates=rates, median={k: statistics.median(v) for k, v in rates.items() if v},
                  torch_threads=torch.get_num_threads())
    result['ratio_tensor_over_pil'] = result['median']['tensor'] / result['median']['pil']
    result['ratio_engine_over_pil'] = result['median']['engine'] / result['median']['pil']
    result['cpu_ms_per_image'] = {k: statistics.median(v) for k, v in cpu_ms.items()}
    tensor_cpu = result['cpu_ms_per_image']['tensor']  # 0 when a short run stays under one clock tick (10 ms)
    result['cpu_ratio_pil_over_tensor'] = result['cpu_ms_per_image']['pil'] / tensor_cpu if tensor_cpu else None
    result['loadavg_at_end'] = os.getloadavg()
    if args.train_steps:
        result['train_img_per_sec'] = dict(pil=train_rate(pil, args), tensor=train_rate(tensor, args, augment))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix('.json').write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
    main()
