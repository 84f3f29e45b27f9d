"""What the Triton kernel modules (``dwconv``, ``convmod``) share: the triton import, launch mode (compiled on CUDA,
interpreted on CPU with ``TRITON_INTERPRET=1``), the per-mode jitted kernel sets, the tile of one program, its
heuristic and the launch grid, the device function that opens every per-position kernel, accumulator dtypes, the
weight layout the kernels read, input validation, and the hook that records launches instead of running them
(``recording_launches``, for compiling the kernels ahead of time without a GPU: benchmarks/kernel_aot).

Triton decides at ``triton.jit`` time whether a kernel runs compiled or under the interpreter, so the kernels are
plain functions jitted on first use by their ``KernelSet`` (one set per mode). Importing this module needs neither
triton nor ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import collections
import contextlib
import os
import types
import warnings
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (conv2former.ops.dwconv2d) still works
    triton = None
    tl = None

__all__ = ['SUPPORTED_DTYPES', 'MIN_KERNEL_SIZE', 'MAX_KERNEL_SIZE', 'SUM_COMBINE', 'KERNEL_SETS', 'KernelSet',
           'Launch', 'TileConfig', 'accumulator_dtypes', 'empty_output', 'interpreter_enabled', 'is_channels_last',
           'heuristic_tile', 'launch_grid', 'launch_mode', 'next_pow2', 'recording_launches', 'resolve_tile',
           'sm_count', 'taps_by_channel', 'tile_config', 'tile_indices', 'depthwise_sum', 'triton_available', 'validate_inputs']

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_KERNEL_SIZE, MAX_KERNEL_SIZE = 3, 31
# Above this many tile elements per thread the ahead-of-time compiled kernels (benchmarks.kernel_aot) use 182-255
# registers or spill; every tile the heuristic picks holds 4-8, gpu_check's candidates 8-16.
MAX_ELEMENTS_PER_THREAD = 32

# The kernels call only Triton builtins. triton.language's own jitted helpers (tl.cdiv, tl.sum, tl.zeros, ...) become
# compiled or interpreted when triton.language is imported, which may be before TRITON_INTERPRET is set, and a compiled
# helper cannot be called from an interpreted kernel. Sums use tl.reduce with tl.sum's combine function, which the
# interpreter recognises (numpy sum) however it was built.
SUM_COMBINE = tl.standard._sum_combine if tl is not None else None


def triton_available() -> bool:
    """True when triton can be imported."""
    return triton is not None


@torch.compiler.assume_constant_result  # read while tracing: triton's env lookup is opaque to dynamo
def interpreter_enabled() -> bool:
    """True when Triton would build interpreted (CPU) kernels now, i.e. ``TRITON_INTERPRET`` is set."""
    knobs = getattr(triton, 'knobs', None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')


def launch_mode(x: Tensor, op: str) -> bool:
    """Whether kernels run interpreted for ``x`` (CPU with TRITON_INTERPRET=1); a RuntimeError saying what is
    missing when they cannot run at all."""
    if triton is None:
        raise RuntimeError(f'conv2former.ops.{op} needs triton, which is not installed '
                           '(use conv2former.ops.dwconv2d with CONV2FORMER_KERNELS=torch for the PyTorch path)')
    interpret = interpreter_enabled()
    if not x.is_cuda and not interpret:
        raise RuntimeError(f'the Triton {op} runs on CUDA tensors, got a tensor on {x.device}; '
                           'to run it on CPU set TRITON_INTERPRET=1 (the Triton interpreter) before the first call')
    return interpret


class Launch(NamedTuple):
    """One kernel launch, ``jit[grid](*args, **kwargs)``, as ``recording_launches`` records it."""
    kernel: str  # '<kernel set>.<field>', e.g. 'dwconv.forward'
    jit: object  # the compiled-mode triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


_recording: Optional[tuple[list, int]] = None  # (sink, SM count) inside recording_launches


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` appends a Launch instead of running it."""

    def __init__(self, label: str, jit, sink: list):
        self.label, self.jit, self.sink = label, jit, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.label, self.jit, tuple(grid), args, kwargs))


def _rebind(fn: Callable, names: dict) -> Callable:
    """A copy of ``fn`` whose globals are its module's plus ``names`` (each mode's kernels see that mode's helpers)."""
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__, copy.__qualname__, copy.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    copy.__annotations__, copy.__kwdefaults__ = dict(fn.__annotations__), fn.__kwdefaults__
    return copy


class KernelSet:
    """The Triton kernels of one op module, e.g. ``KernelSet('dwconv', 'depthwise_conv2d', forward=fn, ...)``.

    The kernels are plain functions, jitted on first use per launch mode (``jitted``); ``helpers`` are the device
    functions they call by name (``tile_indices``, ``depthwise_sum``; helpers call only Triton builtins), jitted
    alongside in the same mode. Every set registers itself in ``KERNEL_SETS`` under its name.
    """

    def __init__(self, name: str, op: str, helpers: tuple = (), **kernels: Callable):
        self.name, self.op, self.helpers, self.kernels = name, op, helpers, kernels
        self.fields = collections.namedtuple(f'{name}_kernels', kernels)
        self._jitted: dict = {}
        KERNEL_SETS[name] = self

    def jitted(self, interpret: bool) -> tuple:
        """The kernels (a named tuple) jitted for ``interpret``, which must be the current mode (TRITON_INTERPRET)."""
        if interpret not in self._jitted:
            assert interpret == interpreter_enabled(), 'triton reads the launch mode while jitting'
            helpers = {fn.__name__: triton.jit(_rebind(fn, {})) for fn in self.helpers}
            self._jitted[interpret] = self.fields(*(triton.jit(_rebind(fn, helpers)) for fn in self.kernels.values()))
        return self._jitted[interpret]

    def for_input(self, x: Tensor) -> tuple:
        """The kernels to launch for ``x``'s device (RuntimeError saying what is missing when none can run), or
        recording stand-ins inside ``recording_launches``."""
        if _recording is not None:
            return self.fields(*(_Recorder(f'{self.name}.{field}', jit, _recording[0])
                                 for field, jit in zip(self.fields._fields, self.jitted(False))))
        return self.jitted(launch_mode(x, self.op))


KERNEL_SETS: dict[str, KernelSet] = {}


@contextlib.contextmanager
def recording_launches(sms: int) -> Iterator[list[Launch]]:
    """Inside, the launchers record each launch (compiled-mode kernel, grid, arguments) into the yielded list
    instead of running it, on tensors of any device (``meta`` ones too), and ``sm_count`` answers ``sms``: exactly
    what a GPU with ``sms`` SMs would compile, for compiling the kernels ahead of time (benchmarks/kernel_aot)."""
    global _recording
    saved, sink = _recording, []
    _recording = (sink, sms)
    try:
        yield sink
    finally:
        _recording = saved


def sm_count(device: torch.device) -> Optional[int]:
    """The SM count of ``device``'s GPU (the target's inside ``recording_launches``); None off CUDA."""
    if _recording is not None:
        return _recording[1]
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else None


def is_channels_last(x: Tensor) -> bool:
    """True when channels move faster in memory than width (NHWC-like strides, also for sliced NHWC views)."""
    return x.stride(1) < x.stride(3)


def empty_output(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x``: channels_last for NHWC-like ``x``, else contiguous (as F.conv2d does)."""
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tile_config(channels: int, height: int, width: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W): wide along the contiguous dimension, about 1-2k elements per program."""
    if channels_last:
        return min(32, next_pow2(channels)), min(4, next_pow2(height)), min(8, next_pow2(width))
    block_h, block_w = min(8, next_pow2(height)), min(32, next_pow2(width))
    return min(next_pow2(channels), max(1, 1024 // (block_h * block_w))), block_h, block_w


class TileConfig(NamedTuple):
    """The work of one Triton program: a BLOCK_C x BLOCK_H x BLOCK_W tile (each a power of two), run by ``num_warps``
    warps. The launchers take one to override the shape heuristic (``tile_config``), e.g. for autotuning."""
    block_c: int
    block_h: int
    block_w: int
    num_warps: int = 4

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_H=self.block_h, BLOCK_W=self.block_w, num_warps=self.num_warps)


def heuristic_tile(channels: int, height: int, width: int, channels_last: bool) -> TileConfig:
    """The heuristic's tile (``tile_config``) with its warps: 4, or 8 for an NCHW tile of 16 or more channels (maps
    of at most 8 x 8, e.g. stage 4 at 224 px: 16x8x8 at 4 warps takes 72-94 registers, 20-28 of 64 warps per SM on
    sm_90 / sm_80; at 8 warps 48-60 registers, 32-40 warps, no spills; benchmarks/results/aot/aot.md)."""
    block_c, block_h, block_w = tile_config(channels, height, width, channels_last)
    return TileConfig(block_c, block_h, block_w, 8 if not channels_last and block_c >= 16 else 4)


def resolve_tile(x: Tensor, tile: Optional[TileConfig]) -> TileConfig:
    """``tile`` checked (ValueError naming the bad field), or the heuristic's tile for ``x`` (``heuristic_tile``)."""
    if tile is None:
        return heuristic_tile(x.shape[1], x.shape[2], x.shape[3], is_channels_last(x))
    tile = TileConfig(*tile)
    for name, value in zip(TileConfig._fields, tile):
        limit = 32 if name == 'num_warps' else 1024
        if not isinstance(value, int) or value < 1 or value & (value - 1) or value > limit:
            raise ValueError(f'tile {name} must be a power of two in [1, {limit}], got {value!r}')
    if tile.block_c * tile.block_h * tile.block_w > 8192:
        raise ValueError(f'tile {tile.block_c}x{tile.block_h}x{tile.block_w} has more than 8192 elements')
    per_thread = tile.block_c * tile.block_h * tile.block_w // (32 * tile.num_warps)
    if per_thread > MAX_ELEMENTS_PER_THREAD:
        warnings.warn(f'tile {tile.block_c}x{tile.block_h}x{tile.block_w} at {tile.num_warps} warps holds {per_thread} '
                      f'accumulator elements per thread (> {MAX_ELEMENTS_PER_THREAD}): compiled for sm_90 / sm_80, '
                      f'such tiles take 182-255 registers (8 of 64 warps per SM) and spill up to 12 KB at 1-2 warps '
                      f'(benchmarks/results/aot/aot.md); use more warps or a smaller tile', stacklevel=4)
    return tile


def launch_grid(x: Tensor, tile: Optional[TileConfig]) -> tuple[tuple[int, int, int], TileConfig]:
    """The grid of a per-position kernel over ``x`` (spatial tiles, channel blocks, batch) and its tile
    (``resolve_tile``)."""
    tile = resolve_tile(x, tile)
    batch, channels, height, width = x.shape
    return (triton.cdiv(height, tile.block_h) * triton.cdiv(width, tile.block_w), triton.cdiv(channels, tile.block_c),
            batch), tile


def tile_indices(C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Device function opening the per-position kernels (grid of ``launch_grid``; a ``KernelSet`` helper).

    Returns this program's batch index (int64), its channel, row and column indices shaped (BLOCK_C, 1, 1),
    (1, BLOCK_H, 1) and (1, 1, BLOCK_W), the channel mask and the mask of the tile's positions inside the map.
    """
    pid_hw = tl.program_id(0)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    c3 = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    h3 = ((pid_hw // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    w3 = ((pid_hw % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
    mask_c3 = c3 < C
    return tl.program_id(2).to(tl.int64), c3, h3, w3, mask_c3, mask_c3 & (h3 < H) & (w3 < W)


def depthwise_sum(x_base, sxh, sxw, w_ptr, C, H, W, c3, h3, w3, mask_c3, K: tl.constexpr, FLIP: tl.constexpr,
                  ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_W: tl.constexpr):
    """Device function (a ``KernelSet`` helper): the K x K depthwise sum of one tile in ACC_DTYPE,
    sum_ij act(x)[c, h + i - K//2, w + j - K//2] * w[tap, c] with tap = i*K + j (K*K - 1 - that when FLIP), zero
    padding from masked loads; act is the exact GELU when ACT (GELU(0) = 0 keeps the padding zero), else the identity.

    ``x_base`` points at (batch, channel c3) of the input, which is addressed by its row / column strides; ``w_ptr``
    at the weight laid out (K*K, C) (``taps_by_channel``); c3 / h3 / w3 / mask_c3 as ``tile_indices`` returns them.
    """
    acc = tl.full((BLOCK_C, BLOCK_H, BLOCK_W), 0, ACC_DTYPE)
    for i in range(K):
        in_h = h3 + (i - K // 2)
        row_mask = mask_c3 & (in_h >= 0) & (in_h < H)
        x_row = x_base + in_h * sxh
        for j in range(K):
            in_w = w3 + (j - K // 2)
            tap = i * K + j
            if FLIP:
                tap = K * K - 1 - tap
            wv = tl.load(w_ptr + tap * C + c3, mask=mask_c3, other=0.0).to(ACC_DTYPE)
            xv = tl.load(x_row + in_w * sxw, mask=row_mask & (in_w >= 0) & (in_w < W), other=0.0).to(ACC_DTYPE)
            if ACT:
                xv = 0.5 * xv * (1.0 + tl.erf(xv * 0.7071067811865476))
            acc += xv * wv
    return acc


def accumulator_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype as (torch, triton): float64 for float64 inputs (gradcheck), float32 otherwise."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def taps_by_channel(weight: Tensor) -> Tensor:
    """(C, 1, K, K) weight -> contiguous (K*K, C), so each tap's channel block is one contiguous load."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def validate_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str = 'depthwise_conv2d',
                    x_name: str = 'input', others: tuple = ()) -> None:
    """Raise ValueError naming what was expected and what came; ``others`` are (name, tensor) pairs that must share
    x's device and dtype (the fused op's v)."""
    if x.dim() != 4:
        raise ValueError(f'{op} expects a 4-D {x_name} (B, C, H, W), got a {x.dim()}-D tensor of shape '
                         f'{tuple(x.shape)}')
    if x.dtype not in SUPPORTED_DTYPES:
        names = ', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)
        raise ValueError(f'{op} supports dtypes {names}, got {x.dtype}')
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'{op} expects a weight of shape (C, 1, k, k) = ({channels}, 1, k, k) for an {x_name} with '
                         f'{channels} channels, got {tuple(weight.shape)}')
    k = weight.shape[-1]
    if k % 2 == 0 or not MIN_KERNEL_SIZE <= k <= MAX_KERNEL_SIZE:
        raise ValueError(f'{op} expects an odd kernel size in [{MIN_KERNEL_SIZE}, {MAX_KERNEL_SIZE}], got {k}')
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f'{op} expects a bias of shape ({channels},), got {tuple(bias.shape)}')
    for name, tensor in (*others, ('weight', weight), ('bias', bias)):
        if tensor is None:
            continue
        if tensor.device != x.device:
            raise ValueError(f'{op} expects {name} on the device of the {x_name} ({x.device}), got {tensor.device}')
        if tensor.dtype != x.dtype:
            raise ValueError(f'{op} expects {name} of dtype {x.dtype} (that of the {x_name}), got {tensor.dtype}')
