"""Training activation memory and step time of every hierarchical Conv2Former against the ConvNeXt of its size.

For each pair (conv2former_n/t/s/b vs convnext_nano/tiny/small/base), float32, 224x224, train mode:

- saved MiB/image: the bytes of the distinct storages that autograd saves for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, batch 2 minus batch 1. Device-independent.
- RSS MiB/image (CPU): resident-set growth of a fresh process during one train-mode forward at --rss-batch (4),
  divided by the batch: the memory really held, whatever autograd's hooks see.
- CUDA MiB/image and peak GiB (GPU only): allocated-memory growth during one forward, per image, and the peak
  allocated memory of a training step (forward + backward) at --batch.
- step time: forward + backward (gradients are computed, not applied) at --batch, median of --steps timed steps after
  one warm-up, the models timed in turn within each round so drift hits them alike; process CPU time (robust to
  other load on a shared machine; equal to wall time on an idle one with --threads 1) and wall time, each with the
  ratio to the ConvNeXt peer.

Conv2Former is measured with its default (lean) backward and, when the code has the switch
(``model.set_lean_backward``), also with it off (``plain``: autograd saves every intermediate, the code before the
lean backward existed), so one run gives the before/after comparison. Writes ``memory-<device>.json`` and ``.md``
to --out.

    python -m benchmarks.bench_memory                       # all pairs on CPU, results in benchmarks/results/cpu
    python -m benchmarks.bench_memory --pairs n,t --steps 3
    python -m benchmarks.bench_memory --device cuda --batch 32 --out benchmarks/results/cuda
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_memory.py
    import as_script
    as_script.run(__file__)

import argparse
import datetime
import gc
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

import conv2former  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {'n': ('conv2former_n', 'convnext_nano'), 't': ('conv2former_t', 'convnext_tiny'),
         's': ('conv2former_s', 'convnext_small'), 'b': ('conv2former_b', 'convnext_base')}
MIB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', default='n,t,s,b', help='comma-separated subset of n,t,s,b (default: all)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default: cpu)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=4, help='batch of the timed training steps (default: 4)')
    parser.add_argument('--rss-batch', type=int, default=4, help='batch of the RSS measurement (default: 4)')
    parser.add_argument('--steps', type=int, default=5, help='timed training steps per model (default: 5)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--no-plain', action='store_true', help='skip the plain (non-lean) Conv2Former variant')
    parser.add_argument('--no-time', action='store_true', help='memory only, no step time')
    parser.add_argument('--out', type=Path, default=None,
                        help='folder for the results (default: benchmarks/results/<device type>)')
    parser.add_argument('--rss-child', default=None, help=argparse.SUPPRESS)  # internal: one RSS measurement
    parser.add_argument('--plain', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [p for p in args.pairs.split(',') if p not in PAIRS]
    if bad:
        parser.error(f'--pairs takes a comma-separated subset of {",".join(PAIRS)}, got {args.pairs!r}')
    return args


def log(message: str) -> None:
    print(f'[{datetime.datetime.now():%H:%M:%S}] {message}', file=sys.stderr, flush=True)


def has_lean_switch(model: nn.Module) -> bool:
    return callable(getattr(model, 'set_lean_backward', None))


def build(name: str, device: torch.device, plain: bool = False) -> nn.Module:
    model = timm.create_model(name).to(device).train()
    if plain:
        model.set_lean_backward(False)
    return model


def saved_bytes(model: nn.Module, batch: int, size: int, device: torch.device) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward of ``batch`` images."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def saved_mib_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    """Saved bytes per image: batch 2 minus batch 1, so constant (per-model) storages cancel."""
    return (saved_bytes(model, 2, size, device) - saved_bytes(model, 1, size, device)) / MIB


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os
    return os.sysconf('SC_PAGE_SIZE')


def rss_child(name: str, batch: int, size: int, plain: bool) -> dict:
    """In a fresh process: RSS growth during one train-mode forward (output and autograd graph alive)."""
    torch.manual_seed(0)
    model = build(name, torch.device('cpu'), plain)
    x = torch.randn(batch, 3, size, size)
    gc.collect()
    before = rss_bytes()
    out = model(x)
    after = rss_bytes()
    assert out.requires_grad
    return dict(rss_mib_per_image=(after - before) / batch / MIB)


def rss_mib_per_image(name: str, batch: int, size: int, plain: bool, threads: int | None) -> float:
    cmd = [sys.executable, '-m', 'benchmarks.bench_memory', '--rss-child', name, '--rss-batch', str(batch),
           '--img-size', str(size)] + (['--plain'] if plain else []) + (['--threads', str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'RSS measurement of {name} failed:\n{proc.stderr}')
    return json.loads(proc.stdout.strip().splitlines()[-1])['rss_mib_per_image']


def cuda_memory(model: nn.Module, batch: int, size: int, device: torch.device) -> dict:
    """Allocated-memory growth of one forward per image, and the peak of a forward + backward, on CUDA."""
    x = torch.randn(batch, 3, size, size, device=device)
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = model(x)
    torch.cuda.synchronize(device)
    grown = torch.cuda.memory_allocated(device) - base
    out.float().mean().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    model.zero_grad(set_to_none=True)
    return dict(cuda_mib_per_image=grown / batch / MIB, cuda_peak_gib=peak / 2 ** 30)


def step_times(models: dict[str, nn.Module], batch: int, size: int, steps: int, device: torch.device) -> dict:
    """Median (CPU seconds, wall seconds) of a training step (forward + backward) per model, the models timed in
    turn each round."""
    x = torch.randn(batch, 3, size, size, device=device)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for model in models.values():  # warm-up
        step(model)
    cpu: dict[str, list[float]] = {k: [] for k in models}
    wall: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(steps):
        for key, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model)
            cpu[key].append(time.process_time() - start_cpu)
            wall[key].append(time.perf_counter() - start)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in models}


def _cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'cpu'


def environment(device: torch.device) -> dict:
    cuda = device.type == 'cuda'
    return dict(
        device=torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        command=shlex.join(['python', '-m', 'benchmarks.bench_memory'] + sys.argv[1:]))


def markdown(report: dict) -> str:
    env, args = report['environment'], report['settings']
    cuda = args['device'] == 'cuda' 
    lines = [
        f"# Training activation memory: Conv2Former vs ConvNeXt ({args['device']})", '',
        f"`{env['command']}` — {env['device']}, {env['threads']} thread(s), torch {env['torch']}, timm "
        f"{env['timm']}, {env['date']}", '',
        f"float32, {args['img_size']}x{args['img_size']}, train mode. *saved*: distinct storages autograd saves "
        f"during one forward (saved-tensor hooks, parameters excluded), batch 2 minus batch 1. "
        + ('' if cuda else f"*RSS*: resident-set growth of a fresh process during one forward at batch "
           f"{args['rss_batch']}, per image. ")
        + (f"*CUDA*: allocated-memory growth of one forward per image, and the peak of forward + backward at batch "
           f"{args['batch']}. " if cuda else '')
        + (f"*step*: forward + backward at batch {args['batch']}, median of {args['steps']} steps, process CPU "
           f"time (wall time in the JSON); *ratio*: to the ConvNeXt's. " if args['time'] else '')
        + "*lean*: Conv2Former as it is now (default); *plain*: with the lean backward switched off "
          "(`set_lean_backward(False)`): autograd saving every intermediate, as before it existed.", '',
    ]
    header = ['model', 'variant', 'saved MiB/img', 'vs ConvNeXt']
    header += ['CUDA MiB/img', 'CUDA peak GiB'] if cuda else ['RSS MiB/img', 'vs ConvNeXt']
    if args['time']:
        header += ['step CPU s', 'step ratio vs ConvNeXt']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for pair in report['pairs']:
        peer = pair['rows']['convnext']
        for variant, row in pair['rows'].items():
            name = pair['peer'] if variant == 'convnext' else pair['model']
            cells = [f'`{name}`', variant if variant != 'convnext' else '—', f"{row['saved_mib_per_image']:.1f}",
                     f"{row['saved_mib_per_image'] / peer['saved_mib_per_image']:.2f}×"]
            if cuda:
                cells += [f"{row['cuda_mib_per_image']:.1f}", f"{row['cuda_peak_gib']:.2f}"]
            else:
                cells += [f"{row['rss_mib_per_image']:.1f}",
                          f"{row['rss_mib_per_image'] / peer['rss_mib_per_image']:.2f}×"]
            if args['time']:
                cells += [f"{row['step_cpu_s']:.3f}", f"{row['step_cpu_s'] / peer['step_cpu_s']:.2f}×"]
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss_batch, args.img_size, args.plain)))
        return 0
    device = torch.device(args.device)
    out = args.out or ROOT / 'benchmarks' / 'results' / device.type
    report = dict(environment=environment(device),
                  settings=dict(device=device.type, img_size=args.img_size, batch=args.batch,
                                rss_batch=args.rss_batch, steps=args.steps, time=not args.no_time),
                  pairs=[])
    for key in args.pairs.split(','):
        ours, peer = PAIRS[key]
        torch.manual_seed(0)
        models = {'convnext': build(peer, device), 'lean': build(ours, device)}
        if not args.no_plain and has_lean_switch(models['lean']):
            models['plain'] = build(ours, device, plain=True)
        elif not has_lean_switch(models['lean']):
            models['plain'] = models.pop('lean')  # code without the lean backward: everything is 'plain'
        rows = {}
        for variant, model in models.items():
            row = dict(saved_mib_per_image=saved_mib_per_image(model, args.img_size, device))
            if device.type == 'cuda':
                row.update(cuda_memory(model, args.batch, args.img_size, device))
            else:
                row['rss_mib_per_image'] = rss_mib_per_image(
                    peer if variant == 'convnext' else ours, args.rss_batch, args.img_size,
                    plain=variant == 'plain' and has_lean_switch(model), threads=args.threads)
            rows[variant] = row
            log(f'{ours if variant != "convnext" else peer} [{variant}]: ' +
                ', '.join(f'{k} {v:.2f}' for k, v in row.items()))
        if not args.no_time:
            for variant, (cpu, wall) in step_times(models, args.batch, args.img_size, args.steps, device).items():
                rows[variant].update(step_cpu_s=cpu, step_wall_s=wall)
                log(f'{ours if variant != "convnext" else peer} [{variant}]: step {cpu:.3f} s CPU, {wall:.3f} s wall')
        report['pairs'].append(dict(model=ours, peer=peer, rows=rows))
        del models
        gc.collect()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'memory-{device.type}'
    stem.with_suffix('.json').write_text(json.dumps(report, indent=1) + '\n')
    stem.with_suffix('.md').write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
