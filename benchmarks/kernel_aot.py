"""Ahead-of-time compilation report of the Triton kernels (issue 25): registers, spills, shared memory, occupancy.

``python -m benchmarks.kernel_aot --arch 90 [--arch 80] [--quick] --out DIR`` compiles, without a GPU and without
``TRITON_INTERPRET``, every kernel the launchers of ``conv2former.ops.dwconv`` and ``conv2former.ops.convmod`` launch
for the Conv2Former family's real shapes, and writes ``DIR/aot.json`` (one record per distinct compilation) and
``DIR/aot.md`` (a table per kernel with the occupancy the numbers allow, the spills, and the bandwidth lower bound of
the C2F-T stage-1 depthwise conv beside cuDNN's measured time).

How a configuration becomes a compilation, exactly as a real launch on the GPU would:

1. The real launchers (``launch_forward``, ``launch_weight_grad``, convmod's ``_launch_modulate``,
   ``_launch_input_grad``, ``_launch_weight_grad``) run on ``meta`` tensors with the model's shapes, strides and
   dtypes; the modules' ``_require_launchable`` is swapped, for the duration, for one that hands them recording
   stand-ins of their jitted kernels, so the constexprs (FLIP, HAS_BIAS, ACT, ..., K, BLOCK_*, num_warps), the tile
   heuristic's choice and every argument value are the launchers' own. ``torch.cuda.get_device_properties`` answers
   the target GPU's SM count, so the weight gradient's SPLITS is the one an H100 (132 SMs) / A100 (108) gets.
2. Each recorded ``kernel[grid](*args, **kwargs)`` goes through triton's own argument binder
   (``runtime.jit.create_function_from_signature`` for the target's backend) and ``JITFunction._pack_args``: the
   specialisation of ints (``== 1`` becomes a constant, ``% 16 == 0`` a divisibility hint) and pointers (16-byte
   alignment; a meta tensor's address is 0, i.e. aligned, as the CUDA caching allocator's blocks are) is triton's,
   not a hand-written signature.
3. Identical compilations (same kernel, constexprs, specialisation, options and arch; triton's launch cache key)
   are compiled once: ``triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))``, which ends with the
   wheel's ptxas; its ``-v`` log (registers, spill stores/loads, stack) is captured, and the dynamic shared memory is
   triton's ``metadata.shared``.

Occupancy per SM (both sm_80 and sm_90, as cuda_occupancy.h computes it): 65,536 32-bit registers in 4
sub-partitions, allocated per warp in units of 256 (a thread's count rounded up to a multiple of 8); at most 64
resident warps and 32 blocks; shared memory 228 KB per SM and 227 KB per block on sm_90, 164 KB / 163 KB on sm_80,
in 128-byte units plus 1 KB reserved per block.

``--quick``: the C2F-T stage-1 shape (batch 128, 72 channels, 56x56, k=11) at the heuristic's tile, the kernel
variants of the upstream block's forward and backward plus the heaviest ones, the three dtypes, channels_last (and
NCHW with ``--layouts``), both archs: ~54 compilations. Without it: all models, stages, batches 1 and 128, odd k in
3..31, both layouts, every launcher variant (narrow it with ``--models``, ``--batches``, ``--kernel-sizes``,
``--variants``, ...; ``--dry-run`` counts the distinct compilations without compiling; ``--append`` adds to an
existing report).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import importlib
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import torch  # noqa: E402

__all__ = ['ARCHS', 'MODELS', 'MAPS', 'BATCHES', 'KERNEL_SIZES', 'DTYPES', 'LAYOUTS', 'Selection', 'quick_selection',
           'full_selection', 'enumerate_jobs', 'compile_job', 'occupancy', 'parse_ptxas_log', 'ptxas_path', 'run',
           'bandwidth_bounds', 'main']

# ------------------------------------------------------------------------------------------------ model family
MODELS = {'N': (64, 128, 256, 512), 'T': (72, 144, 288, 576), 'S': (72, 144, 288, 576), 'B': (96, 192, 384, 768),
          'L': (128, 256, 512, 1024)}  # channels per stage; T and S differ in depth only
MAPS = (56, 28, 14, 7)  # stage feature maps at 224 px
BATCHES = (1, 128)
KERNEL_SIZES = tuple(range(3, 32, 2))
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LAYOUTS = ('NCHW', 'channels_last')
REFERENCE = dict(model='T', stage=1, batch=128, kernel_size=11)  # C2F-T stage 1: 128x72x56x56, k=11


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int
    gpu: str
    sms: int
    smem_per_sm: int
    smem_per_block: int
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reg_unit: int = 256  # registers per warp, allocation unit
    smem_unit: int = 128
    smem_reserved: int = 1024  # per block, by the CUDA runtime
    sub_partitions: int = 4


ARCHS = {90: Arch(90, 'H100 SXM', 132, 228 * 1024, 227 * 1024), 80: Arch(80, 'A100', 108, 164 * 1024, 163 * 1024)}
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
CUDNN_MS = {  # /work/shared/docs/performance-baseline.md: bf16, 128x72x56x56, k=11, H100
    'channels_last': dict(fwd=4.83, fwd_bwd=15.7), 'NCHW': dict(fwd=1.99, fwd_bwd=9.4)}
LOW_OCCUPANCY = 0.5  # flagged below this share of the 64 warps an SM holds
KERNEL_FLAGS = ('K', 'FLIP', 'HAS_BIAS', 'ACT', 'SIGMOID', 'MUL', 'GRAD', 'RECOMPUTE', 'STORE_OUT', 'STORE_DV',
                'ACC_DTYPE')


# -------------------------------------------------------------------------------------------- the ops' modules
def _ops():
    """(dwconv, convmod, launch) of conv2former.ops, imported with the interpreter off."""
    from conv2former.ops import convmod, dwconv
    try:
        from conv2former.ops import launch
    except ImportError:  # before the refactor the helpers lived in dwconv
        launch = dwconv
    if launch.interpreter_enabled():
        raise RuntimeError('TRITON_INTERPRET is set: the AOT report needs triton in compiled mode')
    return dwconv, convmod, launch


def _attr(module, *names: str):
    """The first of ``names`` that ``module`` has (the ops modules are being refactored: public, then private)."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f'{module.__name__} has none of {", ".join(names)} (kernel_aot needs it: see its docstring)')


def tile_heuristic(channels: int, height: int, width: int, channels_last: bool) -> tuple[int, int, int]:
    """The ops' tile heuristic (BLOCK_C, BLOCK_H, BLOCK_W), wherever it lives now."""
    dwconv, _, launch = _ops()
    for module in (launch, dwconv):
        for name in ('tile_config', '_tile_config'):
            if hasattr(module, name):
                return tuple(getattr(module, name)(channels, height, width, channels_last))
    raise AttributeError('no tile heuristic (tile_config / _tile_config) in conv2former.ops.launch or .dwconv')


# ------------------------------------------------------------------------------------------------- selections
@dataclasses.dataclass(frozen=True)
class Case:
    """One (model, stage, batch) shape."""
    model: str
    stage: int
    batch: int

    @property
    def channels(self) -> int:
        return MODELS[self.model][self.stage - 1]

    @property
    def size(self) -> int:
        return MAPS[self.stage - 1]

    @property
    def label(self) -> str:
        return f'{self.model}{self.stage}@{self.batch}'


@dataclasses.dataclass
class Selection:
    models: tuple = tuple(MODELS)
    stages: tuple = (1, 2, 3, 4)
    batches: tuple = BATCHES
    kernel_sizes: tuple = KERNEL_SIZES
    dtypes: tuple = tuple(DTYPES)
    layouts: tuple = LAYOUTS
    variants: tuple = ('*',)  # fnmatch patterns on variant names
    tiles: tuple = ()  # hand-passed TileConfig tuples, besides the heuristic's
    heuristic: bool = True  # the tile heuristic's choice (tile=None)

    def cases(self) -> list[Case]:
        return [Case(m, s, b) for m in self.models for s in self.stages for b in self.batches]


QUICK_VARIANTS = ('dwconv.fwd bias', 'dwconv.dgrad', 'dwconv.wgrad', 'dwconv.wgrad act',
                  'convmod.fwd act mul none bias', 'convmod.fwd act mul sigmoid bias',
                  'convmod.grad_pre act mul none bias pre+dv', 'convmod.grad_pre act mul sigmoid bias pre+dv',
                  'convmod.dgrad act')


def quick_selection(layouts: tuple = ('channels_last',)) -> Selection:
    """The C2F-T stage-1 shape at k=11, the representative variants, all dtypes, the heuristic's tile."""
    return Selection(models=(REFERENCE['model'],), stages=(REFERENCE['stage'],), batches=(REFERENCE['batch'],),
                     kernel_sizes=(REFERENCE['kernel_size'],), layouts=layouts, variants=QUICK_VARIANTS)


def full_selection() -> Selection:
    return Selection()


# ----------------------------------------------------------------------------------------- launcher variants
@dataclasses.dataclass(frozen=True)
class Tensors:
    """Meta tensors of one (case, layout, dtype, k): x/a the input, v the value, g/dy an output gradient."""
    x: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    k: int


def make_tensors(case: Case, layout: str, dtype: torch.dtype, k: int) -> Tensors:
    shape = (case.batch, case.channels, case.size, case.size)
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format

    def act():
        return torch.empty(shape, dtype=dtype, device='meta', memory_format=fmt)

    return Tensors(act(), act(), act(), torch.empty(case.channels, 1, k, k, dtype=dtype, device='meta'),
                   torch.empty(case.channels, dtype=dtype, device='meta'), k)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A launcher call: ``call(tensors, tile)`` launches one or more kernels."""
    name: str
    call: Callable


def variants() -> list[Variant]:
    """Every launcher call the ops make: dwconv's forward (with/without bias), input gradient (flipped, no bias),
    weight gradient (identity / GELU input); convmod's forward (act x fusion x weighting x bias), gradient mode
    (as its backward calls it: not for sum/none, need_pre/need_dv with at least one), input gradient (act) and
    weight gradient (act, = dwconv's)."""
    dwconv, convmod, _ = _ops()
    fwd = _attr(dwconv, 'launch_forward', '_launch_forward')
    wgrad = _attr(dwconv, 'launch_weight_grad', '_launch_weight_grad')
    modulate = _attr(convmod, '_launch_modulate', 'launch_modulate')
    input_grad = _attr(convmod, '_launch_input_grad', 'launch_input_grad')
    cm_wgrad = _attr(convmod, '_launch_weight_grad', 'launch_weight_grad')
    out = [Variant('dwconv.fwd bias', lambda t, tile: fwd(t.x, t.weight, t.bias, flip=False, tile=tile)),
           Variant('dwconv.fwd', lambda t, tile: fwd(t.x, t.weight, None, flip=False, tile=tile)),
           Variant('dwconv.dgrad', lambda t, tile: fwd(t.g, t.weight, None, flip=True, tile=tile)),
           Variant('dwconv.wgrad', lambda t, tile: wgrad(t.g, t.x, t.k, act=False, tile=tile)),
           Variant('dwconv.wgrad act', lambda t, tile: wgrad(t.g, t.x, t.k, act=True, tile=tile))]
    for act in (True, False):
        for fusion in ('mul', 'sum'):
            for weighting in ('none', 'sigmoid'):
                for bias in (True, False):
                    flags = ' '.join(filter(None, ('act' if act else 'noact', fusion, weighting,
                                                   'bias' if bias else 'nobias')))

                    def forward(t, tile, act=act, fusion=fusion, weighting=weighting, bias=bias):
                        return modulate(t.x, t.v, t.weight, t.bias if bias else None, act, fusion, weighting,
                                        tile=tile)
                    out.append(Variant(f'convmod.fwd {flags}', forward))
                    if fusion == 'sum' and weighting == 'none':
                        continue  # the backward needs no recompute: dA_pre = dv = grad
                    for need_pre, need_dv in ((True, True), (True, False), (False, True)):
                        if fusion == 'sum' and not need_pre:
                            continue  # dv of a sum is the gradient itself: nothing to launch
                        if fusion == 'sum' and need_dv:
                            continue  # same launch as need_dv=False (the launcher drops it)
                        stores = '+'.join(n for n, on in (('pre', need_pre), ('dv', need_dv)) if on)

                        def grad_pre(t, tile, act=act, fusion=fusion, weighting=weighting, bias=bias,
                                     need_pre=need_pre, need_dv=need_dv):
                            return modulate(t.x, t.v, t.weight, t.bias if bias else None, act, fusion, weighting,
                                            grad=t.g, need_pre=need_pre, need_dv=need_dv, tile=tile)
                        out.append(Variant(f'convmod.grad_pre {flags} {stores}', grad_pre))
    for act in (True, False):
        name = 'act' if act else 'noact'
        out.append(Variant(f'convmod.dgrad {name}', lambda t, tile, act=act: input_grad(t.g, t.x, t.weight, act,
                                                                                      tile=tile)))
        out.append(Variant(f'convmod.wgrad {name}', lambda t, tile, act=act: cm_wgrad(t.g, t.x, t.k, act,
                                                                                    tile=tile)))
    return out


def select_variants(patterns: Iterable[str]) -> list[Variant]:
    patterns = tuple(patterns)
    chosen = [v for v in variants() if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f'no launcher variant matches {patterns}; known: {", ".join(v.name for v in variants())}')
    return chosen


# ------------------------------------------------------------------------------------------ recording launches
@dataclasses.dataclass
class Launch:
    kernel: str  # 'dwconv.forward', 'dwconv.weight_grad', 'convmod.modulate', 'convmod.input_grad'
    jit: object  # the triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, label: str, jit, sink: list):
        self.label, self.jit, self.sink = label, jit, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.label, self.jit, tuple(grid), args, kwargs))
        return launch


_WARNED: list = []


@contextlib.contextmanager
def recording(sink: list, sms: int) -> Iterator[None]:
    """Inside: the ops' launchers record into ``sink`` instead of launching, for a GPU with ``sms`` SMs."""
    dwconv, convmod, _ = _ops()
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    for module in (dwconv, convmod):
        real = module._kernels(False)
        fake = type(real)(*(_Recorder(f'{module.__name__.rsplit(".", 1)[-1]}.{field}', jit, sink)
                            for field, jit in zip(real._fields, real)))
        patch(module, '_require_launchable', lambda x, fake=fake: fake)
    splits = getattr(dwconv, '_weight_grad_splits', None)
    if splits is None:
        if not _WARNED:
            _WARNED.append(True)
            print('kernel_aot: conv2former.ops.dwconv._weight_grad_splits is gone; the weight gradient\'s SPLITS is '
                  'the CPU value (1), not the GPU heuristic\'s', file=sys.stderr)
    else:  # the heuristic asks the device for its SM count; answer the target's
        patch(dwconv, '_weight_grad_splits', lambda b, cb, nt, device: splits(b, cb, nt, torch.device('cuda')))
        patch(torch.cuda, 'get_device_properties', lambda device=None: _Props(sms))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@dataclasses.dataclass
class _Props:
    multi_processor_count: int


def record_launches(variant: Variant, tensors: Tensors, tile, sms: int) -> list[Launch]:
    sink: list[Launch] = []
    with recording(sink, sms):
        variant.call(tensors, tile)
    return sink


# ------------------------------------------------------------------------------------- triton's specialisation
_BINDERS: dict = {}


def _binder(jit, cc: int):
    """Triton's own argument binder of ``jit`` for a CUDA target of compute capability ``cc``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    key = (id(jit), cc)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget('cuda', cc, 32))
        _BINDERS[key] = (jit, backend, create_function_from_signature(jit.signature, jit.params, backend))
    return _BINDERS[key][1:]


def bind(launch: Launch, cc: int) -> tuple:
    """Triton's binder on this launch for a ``cc`` GPU: (bound args, specialisation, options, kwargs), as in
    ``JITFunction.run``."""
    from triton import knobs
    jit = launch.jit
    backend, binder = _binder(jit, cc)
    kwargs = dict(launch.kwargs)
    kwargs['debug'] = kwargs.get('debug', jit.debug) or knobs.runtime.debug
    kwargs['instrumentation_mode'] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    return bound, specialization, options, kwargs


def specialise(launch: Launch, cc: int, bound=None) -> dict:
    """What ``JITFunction.run`` computes for this launch on a ``cc`` GPU: the cache key, signature, constexprs,
    attrs and options (``_pack_args``), plus readable forms (kernel constexprs by name, the specialisation of the
    runtime arguments: ``name=1`` a constant, ``name:type:16`` divisible by 16)."""
    from triton.runtime.jit import compute_cache_key
    jit = launch.jit
    backend, _ = _binder(jit, cc)
    bound, specialization, options, kwargs = bound or bind(launch, cc)
    cache_key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in jit.params]
    declared = {p.name for p in jit.params if p.is_constexpr}
    flags, spec = {}, {}
    for (index,), value in constexprs.items():
        if names[index] in declared:
            flags[names[index]] = value if isinstance(value, (bool, int)) else str(value)
        else:
            spec[index] = f'{names[index]}={value}'  # an int specialised to a constant (== 1)
    for (index,), attr in attrs.items():
        if names[index] not in declared and index not in spec:
            hint = ':16' if any(a[0] == 'tt.divisibility' for a in attr) else ''
            spec[index] = f'{names[index]}:{signature[names[index]]}{hint}'
    key = hashlib.sha1(f'{launch.kernel}|{cc}|{cache_key}'.encode()).hexdigest()[:16]
    return dict(key=key, kernel=launch.kernel, arch=cc, flags=flags,
                specialization=' '.join(spec[i] for i in sorted(spec)), num_warps=options.num_warps,
                signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__))


# ----------------------------------------------------------------------------------------------- enumeration
def _tiles(selection: Selection) -> list:
    from_heuristic = [None] if selection.heuristic else []
    _, _, launch = _ops()
    TileConfig = _attr(launch, 'TileConfig')
    return from_heuristic + [TileConfig(*t) for t in selection.tiles]


def enumerate_jobs(selection: Selection, archs: Iterable[int]) -> list[dict]:
    """Distinct compilations of ``selection`` for ``archs``: one job per triton launch-cache key (kernel,
    specialisation, options) and arch, with the variants, layouts and cases that reach it."""
    chosen = select_variants(selection.variants)
    tiles = _tiles(selection)
    cases: dict[tuple, list[str]] = {}  # T and S share their stage shapes
    for case in selection.cases():
        cases.setdefault((case.channels, case.size, case.batch), []).append(case)
    jobs: dict[str, dict] = {}
    seen: dict[tuple, dict] = {}  # (kernel, arch, specialisation, options) -> job: skips _pack_args for repeats
    for cc in archs:
        sms = ARCHS[cc].sms
        for same in cases.values():
            for layout in selection.layouts:
                for dtype_name in selection.dtypes:
                    for k in selection.kernel_sizes:
                        tensors = make_tensors(same[0], layout, DTYPES[dtype_name], k)
                        for tile in tiles:
                            for variant in chosen:
                                for launch in record_launches(variant, tensors, tile, sms):
                                    bound = bind(launch, cc)
                                    fast = (launch.kernel, cc, str(bound[1]), str(bound[2]))
                                    job = seen.get(fast)
                                    if job is None:
                                        info = specialise(launch, cc, bound)
                                        job = jobs.get(info['key'])
                                        if job is None:
                                            job = jobs[info['key']] = dict(
                                                info, dtype=dtype_name, layouts=[], kernel_size=k,
                                                tile='x'.join(str(launch.kwargs[f'BLOCK_{d}']) for d in 'CHW'),
                                                tile_source='heuristic' if tile is None else 'hand',
                                                variants=[], uses=[])
                                        seen[fast] = job
                                    if layout not in job['layouts']:
                                        job['layouts'].append(layout)
                                    if variant.name not in job['variants']:
                                        job['variants'].append(variant.name)
                                    if tile is None:
                                        job['tile_source'] = 'heuristic'  # also when a hand tile equals it
                                    for case in same:
                                        if case.label not in job['uses']:
                                            job['uses'].append(case.label)
    return list(jobs.values())


# ---------------------------------------------------------------------------------------------------- compiling
def ptxas_path(cc: int = 90) -> Optional[str]:
    """The ptxas triton uses for ``cc`` (the wheel's, unless TRITON_PTXAS_PATH says otherwise), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(cc).path
    except Exception:  # noqa: BLE001 (no nvidia backend, no binary)
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


_LOG_PATTERNS = dict(regs=r'Used (\d+) registers', stack_bytes=r'(\d+) bytes stack frame',
                     spill_stores=r'(\d+) bytes spill stores', spill_loads=r'(\d+) bytes spill loads',
                     static_smem=r'(\d+) bytes smem')


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads and static shared memory from a ``ptxas -v`` log (one kernel)."""
    out = {}
    for name, pattern in _LOG_PATTERNS.items():
        match = re.search(pattern, log)
        out[name] = int(match.group(1)) if match else (None if name == 'regs' else 0)
    return out


def _rerun_ptxas(ptx: str, cc: int, fp_fusion: bool) -> str:
    """``ptxas -v`` on ``ptx`` with the flags of triton's make_cubin (used when triton did not run ptxas)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'k.ptx'
        src.write_text(ptx)
        cmd = [ptxas_path(cc), '-lineinfo', *([] if fp_fusion else ['--fmad=false']), '-v', '--regAllocOptLevel=2',
               f'--gpu-name={sm_arch_from_capability(cc)}', str(src), '-o', str(Path(tmp) / 'k.o')]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_job(job: dict) -> dict:
    """Compile one job (from ``enumerate_jobs``) and measure it: ok, regs, spill_stores, shared_bytes, seconds."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, field = job['kernel'].split('.')
    jit = getattr(importlib.import_module(f'conv2former.ops.{module}')._kernels(False), field)
    src = ASTSource(jit, job['signature'], job['constexprs'], job['attrs'])
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and with it the log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log to stdout
    out = dict(ok=False, regs=None, spill_stores=None, spill_loads=None, stack_bytes=None, shared_bytes=None,
               static_smem=None, error=None, ptxas_log='triton')
    buffer = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buffer):
            kernel = triton.compile(src, target=GPUTarget('cuda', job['arch'], 32), options=job['options'])
    except Exception as error:  # noqa: BLE001 (recorded: a failed compilation is a result)
        out.update(seconds=round(time.perf_counter() - start, 3),
                   error=f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0]}'[:500])
        return out
    seconds = time.perf_counter() - start
    log = buffer.getvalue()
    if 'Used' not in log:
        log = _rerun_ptxas(kernel.asm['ptx'], job['arch'], job['options'].get('enable_fp_fusion', True))
        out['ptxas_log'] = 'rerun'
    stats = parse_ptxas_log(log)
    out.update(stats, ok=stats['regs'] is not None, seconds=round(seconds, 3),
               shared_bytes=int(kernel.metadata.shared) + stats['static_smem'])
    if stats['regs'] is None:
        out['error'] = 'no register count in the ptxas log'
    return out


def occupancy(regs: Optional[int], shared: Optional[int], num_warps: int, cc: int) -> dict:
    """Resident warps per SM that ``regs`` registers per thread and ``shared`` bytes per block allow on ``cc``."""
    arch = ARCHS[cc]
    if regs is None or shared is None:
        return dict(warps_per_sm=None, occupancy=None, limiter=None, blocks_per_sm=None)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_unit) * arch.reg_unit
    # cuda_occupancy.h (cudaOccMaxBlocksPerSMRegsLimit): registers are allocated in each of the 4 sub-partitions
    warps_by_regs = (arch.regs_per_sm // arch.sub_partitions // regs_per_warp) * arch.sub_partitions
    limits = dict(warps=arch.max_warps // num_warps, blocks=arch.max_blocks, registers=warps_by_regs // num_warps)
    warps_assumed = math.ceil(num_warps / arch.sub_partitions) * arch.sub_partitions  # the hardware's launch check
    if regs > 255 or regs_per_warp * warps_assumed > arch.regs_per_sm:
        limits['registers'] = 0
    if shared > arch.smem_per_block:
        limits['shared'] = 0
    else:
        per_block = math.ceil((shared + arch.smem_reserved) / arch.smem_unit) * arch.smem_unit
        limits['shared'] = arch.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda n: (limits[n], n != 'registers'))
    warps = blocks * num_warps
    return dict(warps_per_sm=warps, occupancy=round(warps / arch.max_warps, 4), blocks_per_sm=blocks,
                limiter=limiter if warps < arch.max_warps else 'none')


def _record(job: dict, result: dict) -> dict:
    flags = {name: job['flags'].get(name) for name in KERNEL_FLAGS}
    record = dict(arch=job['arch'], kernel=job['kernel'], dtype=job['dtype'], layout='+'.join(job['layouts']),
                  tile=job['tile'], num_warps=job['num_warps'], kernel_size=job['flags'].get('K'),
                  ok=result['ok'], regs=result['regs'], spill_stores=result['spill_stores'],
                  shared_bytes=result['shared_bytes'], seconds=result['seconds'], error=result['error'],
                  spill_loads=result['spill_loads'], stack_bytes=result['stack_bytes'],
                  **occupancy(result['regs'], result['shared_bytes'], job['num_warps'], job['arch']),
                  **flags, tile_source=job['tile_source'], variants=job['variants'], uses=job['uses'],
                  specialization=job['specialization'], ptxas_log=result['ptxas_log'], key=job['key'])
    return record


# ----------------------------------------------------------------------------------------- bandwidth bounds
def _tensor_roles(kernel: str, flags: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read, written) pointer arguments of one launch, from the kernel's code paths."""
    if kernel == 'dwconv.forward':
        return ('x_ptr', 'w_ptr') + (('b_ptr',) if flags['HAS_BIAS'] else ()), ('y_ptr',)
    if kernel == 'dwconv.weight_grad':
        return ('x_ptr', 'dy_ptr'), ('dw_part_ptr', 'db_part_ptr')
    if kernel == 'convmod.input_grad':
        return ('g_ptr', 'w_ptr') + (('a_ptr',) if flags['ACT'] else ()), ('da_ptr',)
    if kernel == 'convmod.modulate':
        reads = []
        if flags['RECOMPUTE']:
            reads += ['a_ptr', 'w_ptr'] + (['b_ptr'] if flags['HAS_BIAS'] else [])
        if flags['GRAD']:
            reads.append('g_ptr')
            if flags['STORE_OUT'] and flags['MUL']:
                reads.append('v_ptr')
            writes = (['out_ptr'] if flags['STORE_OUT'] else []) + (['dv_ptr'] if flags['STORE_DV'] else [])
        else:
            reads.append('v_ptr')
            writes = ['out_ptr']
        return tuple(reads), tuple(writes)
    raise KeyError(kernel)


def launch_bytes(launch: Launch) -> dict:
    """Bytes each tensor of one launch moves if read or written exactly once (halos and re-reads cached)."""
    names = [p.name for p in launch.jit.params]
    args = dict(zip(names, launch.args))
    flags = {n: launch.kwargs.get(n) for n in KERNEL_FLAGS}
    reads, writes = _tensor_roles(launch.kernel, flags)
    size = {n: args[n].numel() * args[n].element_size() for n in reads + writes}
    out = dict(read=sum(size[n] for n in reads), written=sum(size[n] for n in writes))
    if launch.kernel == 'dwconv.weight_grad':  # the launcher's torch.sum over the partials reads them once more
        out['read'] += size['dw_part_ptr'] + size['db_part_ptr']
    return out


def bandwidth_bounds(dtypes: Iterable[str] = ('bf16', 'fp32'), layouts: Iterable[str] = LAYOUTS) -> list[dict]:
    """Bytes and time at H100 bandwidth of one forward and one backward call of the depthwise conv (bias) and of
    the fused modulation (upstream: GELU, mul, no weighting, bias; all gradients) for C2F-T stage 1, k=11."""
    case = Case(REFERENCE['model'], REFERENCE['stage'], REFERENCE['batch'])
    by_name = {v.name: v for v in variants()}
    ops = {'dwconv': (('dwconv.fwd bias',), ('dwconv.dgrad', 'dwconv.wgrad')),
           'convmod (fused)': (('convmod.fwd act mul none bias',),
                               ('convmod.grad_pre act mul none bias pre+dv', 'convmod.dgrad act',
                                'convmod.wgrad act'))}
    rows = []
    for op, (forward, backward) in ops.items():
        for layout in layouts:
            for dtype in dtypes:
                tensors = make_tensors(case, layout, DTYPES[dtype], REFERENCE['kernel_size'])
                row = dict(op=op, layout=layout, dtype=dtype, shape=f'{case.batch}x{case.channels}x{case.size}x'
                           f'{case.size}', kernel_size=REFERENCE['kernel_size'])
                for phase, names in (('fwd', forward), ('bwd', backward)):
                    launches = [launch for name in names
                                for launch in record_launches(by_name[name], tensors, None, ARCHS[90].sms)]
                    moved = sum(sum(launch_bytes(launch).values()) for launch in launches)
                    row[f'{phase}_launches'] = len(launches)
                    row[f'{phase}_bytes'] = moved
                    row[f'{phase}_bound_ms'] = moved / H100_BANDWIDTH * 1e3
                if op == 'dwconv' and dtype == 'bf16':
                    row['cudnn_fwd_ms'] = CUDNN_MS[layout]['fwd']
                    row['cudnn_bwd_ms'] = round(CUDNN_MS[layout]['fwd_bwd'] - CUDNN_MS[layout]['fwd'], 2)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- report
def _fmt_range(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '—'
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f'{lo}–{hi}'


def _k_range(ks: list) -> str:
    ks = sorted(set(k for k in ks if k is not None))
    if not ks:
        return '—'
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1, 2)):
        return f'{ks[0]}–{ks[-1]} ({len(ks)})'
    return ','.join(map(str, ks))


def _flag_text(record: dict) -> str:
    """The kernel's boolean constexprs that are True (the others are False)."""
    return ' '.join(n for n in KERNEL_FLAGS if n not in ('K', 'ACC_DTYPE') and record.get(n) is True) or '(none)'


def _is_low(record: dict) -> bool:
    return record['occupancy'] is not None and record['occupancy'] < LOW_OCCUPANCY


def render_markdown(records: list[dict], runs: list[dict], bounds: list[dict]) -> str:
    archs = sorted({r['arch'] for r in records}, reverse=True)
    lines = ['# Triton kernels compiled ahead of time: registers, spills, shared memory, occupancy', '',
             'Written by `benchmarks/kernel_aot.py` (issue 25) without a GPU: every launch goes through the real '
             'launchers on meta tensors and triton\'s own argument binder (int/pointer specialisation as on the GPU), '
             'then `triton.compile` for `GPUTarget(\'cuda\', arch, 32)` and the wheel\'s ptxas (`-v` log). One row of '
             '`aot.json` per distinct compilation (kernel, constexprs, specialisation, options, arch).', '']
    lines += ['## Runs', '', '| command | when | triton | compilations | failed | compile s (sum) | wall s |',
              '|---|---|---|---|---|---|---|']
    for run_ in runs:
        lines.append(f"| `{run_['command']}` | {run_['date']} | {run_['triton']} | {run_['compiled']} | "
                     f"{run_['failed']} | {run_['compile_seconds']:.0f} | {run_['wall_seconds']:.0f} |")
    lines += ['', 'What each run covered (archs; selection):', '']
    lines += [f"{i}. sm_{', sm_'.join(map(str, run_['archs']))}; {run_['selection']}"
              + (f". {run_['note']}" if run_.get('note') else '') for i, run_ in enumerate(runs, 1)]
    lines.append('')
    lines += ['## Occupancy model', '',
              'Per SM on sm_80 and sm_90 (as cuda_occupancy.h computes it): 65,536 registers in 4 sub-partitions, '
              'allocated per warp in units of 256 (the per-thread count rounded up to 8), so warps by registers = '
              '4 × ⌊16,384 / registers per warp⌋; at most 64 warps and 32 blocks; shared memory in 128-byte units '
              'plus 1 KB reserved per block, 228 KB/SM and 227 KB/block on sm_90, 164 KB/SM and 163 KB/block on sm_80. '
              f'"warps/SM" = resident warps (of 64); "low" below {LOW_OCCUPANCY:.0%}. Limiter: what caps the blocks '
              '(registers, warps = the 64-warp cap, shared, blocks = the 32-block cap).', '']
    kernels = sorted({r['kernel'] for r in records})
    lines += ['## Summary', '', '| arch | kernel | tiles from | compilations | failed | regs | spill stores B (max) | '
              'shared B (max) | warps/SM | tiles / warps |', '|---|---|---|---|---|---|---|---|---|---|']
    for arch in archs:
        for kernel in kernels:
            for source in ('heuristic', 'hand'):
                rows = [r for r in records
                        if r['arch'] == arch and r['kernel'] == kernel and r['tile_source'] == source]
                if not rows:
                    continue
                tiles = sorted({f"{r['tile']}/{r['num_warps']}" for r in rows})
                lines.append(f"| sm_{arch} | {kernel} | {source} | {len(rows)} | {sum(not r['ok'] for r in rows)} | "
                             f"{_fmt_range([r['regs'] for r in rows])} | {max(r['spill_stores'] or 0 for r in rows)} | "
                             f"{max(r['shared_bytes'] or 0 for r in rows)} | "
                             f"{_fmt_range([r['warps_per_sm'] for r in rows])} | {', '.join(tiles)} |")
    lines.append('')
    for arch in archs:
        arch_records = [r for r in records if r['arch'] == arch]
        n_ok = sum(r['ok'] for r in arch_records)
        lines += [f'## sm_{arch} ({ARCHS[arch].gpu}): {len(arch_records)} compilations, {n_ok} ok', '']
        for kernel in kernels:
            rows = [r for r in arch_records if r['kernel'] == kernel]
            if not rows:
                continue
            lines += [f'### `{kernel}` (sm_{arch})', '',
                      'Grouped over kernel sizes and argument specialisations; flags: the boolean constexprs that are '
                      'True (the others False); regs per dtype fp32 / bf16 / fp16 (— where not compiled).', '',
                      '| constexpr flags | layout | tile / warps | source | k | compiles | regs fp32 / bf16 / fp16 '
                      '| spill stores B (max) | stack B (max) | shared B (max) | warps/SM (min) | limiter |',
                      '|---|---|---|---|---|---|---|---|---|---|---|---|']
            groups: dict = {}
            for r in rows:
                groups.setdefault((_flag_text(r), r['layout'], r['tile'], r['num_warps'], r['tile_source']),
                                  []).append(r)
            for (flags, layout, tile, warps, source), group in sorted(groups.items()):
                regs = ' / '.join(_fmt_range([r['regs'] for r in group if r['dtype'] == d]) for d in DTYPES)
                worst = min(group, key=lambda r: (r['warps_per_sm'] if r['warps_per_sm'] is not None else -1))
                failed = sum(not r['ok'] for r in group)
                low = ' **low**' if _is_low(worst) else ''
                lines.append(
                    f"| {flags} | {layout} | {tile} / {warps} | {source} | "
                    f"{_k_range([r['kernel_size'] for r in group])}"
                    f" | {len(group)}{f' ({failed} failed)' if failed else ''} | {regs} | "
                    f"{_fmt_range([max((r['spill_stores'] or 0) for r in group)])} | "
                    f"{_fmt_range([max((r['stack_bytes'] or 0) for r in group)])} | "
                    f"{_fmt_range([max((r['shared_bytes'] or 0) for r in group)])} | "
                    f"{worst['warps_per_sm']}{low} | {worst['limiter']} |")
            lines.append('')
    bad = [r for r in records if not r['ok'] or (r['spill_stores'] or 0) > 0 or _is_low(r)]
    lines += ['## Failures, spills and low occupancy', '']
    if not bad:
        lines += ['None: every compilation succeeded without spills, at or above '
                  f'{LOW_OCCUPANCY:.0%} occupancy.', '']
    for source, title in (('heuristic', "Tiles the heuristic picks"), ('hand', 'Hand-passed tiles')):
        rows = [r for r in bad if r['tile_source'] == source]
        if not rows:
            continue
        lines += [f'### {title}', '', 'Grouped over kernel sizes and specialisations.', '',
                  '| arch | kernel | flags | dtype | layout | tile / warps | k | failed | regs | spill stores B | '
                  'spill loads B | shared B | warps/SM | limiter | error |', '|' + '---|' * 15]
        groups: dict = {}
        for r in rows:
            groups.setdefault((-r['arch'], r['kernel'], r['tile'], r['num_warps'], _flag_text(r), r['dtype'],
                               r['layout']), []).append(r)
        for (arch, kernel, tile, warps, flags, dtype, layout), group in sorted(groups.items()):
            errors = sorted({r['error'] for r in group if r['error']})
            lines.append(f"| sm_{-arch} | {kernel} | {flags} | {dtype} | {layout} | {tile} / {warps} | "
                         f"{_k_range([r['kernel_size'] for r in group])} | {sum(not r['ok'] for r in group)} | "
                         f"{_fmt_range([r['regs'] for r in group])} | "
                         f"{_fmt_range([r['spill_stores'] for r in group])} | "
                         f"{_fmt_range([r['spill_loads'] for r in group])} | "
                         f"{_fmt_range([r['shared_bytes'] for r in group])} | "
                         f"{_fmt_range([r['warps_per_sm'] for r in group])} | "
                         f"{', '.join(sorted({str(r['limiter']) for r in group}))} | {'; '.join(errors)[:200]} |")
        lines.append('')
    if bounds:
        lines += ['## Bandwidth lower bound: C2F-T stage 1 (128×72×56×56, k=11) on H100 (3.35 TB/s)', '',
                  'Bytes = every tensor the launches read or write, once (perfect reuse of halos and taps); the weight '
                  'gradient\'s float32 partials (SPLITS from the launcher\'s heuristic for 132 SMs) are written and '
                  'read back by its torch.sum. Forward = one call of the op; backward = its kernels for all '
                  'gradients (dwconv: input-gradient + weight-gradient kernels; fused modulation: grad_pre (dA_pre and '
                  'dv), input gradient, weight gradient). cuDNN: measured, bf16 (docs/performance-baseline.md; '
                  'backward = fwd+bwd − fwd).', '',
                  '| op | layout | dtype | fwd MB | fwd bound ms | cuDNN fwd ms (× bound) | bwd launches | bwd MB | '
                  'bwd bound ms | cuDNN bwd ms (× bound) |', '|---|---|---|---|---|---|---|---|---|---|']

        def cudnn(b, phase):
            ms = b.get(f'cudnn_{phase}_ms')
            return '—' if ms is None else f"{ms} ({ms / b[f'{phase}_bound_ms']:.0f}×)"
        for b in bounds:
            lines.append(f"| {b['op']} | {b['layout']} | {b['dtype']} | {b['fwd_bytes'] / 1e6:.1f} | "
                         f"{b['fwd_bound_ms']:.3f} | {cudnn(b, 'fwd')} | {b['bwd_launches']} | "
                         f"{b['bwd_bytes'] / 1e6:.1f} | {b['bwd_bound_ms']:.3f} | {cudnn(b, 'bwd')} |")
        lines.append('')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------ driver
def _compile_all(jobs: list[dict], n_jobs: int, progress: bool) -> list[dict]:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc='compile', unit='kernel', disable=not progress, file=sys.stderr)
    results: list = [None] * len(jobs)
    if n_jobs <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = compile_job(job)
            bar.update()
    else:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context('fork')) as pool:
            futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return [_record(job, result) for job, result in zip(jobs, results)]


def _describe(selection: Selection) -> str:
    tiles = (['heuristic'] if selection.heuristic else []) + ['x'.join(map(str, t[:3])) + f'/{t[3]}'
                                                              for t in selection.tiles]
    variants_ = 'all' if selection.variants == ('*',) else ', '.join(selection.variants)
    return (f"models {','.join(selection.models)}, stages {','.join(map(str, selection.stages))}, batches "
            f"{','.join(map(str, selection.batches))}, k {_k_range(list(selection.kernel_sizes))}, dtypes "
            f"{','.join(selection.dtypes)}, layouts {','.join(selection.layouts)}, tiles {', '.join(tiles)}, "
            f"variants {variants_}")


def run(selection: Selection, archs: Iterable[int], out_dir: Path, n_jobs: int = 1, append: bool = False,
        progress: bool = True, command: str = '', note: str = '') -> list[dict]:
    """Enumerate, compile (skipping keys already in ``out_dir/aot.json`` when ``append``), write aot.json/aot.md."""
    from triton import __version__ as triton_version
    from triton import knobs
    archs = list(dict.fromkeys(archs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = enumerate_jobs(selection, archs)
    old: list[dict] = []
    runs: list[dict] = []
    if append and (out_dir / 'aot.json').is_file():
        old = json.loads((out_dir / 'aot.json').read_text())
        runs = json.loads((out_dir / 'runs.json').read_text()) if (out_dir / 'runs.json').is_file() else []
    known = {r['key'] for r in old}
    todo = [job for job in jobs if job['key'] not in known]
    print(f'{len(jobs)} distinct compilations ({len(jobs) - len(todo)} already in {out_dir / "aot.json"}), '
          f'enumerated in {time.perf_counter() - start:.1f} s', file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix='kernel-aot-cache-') as cache:
        saved = knobs.cache.dir
        knobs.cache.dir = cache  # a private cache: nothing stale, nothing left in ~/.triton
        try:
            records = _compile_all(todo, n_jobs, progress)
        finally:
            knobs.cache.dir = saved
    merged = {r['key']: r for r in old}
    merged.update({r['key']: r for r in records})
    all_records = sorted(merged.values(), key=lambda r: (-r['arch'], r['kernel'], r['dtype'], r['layout'],
                                                          r['tile'], r['num_warps'], r['kernel_size'] or 0,
                                                          r['specialization']))
    runs.append(dict(command=command or 'kernel_aot.run(...)',
                     date=datetime.datetime.now().isoformat(timespec='seconds'),
                     triton=triton_version, torch=torch.__version__, python=platform.python_version(),
                     cpus=os.cpu_count(), jobs=n_jobs, archs=archs, selection=_describe(selection), note=note,
                     compiled=len(records), failed=sum(not r['ok'] for r in records),
                     compile_seconds=round(sum(r['seconds'] or 0 for r in records), 1),
                     wall_seconds=round(time.perf_counter() - start, 1)))
    _write_atomic(out_dir / 'aot.json', '[\n' + ',\n'.join(json.dumps(r) for r in all_records) + '\n]\n')  # a line each
    _write_atomic(out_dir / 'runs.json', json.dumps(runs, indent=1) + '\n')
    _write_atomic(out_dir / 'aot.md', render_markdown(all_records, runs, bandwidth_bounds()) + '\n')
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def _tile(text: str) -> tuple:
    """'64x8x16/2' -> (64, 8, 16, 2); warps default to 4."""
    match = re.fullmatch(r'(\d+)x(\d+)x(\d+)(?:/(\d+))?', text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f'a tile is CxHxW[/warps], e.g. 64x8x16/2, got {text!r}')
    return tuple(int(g) if g else 4 for g in match.groups())


def _csv(cast=str, choices=None):
    def parse(text: str) -> tuple:
        items = tuple(cast(s.strip()) for s in text.split(',') if s.strip())
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'expected a comma-separated subset of {choices}, got {text!r}')
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.kernel_aot', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', type=int, action='append', choices=sorted(ARCHS), help='compute capability '
                        '(repeat for several; default 90 and 80)')
    parser.add_argument('--quick', action='store_true', help='one representative configuration per kernel variant '
                        'and dtype (C2F-T stage 1, k=11, heuristic tile), ~1-2 minutes')
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'aot')
    parser.add_argument('--jobs', type=int, default=1, help='compile in N processes (default 1)')
    parser.add_argument('--models', type=_csv(str, tuple(MODELS)))
    parser.add_argument('--stages', type=_csv(int, (1, 2, 3, 4)))
    parser.add_argument('--batches', type=_csv(int))
    parser.add_argument('--kernel-sizes', type=_csv(int, KERNEL_SIZES))
    parser.add_argument('--dtypes', type=_csv(str, tuple(DTYPES)))
    parser.add_argument('--layouts', type=_csv(str, LAYOUTS))
    parser.add_argument('--variants', type=_csv(str), help='fnmatch patterns on launcher variant names, e.g. '
                        '"dwconv.*,convmod.fwd act*" (--list-variants shows them)')
    parser.add_argument('--tiles', type=_csv(_tile), default=(), help='hand-passed tiles CxHxW/warps besides the '
                        "heuristic's, e.g. 64x8x16/1,64x8x16/2")
    parser.add_argument('--no-heuristic', action='store_true', help="only the --tiles, not the heuristic's tile")
    parser.add_argument('--append', action='store_true', help='add to DIR/aot.json (skip compilations already there)')
    parser.add_argument('--dry-run', action='store_true', help='count the distinct compilations, compile nothing')
    parser.add_argument('--render-only', action='store_true', help='rewrite DIR/aot.md from DIR/aot.json and '
                        'DIR/runs.json, compile nothing')
    parser.add_argument('--list-variants', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--note', default='', help='a sentence for the report (e.g. what this run leaves out)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    os.environ.pop('TRITON_INTERPRET', None)  # compiled kernels only (read when the kernels are jitted, later)
    args = parse_args(argv)
    if args.list_variants:
        print('\n'.join(v.name for v in variants()))
        return 0
    if ptxas_path() is None:
        print('kernel_aot: triton\'s ptxas is missing (triton/backends/nvidia/bin/ptxas); nothing to compile with',
              file=sys.stderr)
        return 2
    if args.render_only:
        records = json.loads((args.out / 'aot.json').read_text())
        runs = json.loads((args.out / 'runs.json').read_text()) if (args.out / 'runs.json').is_file() else []
        _write_atomic(args.out / 'aot.md', render_markdown(records, runs, bandwidth_bounds()) + '\n')
        print(f"wrote {args.out / 'aot.md'} ({len(records)} records)")
        return 0
    selection = quick_selection(args.layouts or ('channels_last',)) if args.quick else full_selection()
    for field in ('models', 'stages', 'batches', 'kernel_sizes', 'dtypes', 'layouts', 'variants'):
        value = getattr(args, field)
        if value:
            setattr(selection, field, value)
    selection.tiles = tuple(args.tiles)
    selection.heuristic = not args.no_heuristic
    archs = args.arch or [90, 80]
    command = 'python -m benchmarks.kernel_aot ' + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.dry_run:
        start = time.perf_counter()
        jobs = enumerate_jobs(selection, archs)
        by_kernel: dict = {}
        for job in jobs:
            by_kernel[(job['arch'], job['kernel'])] = by_kernel.get((job['arch'], job['kernel']), 0) + 1
        for (arch, kernel), n in sorted(by_kernel.items()):
            print(f'sm_{arch} {kernel}: {n}')
        print(f'{len(jobs)} distinct compilations ({_describe(selection)}), enumerated in '
              f'{time.perf_counter() - start:.1f} s')
        return 0
    records = run(selection, archs, args.out, n_jobs=args.jobs, append=args.append, progress=not args.no_progress,
                  command=command, note=args.note)
    failed = [r for r in records if not r['ok']]
    spilled = [r for r in records if (r['spill_stores'] or 0) > 0]
    print(f"{len(records)} compiled, {len(failed)} failed, {len(spilled)} spill; wrote {args.out / 'aot.json'} and "
          f"{args.out / 'aot.md'}")
    for r in failed[:10]:
        print(f"FAILED sm_{r['arch']} {r['kernel']} {r['dtype']} {r['layout']} {r['tile']}/{r['num_warps']} "
              f"k={r['kernel_size']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
