"""Backbone resolution scaling on CUDA: forward time and peak memory of Conv2Former-T vs ConvNeXt-T, Swin-T and ViT-S.

For each model and image size (default 224, 448, 896, 1344 and 1792 px, batch 8) it times the backbone forward
(``forward_features``; eval mode, no_grad, bf16 autocast, channels_last for the convnets) as the median ms per call
over timed windows after untimed warm-up calls, and records the peak GPU memory of the timed calls
(torch.cuda.max_memory_allocated: weights, input and activations). Conv2Former-T runs in each kernel variant the code
offers (kernels='torch', 'triton', 'fused'), each first checked against kernels='torch' on the same weights. Every
(model, size) gets a freshly built model: Swin-T and ViT-S are created with ``img_size=size``. A size that runs out
of memory is recorded as 'OOM' and the run goes on. Writes JSON, markdown (ms and GiB with the ratio to ConvNeXt-T)
and a PNG plot (time and memory vs pixels, log-log) to --out, rewritten after every model.

    python -m benchmarks.bench_resolution [--out DIR] [--sizes 224,448,896,1344,1792] [--batch 8] [--iters 10]
    python -m benchmarks.bench_resolution --smoke   # shrunk models, 32 and 64 px, batch 1, on CPU: tests the script
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_resolution.py
    import as_script
    as_script.run(__file__)

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .common import (CHECK_BATCH, SMOKE_MODELS, SMOKE_OURS, attempt, begin, bf16, build, check_agreement, csv,
                     environment, finish, fmt, footer, free_memory, fused_variant, images, kernel_variants, log,
                     output_stem, peak_memory_gib, record_agreement, reset_peak_memory, synchronize, timed_windows,
                     write_report)

HERE = Path(__file__).resolve().parent

__all__ = ['MODELS', 'parse_args', 'scaling_exponent', 'add_ratios', 'markdown', 'plot', 'main']


class Backbone(NamedTuple):
    timm_name: str
    label: str
    convnet: bool  # run channels_last; otherwise a transformer, created with img_size=size
    smoke: dict  # --smoke: keywords shrinking it


MODELS = {
    'conv2former_t': Backbone('conv2former_t', 'Conv2Former-T', True, SMOKE_OURS),
    'convnext_t': Backbone('convnext_tiny', 'ConvNeXt-T', True, SMOKE_MODELS),
    'swin_t': Backbone('swin_tiny_patch4_window7_224', 'Swin-T', False,
                       dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))),
    'vit_s': Backbone('vit_small_patch16_224', 'ViT-S', False, dict(depth=1, embed_dim=32, num_heads=2)),
}
OURS, PEER = 'conv2former_t', 'convnext_t'
SIZES = (224, 448, 896, 1344, 1792)
SIZE_MULTIPLE = 32  # the stride of the last stage of the hierarchical models
METRICS = {'ms': 1, 'peak_gib': 2}  # cell keys and the digits shown
SMOKE = dict(sizes=(32, 64), batch=1, warmup=1, iters=1, windows=1)
REFERENCE = dict(source='issue 5: the upstream Conv2Former-T code on an H100, batch 8, bf16 (not measured here)',
                 size=1792, ms={'conv2former_t': 305.0, 'convnext_t': 64.0, 'swin_t': 92.0, 'vit_s': 81.0})


def image_sizes(text: str) -> tuple[int, ...]:
    """argparse type: distinct comma-separated image sizes, each a positive multiple of SIZE_MULTIPLE; sorted."""
    expected = f'distinct comma-separated image sizes in pixels, each a positive multiple of {SIZE_MULTIPLE}'
    try:
        sizes = tuple(int(s) for s in text.split(',') if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
    if not sizes or len(set(sizes)) < len(sizes) or any(s <= 0 or s % SIZE_MULTIPLE for s in sizes):
        raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
    return tuple(sorted(sizes))


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {text!r}')
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=HERE / 'results',
                        help='folder for the JSON, markdown and PNG results (default: benchmarks/results)')
    parser.add_argument('--models', type=csv(tuple(MODELS)), default=tuple(MODELS),
                        help=f'default: {",".join(MODELS)} (conv2former_t in every kernel variant)')
    parser.add_argument('--sizes', type=image_sizes, default=SIZES,
                        help=f'image sizes in pixels (default: {",".join(map(str, SIZES))})')
    parser.add_argument('--batch', type=at_least(1), default=8)
    parser.add_argument('--warmup', type=at_least(0), default=3, help='untimed calls before timing')
    parser.add_argument('--iters', type=at_least(1), default=10, help='calls per timed window')
    parser.add_argument('--windows', type=at_least(1), default=3, help='timed windows; the median is reported')
    parser.add_argument('--smoke', action='store_true',
                        help='shrunk models (one block per stage), sizes 32,64, batch 1, one warm-up and one timed '
                             'call, on CPU under TRITON_INTERPRET=1: checks the code path, not speed (peak memory '
                             'is then the process RSS); other flags still apply')
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def measure_forward(backbone: Backbone, kwargs: dict, size: int, args: argparse.Namespace,
                    device: torch.device) -> dict:
    """ms per ``forward_features`` call at ``--batch`` images of ``size`` px, and the peak GiB of the timed calls."""
    kwargs = kwargs if backbone.convnet else kwargs | dict(img_size=size)
    model = build(backbone.timm_name, kwargs, device, channels_last=backbone.convnet).eval()
    x = images(args.batch, size, device, channels_last=backbone.convnet)
    with torch.no_grad(), bf16(device):
        for _ in range(args.warmup):  # also lets cuDNN autotune before the peak is reset
            model.forward_features(x)
        synchronize(device)
        free_memory(device)
        reset_peak_memory(device)
        seconds = timed_windows(lambda: model.forward_features(x), 0, args.iters, args.windows, device)
    return dict(ms=1e3 * statistics.median(seconds) / args.iters, peak_gib=peak_memory_gib(device))


def scaling_exponent(sizes: list[int], values: list) -> float | None:
    """k in value ∝ pixels**k between the two largest sizes with a number (None if fewer than two have one)."""
    points = sorted((size * size, value) for size, value in zip(sizes, values) if isinstance(value, float))
    if len(points) < 2:
        return None
    (pixels_1, value_1), (pixels_2, value_2) = points[-2:]
    return math.log(value_2 / value_1) / math.log(pixels_2 / pixels_1)


def add_ratios(rows: list[dict]) -> None:
    """Each cell's ms and GiB relative to ConvNeXt-T's at the same size (> 1: slower / more memory), None where
    either is missing; and each row's scaling exponents."""
    peer = next((row for row in rows if row['model'] == PEER), None)
    for row in rows:
        for size, cell in row['cells'].items():
            theirs = peer['cells'].get(size, {}) if peer else {}
            cell['vs_peer'] = {key: cell[key] / theirs[key] if isinstance(cell[key], float)
                               and isinstance(theirs.get(key), float) else None for key in METRICS}
        sizes = [int(size) for size in row['cells']]
        row['exponent'] = {key: scaling_exponent(sizes, [cell[key] for cell in row['cells'].values()])
                           for key in METRICS}


def run(args: argparse.Namespace, device: torch.device, report: dict, save: Callable[[], None]) -> None:
    """Check the kernel variants, then measure every (model, size) into ``report``, saving after each model."""
    models = []
    for key in args.models:
        backbone = MODELS[key]
        base = backbone.smoke if args.smoke else {}
        if key != OURS:
            models.append((key, None, base))
            continue
        fused, fused_note = fused_variant()
        report['fused_variant'] = dict(kwargs=fused, note=fused_note)
        log(f'fused variant: {fused_note}')
        variants = kernel_variants(base, fused)
        report['agreement'] = check_agreement(backbone.timm_name, variants, min(CHECK_BATCH, args.batch),
                                              args.sizes[0], device)
        record_agreement(backbone.timm_name, report['agreement'], report['failures'])
        models += [(key, variant, kwargs) for variant, kwargs in variants.items()]
    for key, variant, kwargs in models:
        backbone = MODELS[key]
        label = backbone.label if variant is None else f'{backbone.label} ({variant})'
        row = dict(model=key, timm_name=backbone.timm_name, variant=variant, label=label, kwargs=kwargs, cells={})
        for size in args.sizes:
            result = attempt(lambda: measure_forward(backbone, kwargs, size, args, device), device)
            row['cells'][str(size)] = result if isinstance(result, dict) else dict.fromkeys(METRICS, result)
            log(f'{label} {size} px: ' + ', '.join(f'{key} {fmt(row["cells"][str(size)][key], digits=digits)}'
                                                  for key, digits in METRICS.items()))
        report['rows'].append(row)
        add_ratios(report['rows'])
        save()


def markdown(report: dict) -> str:
    env, cfg = report['environment'], report['settings']
    sizes = cfg['sizes']
    fused = report['fused_variant']['note'] if report['fused_variant'] else 'conv2former_t not run'
    peer_note = ('(×) = ratio to ConvNeXt-T at the same size (> 1: slower, more memory)'
                 if any(row['model'] == PEER for row in report['rows']) else 'ConvNeXt-T not run: no ratios')
    lines = [f"# Backbone resolution scaling ({env['device']})", '',
             f"torch {env['torch']}, timm {env['timm']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"`{env['command']}`", '',
             f"forward_features, eval, no_grad, bf16 autocast, channels_last for the convnets; batch {cfg['batch']}; "
             f"median ms per call over {cfg['windows']} windows of {cfg['iters']} calls after {cfg['warmup']} "
             "warm-up calls; peak = max allocated memory during the timed calls (weights, input, activations). "
             f"{peer_note}. k: value ∝ pixels^k between the two largest sizes that ran (1 = linear). "
             f"Fused variant: {fused}."]
    for key, title in (('ms', f"Forward time, ms per batch of {cfg['batch']}"), ('peak_gib', 'Peak memory, GiB')):
        lines += ['', f'## {title}', '', '| model | ' + ' | '.join(f'{size} px' for size in sizes) + ' | k |',
                  '|---|' + '---|' * (len(sizes) + 1)]
        for row in report['rows']:
            cells = [row['cells'].get(str(size), {}) for size in sizes]
            shown = [fmt(cell.get(key), None if row['model'] == PEER else (cell.get('vs_peer') or {}).get(key),
                         digits=METRICS[key]) for cell in cells]
            exponent = row['exponent'][key]
            lines.append(f"| {row['label']} | " + ' | '.join(shown) + f" | {fmt(exponent, digits=2)} |")
    reference = ', '.join(f"{MODELS[key].label} {ms:g} ms" for key, ms in REFERENCE['ms'].items())
    lines += ['', f"Reference at {REFERENCE['size']} px, from {REFERENCE['source']}: {reference}."]
    checks = [f"{variant}: {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}, max |logit| "
              f"{r['max_abs_logit']:.3g})" for variant, r in report['agreement'].items()]
    lines += ['', f"Max |logit diff| vs kernels=torch, same weights, bf16, {sizes[0]} px: "
              + ('; '.join(checks) or 'none run') + '.']
    return '\n'.join(lines + footer(report)) + '\n'


def plot(report: dict, path: Path) -> None:
    """Time and peak memory vs pixels per image, log-log, one line per row, with a dashed ∝ pixels guide; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from conv2former.fileio import atomic_path

    sizes, batch = report['settings']['sizes'], report['settings']['batch']
    fig = Figure(figsize=(12, 4.8), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, ylabel in zip(axes, METRICS, (f'forward ms (batch {batch})', 'peak memory, GiB')):
        guide = None
        for row in report['rows']:
            points = [(size * size, row['cells'][str(size)][key]) for size in sizes
                      if isinstance(row['cells'].get(str(size), {}).get(key), float)]
            if points:
                ax.plot(*zip(*points), marker='o', label=row['label'])
                if guide is None or row['model'] == PEER:
                    guide = points[-1]
        if guide is not None:
            pixels = [size * size for size in sizes]
            ax.plot(pixels, [guide[1] * p / guide[0] for p in pixels], '--', color='grey', lw=1,
                    label='∝ pixels (linear)')
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xticks([size * size for size in sizes], labels=[f'{size}²' for size in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel('pixels per image')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize='small')
    fig.suptitle(f"Backbone forward vs resolution, bf16, {report['environment']['device']}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin(args.smoke, 'bench_resolution.py')
    if started is None:
        return 2
    device, now = started
    env = environment(device, now)
    settings = {key: getattr(args, key) for key in ('models', 'sizes', 'batch', 'warmup', 'iters', 'windows', 'smoke')}
    report = dict(environment=env, settings=dict(settings, dtype='bf16', channels_last='convnets'), complete=False,
                  fused_variant=None, agreement={}, reference=REFERENCE, rows=[], failures=[])
    stem = output_stem(args.out, 'bench_resolution', env, args.smoke, now)
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_report(stem, report, markdown(report))
        plot(report, stem.with_suffix('.png'))

    run(args, device, report, save)
    report['failures'] += [f"{row['label']} {size} px: {cell['ms']}" for row in report['rows']
                           for size, cell in row['cells'].items() if str(cell['ms']).startswith('error:')]
    return finish(report, save, markdown, f'{stem}.json, .md and .png')


if __name__ == '__main__':
    sys.exit(main())
