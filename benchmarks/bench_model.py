"""Benchmark whole Conv2Former models against their timm ConvNeXt peers on CUDA.

For each pair (conv2former_t vs convnext_tiny, conv2former_n vs convnext_nano, conv2former_b vs convnext_base) it
measures, with bf16 autocast and channels_last, eager inference img/s, torch.compile inference img/s (compile time
reported apart), and training img/s (AdamW, cross-entropy, forward + backward + step) with the peak GPU memory, for
our model with kernels='torch', kernels='triton' and, when the code offers it, the fused modulation kernel, and for
the ConvNeXt peer. Throughput is the median over timed windows after untimed warm-up steps. Before timing, the
logits of each kernel variant are checked against kernels='torch' on the same weights. Writes JSON and markdown to
--out (rewritten after every model, so a run cut short keeps what it measured).

    python benchmarks/bench_model.py [--out DIR] [--pairs t,n,b] [--modes infer,compile,train] [--iters 10]
    python benchmarks/bench_model.py --smoke   # a shrunk pair n on CPU (Triton interpreter): tests the script
"""
import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

PAIRS = {'t': ('conv2former_t', 'convnext_tiny'), 'n': ('conv2former_n', 'convnext_nano'),
         'b': ('conv2former_b', 'convnext_base')}
MODES = ('infer', 'compile', 'train')
MODE_KEYS = {'infer': ('infer_img_s',), 'compile': ('compile_img_s', 'compile_s'),
             'train': ('train_img_s', 'train_peak_gib')}
PEER = 'convnext'
CHECK_BATCH = 8
BF16_NOISE_FACTOR = 4  # a variant may differ from kernels='torch' by this many times torch's own bf16 error
SMOKE = dict(pairs=('n',), infer_batch=2, train_batch=2, img_size=32, warmup=1, iters=1, windows=1)
SMOKE_MODELS = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32))  # --smoke: the Triton interpreter is slow
SMOKE_OURS = dict(SMOKE_MODELS, kernel_size=3)


def csv(choices) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated subset of ``choices``."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(',') if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'expected a comma-separated subset of {",".join(choices)}, got {text!r}')
        return items
    return parse


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


def fused_variant() -> tuple[dict | None, str]:
    """Model keywords selecting the fused modulation kernel, or None and why there is none.

    Needs ``conv2former.ops.conv_modulation`` and a model keyword for it: ``kernels='fused'`` or a boolean keyword
    with "fuse" in its name.
    """
    import conv2former.ops
    from conv2former import Conv2Former
    from conv2former.models.layers import KERNELS

    if not hasattr(conv2former.ops, 'conv_modulation'):
        return None, 'skipped: conv2former.ops has no conv_modulation'
    if 'fused' in KERNELS:
        return dict(kernels='fused'), "kernels='fused'"
    keywords = [name for name in inspect.signature(Conv2Former).parameters if 'fuse' in name]
    if keywords:
        return {keywords[0]: True}, f'{keywords[0]}=True'
    return None, ("skipped: conv2former.ops.conv_modulation exists but Conv2Former takes no keyword for it "
                  "(looked for kernels='fused' and a keyword containing 'fuse')")


def build(name: str, kwargs: dict, device: torch.device) -> nn.Module:
    """A randomly initialised timm model on ``device``, channels_last."""
    return timm.create_model(name, **kwargs).to(device, memory_format=torch.channels_last)


def images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)


def bf16(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def throughput(step: Callable[[], object], batch: int, args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of ``step``: ``args.warmup`` untimed steps, then the median over ``args.windows`` timed windows of
    ``args.iters`` steps each (host clock, device synchronised at the window edges)."""
    for _ in range(args.warmup):
        step()
    synchronize(device)
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        synchronize(device)
        rates.append(batch * args.iters / (time.perf_counter() - start))
    return statistics.median(rates)


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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on CPU (smoke) the process's peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


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
    try:
        return MEASURES[mode](model, args, device)
    except torch.OutOfMemoryError:
        result = 'OOM'
    except Exception as exc:  # noqa: BLE001 - recorded in the cell; main() exits 1
        result = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    finally:
        free_memory(device)
    return dict.fromkeys(MODE_KEYS[mode], result)


def randomize_for_check(model: nn.Module) -> None:
    """Variance-preserving random weights and layer scale 1, so that every depthwise conv moves the logits (at the
    default init, layer scale 1e-6 and std 0.02, a wrong depthwise conv would hardly show in them)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(std=param[0].numel() ** -0.5)
            elif name.endswith('gamma'):
                param.fill_(1.0)


def check_agreement(name: str, variants: dict[str, dict], args: argparse.Namespace, device: torch.device) -> dict:
    """Max |logit difference| in bf16 of each kernel variant vs kernels='torch' on the same weights.

    The tolerance is BF16_NOISE_FACTOR times the bf16 error of kernels='torch' itself (max |logit difference|
    between its bf16 and float32 logits), so it grows with the model's depth as bf16 rounding does.
    """
    reference = build(name, variants['torch'], device).eval()
    randomize_for_check(reference)
    x = images(min(CHECK_BATCH, args.infer_batch), args.img_size, device)
    results = {}
    with torch.no_grad():
        ref_fp32 = reference(x)
        with bf16(device):
            ref = reference(x).float()
        tolerance = BF16_NOISE_FACTOR * (ref - ref_fp32).abs().max().item()
        for variant, kwargs in variants.items():
            if variant == 'torch':
                continue
            model = build(name, kwargs, device).eval()
            model.load_state_dict(reference.state_dict())
            with bf16(device):
                diff = (model(x).float() - ref).abs().max().item()
            results[variant] = dict(max_abs_diff=diff, tolerance=tolerance, max_abs_logit=ref.abs().max().item(),
                                    ok=diff <= tolerance)
            del model
    del reference
    free_memory(device)
    return results


def log(message: str) -> None:
    print(f'[{datetime.datetime.now():%H:%M:%S}] {message}', file=sys.stderr, flush=True)


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
        variants = {'torch': ours | dict(kernels='torch'), 'triton': ours | dict(kernels='triton')}
        if fused is not None:
            variants['fused'] = ours | fused
        report['agreement'][pair] = check_agreement(name, variants, args, device)
        for variant, result in report['agreement'][pair].items():
            log(f'{name} {variant} vs torch: max |logit diff| {result["max_abs_diff"]:.3g} '
                f'(tolerance {result["tolerance"]:.3g})')
            if not result['ok']:
                report['failures'].append(f'{name} {variant}: logits differ from kernels=torch by '
                                          f'{result["max_abs_diff"]:.3g} > {result["tolerance"]:.3g}')
                print(f'ERROR: {report["failures"][-1]}', file=sys.stderr, flush=True)
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


def fmt(value, ratio: float | None = None, digits: int = 0) -> str:
    """A table cell: the number (with its ratio to the peer), 'OOM' / 'error: ...' as is, '—' if not measured."""
    if not isinstance(value, float):
        return '—' if value is None else str(value)
    return f'{value:,.{digits}f}' + ('' if ratio is None else f' ({ratio:.2f}×)')


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
    if report['failures']:
        lines += ['', f"**{len(report['failures'])} failure(s):** " + '; '.join(report['failures'])]
    if not report['complete']:
        lines += ['', '**Incomplete: the run stopped before measuring every model.**']
    return '\n'.join(lines) + '\n'


def environment(device: torch.device, now: datetime.datetime) -> dict:
    import triton
    cuda = device.type == 'cuda'
    return dict(
        device=torch.cuda.get_device_name(device) if cuda else 'cpu (smoke run, Triton interpreter: no real numbers)',
        torch=torch.__version__, timm=timm.__version__, triton=triton.__version__,
        cuda=torch.version.cuda if cuda else None, cudnn=torch.backends.cudnn.version() if cuda else None,
        python=platform.python_version(), date=now.isoformat(timespec='seconds'),
        command=shlex.join([Path(sys.executable).name] + sys.argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ['TRITON_INTERPRET'] = '1'  # read when the kernels are first jitted, which happens below
        device = torch.device('cpu')
    elif not torch.cuda.is_available():
        print('bench_model.py needs a CUDA GPU (none found); use --smoke to exercise the script on CPU',
              file=sys.stderr)
        return 2
    else:
        device = torch.device('cuda')
        torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithms during warm-up
    import conv2former  # noqa: F401  (registers the models; after TRITON_INTERPRET is set)

    torch.manual_seed(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    env = environment(device, now)
    settings = {key: getattr(args, key) for key in ('pairs', 'modes', 'infer_batch', 'train_batch', 'img_size',
                                                     'warmup', 'iters', 'windows', 'smoke')}
    report = dict(environment=env, settings=dict(settings, dtype='bf16', channels_last=True), complete=False,
                  fused_variant=None, agreement={}, rows=[], failures=[])
    slug = re.sub(r'[^a-z0-9]+', '-', env['device'].split(' (')[0].lower()).strip('-')
    stem = args.out / f"bench_model-{slug}{'-smoke' if args.smoke else ''}-{now:%Y%m%d-%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        stem.with_suffix('.json').write_text(json.dumps(report, indent=1) + '\n')
        stem.with_suffix('.md').write_text(markdown(report))

    run(args, device, report, save)
    errors = [f"{row['model']} {row['variant']} {key}: {value}" for row in report['rows']
              for key, value in row.items() if isinstance(value, str) and value.startswith('error:')]
    report['failures'] += errors
    report['complete'] = True
    save()
    print(markdown(report))
    print(f'wrote {stem}.json and .md')
    return 1 if report['failures'] else 0


if __name__ == '__main__':
    sys.exit(main())
