"""Large-kernel depthwise 2-D convolution in Triton, registered as a ``torch.library`` custom op.

``depthwise_conv2d(x, weight, bias)`` equals ``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for an odd square
kernel ``k`` in [3, 31], stride 1 and dilation 1. The kernels address tensors through their strides, so one kernel
serves NCHW and channels_last (NHWC) inputs; the output keeps the input's memory format. Gradients for x, weight and
bias are Triton kernels too; the weight/bias gradient is deterministic (per-program partial sums reduced by torch.sum).
Sums accumulate in float32 (float64 for float64 inputs, so ``torch.autograd.gradcheck`` works).

Triton decides at ``triton.jit`` time whether a kernel runs compiled (GPU) or under the CPU interpreter
(``TRITON_INTERPRET=1``), so the kernels below are plain functions, jitted on first use by ``_kernels`` (one cache
entry per mode). Importing this module therefore needs neither triton nor ``TRITON_INTERPRET``; postponed
annotations (``from __future__ import annotations``) let the kernels' ``tl.constexpr`` parameters be defined when
triton is not installed.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (conv2former.ops.dwconv2d) still works
    triton = None
    tl = None

__all__ = ['depthwise_conv2d', 'triton_available', 'interpreter_enabled', 'TileConfig', 'SUPPORTED_DTYPES',
           'MIN_KERNEL_SIZE', 'MAX_KERNEL_SIZE']

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_KERNEL_SIZE, MAX_KERNEL_SIZE = 3, 31


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


# ----------------------------------------------------------------------------------------------------- Triton kernels
# The kernels call only Triton builtins. triton.language's own jitted helpers (tl.cdiv, tl.sum, tl.zeros, ...) become
# compiled or interpreted when triton.language is imported, which may be before TRITON_INTERPRET is set, and a compiled
# helper cannot be called from an interpreted kernel. Sums use tl.reduce with tl.sum's combine function, which the
# interpreter recognises (numpy sum) however it was built.
_SUM = tl.standard._sum_combine if tl is not None else None


def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """y[b, c, h, w] = bias[c] + sum_ij x[b, c, h + i - K//2, w + j - K//2] * w[i*K + j, c]; taps reversed if FLIP.

    Grid: (spatial tiles, channel blocks, batch). ``w`` is the weight laid out (K*K, C) so a tap's channel block is
    contiguous. Zero padding comes from masked loads; sums accumulate in ACC_DTYPE (float32, float64 for float64).
    """
    pid_hw = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = (pid_hw // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = (pid_hw % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_c = offs_c < C
    c3 = offs_c[:, None, None]
    h3 = offs_h[None, :, None]
    w3 = offs_w[None, None, :]
    mask_c3 = mask_c[:, None, None]
    x_base = x_ptr + pid_b * sxb + c3 * sxc
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
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(b_ptr + c3, mask=mask_c3, other=0.0).to(ACC_DTYPE)
    y_offs = pid_b * syb + c3 * syc + h3 * syh + w3 * syw
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_c3 & (h3 < H) & (w3 < W))


def _dwconv_wgrad_kernel(x_ptr, dy_ptr, dw_part_ptr, db_part_ptr, B, C, H, W, SPLITS,
                         sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                         K: tl.constexpr, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Partial weight/bias gradients of program (split s, channel block, batch b) over spatial tiles s, s+SPLITS, ...

    dw_part[(s*B + b), i*K + j, c] = sum dy[b, c, h, w] * act(x)[b, c, h + i - K//2, w + j - K//2];
    db_part[(s*B + b), c] = sum dy[b, c, h, w]. Both buffers are ACC_DTYPE; the caller sums over the first axis.
    act is GELU on each loaded tap when ACT (the fused modulation's input), else the identity.
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    n_tiles = (H + BLOCK_H - 1) // BLOCK_H * tiles_w
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c3 = offs_c[:, None, None]
    mask_c3 = mask_c[:, None, None]
    x_base = x_ptr + pid_b * sxb + c3 * sxc
    dy_base = dy_ptr + pid_b * sdb + c3 * sdc
    part_row = pid_s * B + pid_b

    acc = tl.full((BLOCK_C, BLOCK_H, BLOCK_W), 0, ACC_DTYPE)
    for t in range(pid_s, n_tiles, SPLITS):
        h3 = ((t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
        w3 = ((t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
        acc += tl.load(dy_base + h3 * sdh + w3 * sdw, mask=mask_c3 & (h3 < H) & (w3 < W), other=0.0).to(ACC_DTYPE)
    tl.store(db_part_ptr + part_row * C + offs_c, tl.reduce(tl.reduce(acc, 2, _SUM), 1, _SUM), mask=mask_c)

    for tap in range(K * K):
        di = tap // K - K // 2
        dj = tap % K - K // 2
        acc = tl.full((BLOCK_C, BLOCK_H, BLOCK_W), 0, ACC_DTYPE)
        for t in range(pid_s, n_tiles, SPLITS):
            h3 = ((t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
            w3 = ((t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
            out_mask = mask_c3 & (h3 < H) & (w3 < W)
            dyv = tl.load(dy_base + h3 * sdh + w3 * sdw, mask=out_mask, other=0.0).to(ACC_DTYPE)
            in_h = h3 + di
            in_w = w3 + dj
            in_mask = out_mask & (in_h >= 0) & (in_h < H) & (in_w >= 0) & (in_w < W)
            xv = tl.load(x_base + in_h * sxh + in_w * sxw, mask=in_mask, other=0.0).to(ACC_DTYPE)
            if ACT:
                xv = 0.5 * xv * (1.0 + tl.erf(xv * 0.7071067811865476))
            acc += dyv * xv
        tl.store(dw_part_ptr + (part_row * (K * K) + tap) * C + offs_c, tl.reduce(tl.reduce(acc, 2, _SUM), 1, _SUM),
                 mask=mask_c)


class _Kernels(NamedTuple):
    forward: object
    weight_grad: object


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> _Kernels:
    """Jit the kernels for the current mode; ``interpret`` is part of the cache key, triton reads it while jitting."""
    assert interpret == interpreter_enabled()
    return _Kernels(triton.jit(_dwconv_fwd_kernel), triton.jit(_dwconv_wgrad_kernel))


# --------------------------------------------------------------------------------------------------------- launchers

def _launch_mode(x: Tensor, op: str) -> bool:
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


def _require_launchable(x: Tensor) -> _Kernels:
    """The kernels for ``x``'s device, or a RuntimeError saying what is missing."""
    return _kernels(_launch_mode(x, 'depthwise_conv2d'))


def _is_channels_last(x: Tensor) -> bool:
    """True when channels move faster in memory than width (NHWC-like strides, also for sliced NHWC views)."""
    return x.stride(1) < x.stride(3)


def _empty_output(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x``: channels_last for NHWC-like ``x``, else contiguous (as F.conv2d does)."""
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile_config(channels: int, height: int, width: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W): wide along the contiguous dimension, about 1-2k elements per program."""
    if channels_last:
        return min(32, _next_pow2(channels)), min(4, _next_pow2(height)), min(8, _next_pow2(width))
    block_h, block_w = min(8, _next_pow2(height)), min(32, _next_pow2(width))
    return min(_next_pow2(channels), max(1, 1024 // (block_h * block_w))), block_h, block_w


class TileConfig(NamedTuple):
    """The work of one Triton program: a BLOCK_C x BLOCK_H x BLOCK_W tile (each a power of two), run by ``num_warps``
    warps. The launchers take one to override the shape heuristic (``_tile_config``), e.g. for autotuning."""
    block_c: int
    block_h: int
    block_w: int
    num_warps: int = 4

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_H=self.block_h, BLOCK_W=self.block_w, num_warps=self.num_warps)


def _resolve_tile(x: Tensor, tile: Optional[TileConfig]) -> TileConfig:
    """``tile`` checked (ValueError naming the bad field), or the heuristic's tile for ``x`` with 4 warps."""
    if tile is None:
        return TileConfig(*_tile_config(x.shape[1], x.shape[2], x.shape[3], _is_channels_last(x)))
    tile = TileConfig(*tile)
    for name, value in zip(TileConfig._fields, tile):
        limit = 32 if name == 'num_warps' else 1024
        if not isinstance(value, int) or value < 1 or value & (value - 1) or value > limit:
            raise ValueError(f'tile {name} must be a power of two in [1, {limit}], got {value!r}')
    if tile.block_c * tile.block_h * tile.block_w > 8192:
        raise ValueError(f'tile {tile.block_c}x{tile.block_h}x{tile.block_w} has more than 8192 elements')
    return tile


def _accumulator_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype as (torch, triton): float64 for float64 inputs (gradcheck), float32 otherwise."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _taps_by_channel(weight: Tensor) -> Tensor:
    """(C, 1, K, K) weight -> contiguous (K*K, C), so each tap's channel block is one contiguous load."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _launch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool,
                    tile: Optional[TileConfig] = None) -> Tensor:
    """Depthwise correlation of ``x`` with ``weight`` (spatially flipped when ``flip``), plus ``bias``; ``tile``
    overrides the tile heuristic."""
    kernels = _require_launchable(x)
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    y = _empty_output(x)
    if y.numel() == 0:
        return y
    tile = _resolve_tile(x, tile)
    grid = (triton.cdiv(height, tile.block_h) * triton.cdiv(width, tile.block_w), triton.cdiv(channels, tile.block_c),
            batch)
    w_taps = _taps_by_channel(weight)
    kernels.forward[grid](
        x, w_taps, w_taps if bias is None else bias.contiguous(), y, channels, height, width, *x.stride(), *y.stride(),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, ACC_DTYPE=_accumulator_dtypes(x.dtype)[1], **tile.launch_kwargs())
    return y


def _weight_grad_splits(batch: int, channel_blocks: int, n_tiles: int, device: torch.device) -> int:
    """How many programs share one (batch, channel block): enough for ~4 waves on a GPU, one on the interpreter."""
    if device.type != 'cuda':
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(target, batch * channel_blocks)))


def _launch_weight_grad(grad_y: Tensor, x: Tensor, k: int, splits: Optional[int] = None,
                        act: bool = False, tile: Optional[TileConfig] = None) -> tuple[Tensor, Tensor]:
    """(grad_weight (C, 1, k, k), grad_bias (C,)) in x's dtype of the depthwise conv of x (GELU(x) when ``act``);
    ``splits`` (for tests) and ``tile`` (for autotuning) override the heuristics."""
    kernels = _require_launchable(x)
    batch, channels, height, width = x.shape
    tile = _resolve_tile(x, tile)
    channel_blocks = triton.cdiv(channels, tile.block_c)
    n_tiles = triton.cdiv(height, tile.block_h) * triton.cdiv(width, tile.block_w)
    if splits is None:
        splits = _weight_grad_splits(batch, channel_blocks, n_tiles, x.device)
    acc_torch, acc_triton = _accumulator_dtypes(x.dtype)
    dw_part = torch.zeros(splits * batch, k * k, channels, device=x.device, dtype=acc_torch)
    db_part = torch.zeros(splits * batch, channels, device=x.device, dtype=acc_torch)
    if x.numel() > 0:
        kernels.weight_grad[(splits, channel_blocks, batch)](
            x, grad_y, dw_part, db_part, batch, channels, height, width, splits, *x.stride(), *grad_y.stride(),
            K=k, ACT=act, ACC_DTYPE=acc_triton, **tile.launch_kwargs())
    grad_weight = dw_part.sum(0).t().contiguous().view(channels, 1, k, k).to(x.dtype)
    return grad_weight, db_part.sum(0).to(x.dtype)


# ----------------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op('conv2former::depthwise_conv2d', mutates_args=())
def _depthwise_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _launch_forward(x, weight, bias, flip=False)


@_depthwise_conv2d_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _empty_output(x)


@torch.library.custom_op('conv2former::depthwise_conv2d_input_grad', mutates_args=())
def _input_grad_op(grad_y: Tensor, weight: Tensor) -> Tensor:
    return _launch_forward(grad_y, weight, None, flip=True)


@_input_grad_op.register_fake
def _(grad_y: Tensor, weight: Tensor) -> Tensor:
    return _empty_output(grad_y)


@torch.library.custom_op('conv2former::depthwise_conv2d_weight_grad', mutates_args=())
def _weight_grad_op(grad_y: Tensor, x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    return _launch_weight_grad(grad_y, x, kernel_size)


@_weight_grad_op.register_fake
def _(grad_y: Tensor, x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    channels = x.shape[1]
    return x.new_empty(channels, 1, kernel_size, kernel_size), x.new_empty(channels)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_x = _input_grad_op(grad_y, weight) if need_x else None
    grad_w = grad_b = None
    if need_w or need_b:
        grad_w, grad_b = _weight_grad_op(grad_y, x, weight.shape[-1])
    return grad_x, grad_w if need_w else None, grad_b if ctx.has_bias and need_b else None


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------- public API

def _validate(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str = 'depthwise_conv2d', x_name: str = 'input',
              others: tuple = ()) -> None:
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


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Triton depthwise conv: ``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, differentiable and compilable.

    Args:
        x: (B, C, H, W), NCHW or channels_last, float32/float16/bfloat16/float64, on CUDA (or CPU with
            ``TRITON_INTERPRET=1``).
        weight: (C, 1, k, k) with odd k in [3, 31], same dtype and device as x.
        bias: (C,) or None.

    Returns:
        (B, C, H, W) in x's dtype and memory format; sums accumulate in float32 (float64 for float64 inputs).

    Inside ``torch.autocast`` floating-point inputs are cast to the autocast dtype first, as F.conv2d does.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias))
    _validate(x, weight, bias)
    return _depthwise_conv2d_op(x, weight, bias)
