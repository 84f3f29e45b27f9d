"""What the Triton kernel modules (``dwconv``, ``convmod``) share: the triton import, launch mode (compiled on CUDA,
interpreted on CPU with ``TRITON_INTERPRET=1``) and the per-mode jit cache, the tile of one program and its
heuristic, accumulator dtypes, the weight layout the kernels read, and input validation.

Triton decides at ``triton.jit`` time whether a kernel runs compiled or under the interpreter, so the kernels are
plain functions jitted on first use by ``jit_kernels`` (one cache entry per mode). Importing this module needs
neither triton nor ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (conv2former.ops.dwconv2d) still works
    triton = None
    tl = None

__all__ = ['SUPPORTED_DTYPES', 'MIN_KERNEL_SIZE', 'MAX_KERNEL_SIZE', 'SUM_COMBINE', 'TileConfig', 'accumulator_dtypes',
           'empty_output', 'interpreter_enabled', 'is_channels_last', 'jit_kernels', 'launch_mode', 'next_pow2',
           'resolve_tile', 'taps_by_channel', 'tile_config', 'triton_available', 'validate_inputs']

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_KERNEL_SIZE, MAX_KERNEL_SIZE = 3, 31
# Above this many tile elements per thread the ahead-of-time compiled kernels (benchmarks/kernel_aot.py) use 182-255
# registers or spill; every tile the heuristic picks, and gpu_check's candidates, hold 8-16.
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


@functools.lru_cache(maxsize=None)
def jit_kernels(interpret: bool, functions: tuple) -> tuple:
    """``functions`` jitted for the current mode; ``interpret`` keys the cache (triton reads it while jitting)."""
    assert interpret == interpreter_enabled()
    return tuple(triton.jit(fn) for fn in functions)


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


def resolve_tile(x: Tensor, tile: Optional[TileConfig]) -> TileConfig:
    """``tile`` checked (ValueError naming the bad field), or the heuristic's tile for ``x`` with 4 warps."""
    if tile is None:
        return TileConfig(*tile_config(x.shape[1], x.shape[2], x.shape[3], is_channels_last(x)))
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
                      f'(benchmarks/results/aot/aot.md); use more warps or a smaller tile', stacklevel=3)
    return tile


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
