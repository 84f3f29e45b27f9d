"""Benchmark whole Conv2Former models against their timm ConvNeXt peers on CUDA.

For each pair (conv2former_t vs convnext_tiny, conv2former_n vs convnext_nano, conv2former_b vs convnext_base) it
measures, with bf16 autocast and channels_last, eager inference img/s, torch.compile inference img/s (compile time
reported apart), and training img/s (AdamW, cross-entropy, forward + backward + step) with the peak GPU memory, for
our model with kernels='torch', kernels='triton' and, when the code offers it, the fused modulation kernel, and for
the ConvNeXt peer. Throughput is the median over timed windows after untimed warm-up steps. Before timing, the
logits of each kernel variant are checked against kernels='torch' on the same weights. Writes JSON and markdown to
--out (rewritten after every model, so a run cut short keeps what it measured).

    python -m benchmarks.bench_model [--out DIR] [--pairs t,n,b] [--modes infer,compile,train] [--iters 10]
    python -m benchmarks.bench_model --smoke   # a shrunk pair n on CPU (Triton interpreter): tests the script
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_model.py
    import as_script
    as_script.run(__file__)

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (CHECK_BATCH, SMOKE_MODELS, SMOKE_OURS, attempt, begin, bf16, build, check_agreement, csv,
                     environment, finish, fmt, footer, free_memory, fused_variant, images, kernel_variants, log,
                     output_stem, peak_memory_gib, record_agreement, reset_peak_memory, synchronize, timed_windows,
                     write_report)

PAIRS = {'t': ('conv2former_t', 'convnext_tiny'), 'n': ('conv2former_n', 'convnext_nano'),
         'b': ('conv2former_b', 'convnext_base')}
MODES = ('infer', 'compile', 'train')
MODE_KEYS = {'infer': ('infer_img_s',), 'compile': ('compile_img_s', 'compile_s'),
             'train': ('train_img_s', 'train_peak_gib')}
PEER = 'convnext'
SMOKE = dict(pairs=('n',), infer_batch=2, train_batch=2, img_size=32, warmup=1, iters=1, windows=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'results',
                        help='folder for the JSON and markdown results (default: benchmarks/results)')
    parser.add_argument('--pairs', type=csv(tuple(PAIRS)), default=tuple(PAIRS),
                        help='model pairs: t (tiny), n (nano), b (base) (default: t,n,b)')
    parser.add_argument('--modes', type=csv(MODES), default=MODES, help='default: infer,compile,train')
    parser.add_argument('--infer-batch', type=int, default=256)
    parser.add_argument('--train-batch', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps before timing')
    parser.add_argument('--iters', type=int, default=10, help='steps per timed window')
    parser.add_argument('--windows', type=int, default=3, help='timed windows; the median img/s is reported')
    parser.add_argument('--smoke', action='store_true',
                        help='pair n with one block per stage, batch 2, 32x32, one warm-up and one timed step, on '
                             'CPU under TRITON_INTERPRET=1, torch.compile with the eager backend: checks the code '
                             'path, not speed (peak memory is then the process RSS)')
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def throughput(step: Callable[[], object], batch: int, args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of ``step``: ``args.warmup`` untimed steps, then the median over ``args.windows`` timed windows of
    ``args.iters`` steps each (host clock, device synchronised at the window edges)."""
    seconds = timed_windows(step, args.warmup, args.iters, args.windows, device)
    return statistics.median(batch * args.iters / s for s in seconds)


def measure_infer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Eager inference img/s at ``--infer-batch``."""
    model.eval()
    x = images(args.infer_batch, args.img_size, device)
    with torch.no_grad(), bf16(device):
        return dict(infer_img_s=throughput(lambda: model(x), args.infer_batch, args, device))


def measure_compile(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """torch.compile (default mode) inference img/s at ``--infer-batch``; the first call is timed as compile_s."""
    model.eval()
    x = images(args.infer_batch, args.img_size, device)
    compiled = torch.compile(model, backend='eager' if args.smoke else 'inductor')
    try:
        with torch.no_grad(), bf16(device):
            start = time.perf_counter()
            compiled(x)
            synchronize(device)
            compile_s = time.perf_counter() - start
            return dict(compile_img_s=throughput(lambda: compiled(x), args.infer_batch, args, device),
                        compile_s=compile_s)
    finally:
        torch._dynamo.reset()  # drop the compiled code: the next model compiles from scratch, no recompile limit


def measure_train(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Training img/s at ``--train-batch`` (AdamW, cross-entropy on random labels) and the peak memory of it."""
    model.train()
    x = images(args.train_batch, args.img_size, device)
    labels = torch.randint(0, model.num_classes, (args.train_batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with bf16(device):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    free_memory(device)
    reset_peak_memory(device)
    return dict(train_img_s=throughput(step, args.train_batch, args, device), train_peak_gib=peak_memory_gib(device))


MEASURES = {'infer': measure_infer, 'compile': measure_compile, 'train': measure_train}


def measure(mode: str, model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """One cell: its numbers, 'OOM' when the device ran out of memory, or 'error: ...' for any other failure."""
    result = attempt(lambda: MEASURES[mode](model, args, device), device)
    return result if isinstance(result, dict) else dict.fromkeys(MODE_KEYS[mode], result)


def add_ratios(rows: list[dict]) -> None:
    """Each row's numbers relative to its pair's ConvNeXt row (throughput: ours / peer, > 1 faster; memory: ours /
    peer, the target is <= 1.2)."""
    keys = ('infer_img_s', 'compile_img_s', 'train_img_s', 'train_peak_gib')
    peers = {row['pair']: row for row in rows if row['variant'] == PEER}
    for row in rows:
        peer = peers.get(row['pair'], {})
        row['vs_peer'] = {key: row[key] / peer[key] if isinstance(row.get(key), float)
                          and isinstance(peer.get(key), float) else None for key in keys}


def run(args: argparse.Namespace, device: torch.device, report: dict, save: Callable[[], None]) -> None:
    """Check, then measure every (pair, variant, mode) into ``report``, saving after each model."""
    fused, fused_note = fused_variant()
    report['fused_variant'] = dict(kwargs=fused, note=fused_note)
    log(f'fused variant: {fused_note}')
    ours, theirs = (SMOKE_OURS, SMOKE_MODELS) if args.smoke else ({}, {})
    for pair in args.pairs:
        name, peer = PAIRS[pair]
        variants = kernel_variants(ours, fused)
        report['agreement'][pair] = check_agreement(name, variants, min(CHECK_BATCH, args.infer_batch),
                                                    args.img_size, device)
        record_agreement(name, report['agreement'][pair], report['failures'])
        models = {variant: (name, kwargs) for variant, kwargs in variants.items()} | {PEER: (peer, theirs)}
        for variant, (model_name, kwargs) in models.items():
            row = dict(pair=pair, model=model_name, variant=variant, kwargs=kwargs)
            model = build(model_name, kwargs, device)
            for mode in args.modes:
                row.update(measure(mode, model, args, device))
                log(f'{model_name} {variant} {mode}: '
                    + ', '.join(f'{key} {fmt(row[key], digits=2)}' for key in MODE_KEYS[mode]))
            del model
            free_memory(device)
            report['rows'].append(row)
            add_ratios(report['rows'])
            save()


def markdown(report: dict) -> str:
    env, cfg = report['environment'], report['settings']
    lines = [f"# Conv2Former vs ConvNeXt ({env['device']})", '',
             f"torch {env['torch']}, timm {env['timm']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"`{env['command']}`", '',
             f"bf16 autocast, channels_last, {cfg['img_size']}×{cfg['img_size']}; inference batch "
             f"{cfg['infer_batch']} (no_grad), training batch {cfg['train_batch']} (AdamW); median img/s over "
             f"{cfg['windows']} windows of {cfg['iters']} steps after {cfg['warmup']} warm-up steps. "
             '(×) = ratio to the ConvNeXt peer: img/s ours / peer (> 1 faster), memory ours / peer (target <= 1.2). '
             f"Fused variant: {report['fused_variant']['note']}.", '',
             '| pair | variant | infer img/s | compile img/s | compile s | train img/s | train peak GiB |',
             '|---|---|---|---|---|---|---|']
    for row in report['rows']:
        model = row['model'] if row['variant'] == PEER else f"{row['model']} ({row['variant']})"
        ratio = row['vs_peer'] if row['variant'] != PEER else {}
        cells = [fmt(row.get('infer_img_s'), ratio.get('infer_img_s')),
                 fmt(row.get('compile_img_s'), ratio.get('compile_img_s')), fmt(row.get('compile_s'), digits=1),
                 fmt(row.get('train_img_s'), ratio.get('train_img_s')),
                 fmt(row.get('train_peak_gib'), ratio.get('train_peak_gib'), digits=2)]
        lines.append(f"| {row['pair']} | {model} | " + ' | '.join(cells) + ' |')
    checks = [f"{pair} {variant}: {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}, max |logit| "
              f"{r['max_abs_logit']:.3g})" for pair, results in report['agreement'].items()
              for variant, r in results.items()]
    lines += ['', 'Max |logit diff| vs kernels=torch, same weights, bf16: ' + ('; '.join(checks) or 'none run') + '.']
    return '\n'.join(lines + footer(report)) + '\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin(args.smoke, 'bench_model.py')
    if started is None:
        return 2
    device, now = started
    env = environment(device, now)
    settings = {key: getattr(args, key) for key in ('pairs', 'modes', 'infer_batch', 'train_batch', 'img_size',
                                                     'warmup', 'iters', 'windows', 'smoke')}
    report = dict(environment=env, settings=dict(settings, dtype='bf16', channels_last=True), complete=False,
                  fused_variant=None, agreement={}, rows=[], failures=[])
    stem = output_stem(args.out, 'bench_model', env, args.smoke, now)
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_report(stem, report, markdown(report))

    run(args, device, report, save)
    errors = [f"{row['model']} {row['variant']} {key}: {value}" for row in report['rows']
              for key, value in row.items() if isinstance(value, str) and value.startswith('error:')]
    report['failures'] += errors
    return finish(report, save, markdown, f'{stem}.json and .md')


if __name__ == '__main__':
    sys.exit(main())
