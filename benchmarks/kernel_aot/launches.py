"""From a launcher call to a distinct compilation, exactly as a real launch on the GPU would get it.

1. ``variants`` are the launcher calls the ops make (``conv2former.ops.dwconv.launch_forward``, ...); each runs on
   meta tensors inside ``conv2former.ops.launch.recording_launches``, so the kernels, constexprs, the tile heuristic's
   choice, the weight gradient's SPLITS for the target's SM count and every argument are the launchers' own.
2. ``bind`` / ``specialise``: triton's own argument binder for the target (divisibility and ``== 1``
   specialisation of ints, 16-byte alignment of pointers: a meta tensor's address 0 is aligned as the caching
   allocator's blocks are), then ``JITFunction._pack_args``: signature, constexprs, attrs and options.
3. ``enumerate_jobs``: one job per distinct compilation (triton's launch-cache key, the kernel's source and the
   triton version, per arch), with the variants, layouts and cases that reach it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import inspect
from typing import Callable, Iterable

from .family import ARCHS, DTYPES, Selection, Tensors, make_tensors

__all__ = ['KERNEL_FLAGS', 'Variant', 'variants', 'select_variants', 'record_launches', 'bind', 'specialise',
           'source_hash', 'enumerate_jobs', 'compiled_kernel']

KERNEL_FLAGS = ('K', 'FLIP', 'HAS_BIAS', 'ACT', 'SIGMOID', 'MUL', 'GRAD', 'RECOMPUTE', 'STORE_OUT', 'STORE_DV',
                'ACC_DTYPE')


def _ops():
    """(dwconv, convmod, launch) of conv2former.ops, with the interpreter off."""
    from conv2former.ops import convmod, dwconv, launch
    if launch.interpreter_enabled():
        raise RuntimeError('TRITON_INTERPRET is set: the AOT report needs triton in compiled mode')
    return dwconv, convmod, launch


def compiled_kernel(label: str):
    """The compiled-mode triton.JITFunction of ``label`` ('dwconv.forward', 'convmod.modulate', ...)."""
    _, _, launch = _ops()
    name, field = label.split('.')
    return getattr(launch.KERNEL_SETS[name].jitted(False), field)


@functools.lru_cache(maxsize=None)
def source_hash(label: str) -> str:
    """A hash of the kernel's source and its set's helpers' (the report's records are of this code only)."""
    _, _, launch = _ops()
    name, field = label.split('.')
    kernels = launch.KERNEL_SETS[name]
    text = ''.join(inspect.getsource(fn) for fn in (kernels.kernels[field], *kernels.helpers))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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
    fwd, wgrad, modulate = dwconv.launch_forward, dwconv.launch_weight_grad, convmod.launch_modulate
    out = [Variant('dwconv.fwd bias', lambda t, tile: fwd(t.x, t.weight, t.bias, flip=False, tile=tile)),
           Variant('dwconv.fwd', lambda t, tile: fwd(t.x, t.weight, None, flip=False, tile=tile)),
           Variant('dwconv.dgrad', lambda t, tile: fwd(t.g, t.weight, None, flip=True, tile=tile)),
           Variant('dwconv.wgrad', lambda t, tile: wgrad(t.g, t.x, t.k, act=False, tile=tile)),
           Variant('dwconv.wgrad act', lambda t, tile: wgrad(t.g, t.x, t.k, act=True, tile=tile))]
    for act in (True, False):
        for fusion in ('mul', 'sum'):
            for weighting in ('none', 'sigmoid'):
                for bias in (True, False):
                    flags = ' '.join(('act' if act else 'noact', fusion, weighting, 'bias' if bias else 'nobias'))

                    def forward(t, tile, act=act, fusion=fusion, weighting=weighting, bias=bias):
                        return modulate(t.x, t.v, t.weight, t.bias if bias else None, act, fusion, weighting,
                                        tile=tile)
                    out.append(Variant(f'convmod.fwd {flags}', forward))
                    if fusion == 'sum' and weighting == 'none':
                        continue  # the backward needs no recompute: dA_pre = dv = grad
                    for need_pre, need_dv in ((True, True), (True, False), (False, True)):
                        if fusion == 'sum' and (need_dv or not need_pre):
                            continue  # dv of a sum is the gradient itself: the launcher drops it
                        stores = '+'.join(n for n, on in (('pre', need_pre), ('dv', need_dv)) if on)

                        def grad_pre(t, tile, act=act, fusion=fusion, weighting=weighting, bias=bias,
                                     need_pre=need_pre, need_dv=need_dv):
                            return modulate(t.x, t.v, t.weight, t.bias if bias else None, act, fusion, weighting,
                                            grad=t.g, need_pre=need_pre, need_dv=need_dv, tile=tile)
                        out.append(Variant(f'convmod.grad_pre {flags} {stores}', grad_pre))
    for act in (True, False):
        name = 'act' if act else 'noact'
        out.append(Variant(f'convmod.dgrad {name}', lambda t, tile, act=act: convmod.launch_input_grad(
            t.g, t.x, t.weight, act, tile=tile)))
        out.append(Variant(f'convmod.wgrad {name}', lambda t, tile, act=act: wgrad(t.g, t.x, t.k, act=act,
                                                                                 tile=tile)))
    return out


def select_variants(patterns: Iterable[str]) -> list[Variant]:
    patterns = tuple(patterns)
    chosen = [v for v in variants() if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f'no launcher variant matches {patterns}; known: {", ".join(v.name for v in variants())}')
    return chosen


def record_launches(variant: Variant, tensors: Tensors, tile, sms: int) -> list:
    """The launches (``conv2former.ops.launch.Launch``) of one launcher call, for a GPU with ``sms`` SMs."""
    _, _, launch = _ops()
    with launch.recording_launches(sms) as sink:
        variant.call(tensors, tile)
    return list(sink)


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


def bind(launch, cc: int) -> tuple:
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


def specialise(launch, cc: int, bound=None) -> dict:
    """What ``JITFunction.run`` computes for this launch on a ``cc`` GPU: the cache key, signature, constexprs,
    attrs and options (``_pack_args``), plus readable forms (kernel constexprs by name, the specialisation of the
    runtime arguments: ``name=1`` a constant, ``name:type:16`` divisible by 16). The record key adds the kernel's
    source hash and the triton version to triton's launch-cache key."""
    import triton
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
    source = source_hash(launch.kernel)
    key = hashlib.sha1(f'{launch.kernel}|{cc}|{cache_key}|{source}|{triton.__version__}'.encode()).hexdigest()[:16]
    return dict(key=key, kernel=launch.kernel, arch=cc, flags=flags, source=source,
                specialization=' '.join(spec[i] for i in sorted(spec)), num_warps=options.num_warps,
                signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__))


def _tiles(selection: Selection) -> list:
    _, _, launch = _ops()
    return ([None] if selection.heuristic else []) + [launch.TileConfig(*t) for t in selection.tiles]


class JobIndex:
    """Distinct compilations by record key, with what reaches each (variants, layouts, case labels)."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self._seen: dict[tuple, dict] = {}  # (kernel, arch, specialisation, options) -> job: skips _pack_args

    def add(self, launch, cc: int, dtype: str, layout: str, k: int, tile, variant: str, uses: Iterable[str]) -> dict:
        bound = bind(launch, cc)
        fast = (launch.kernel, cc, str(bound[1]), str(bound[2]))
        job = self._seen.get(fast)
        if job is None:
            info = specialise(launch, cc, bound)
            job = self.jobs.get(info['key'])
            if job is None:
                job = self.jobs[info['key']] = dict(
                    info, dtype=dtype, layouts=[], kernel_size=k,
                    tile='x'.join(str(launch.kwargs[f'BLOCK_{d}']) for d in 'CHW'),
                    tile_source='heuristic' if tile is None else 'hand', variants=[], uses=[])
            self._seen[fast] = job
        for field, value in (('layouts', layout), ('variants', variant), *(('uses', u) for u in uses)):
            if value not in job[field]:
                job[field].append(value)
        if tile is None:
            job['tile_source'] = 'heuristic'  # also when a hand tile equals it
        return job


def enumerate_jobs(selection: Selection, archs: Iterable[int]) -> list[dict]:
    """Distinct compilations of ``selection`` for ``archs``: one job per record key (``specialise``) and arch,
    with the variants, layouts and cases that reach it."""
    chosen = select_variants(selection.variants)
    tiles = _tiles(selection)
    cases: dict[tuple, list] = {}  # T and S share their stage shapes
    for case in selection.cases():
        cases.setdefault(case.shape, []).append(case)
    index = JobIndex()
    for cc in archs:
        for shape, same in cases.items():
            for layout in selection.layouts:
                for dtype in selection.dtypes:
                    for k in selection.kernel_sizes:
                        tensors = make_tensors(shape, layout, DTYPES[dtype], k)
                        for tile in tiles:
                            for variant in chosen:
                                for launch in record_launches(variant, tensors, tile, ARCHS[cc].sms):
                                    index.add(launch, cc, dtype, layout, k, tile, variant.name,
                                              [case.label for case in same])
    return list(index.jobs.values())
