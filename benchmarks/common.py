"""Helpers shared by the whole-model benchmarks (bench_model.py, bench_resolution.py).

Device choice (CUDA, or CPU under the Triton interpreter for --smoke), model and input construction, bf16 autocast,
timing in windows, peak memory, a cell that records 'OOM' instead of stopping the run, the kernel variants of
Conv2Former and their logit check against kernels='torch', the environment record, and atomic result files.
conv2former is imported lazily: a script sets TRITON_INTERPRET (``select_device``) before the kernels are loaded.
"""
from __future__ import annotations

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
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import timm
import torch
import torch.nn as nn

__all__ = ['CHECK_BATCH', 'BF16_NOISE_FACTOR', 'SMOKE_MODELS', 'SMOKE_OURS', 'csv', 'select_device', 'fused_variant',
           'kernel_variants', 'build', 'images', 'bf16', 'synchronize', 'free_memory', 'reset_peak_memory',
           'peak_memory_gib', 'process_tree', 'timed_windows', 'attempt', 'randomize_for_check', 'check_agreement',
           'record_agreement', 'log', 'fmt', 'environment', 'output_stem', 'write_report', 'begin', 'footer', 'finish']

CHECK_BATCH = 8
BF16_NOISE_FACTOR = 4  # a variant may differ from kernels='torch' by this many times torch's own bf16 error
SMOKE_MODELS = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32))  # --smoke: the Triton interpreter is slow
SMOKE_OURS = dict(SMOKE_MODELS, kernel_size=3)

T = TypeVar('T')


def csv(choices) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated subset of ``choices``."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(',') if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'expected a comma-separated subset of {",".join(choices)}, got {text!r}')
        return items
    return parse


def select_device(smoke: bool, script: str) -> torch.device | None:
    """CPU with TRITON_INTERPRET=1 for a smoke run, else CUDA (cuDNN autotuning on); None, with the reason printed
    to stderr, when there is no GPU."""
    if smoke:
        os.environ['TRITON_INTERPRET'] = '1'  # read when the kernels are first jitted, after this
        return torch.device('cpu')
    if not torch.cuda.is_available():
        print(f'{script} needs a CUDA GPU (none found); use --smoke to exercise the script on CPU', file=sys.stderr)
        return None
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithms during warm-up
    return torch.device('cuda')


def begin(smoke: bool, script: str) -> tuple[torch.device, datetime.datetime] | None:
    """Start of a benchmark's main: the device (``select_device``; None without a GPU), conv2former's models
    registered (after TRITON_INTERPRET is set), the seed fixed, and the UTC start time."""
    device = select_device(smoke, script)
    if device is None:
        return None
    import conv2former  # noqa: F401

    torch.manual_seed(0)
    return device, datetime.datetime.now(datetime.timezone.utc)


def footer(report: dict) -> list[str]:
    """Markdown lines naming the report's failures and saying when the run stopped early."""
    lines = []
    if report['failures']:
        lines += ['', f"**{len(report['failures'])} failure(s):** " + '; '.join(report['failures'])]
    if not report['complete']:
        lines += ['', '**Incomplete: the run stopped before the end.**']
    return lines


def finish(report: dict, save: Callable[[], None], markdown: Callable[[dict], str], written: str) -> int:
    """End of a benchmark's main: the report marked complete and saved, its table printed, ``wrote <written>``;
    the exit status, 1 when the report lists failures."""
    report['complete'] = True
    save()
    print(markdown(report))
    print(f'wrote {written}')
    return 1 if report['failures'] else 0


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


def kernel_variants(base: dict, fused: dict | None) -> dict[str, dict]:
    """Conv2Former model keywords per kernel variant: torch, triton and (when offered) fused, on top of ``base``."""
    variants = {'torch': base | dict(kernels='torch'), 'triton': base | dict(kernels='triton')}
    if fused is not None:
        variants['fused'] = base | fused
    return variants


def build(name: str, kwargs: dict, device: torch.device, channels_last: bool = True) -> nn.Module:
    """A randomly initialised timm model on ``device`` (channels_last unless told otherwise)."""
    model = timm.create_model(name, **kwargs)
    return model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)


def images(batch: int, size: int, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def bf16(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def process_tree(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and its live descendants, e.g. the DataLoader workers, from /proc (Linux)."""
    pids, todo = [], [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in Path(f'/proc/{pid}/task').iterdir():
                todo += [int(c) for c in (task / 'children').read_text().split()]
        except OSError:
            continue
    return pids


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on CPU (smoke) the process's peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def timed_windows(step: Callable[[], object], warmup: int, iters: int, windows: int,
                  device: torch.device) -> list[float]:
    """Seconds of each of ``windows`` timed windows of ``iters`` calls of ``step``, after ``warmup`` untimed calls
    (host clock, device synchronised at the window edges)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def attempt(measure: Callable[[], T], device: torch.device) -> T | str:
    """``measure()``, or 'OOM' when the device ran out of memory, or 'error: Type: first line' for any other failure;
    the device memory is freed afterwards either way, so the next measurement starts clean."""
    try:
        return measure()
    except torch.OutOfMemoryError:  # = torch.cuda.OutOfMemoryError
        result = 'OOM'
    except Exception as exc:  # noqa: BLE001 - recorded in the results; the scripts exit 1
        result = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    finally:
        free_memory(device)
    return result


def randomize_for_check(model: nn.Module) -> None:
    """Variance-preserving random weights and layer scale 1, so that every depthwise conv moves the logits (at the
    default init, layer scale 1e-6 and std 0.02, a wrong depthwise conv would hardly show in them)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(std=param[0].numel() ** -0.5)
            elif name.endswith('gamma'):
                param.fill_(1.0)


def check_agreement(name: str, variants: dict[str, dict], batch: int, size: int, device: torch.device) -> dict:
    """Max |logit difference| in bf16 of each kernel variant vs kernels='torch' on the same weights and images.

    The tolerance is BF16_NOISE_FACTOR times the bf16 error of kernels='torch' itself (max |logit difference|
    between its bf16 and float32 logits), so it grows with the model's depth as bf16 rounding does.
    """
    reference = build(name, variants['torch'], device).eval()
    randomize_for_check(reference)
    x = images(batch, size, device)
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


def record_agreement(name: str, results: dict, failures: list[str]) -> None:
    """Log each variant's check; append a failure message (and print it as an ERROR) for each one out of tolerance."""
    for variant, result in results.items():
        log(f'{name} {variant} vs torch: max |logit diff| {result["max_abs_diff"]:.3g} '
            f'(tolerance {result["tolerance"]:.3g})')
        if not result['ok']:
            failures.append(f'{name} {variant}: logits differ from kernels=torch by '
                            f'{result["max_abs_diff"]:.3g} > {result["tolerance"]:.3g}')
            print(f'ERROR: {failures[-1]}', file=sys.stderr, flush=True)


def log(message: str) -> None:
    print(f'[{datetime.datetime.now():%H:%M:%S}] {message}', file=sys.stderr, flush=True)


def fmt(value, ratio: float | None = None, digits: int = 0) -> str:
    """A table cell: the number (with its ratio to the peer), 'OOM' / 'error: ...' as is, '—' if not measured."""
    if not isinstance(value, float):
        return '—' if value is None else str(value)
    return f'{value:,.{digits}f}' + ('' if ratio is None else f' ({ratio:.2f}×)')


def environment(device: torch.device, now: datetime.datetime) -> dict:
    """Device, library versions, UTC date and the exact command line of this run."""
    import triton
    cuda = device.type == 'cuda'
    return dict(
        device=torch.cuda.get_device_name(device) if cuda else 'cpu (smoke run, Triton interpreter: no real numbers)',
        torch=torch.__version__, timm=timm.__version__, triton=triton.__version__,
        cuda=torch.version.cuda if cuda else None, cudnn=torch.backends.cudnn.version() if cuda else None,
        python=platform.python_version(), date=now.isoformat(timespec='seconds'),
        command=shlex.join([Path(sys.executable).name] + sys.argv))


def output_stem(out: Path, script: str, env: dict, smoke: bool, now: datetime.datetime) -> Path:
    """``out/<script>-<device slug>[-smoke]-<UTC date-time>``: the result files add their suffixes to it."""
    slug = re.sub(r'[^a-z0-9]+', '-', env['device'].split(' (')[0].lower()).strip('-')
    return Path(out) / f"{script}-{slug}{'-smoke' if smoke else ''}-{now:%Y%m%d-%H%M%S}"


def write_report(stem: Path, report: dict, table: str) -> None:
    """Write ``stem``.json (the report) and ``stem``.md (the table), each atomically."""
    from conv2former.fileio import atomic_write_text

    atomic_write_text(stem.with_suffix('.json'), json.dumps(report, indent=1) + '\n')
    atomic_write_text(stem.with_suffix('.md'), table)
