"""Benchmark the Triton depthwise conv against F.conv2d (cuDNN or PyTorch's native depthwise kernel) on CUDA.

For the Conv2Former-T stage shapes and kernel sizes 3..31 it times forward and forward+backward of the Triton op
(NHWC and NCHW) and of F.conv2d (channels_last and NCHW) with CUDA events (warm-up, L2 flushed before every timed
run, median of the runs), checks the Triton results against an fp32 F.conv2d reference, and reports ms, GB/s,
multiply-adds/s and the ratio to the roofline time max(bytes / 3.0e12, MACs / 33.5e12) (H100 SXM: HBM3 bandwidth
and fp32 FMA rate). Writes JSON and markdown to --out.

    python -m benchmarks.bench_dwconv [--out DIR] [--batch 128] [--dtype bf16]
    python -m benchmarks.bench_dwconv --smoke   # one tiny shape on CPU under the Triton interpreter (tests the script)
"""
if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/bench_dwconv.py
    import as_script
    as_script.run(__file__)

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

STAGE_SHAPES = ((72, 56, 56), (144, 28, 28), (288, 14, 14), (576, 7, 7))  # Conv2Former-T (C, H, W) per stage
KERNEL_SIZES = (3, 5, 7, 11, 13, 21, 31)
SMOKE_SHAPE, SMOKE_BATCH, SMOKE_KERNEL = (4, 5, 5), 2, 3
PEAK_BYTES_PER_S = 3.0e12  # H100 SXM HBM3, bytes read + written
PEAK_MACS_PER_S = 33.5e12  # H100 SXM fp32 FMA (67 TFLOP/s): depthwise conv runs on CUDA cores, not tensor cores
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
IMPLS = (('triton', 'NHWC'), ('triton', 'NCHW'), ('F.conv2d', 'NHWC'), ('F.conv2d', 'NCHW'))
MODES = ('fwd', 'fwd+bwd')
L2_FLUSH_BYTES = 256 * 2 ** 20
RESULTS = Path(__file__).resolve().parent / 'results'
REL_ERR_LIMIT = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=RESULTS,
                        help='folder for the JSON and markdown results (default: benchmarks/results)')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    parser.add_argument('--kernels', type=lambda s: tuple(int(k) for k in s.split(',')), default=KERNEL_SIZES,
                        help='comma-separated kernel sizes (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=10, help='untimed runs before timing')
    parser.add_argument('--iters', type=int, default=50, help='timed runs; the median is reported')
    parser.add_argument('--smoke', action='store_true',
                        help='one tiny shape on CPU under TRITON_INTERPRET=1, one warm-up and one timed run: checks '
                             'the code path, not speed')
    return parser.parse_args(argv)


def traffic(batch: int, channels: int, height: int, width: int, k: int, elt: int, mode: str) -> tuple[int, int]:
    """(bytes, multiply-adds) that ``mode`` must at least move and do, with bias.

    fwd reads x, writes y, reads weight and bias; the backward reads dy and weight and writes dx (input grad), reads
    x and dy and writes dweight and dbias (weight grad). MACs: B*C*H*W*k*k per pass, three passes for fwd+bwd.
    """
    acts, params = batch * channels * height * width, channels * k * k
    fwd_bytes, fwd_macs = (2 * acts + params + channels) * elt, acts * k * k
    if mode == 'fwd':
        return fwd_bytes, fwd_macs
    bwd_bytes = (2 * acts + params) * elt + (2 * acts + params + channels) * elt
    return fwd_bytes + bwd_bytes, 3 * fwd_macs


def roofline_ms(n_bytes: int, macs: int) -> float:
    return 1e3 * max(n_bytes / PEAK_BYTES_PER_S, macs / PEAK_MACS_PER_S)


def time_cuda(fn: Callable[[], object], warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Median ms of ``fn`` over ``iters`` runs, timed with CUDA events, L2 flushed before each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_host(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median ms of ``fn`` by the host clock (smoke mode on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against(op: Callable, reference: Callable, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
                  ref_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Relative errors of ``op(*inputs)`` and its input gradients against ``reference`` run on ``ref_dtype`` copies of
    the same inputs, for the same random output gradient; ``names`` name the output and then each input's gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = op(*leaves)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    refs = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
    ref = reference(*refs)
    ref.backward(grad_out.to(ref_dtype))
    return {name: rel_err(a, b) for name, a, b in zip(names, [out] + [t.grad for t in leaves],
                                                      [ref] + [t.grad for t in refs])}


def conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The depthwise conv as F.conv2d runs it (cuDNN or PyTorch's native kernel)."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def check(op: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
          ref_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Relative errors of ``op``'s output and gradients against F.conv2d on ``ref_dtype`` copies of the same inputs."""
    return check_against(op, conv_torch, (x, weight, bias), ('out', 'grad_x', 'grad_weight', 'grad_bias'), ref_dtype)


def conv_inputs(batch: int, channels: int, height: int, width: int, k: int, dtype: torch.dtype,
                device: torch.device, layout: str = 'NCHW') -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (x in ``layout``: 'NCHW' or channels_last, weight / k, bias) of one depthwise conv case."""
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
    x = x.contiguous() if layout == 'NCHW' else x.to(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, k, k, device=device, dtype=dtype) / k
    return x, weight, torch.randn(channels, device=device, dtype=dtype)


def timed_fns(op: Callable, inputs: tuple[torch.Tensor, ...],
              grad_out: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The two timed callables of ``op(*inputs)``: forward without autograd, and forward+backward into fresh
    gradients of every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            return op(*inputs)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        op(*leaves).backward(grad_out)

    return {'fwd': forward, 'fwd+bwd': forward_backward}


def run(args: argparse.Namespace) -> dict:
    """Check and time every (shape, k, impl, mode); return the rows and any failed correctness checks."""
    from conv2former.ops import depthwise_conv2d

    dtype = DTYPES[args.dtype]
    elt = torch.empty((), dtype=dtype).element_size()
    if args.smoke:
        device, shapes, kernels, batch = torch.device('cpu'), (SMOKE_SHAPE,), (SMOKE_KERNEL,), SMOKE_BATCH
        timer = functools.partial(time_host, warmup=args.warmup, iters=args.iters)
    else:
        device, shapes, kernels, batch = torch.device('cuda'), STAGE_SHAPES, args.kernels, args.batch
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm during warm-up
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        timer = functools.partial(time_cuda, warmup=args.warmup, iters=args.iters, flush=flush)

    ops = {'triton': depthwise_conv2d, 'F.conv2d': conv_torch}
    rows, failures = [], []
    for channels, height, width in shapes:
        for k in kernels:
            x_nchw, weight, bias = conv_inputs(batch, channels, height, width, k, dtype, device)
            inputs = {'NCHW': x_nchw, 'NHWC': x_nchw.to(memory_format=torch.channels_last)}
            max_err = {}
            for layout, x in inputs.items():
                errs = check(depthwise_conv2d, x, weight, bias)
                max_err[layout] = max(errs.values())
                if max_err[layout] > REL_ERR_LIMIT[dtype]:
                    failures.append(dict(shape=(channels, height, width), k=k, layout=layout, rel_err=errs))
            for impl, layout in IMPLS:
                fns = timed_fns(ops[impl], (inputs[layout], weight, bias), torch.randn_like(inputs[layout]))
                for mode in MODES:
                    ms = timer(fns[mode])
                    n_bytes, macs = traffic(batch, channels, height, width, k, elt, mode)
                    floor = roofline_ms(n_bytes, macs)
                    rows.append(dict(C=channels, H=height, W=width, k=k, impl=impl, layout=layout, mode=mode, ms=ms,
                                     gbps=n_bytes / ms / 1e6, tmacs=macs / ms / 1e9, roofline_ms=floor,
                                     ratio=ms / floor, max_rel_err=max_err[layout] if impl == 'triton' else None))
    return dict(batch=batch, rel_err_limit=REL_ERR_LIMIT[dtype], failures=failures, rows=rows)


def environment(args: argparse.Namespace) -> dict:
    import triton
    cuda = not args.smoke
    return dict(
        device=torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter; smoke run, timings meaningless)',
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda if cuda else None,
        cudnn=torch.backends.cudnn.version() if cuda else None, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        command=shlex.join([Path(sys.executable).name] + sys.argv), dtype=args.dtype, warmup=args.warmup,
        iters=args.iters, smoke=args.smoke, peak_bytes_per_s=PEAK_BYTES_PER_S, peak_macs_per_s=PEAK_MACS_PER_S)


def markdown(report: dict) -> str:
    env = report['environment']
    lines = [f"# Depthwise conv: Triton vs F.conv2d ({env['device']}, {env['dtype']}, batch {report['batch']})", '',
             f"torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, {env['date']}; "
             f"`{env['command']}`", '',
             'Roofline = max(bytes / 3.0e12 B/s, MACs / 33.5e12 MAC/s); ratio = ms / roofline (1.0 is the floor). '
             'vs F.conv2d = F.conv2d ms / this ms in the same layout and mode (> 1: faster).', '',
             '| C×H×W | k | mode | impl | layout | ms | GB/s | TMAC/s | roofline ms | ratio | vs F.conv2d '
             '| rel err |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    baseline = {(r['C'], r['k'], r['mode'], r['layout']): r['ms'] for r in report['rows'] if r['impl'] == 'F.conv2d'}
    for r in sorted(report['rows'], key=lambda r: (r['C'], r['k'], r['mode'], r['impl'] != 'triton', r['layout'])):
        speedup = baseline[(r['C'], r['k'], r['mode'], r['layout'])] / r['ms']
        err = '' if r['max_rel_err'] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['C']}×{r['H']}×{r['W']} | {r['k']} | {r['mode']} | {r['impl']} | {r['layout']} | "
                     f"{r['ms']:.3f} | {r['gbps']:.0f} | {r['tmacs']:.2f} | {r['roofline_ms']:.3f} | "
                     f"{r['ratio']:.1f} | {speedup:.2f} | {err} |")
    if report['failures']:
        lines += ['', f"**{len(report['failures'])} correctness check(s) over rel err {report['rel_err_limit']}:** "
                  + json.dumps(report['failures'])]
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ['TRITON_INTERPRET'] = '1'  # read when the kernels are first jitted, which happens below
        args.warmup = args.iters = 1
    elif not torch.cuda.is_available():
        print('bench_dwconv.py needs a CUDA GPU (none found); use --smoke to exercise the script on CPU',
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = dict(environment=environment(args), **run(args))
    table = markdown(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_dwconv_{args.dtype}_{'smoke_' if args.smoke else ''}" \
           f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    (args.out / f'{stem}.json').write_text(json.dumps(report, indent=1) + '\n')
    (args.out / f'{stem}.md').write_text(table)
    print(f'wrote {args.out / stem}.json and .md')
    return 1 if report['failures'] else 0


if __name__ == '__main__':
    sys.exit(main())
