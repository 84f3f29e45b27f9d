"""Large-kernel depthwise 2-D convolution in Triton, registered as a ``torch.library`` custom op.

``depthwise_conv2d(x, weight, bias)`` equals ``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for an odd square
kernel ``k`` in [3, 31], stride 1 and dilation 1. The kernels address tensors through their strides, so one kernel
serves NCHW and channels_last (NHWC) inputs; the output keeps the input's memory format. Gradients for x, weight and
bias are Triton kernels too; the weight/bias gradient is deterministic (per-program partial sums reduced by torch.sum).
Sums accumulate in float32 (float64 for float64 inputs, so ``torch.autograd.gradcheck`` works).

The kernels below are plain functions, jitted on first use for the launch mode by their ``launch.KernelSet``
(``KERNELS``); what this module shares with ``convmod`` (tiles, grid, launch mode, the tile opening and the k x k
sum of the kernels, validation) is in ``launch``. Postponed annotations (``from __future__ import annotations``) let
the kernels' ``tl.constexpr`` parameters be defined when triton is not installed.

Which constexpr combinations are launched: the forward kernel with FLIP=False (forward, HAS_BIAS as the layer) and
FLIP=True, HAS_BIAS=False (input gradient); the weight-gradient kernel with ACT=False (this op) and ACT=True
(``convmod``'s GELU input). ACC_DTYPE is float32, float64 only for float64 inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .launch import (MAX_KERNEL_SIZE, MIN_KERNEL_SIZE, SUM_COMBINE, SUPPORTED_DTYPES, KernelSet, TileConfig,
                     accumulator_dtypes, depthwise_sum, empty_output, interpreter_enabled, launch_grid, sm_count,
                     taps_by_channel, tile_indices, tl, triton, triton_available, validate_inputs)

__all__ = ['depthwise_conv2d', 'launch_forward', 'launch_weight_grad', 'weight_grad_splits', 'KERNELS',
           'triton_available', 'interpreter_enabled', 'TileConfig', 'SUPPORTED_DTYPES', 'MIN_KERNEL_SIZE',
           'MAX_KERNEL_SIZE']

_SUM = SUM_COMBINE  # read by the kernels (a global of this module)

# ----------------------------------------------------------------------------------------------------- Triton kernels
def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """y[b, c, h, w] = bias[c] + sum_ij x[b, c, h + i - K//2, w + j - K//2] * w[i*K + j, c]; taps reversed if FLIP.

    Grid: (spatial tiles, channel blocks, batch). ``w`` is the weight laid out (K*K, C) so a tap's channel block is
    contiguous. Zero padding comes from masked loads; sums accumulate in ACC_DTYPE (float32, float64 for float64).
    """
    pid_b, c3, h3, w3, mask_c3, mask = tile_indices(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    acc = depthwise_sum(x_ptr + pid_b * sxb + c3 * sxc, sxh, sxw, w_ptr, C, H, W, c3, h3, w3, mask_c3, K, FLIP, False,
                        ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c3, mask=mask_c3, other=0.0).to(ACC_DTYPE)
    y_offs = pid_b * syb + c3 * syc + h3 * syh + w3 * syw
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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


# The kernels by role, jitted per launch mode, with the device functions the forward kernel calls.
KERNELS = KernelSet('dwconv', 'depthwise_conv2d', helpers=(tile_indices, depthwise_sum), forward=_dwconv_fwd_kernel,
                    weight_grad=_dwconv_wgrad_kernel)


# --------------------------------------------------------------------------------------------------------- launchers
def launch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool,
                   tile: Optional[TileConfig] = None) -> Tensor:
    """Depthwise correlation of ``x`` with ``weight`` (spatially flipped when ``flip``), plus ``bias``; ``tile``
    overrides the tile heuristic."""
    kernels = KERNELS.for_input(x)
    y = empty_output(x)
    if y.numel() == 0:
        return y
    grid, tile = launch_grid(x, tile)
    w_taps = taps_by_channel(weight)
    kernels.forward[grid](
        x, w_taps, w_taps if bias is None else bias.contiguous(), y, x.shape[1], x.shape[2], x.shape[3], *x.stride(),
        *y.stride(), K=weight.shape[-1], FLIP=flip, HAS_BIAS=bias is not None,
        ACC_DTYPE=accumulator_dtypes(x.dtype)[1], **tile.launch_kwargs())
    return y


def weight_grad_splits(batch: int, channel_blocks: int, n_tiles: int, sms: Optional[int]) -> int:
    """How many programs share one (batch, channel block) of the weight gradient: enough for ~4 waves on a GPU with
    ``sms`` SMs, one without a GPU (``sms`` None: the interpreter)."""
    if sms is None:
        return 1
    return max(1, min(n_tiles, triton.cdiv(4 * sms, batch * channel_blocks)))


def launch_weight_grad(grad_y: Tensor, x: Tensor, k: int, splits: Optional[int] = None,
                       act: bool = False, tile: Optional[TileConfig] = None) -> tuple[Tensor, Tensor]:
    """(grad_weight (C, 1, k, k), grad_bias (C,)) in x's dtype of the depthwise conv of x (GELU(x) when ``act``);
    ``splits`` (for tests) and ``tile`` (for autotuning) override the heuristics."""
    kernels = KERNELS.for_input(x)
    batch, channels, height, width = x.shape
    (n_tiles, channel_blocks, _), tile = launch_grid(x, tile)
    if splits is None:
        splits = weight_grad_splits(batch, channel_blocks, n_tiles, sm_count(x.device))
    acc_torch, acc_triton = accumulator_dtypes(x.dtype)
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
    return launch_forward(x, weight, bias, flip=False)


@_depthwise_conv2d_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return empty_output(x)


@torch.library.custom_op('conv2former::depthwise_conv2d_input_grad', mutates_args=())
def _input_grad_op(grad_y: Tensor, weight: Tensor) -> Tensor:
    return launch_forward(grad_y, weight, None, flip=True)


@_input_grad_op.register_fake
def _(grad_y: Tensor, weight: Tensor) -> Tensor:
    return empty_output(grad_y)


@torch.library.custom_op('conv2former::depthwise_conv2d_weight_grad', mutates_args=())
def _weight_grad_op(grad_y: Tensor, x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    return launch_weight_grad(grad_y, x, kernel_size)


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
    validate_inputs(x, weight, bias)
    return _depthwise_conv2d_op(x, weight, bias)
