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
6. AOT: the registers, spills, shared memory and occupancy on sm_90 of every launch it times (``gpu_aot``: read from
   the committed benchmarks/results/aot/aot.json, the rest compiled in the background on the CPUs), in the kernel
   table and a section of their own, so achieved bandwidth can be read against them.
Anything that fails a correctness check is not timed. Exit status 1 when a check failed, 0 otherwise.

    python -m benchmarks.gpu_check [--out DIR] [--budget 450] [--sections correctness,kernels,models,compile]
    python -m benchmarks.gpu_check --smoke --out DIR   # toy sizes on CPU under TRITON_INTERPRET=1 (tests the script)

Parts: ``budget`` (the time budget), ``correctness`` (the checks), ``gpu_aot`` (the AOT numbers), ``gpu_report``
(rule and summary.md); the timing is bench_dwconv's and bench_model's.
"""
from __future__ import annotations

if __name__ == '__main__' and not __package__:  # run as a file: python benchmarks/gpu_check.py
    import as_script
    as_script.run(__file__)

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from .bench_dwconv import L2_FLUSH_BYTES, conv_torch, time_cuda, time_host, timed_fns
from .bench_model import measure_compile, measure_infer, measure_train
from .budget import Budget, Overrun, overrun_in
from .common import (SMOKE_MODELS, SMOKE_OURS, begin, build, csv, environment, finish, free_memory, log,
                     peak_memory_gib, reset_peak_memory, write_report)
from .correctness import REL_ERR_LIMIT, check_case, check_model, check_tile, conv_inputs, modulation_torch
from .gpu_aot import AotNumbers, configs
from .gpu_cases import (KERNEL_SIZES, ODD_SHAPES, OWN_K, STAGES, candidates, case_key, fused_cases, kernel_cases,
                        roofline, tile_label)
from .gpu_report import SECTIONS, add_model_ratios, auto_rule, markdown

__all__ = ['Budget', 'Overrun', 'overrun_in', 'parse_args', 'kernel_cases', 'case_key', 'candidates', 'check_case',
           'check_tile', 'auto_rule', 'GpuCheck', 'main']

HERE = Path(__file__).resolve().parent
SHARES = dict(correctness=95, kernels=135, models=115, compile=105)  # seconds of the default --budget 450
DTYPES = ('fp32', 'bf16')
PEAKS = {'H200': (4.8e12, 33.5e12), 'H100': (3.35e12, 33.5e12)}  # HBM B/s, fp32 FMA/s (depthwise: CUDA cores)
DEFAULT_PEAKS = PEAKS['H100']
MODEL_PAIRS = (('T', 'conv2former_t', 'convnext_tiny'), ('N', 'conv2former_n', 'convnext_nano'))
PATHS = ('triton', 'fused', 'torch')  # eager order; 'peer' = the ConvNeXt
COMPILE_ORDER = ('fused', 'peer', 'triton', 'torch')
COMPILE_MIN_S = 40  # do not start a compile with less time than this left
AOT_WAIT_S = {False: 20.0, True: 300.0}  # at most this long a wait for the AOT numbers at the end (GPU run, smoke)
SMOKE = dict(stages={'N': ((8, 6, 6),), 'T': ((8, 6, 6),)}, odd=((5, 7, 3),), kernels=(3,), own_k={'N': 3, 'T': 3},
             pairs=('T',), tune_cases=1, tiles=1, compiled=2, check_batch=1, check_size=32, batch=2, infer_batch=2, train_batch=2,
             img_size=32, warmup=1, iters=1, windows=1, budget=600.0)


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
        for case in fused_cases(self.args, cases):  # pass B: fused modulation vs the unfused path
            key = case_key(case)
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
            fns = timed_fns(op, (x, weight, bias), dy)
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
            for mode, fn in timed_fns(op, (a, v, weight, bias), dy).items():
                row[f'{impl} {mode} ms'] = self.timer(fn)
        log(f"fused {case_key(case)}: fwd unfused {row['unfused fwd ms']:.3f} / fused {row['fused fwd ms']:.3f} ms, "
            f"fwd+bwd {row['unfused fwd+bwd ms']:.3f} / {row['fused fwd+bwd ms']:.3f} ms")
        return row

    def tune_tiles(self, case: dict, batch: int) -> dict:
        """Per kernel (fwd, input grad, weight grad) the ms of each candidate tile that passes its check; the best."""
        from conv2former.ops import dwconv

        x, weight, bias = conv_inputs(case, batch, torch.bfloat16, self.device)
        dy = torch.randn_like(x)
        tiles = candidates(case, self.args.tiles)
        default = tiles[0]
        kernels = {'fwd': lambda t: dwconv.launch_forward(x, weight, bias, flip=False, tile=t),
                   'dgrad': lambda t: dwconv.launch_forward(dy, weight, None, flip=True, tile=t),
                   'wgrad': lambda t: dwconv.launch_weight_grad(dy, x, case['k'], tile=t)}
        timings = {name: {} for name in kernels}
        for tile in tiles:
            label = tile_label(tile)
            if tile != default:
                err = check_tile(case, tile, self.device)
                if err > REL_ERR_LIMIT['bf16']:
                    self.fail(f'tile {label} {case_key(case)}: rel err {err:.2e}')
                    continue
            for name, launch in kernels.items():
                timings[name][label] = self.timer(lambda: launch(tile))
        best = {name: min(ms, key=ms.get) for name, ms in timings.items() if ms}
        return dict(ms=timings, best=best, default=tile_label(default),
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

    def start_aot(self) -> AotNumbers | None:
        """The AOT numbers of every launch the kernels section may time, started in the background."""
        cases = kernel_cases(self.args)
        tuned = [(case, candidates(case, self.args.tiles)) for case in cases[:self.args.tune_cases]]
        try:
            return AotNumbers(configs(cases, fused_cases(self.args, cases), tuned, self.args.batch, case_key),
                              self.args.out)
        except Exception as exc:  # noqa: BLE001 - the numbers are an addition; the GPU run goes on without them
            log(f'AOT numbers not started: {type(exc).__name__}: {exc}')
            return None

    def run(self) -> None:
        aot = self.start_aot() if 'kernels' in self.args.sections else None
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
        if aot is not None:  # what the budget leaves, at most AOT_WAIT_S (the compilations began with the run)
            self.report['aot'] = aot.collect(min(max(self.budget.left(), 2.0), AOT_WAIT_S[self.args.smoke]))


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
                  aot=None, skipped={}, failures=[])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / 'summary'

    def save() -> None:
        write_report(stem, report, markdown(report))

    GpuCheck(args, device, report, save).run()
    return finish(report, save, markdown, f'{stem}.json and .md')


if __name__ == '__main__':
    sys.exit(main())
