"""One budgeted GPU run for the Triton kernels (issue 14): correctness first, then kernel timings with tile autotuning,
model throughput and memory, and a proposed automatic backend rule, all in summary.json and summary.md.

Device command (one line, repository root; writes $OUT/gpu_check/, at most 8 minutes on one H100/H200):

    pip install -q --no-deps -e . && bash benchmarks/gpu_check.sh

Sections, each with a time budget (unused time passes on; whatever does not fit is listed as skipped):
1. correctness: the Triton depthwise conv against F.conv2d and the fused modulation against its unfused PyTorch
   composition (forward, input, weight and bias gradients; float64 reference) for every Conv2Former-N/T stage shape
   and two odd shapes, k = 7, 11, 21, fp32 and bf16, NCHW and channels_last; then conv2former_n/t logits and gradients
   with kernels='triton' and 'fused' against kernels='torch' (fp32 and bf16 autocast).
2. kernels: bf16, batch 128, CUDA events, L2 flushed, median: cuDNN vs the Triton op (fwd, fwd+bwd) per case, with GB/s
   and the roofline ratio; the fused modulation vs the unfused path at each model's own k; then a few tile
   configurations per case for the forward, input-gradient and weight-gradient kernels (each checked before timing).
3. models: bf16 autocast + channels_last, inference batch 256 and training batch 128 (AdamW) img/s and peak GiB,
   Conv2Former-T/N per kernel path vs convnext_tiny/nano, eager; 4. then torch.compile inference in priority order.
5. rule: per (k, layout, shape) Triton or cuDNN by "never slower than cuDNN" (fwd and fwd+bwd), condensed per k and
   layout, with the winning tiles.
Anything that fails a correctness check is not timed. Exit status 1 when a check failed, 0 otherwise.

    python benchmarks/gpu_check.py [--out DIR] [--budget 450] [--sections correctness,kernels,models,compile]
    python benchmarks/gpu_check.py --smoke --out DIR   # toy sizes on CPU under TRITON_INTERPRET=1 (tests the script)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # conv2former from this checkout; the sibling benchmark modules

from bench_dwconv import L2_FLUSH_BYTES, check, check_against, conv_torch, rel_err, time_cuda, time_host  # noqa: E402
from bench_dwconv import timed_fns, traffic  # noqa: E402
from bench_model import measure_compile, measure_infer, measure_train  # noqa: E402
from common import (SMOKE_MODELS, SMOKE_OURS, begin, bf16, build, csv, environment, footer,  # noqa: E402
                    free_memory, images, log, peak_memory_gib, randomize_for_check, reset_peak_memory, write_report)

SECTIONS = ('correctness', 'kernels', 'models', 'compile')
SHARES = dict(correctness=95, kernels=135, models=115, compile=105)  # seconds of the default --budget 450
STAGES = {'N': ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)),
          'T': ((72, 56, 56), (144, 28, 28), (288, 14, 14), (576, 7, 7))}
ODD_SHAPES = ((72, 57, 55), (33, 13, 9))  # odd H and W; C not a multiple of the channel block, H, W < 21
KERNEL_SIZES = (11, 7, 21)  # in priority order
OWN_K = {'N': 7, 'T': 11}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
LAYOUTS = ('channels_last', 'NCHW')
REL_ERR_LIMIT = {'fp32': 1e-5, 'bf16': 1e-2}  # norm-wise, against a float64 reference
MODEL_NOISE_FACTOR = 4  # a kernel path may differ from kernels='torch' by this many times torch's own rounding error
MODEL_FLOOR = {'fp32': 1e-5, 'bf16': 1e-3}
PEAKS = {'H200': (4.8e12, 33.5e12), 'H100': (3.35e12, 33.5e12)}  # HBM B/s, fp32 FMA/s (depthwise: CUDA cores)
DEFAULT_PEAKS = PEAKS['H100']
# Tile candidates (BLOCK_C, BLOCK_H, BLOCK_W, num_warps) per layout besides the heuristic's; clamped to the shape.
TILES = {'channels_last': ((64, 4, 4, 4), (32, 8, 8, 8), (16, 4, 16, 4)),
         'NCHW': ((2, 16, 32, 4), (4, 8, 64, 8), (8, 4, 32, 4))}
MODEL_PAIRS = (('T', 'conv2former_t', 'convnext_tiny'), ('N', 'conv2former_n', 'convnext_nano'))
PATHS = ('triton', 'fused', 'torch')  # eager order; 'peer' = the ConvNeXt
COMPILE_ORDER = ('fused', 'peer', 'triton', 'torch')
COMPILE_MIN_S = 40  # do not start a compile with less time than this left
SMOKE = dict(stages={'N': ((8, 6, 6),), 'T': ((8, 6, 6),)}, odd=((5, 7, 3),), kernels=(3,), own_k={'N': 3, 'T': 3},
             pairs=('T',), tune_cases=1, tiles=1, compiled=2, check_batch=1, check_size=32, batch=2, infer_batch=2, train_batch=2,
             img_size=32, warmup=1, iters=1, windows=1, budget=600.0)


class Overrun(Exception):
    """A budgeted step ran past its time."""


class Budget:
    """Cumulative deadlines: section i must end by start + the sum of the first i shares (scaled to ``total``), so
    a section that finishes early leaves its time to the next. ``run`` interrupts a step at the deadline (SIGALRM)."""

    def __init__(self, total: float, shares: dict[str, float]):
        self.start, self.total = time.monotonic(), total
        scale, elapsed = total / sum(shares.values()), 0.0
        self.deadlines = {}
        for name, share in shares.items():
            elapsed += share * scale
            self.deadlines[name] = self.start + elapsed
        self.deadline = self.start + total
        self.used: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        begin, self.deadline = time.monotonic(), self.deadlines[name]
        log(f'section {name}: {self.left():.0f} s')
        try:
            yield
        finally:
            self.used[name] = round(time.monotonic() - begin, 1)

    def run(self, step: Callable[[], object], cap: float | None = None):
        """``step()``, raising Overrun if it is still running at the deadline (or after ``cap`` seconds)."""
        seconds = min(self.left(), cap if cap is not None else math.inf)
        if seconds <= 0:
            raise Overrun('no time left')

        def alarm(signum, frame):
            raise Overrun(f'stopped after {seconds:.0f} s')

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return step()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def overrun_in(exc: BaseException) -> Overrun | None:
    """The Overrun that ``exc`` is or wraps (Triton's interpreter and dynamo re-raise errors inside their own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Overrun):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=HERE / 'results' / 'gpu_check',
                        help='folder for summary.json and summary.md (default: benchmarks/results/gpu_check)')
    parser.add_argument('--budget', type=float, default=450.0,
                        help='seconds for all sections together (default 450: with start-up, under 8 minutes)')
    parser.add_argument('--sections', type=csv(SECTIONS), default=SECTIONS, help='default: all')
    parser.add_argument('--batch', type=int, default=128, help='kernel timing batch')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10, help='timed kernel runs (median) / steps per model window')
    parser.add_argument('--smoke', action='store_true',
                        help='toy shapes, k = 3, shrunk Conv2Former-T vs ConvNeXt-T, on CPU under TRITON_INTERPRET=1: tests the code '
                             'paths, not speed or GPU correctness')
    args = parser.parse_args(argv)
    settings = dict(stages=STAGES, odd=ODD_SHAPES, kernels=KERNEL_SIZES, own_k=OWN_K, pairs=('T', 'N'),
                    tune_cases=None, tiles=None, compiled=None, check_batch=2, check_size=224, infer_batch=256, train_batch=128, img_size=224,
                    windows=3)
    if args.smoke:
        settings.update(SMOKE)
        args.iters, args.warmup = 1, 0
    for key, value in settings.items():
        setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------------- kernels

def layout_of(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if layout == 'channels_last' else x.contiguous()


def kernel_cases(args: argparse.Namespace) -> list[dict]:
    """(shape, k, layout) in priority order: each model's own k on its stages first, then the other k's, odd shapes
    last; a shape shared by N and T is listed once."""
    cases, seen = [], set()
    stage_shapes = [(model, shape) for model in ('T', 'N') for shape in args.stages[model]]
    passes = [[(m, s, args.own_k[m]) for m, s in stage_shapes]]
    passes.append([(m, s, k) for k in args.kernels for m, s in stage_shapes if k != args.own_k[m]])
    passes.append([('odd', s, k) for k in args.kernels for s in args.odd])
    for model, shape, k in (item for group in passes for item in group):
        for layout in LAYOUTS:
            if (shape, k, layout) not in seen:
                seen.add((shape, k, layout))
                cases.append(dict(model=model, C=shape[0], H=shape[1], W=shape[2], k=k, layout=layout))
    return cases


def case_key(case: dict, dtype: str = 'bf16') -> str:
    return f"k{case['k']} {case['C']}x{case['H']}x{case['W']} {case['layout']} {dtype}"


def conv_inputs(case: dict, batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    x = layout_of(torch.randn(batch, case['C'], case['H'], case['W'], device=device, dtype=dtype), case['layout'])
    weight = torch.randn(case['C'], 1, case['k'], case['k'], device=device, dtype=dtype) / case['k']
    bias = torch.randn(case['C'], device=device, dtype=dtype)
    return x, weight, bias


def modulation_torch(a, v, weight, bias):
    """The unfused path of the modulation: GELU, the depthwise conv (F.conv2d), the product with v."""
    return conv_torch(F.gelu(a), weight, bias) * v


def check_case(case: dict, dtype: str, batch: int, device: torch.device) -> dict:
    """Relative errors of the Triton conv and the fused modulation (output and every gradient) vs float64."""
    from conv2former.ops import conv_modulation, depthwise_conv2d

    x, weight, bias = conv_inputs(case, batch, DTYPES[dtype], device)
    conv = check(depthwise_conv2d, x, weight, bias, ref_dtype=torch.float64)
    v = torch.randn_like(x)
    fused = check_against(conv_modulation, modulation_torch, (x, v, weight, bias),
                          ('out', 'grad_a', 'grad_v', 'grad_weight', 'grad_bias'), ref_dtype=torch.float64)
    limit = REL_ERR_LIMIT[dtype]
    return dict(conv=conv, fused=fused, conv_ok=max(conv.values()) <= limit, fused_ok=max(fused.values()) <= limit)


def check_tile(case: dict, tile, device: torch.device) -> float:
    """Largest relative error (bf16, batch 2, vs float64) of the forward, input-gradient and weight-gradient launchers
    with ``tile``."""
    from conv2former.ops import dwconv

    x, weight, bias = conv_inputs(case, 2, torch.bfloat16, device)
    dy = torch.randn_like(x)
    ref = [t.double() for t in (x, weight, bias, dy)]
    grad_w, grad_b = dwconv.launch_weight_grad(dy, x, case['k'], tile=tile)
    pairs = [(dwconv.launch_forward(x, weight, bias, flip=False, tile=tile), conv_torch(*ref[:3])),
             (dwconv.launch_forward(dy, weight, None, flip=True, tile=tile),
              conv_torch(ref[3], ref[1].flip(-1, -2), None)),
             (grad_w, torch.nn.grad.conv2d_weight(ref[0], ref[1].shape, ref[3], padding=case['k'] // 2,
                                                  groups=case['C'])),
             (grad_b, ref[3].sum((0, 2, 3)))]
    return max(rel_err(out, expected) for out, expected in pairs)


def clamp_tile(tile: tuple, case: dict):
    """A candidate tile shrunk to the next powers of two of the case's C, H, W (as the heuristic does)."""
    from conv2former.ops.launch import TileConfig, next_pow2

    block_c, block_h, block_w, warps = tile
    return TileConfig(min(block_c, next_pow2(case['C'])), min(block_h, next_pow2(case['H'])),
                      min(block_w, next_pow2(case['W'])), warps)


def default_tile(case: dict):
    from conv2former.ops.launch import TileConfig, tile_config

    return TileConfig(*tile_config(case['C'], case['H'], case['W'], case['layout'] == 'channels_last'))


def roofline(case: dict, batch: int, mode: str, ms: float, peaks: tuple[float, float]) -> dict:
    """GB/s and the ratio of ``ms`` to max(bytes / peak B/s, MACs / peak MAC/s) for a bf16 ``mode`` pass."""
    n_bytes, macs = traffic(batch, case['C'], case['H'], case['W'], case['k'], 2, mode)
    floor_ms = 1e3 * max(n_bytes / peaks[0], macs / peaks[1])
    return dict(gbps=round(n_bytes / ms / 1e6, 1), roofline_ms=floor_ms, roofline_ratio=round(ms / floor_ms, 2))


# ------------------------------------------------------------------------------------------------------- models

def model_outputs(name: str, kwargs: dict, state: dict, x: torch.Tensor, target: torch.Tensor,
                           dtype: str, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients (loss = sum(logits * target)) of ``name`` with ``state`` in ``dtype``: fp64,
    fp32, or bf16 autocast over fp32 weights."""
    model = build(name, kwargs, device).eval()
    model.load_state_dict(state)
    if dtype == 'fp64':
        model.double()
    context = bf16(device) if dtype == 'bf16' else contextlib.nullcontext()
    with context:
        logits = model(x.double() if dtype == 'fp64' else x).double()
    (logits * target).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def compare(logits, grads, ref_logits, ref_grads) -> dict[str, float]:
    """Relative errors: logits, all gradients as one vector, and the worst single parameter's gradient."""
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    return dict(logits=rel_err(logits, ref_logits), grads=rel_err(flat, ref_flat),
                worst_param=max(rel_err(g, ref_grads[n]) for n, g in grads.items()))


def check_model(name: str, base: dict, paths: tuple[str, ...], batch: int, size: int,
                device: torch.device) -> dict:
    """Each kernel path vs kernels='torch' on the same random (variance-preserving) weights and images, in fp32 and in
    bf16 autocast. The reference is kernels='torch' one precision up (fp64, fp32); a path passes when its error is at
    most MODEL_NOISE_FACTOR x torch's own error at that precision, plus a small floor."""
    reference = build(name, base | dict(kernels='torch'), device).eval()
    randomize_for_check(reference)
    state, num_classes = reference.state_dict(), reference.num_classes
    del reference
    x = images(batch, size, device)
    target = torch.randn(batch, num_classes, device=device, dtype=torch.float64)
    torch_path = base | dict(kernels='torch')
    results = {}
    for dtype, ref_dtype in (('fp32', 'fp64'), ('bf16', 'fp32')):
        ref = model_outputs(name, torch_path, state, x, target, ref_dtype, device)
        noise = compare(*model_outputs(name, torch_path, state, x, target, dtype, device), *ref)
        for path in paths:
            errors = compare(*model_outputs(name, base | dict(kernels=path), state, x, target, dtype, device), *ref)
            tolerance = {key: MODEL_NOISE_FACTOR * noise[key] + MODEL_FLOOR[dtype] for key in errors}
            results[f'{path} {dtype}'] = dict(errors=errors, torch_noise=noise, tolerance=tolerance,
                                              ok=all(errors[key] <= tolerance[key] for key in errors))
        free_memory(device)
    return results


# ------------------------------------------------------------------------------------------------------- the run

class GpuCheck:
    """The sections, writing into one report (saved after each step that adds to it)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, report: dict, save: Callable[[], None]):
        self.args, self.device, self.report, self.save = args, device, report, save
        self.budget = Budget(args.budget, {name: SHARES[name] for name in SECTIONS})
        name = report['environment']['device']
        self.peaks = next((peaks for key, peaks in PEAKS.items() if key in name), DEFAULT_PEAKS)
        report['settings']['peaks'] = dict(bytes_per_s=self.peaks[0], macs_per_s=self.peaks[1])
        if device.type == 'cuda':
            flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
            self.timer = lambda fn: time_cuda(fn, args.warmup, args.iters, flush)
        else:
            self.timer = lambda fn: time_host(fn, args.warmup, args.iters)

    def skip(self, section: str, item: str, why: str) -> None:
        self.report['skipped'].setdefault(section, []).append(f'{item}: {why}')

    def fail(self, message: str) -> None:
        self.report['failures'].append(message)
        print(f'ERROR: {message}', file=sys.stderr, flush=True)

    def attempt(self, section: str, item: str, step: Callable[[], object], cap: float | None = None,
                cleanup: bool = False):
        """``step()`` within the budget; None (and the item listed as skipped) on overrun, OOM or error. The device
        memory is freed afterwards (gc + CUDA cache) when ``cleanup`` or after an error; small steps free theirs on
        return (a gc pass costs ~0.3 s)."""
        try:
            result = self.budget.run(step, cap)
        except torch.OutOfMemoryError:
            self.skip(section, item, 'out of memory')
        except Exception as exc:  # noqa: BLE001 - recorded as a failure; the run goes on
            overrun = overrun_in(exc)
            if overrun is not None:
                self.skip(section, item, f'time budget ({overrun})')
            else:
                self.fail(f"{section} {item}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        else:
            if cleanup:
                free_memory(self.device)
            return result
        free_memory(self.device)
        return None

    # 1. correctness
    def correctness(self) -> None:
        checks = self.report['correctness']
        prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 references
        try:
            cases = [(case, dtype) for case in kernel_cases(self.args) for dtype in ('bf16', 'fp32')]
            for case, dtype in cases:
                key = case_key(case, dtype)
                result = self.attempt('correctness', key,
                                      lambda: check_case(case, dtype, self.args.check_batch, self.device))
                if result is None:
                    continue
                checks['ops'][key] = result
                for op in ('conv', 'fused'):
                    if not result[f'{op}_ok']:
                        worst = max(result[op].items(), key=lambda item: item[1])
                        self.fail(f'{op} {key}: {worst[0]} rel err {worst[1]:.2e} > {REL_ERR_LIMIT[dtype]:g}')
            self.save()
            log(f"ops: {sum(r['conv_ok'] and r['fused_ok'] for r in checks['ops'].values())}/{len(cases)} cases pass")
            for model, name, _ in MODEL_PAIRS:
                if model not in self.args.pairs:
                    continue
                base = SMOKE_OURS if self.args.smoke else {}
                result = self.attempt('correctness', name, lambda: check_model(
                    name, base, ('triton', 'fused'), self.args.check_batch, self.args.check_size, self.device),
                    cleanup=True)
                if result is None:
                    continue
                checks['models'][name] = result
                for variant, r in result.items():
                    log(f'{name} {variant}: ' + ', '.join(f'{k} {v:.2e} (tol {r["tolerance"][k]:.2e})'
                                                          for k, v in r['errors'].items()))
                    if not r['ok']:
                        self.fail(f'{name} kernels={variant}: differs from kernels=torch beyond tolerance')
                self.save()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

    def verified(self, case: dict, op: str = 'conv') -> bool:
        """True when the case's bf16 check ran and passed (only such cases are timed)."""
        result = self.report['correctness']['ops'].get(case_key(case))
        return bool(result and result[f'{op}_ok'])

    # 2. kernels
    def kernels(self) -> None:
        from conv2former.ops import conv_modulation, depthwise_conv2d

        rows, batch = self.report['kernels'], self.args.batch
        cases = kernel_cases(self.args)
        for case in cases:  # pass A: cuDNN vs the Triton op with its heuristic tile
            key = case_key(case)
            if not self.verified(case):
                self.skip('kernels', key, 'correctness not passed (or not run)')
                continue
            row = self.attempt('kernels', key, lambda: self.time_conv(case, batch, depthwise_conv2d))
            if row is not None:
                rows['conv'][key] = row
                self.save()
        for case in cases:  # pass B: fused modulation vs the unfused path, each model's own k
            key = case_key(case)
            if case['model'] not in OWN_K or case['k'] != self.args.own_k[case['model']]:
                continue
            if not self.verified(case, 'fused'):
                self.skip('kernels', f'fused {key}', 'correctness not passed (or not run)')
                continue
            row = self.attempt('kernels', f'fused {key}', lambda: self.time_fused(case, batch, conv_modulation))
            if row is not None:
                rows['fused'][key] = row
                self.save()
        for case in cases[:self.args.tune_cases]:  # pass C: tile autotuning of the three kernels
            key = case_key(case)
            if key not in rows['conv']:
                continue
            row = self.attempt('kernels', f'tiles {key}', lambda: self.tune_tiles(case, batch))
            if row is not None:
                rows['conv'][key]['tiles'] = row
                self.save()

    def time_conv(self, case: dict, batch: int, depthwise_conv2d) -> dict:
        x, weight, bias = conv_inputs(case, batch, torch.bfloat16, self.device)
        dy = torch.randn_like(x)
        row = dict(case)
        for impl, op in (('cudnn', conv_torch), ('triton', depthwise_conv2d)):
            fns = timed_fns(op, x, weight, bias, dy)
            for mode in ('fwd', 'fwd+bwd'):
                ms = self.timer(fns[mode])
                row[f'{impl} {mode} ms'] = ms
                row[f'{impl} {mode}'] = roofline(case, batch, mode, ms, self.peaks)
        log(f"{case_key(case)}: fwd cuDNN {row['cudnn fwd ms']:.3f} / Triton {row['triton fwd ms']:.3f} ms, "
            f"fwd+bwd {row['cudnn fwd+bwd ms']:.3f} / {row['triton fwd+bwd ms']:.3f} ms")
        return row

    def time_fused(self, case: dict, batch: int, conv_modulation) -> dict:
        a, weight, bias = conv_inputs(case, batch, torch.bfloat16, self.device)
        v, dy = torch.randn_like(a), torch.randn_like(a)
        row = dict(case)
        for impl, op in (('unfused', modulation_torch), ('fused', conv_modulation)):
            leaves = [t.detach().requires_grad_() for t in (a, v, weight, bias)]

            def forward(op=op):
                with torch.no_grad():
                    return op(a, v, weight, bias)

            def forward_backward(op=op, leaves=leaves):
                for leaf in leaves:
                    leaf.grad = None
                op(*leaves).backward(dy)

            row[f'{impl} fwd ms'] = self.timer(forward)
            row[f'{impl} fwd+bwd ms'] = self.timer(forward_backward)
        log(f"fused {case_key(case)}: fwd unfused {row['unfused fwd ms']:.3f} / fused {row['fused fwd ms']:.3f} ms, "
            f"fwd+bwd {row['unfused fwd+bwd ms']:.3f} / {row['fused fwd+bwd ms']:.3f} ms")
        return row

    def tune_tiles(self, case: dict, batch: int) -> dict:
        """Per kernel (fwd, input grad, weight grad) the ms of each candidate tile that passes its check; the best."""
        from conv2former.ops import dwconv

        x, weight, bias = conv_inputs(case, batch, torch.bfloat16, self.device)
        dy = torch.randn_like(x)
        default = default_tile(case)
        candidates = [default] + [clamp_tile(t, case) for t in TILES[case['layout']][:self.args.tiles]]
        candidates = list(dict.fromkeys(candidates))  # clamping can make two the same
        kernels = {'fwd': lambda t: dwconv.launch_forward(x, weight, bias, flip=False, tile=t),
                   'dgrad': lambda t: dwconv.launch_forward(dy, weight, None, flip=True, tile=t),
                   'wgrad': lambda t: dwconv.launch_weight_grad(dy, x, case['k'], tile=t)}
        timings = {name: {} for name in kernels}
        for tile in candidates:
            label = 'x'.join(map(str, tile[:3])) + f'/w{tile.num_warps}'
            if tile != default:
                err = check_tile(case, tile, self.device)
                if err > REL_ERR_LIMIT['bf16']:
                    self.fail(f'tile {label} {case_key(case)}: rel err {err:.2e}')
                    continue
            for name, launch in kernels.items():
                timings[name][label] = self.timer(lambda: launch(tile))
        best = {name: min(ms, key=ms.get) for name, ms in timings.items() if ms}
        default_label = 'x'.join(map(str, default[:3])) + f'/w{default.num_warps}'
        return dict(ms=timings, best=best, default=default_label,
                    tuned_fwd_ms=timings['fwd'][best['fwd']],
                    tuned_fwd_bwd_ms=sum(timings[name][best[name]] for name in kernels))

    # 3./4. models
    def models(self, compiled: bool) -> None:
        section = 'compile' if compiled else 'models'
        args = self.args
        settings = argparse.Namespace(infer_batch=args.infer_batch, train_batch=args.train_batch,
                                      img_size=args.img_size, warmup=args.warmup if args.smoke else 2,
                                      iters=args.iters if args.smoke else 5, windows=args.windows, smoke=args.smoke)
        modes = ('compile',) if compiled else ('infer', 'train')
        measures = {'infer': measure_infer, 'train': measure_train, 'compile': measure_compile}
        for model_key, name, peer in MODEL_PAIRS:
            if model_key not in args.pairs:
                continue
            variants = {path: (f'{name} {path}', name, (SMOKE_OURS if args.smoke else {}) | dict(kernels=path))
                        for path in PATHS} | dict(peer=(peer, peer, SMOKE_MODELS if args.smoke else {}))
            order = COMPILE_ORDER[:args.compiled] if compiled else PATHS + ('peer',)
            for path in order:
                label, model_name, kwargs = variants[path]
                checked = self.report['correctness']['models'].get(name, {})
                if path in ('triton', 'fused') and not all(checked.get(f'{path} {d}', {}).get('ok') for d in DTYPES):
                    self.skip(section, label, 'model check not passed (or not run)')
                    continue
                row = self.report['models'].setdefault(label, dict(model=model_name, path=path, pair=model_key))
                for mode in modes:
                    if compiled and self.budget.left() < (0 if args.smoke else COMPILE_MIN_S):
                        self.skip(section, f'{label} {mode}', f'under {COMPILE_MIN_S} s left')
                        continue

                    def step(mode=mode):
                        model = build(model_name, kwargs, self.device)
                        reset_peak_memory(self.device)
                        result = measures[mode](model, settings, self.device)
                        result[f'{mode}_peak_gib'] = peak_memory_gib(self.device)
                        return result

                    result = self.attempt(section, f'{label} {mode}', step, cap=None if compiled else 45,
                                          cleanup=True)
                    if result is not None:
                        row.update(result)
                        log(f'{label} {mode}: ' + ', '.join(f'{k} {v:.2f}' for k, v in result.items()))
                        self.save()
                if compiled:
                    torch._dynamo.reset()

    def run(self) -> None:
        steps = dict(correctness=self.correctness, kernels=self.kernels, models=lambda: self.models(False),
                     compile=lambda: self.models(True))
        for name in SECTIONS:
            if name not in self.args.sections:
                self.skip(name, 'all', 'not selected (--sections)')
                continue
            with self.budget.section(name):
                steps[name]()
            self.report['sections'] = {k: dict(used_s=v) for k, v in self.budget.used.items()}
            self.save()
        self.report['auto_rule'] = auto_rule(self.report['kernels']['conv'])
        add_model_ratios(self.report['models'])


# ------------------------------------------------------------------------------------------------------- results

def auto_rule(rows: dict) -> dict:
    """"Never slower than cuDNN": Triton for a (k, layout, shape) when its best forward and best forward+backward are
    both at most cuDNN's; condensed per (k, layout): 'triton' (all measured shapes), 'torch' (none) or the list."""
    per_case, by_group = [], {}
    for key, row in rows.items():
        tiles = row.get('tiles') or {}
        fwd = min(row['triton fwd ms'], tiles.get('tuned_fwd_ms', math.inf))
        fwd_bwd = min(row['triton fwd+bwd ms'], tiles.get('tuned_fwd_bwd_ms', math.inf))
        speedup = dict(fwd=row['cudnn fwd ms'] / fwd, fwd_bwd=row['cudnn fwd+bwd ms'] / fwd_bwd)
        choice = 'triton' if min(speedup.values()) >= 1 else 'torch'
        per_case.append(dict(case=key, k=row['k'], layout=row['layout'], shape=[row['C'], row['H'], row['W']],
                             speedup={m: round(s, 2) for m, s in speedup.items()}, choice=choice,
                             tiles=tiles.get('best')))
        by_group.setdefault(f"k={row['k']} {row['layout']}", []).append((row['C'], row['H'], row['W'], choice))
    summary = {}
    for group, shapes in sorted(by_group.items()):
        winners = [list(s[:3]) for s in shapes if s[3] == 'triton']
        summary[group] = ('triton' if len(winners) == len(shapes) else 'torch' if not winners
                          else dict(triton_for=winners, measured=len(shapes)))
    return dict(criterion='Triton where its best fwd and fwd+bwd (heuristic tile or tuned, bf16, batch 128) are '
                          'both <= cuDNN; otherwise cuDNN. Shapes not measured stay on cuDNN.',
                by_k_layout=summary, per_case=per_case)


def add_model_ratios(rows: dict) -> None:
    """img/s relative to the pair's ConvNeXt (> 1: faster) for every measured throughput."""
    peers = {row['pair']: row for row in rows.values() if row['path'] == 'peer'}
    for row in rows.values():
        peer = peers.get(row['pair'], {})
        row['vs_peer'] = {key: round(row[key] / peer[key], 3) for key in ('infer_img_s', 'train_img_s',
                                                                          'compile_img_s')
                          if isinstance(row.get(key), float) and isinstance(peer.get(key), float)}


def cell(value, digits: int = 3) -> str:
    return '—' if value is None else f'{value:.{digits}f}'


def markdown(report: dict) -> str:
    env = report['environment']
    lines = [f"# GPU check: Triton kernels vs cuDNN ({env['device']})", '',
             f"torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, CUDA {env['cuda']}, "
             f"{env['date']}; `{env['command']}`", '']
    ops = report['correctness']['ops']
    passed = sum(r['conv_ok'] and r['fused_ok'] for r in ops.values())
    lines += ['## Correctness', '', f'{passed}/{len(ops)} op cases pass (conv and fused modulation; forward, input, '
              f"weight and bias grads vs float64; limits {REL_ERR_LIMIT}).", '']
    for name, results in report['correctness']['models'].items():
        for variant, r in results.items():
            lines.append(f"- {name} kernels={variant}: " + ', '.join(
                f"{k} {v:.2e} (tol {r['tolerance'][k]:.2e})" for k, v in r['errors'].items())
                + ('' if r['ok'] else ' **FAIL**'))
    lines += ['', '## Depthwise conv, bf16, batch ' + str(report['settings']['batch']), '',
              'ms = median (CUDA events, L2 flushed). Triton = heuristic tile (op); tuned = best tile per kernel, '
              'fwd+bwd = sum of the best fwd, input-grad and weight-grad kernels. ratio = ms / roofline.', '',
              '| k | C×H×W | layout | cuDNN fwd | Triton fwd | tuned fwd | × | cuDNN f+b | Triton f+b | tuned f+b '
              '| × | Triton GB/s | roofline ratio | tiles won (fwd/dgrad/wgrad) | rule |',
              '|' + '---|' * 15]
    rule = {c['case']: c for c in (report.get('auto_rule') or {}).get('per_case', [])}
    for key, row in report['kernels']['conv'].items():
        tiles, choice = row.get('tiles') or {}, rule.get(key, {})
        best = tiles.get('best') or {}
        lines.append(
            f"| {row['k']} | {row['C']}×{row['H']}×{row['W']} | {row['layout']} | {cell(row['cudnn fwd ms'])} | "
            f"{cell(row['triton fwd ms'])} | {cell(tiles.get('tuned_fwd_ms'))} | "
            f"{cell(choice.get('speedup', {}).get('fwd'), 2)} | {cell(row['cudnn fwd+bwd ms'])} | "
            f"{cell(row['triton fwd+bwd ms'])} | {cell(tiles.get('tuned_fwd_bwd_ms'))} | "
            f"{cell(choice.get('speedup', {}).get('fwd_bwd'), 2)} | {row['triton fwd']['gbps']:.0f} | "
            f"{row['triton fwd']['roofline_ratio']:.1f} | {' / '.join(best.get(n, '—') for n in ('fwd', 'dgrad', 'wgrad'))}"
            f" | {choice.get('choice', '—')} |")
    if report['kernels']['fused']:
        lines += ['', '## Fused modulation vs unfused (GELU → cuDNN conv → ×v), bf16', '',
                  '| k | C×H×W | layout | unfused fwd | fused fwd | unfused f+b | fused f+b |', '|' + '---|' * 7]
        for row in report['kernels']['fused'].values():
            lines.append(f"| {row['k']} | {row['C']}×{row['H']}×{row['W']} | {row['layout']} | "
                         + ' | '.join(cell(row[f'{i} {m} ms']) for m in ('fwd', 'fwd+bwd') for i in ('unfused', 'fused'))
                         + ' |')
    lines += ['', '## Models (bf16 autocast, channels_last)', '',
              '| model | path | infer img/s | × peer | infer GiB | train img/s | × peer | train GiB | compiled img/s '
              '| × peer | compile s |', '|' + '---|' * 11]
    for label, row in report['models'].items():
        ratio = row.get('vs_peer', {})
        lines.append(f"| {row['model']} | {row['path']} | {cell(row.get('infer_img_s'), 0)} | "
                     f"{cell(ratio.get('infer_img_s'), 2)} | {cell(row.get('infer_peak_gib'), 2)} | "
                     f"{cell(row.get('train_img_s'), 0)} | {cell(ratio.get('train_img_s'), 2)} | "
                     f"{cell(row.get('train_peak_gib'), 2)} | {cell(row.get('compile_img_s'), 0)} | "
                     f"{cell(ratio.get('compile_img_s'), 2)} | {cell(row.get('compile_s'), 1)} |")
    if report.get('auto_rule'):
        lines += ['', '## Proposed automatic rule', '', report['auto_rule']['criterion'], '']
        lines += [f'- {group}: {choice}' for group, choice in report['auto_rule']['by_k_layout'].items()]
    lines += ['', '## Budget', '', '| section | used s | skipped |', '|---|---|---|']
    for name in SECTIONS:
        used = report['sections'].get(name, {}).get('used_s')
        lines.append(f"| {name} | {cell(used, 1)} | {len(report['skipped'].get(name, []))} |")
    return '\n'.join(lines + footer(report)) + '\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = begin(args.smoke, 'gpu_check.py')
    if started is None:
        return 2
    device, now = started
    settings = {key: getattr(args, key) for key in ('budget', 'sections', 'batch', 'warmup', 'iters', 'kernels', 'pairs',
                                                     'check_batch', 'check_size', 'infer_batch', 'train_batch',
                                                     'img_size', 'smoke')}
    report = dict(environment=environment(device, now), settings=settings, complete=False, sections={},
                  correctness=dict(ops={}, models={}), kernels=dict(conv={}, fused={}), models={}, auto_rule=None,
                  skipped={}, failures=[])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / 'summary'

    def save() -> None:
        write_report(stem, report, markdown(report))

    GpuCheck(args, device, report, save).run()
    report['complete'] = True
    save()
    print(markdown(report))
    print(f'wrote {stem}.json and .md')
    return 1 if report['failures'] else 0


if __name__ == '__main__':
    sys.exit(main())
