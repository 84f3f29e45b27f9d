"""Fused convolutional modulation of Conv2Former in Triton, registered as a ``torch.library`` custom op.

``conv_modulation(a, v, weight, bias, act, fusion, weighting)`` returns ``fuse(w(DWConv_k(act(a)) + bias), v)`` with
``act`` the exact (erf) GELU or the identity, ``w`` the identity (``'none'``) or sigmoid (``'sigmoid'``) and ``fuse``
``A * v`` (``'mul'``) or ``A + v`` (``'sum'``): everything of ``ConvModulation`` between the 1x1 projections.

Forward: one kernel. Its prologue applies GELU to every loaded tap of ``a``, the k x k depthwise sum accumulates in
float32 (float64 for float64 inputs), then bias, weighting and, in the epilogue, the fusion with ``v`` before the only
store: neither GELU(a) nor the modulation map A is written to memory.

Backward: autograd saves only a, v, weight and bias; A is recomputed.
1. ``grad_pre`` kernel (the forward kernel in gradient mode): recomputes A at each output position and writes both
   ``dA_pre`` (the gradient of the conv output before the weighting) and ``dv``; skipped for ``sum``/``none``, where
   both equal the incoming gradient, and without the conv recompute when nothing needs A (``mul``/``none``, no dv).
2. ``grad_input`` kernel: transposed depthwise conv of ``dA_pre`` with GELU'(a) applied in its epilogue -> da.
3. ``grad_weight``: ``dwconv``'s weight/bias-gradient kernel of (GELU(a), dA_pre), with GELU applied to each loaded
   tap (its ``ACT`` variant). Kernel 2 is a variant of ``dwconv``'s input-gradient kernel with GELU' in its epilogue.

The per-map weightings ``'l1'`` and ``'minmax'`` need statistics over all positions of a map before any output can be
written, so they are not fused (``FUSED_WEIGHTINGS``); the model keeps its unfused path for them.

Kernels are jitted lazily by their ``launch.KernelSet`` (``KERNELS``), as in ``dwconv`` (``TRITON_INTERPRET`` is read
at jit time), and call only Triton builtins and ``launch.tile_indices``.

Which constexpr combinations of ``_convmod_kernel`` are launched (ACT, MUL, SIGMOID and HAS_BIAS free in each):
forward: GRAD=False, RECOMPUTE=True, STORE_OUT=True, STORE_DV=False; gradient mode: GRAD=True,
RECOMPUTE = SIGMOID or STORE_DV, STORE_DV only with MUL, STORE_OUT when dA_pre is needed, at least one store (the
backward skips the launch for ``sum``/``none`` when dv is not needed). ``_convmod_input_grad_kernel``: ACT free.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dwconv import launch_weight_grad
from .launch import (SUM_COMBINE, KernelSet, TileConfig, accumulator_dtypes, depthwise_sum, empty_output, launch_grid,
                     taps_by_channel, tile_indices, tl, validate_inputs)

__all__ = ['conv_modulation', 'launch_modulate', 'launch_input_grad', 'KERNELS', 'FUSED_WEIGHTINGS', 'FUSIONS']

FUSIONS = ('mul', 'sum')
FUSED_WEIGHTINGS = ('none', 'sigmoid')
_SUM = SUM_COMBINE  # read by the kernels (a global of this module); see launch: tl.sum is a jitted helper

# GELU constants are inlined as literals in the kernels (jitted code may read only constexpr globals):
# 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2*pi).


# ----------------------------------------------------------------------------------------------------- Triton kernels

def _convmod_kernel(a_ptr, v_ptr, w_ptr, b_ptr, g_ptr, out_ptr, dv_ptr, C, H, W,
                    sab, sac, sah, saw, svb, svc, svh, svw, sgb, sgc, sgh, sgw,
                    sob, soc, soh, sow, sdb, sdc, sdh, sdw,
                    K: tl.constexpr, ACT: tl.constexpr, SIGMOID: tl.constexpr, MUL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, GRAD: tl.constexpr, RECOMPUTE: tl.constexpr, STORE_OUT: tl.constexpr,
                    STORE_DV: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Forward (GRAD=False): out = fuse(w(bias + sum_ij act(a)[.., h+i-K//2, w+j-K//2] * wt[i*K+j, c]), v).

    Gradient mode (GRAD=True), g the gradient of the forward output: out = dA_pre = g * (v if MUL) * w'(pre), and
    dv = g * w(pre) when STORE_DV. The conv is recomputed only when RECOMPUTE (sigmoid, or dv of a product).
    Grid: (spatial tiles, channel blocks, batch); ``w`` is the weight laid out (K*K, C); all tensors by strides.
    """
    pid_b, c3, h3, w3, mask_c3, mask = tile_indices(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    if RECOMPUTE:
        att = depthwise_sum(a_ptr + pid_b * sab + c3 * sac, sah, saw, w_ptr, C, H, W, c3, h3, w3, mask_c3, K, False,
                            ACT, ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
        if HAS_BIAS:
            att += tl.load(b_ptr + c3, mask=mask_c3, other=0.0).to(ACC_DTYPE)
        if SIGMOID:
            att = 1.0 / (1.0 + tl.exp(-att))
    o_offs = pid_b * sob + c3 * soc + h3 * soh + w3 * sow
    if GRAD:
        g = tl.load(g_ptr + pid_b * sgb + c3 * sgc + h3 * sgh + w3 * sgw, mask=mask, other=0.0).to(ACC_DTYPE)
        if STORE_OUT:
            d_pre = g
            if MUL:
                d_pre = g * tl.load(v_ptr + pid_b * svb + c3 * svc + h3 * svh + w3 * svw, mask=mask,
                                    other=0.0).to(ACC_DTYPE)
            if SIGMOID:
                d_pre = d_pre * att * (1.0 - att)
            tl.store(out_ptr + o_offs, d_pre.to(out_ptr.dtype.element_ty), mask=mask)
        if STORE_DV:
            tl.store(dv_ptr + pid_b * sdb + c3 * sdc + h3 * sdh + w3 * sdw, (g * att).to(dv_ptr.dtype.element_ty),
                     mask=mask)
    else:
        vv = tl.load(v_ptr + pid_b * svb + c3 * svc + h3 * svh + w3 * svw, mask=mask, other=0.0).to(ACC_DTYPE)
        if MUL:
            res = att * vv
        else:
            res = att + vv
        tl.store(out_ptr + o_offs, res.to(out_ptr.dtype.element_ty), mask=mask)


def _convmod_input_grad_kernel(g_ptr, a_ptr, w_ptr, da_ptr, C, H, W,
                               sgb, sgc, sgh, sgw, sab, sac, sah, saw, sdb, sdc, sdh, sdw,
                               K: tl.constexpr, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """da = (sum_ij g[.., h+i-K//2, w+j-K//2] * wt[K*K-1 - (i*K+j), c]) * (GELU'(a) if ACT else 1).

    The transposed depthwise conv (correlation with the flipped kernel) of dwconv's input gradient, with the GELU
    derivative Phi(a) + a * phi(a) applied to each output before the store.
    """
    pid_b, c3, h3, w3, mask_c3, mask = tile_indices(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    acc = depthwise_sum(g_ptr + pid_b * sgb + c3 * sgc, sgh, sgw, w_ptr, C, H, W, c3, h3, w3, mask_c3, K, True, False,
                        ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
    if ACT:
        x = tl.load(a_ptr + pid_b * sab + c3 * sac + h3 * sah + w3 * saw, mask=mask, other=0.0).to(ACC_DTYPE)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        acc = acc * (cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327)
    tl.store(da_ptr + pid_b * sdb + c3 * sdc + h3 * sdh + w3 * sdw, acc.to(da_ptr.dtype.element_ty), mask=mask)


# The kernels by role, jitted per launch mode; the weight gradient is dwconv's kernel (ACT=True).
KERNELS = KernelSet('convmod', 'conv_modulation', helpers=(tile_indices, depthwise_sum), modulate=_convmod_kernel,
                    input_grad=_convmod_input_grad_kernel)


# --------------------------------------------------------------------------------------------------------- launchers

def launch_modulate(a: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor], act: bool, fusion: str,
                    weighting: str, grad: Optional[Tensor] = None, need_pre: bool = False,
                    need_dv: bool = False, tile: Optional[TileConfig] = None) -> list[Tensor]:
    """Forward ([M]) when ``grad`` is None, else the gradient mode: [dA_pre if need_pre] + [dv if need_dv];
    ``tile`` overrides the tile heuristic."""
    kernels = KERNELS.for_input(a)
    sigmoid, mul = weighting == 'sigmoid', fusion == 'mul'
    if grad is None:
        out, dv, recompute = empty_output(a), None, True
        outputs = [out]
    else:
        need_dv = need_dv and mul  # dv of a sum is the incoming gradient itself
        out = empty_output(a) if need_pre else None
        dv = empty_output(v) if need_dv else None
        recompute = sigmoid or need_dv
        outputs = [t for t in (out, dv) if t is not None]
    if a.numel() == 0 or not outputs:
        return outputs
    grid, tile = launch_grid(a, tile)
    w_taps = taps_by_channel(weight)
    out_ = out if out is not None else outputs[0]
    kernels.modulate[grid](
        a, v, w_taps, w_taps if bias is None else bias.contiguous(), a if grad is None else grad, out_,
        dv if dv is not None else out_, a.shape[1], a.shape[2], a.shape[3], *a.stride(), *v.stride(),
        *(a if grad is None else grad).stride(), *out_.stride(), *(dv if dv is not None else out_).stride(),
        K=weight.shape[-1], ACT=act, SIGMOID=sigmoid, MUL=mul, HAS_BIAS=bias is not None, GRAD=grad is not None,
        RECOMPUTE=recompute, STORE_OUT=out is not None, STORE_DV=dv is not None,
        ACC_DTYPE=accumulator_dtypes(a.dtype)[1], **tile.launch_kwargs())
    return outputs


def launch_input_grad(grad_pre: Tensor, a: Tensor, weight: Tensor, act: bool,
                      tile: Optional[TileConfig] = None) -> Tensor:
    """da = transposed depthwise conv of ``grad_pre`` times GELU'(a) (times 1 without ``act``), in a's layout;
    ``tile`` overrides the tile heuristic."""
    kernels = KERNELS.for_input(a)
    da = empty_output(a)
    if da.numel() == 0:
        return da
    grid, tile = launch_grid(a, tile)
    kernels.input_grad[grid](
        grad_pre, a, taps_by_channel(weight), da, a.shape[1], a.shape[2], a.shape[3], *grad_pre.stride(),
        *a.stride(), *da.stride(), K=weight.shape[-1], ACT=act, ACC_DTYPE=accumulator_dtypes(a.dtype)[1],
        **tile.launch_kwargs())
    return da


# ----------------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op('conv2former::conv_modulation', mutates_args=())
def _conv_modulation_op(a: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor], act: bool, fusion: str,
                        weighting: str) -> Tensor:
    return launch_modulate(a, v, weight, bias, act, fusion, weighting)[0]


@_conv_modulation_op.register_fake
def _(a, v, weight, bias, act, fusion, weighting):
    return empty_output(a)


@torch.library.custom_op('conv2former::conv_modulation_grad_pre', mutates_args=())
def _grad_pre_op(grad: Tensor, a: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor], act: bool, fusion: str,
                 weighting: str, need_pre: bool, need_dv: bool) -> list[Tensor]:
    return launch_modulate(a, v, weight, bias, act, fusion, weighting, grad, need_pre, need_dv)


@_grad_pre_op.register_fake
def _(grad, a, v, weight, bias, act, fusion, weighting, need_pre, need_dv):
    return [empty_output(a)] * need_pre + [empty_output(v)] * (need_dv and fusion == 'mul')


@torch.library.custom_op('conv2former::conv_modulation_grad_input', mutates_args=())
def _grad_input_op(grad_pre: Tensor, a: Tensor, weight: Tensor, act: bool) -> Tensor:
    return launch_input_grad(grad_pre, a, weight, act)


@_grad_input_op.register_fake
def _(grad_pre, a, weight, act):
    return empty_output(a)


@torch.library.custom_op('conv2former::conv_modulation_grad_weight', mutates_args=())
def _grad_weight_op(grad_pre: Tensor, a: Tensor, kernel_size: int, act: bool) -> tuple[Tensor, Tensor]:
    return launch_weight_grad(grad_pre, a, kernel_size, act=act)  # dwconv's, GELU on each loaded tap


@_grad_weight_op.register_fake
def _(grad_pre, a, kernel_size, act):
    channels = a.shape[1]
    return a.new_empty(channels, 1, kernel_size, kernel_size), a.new_empty(channels)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    a, v, weight, bias, act, fusion, weighting = inputs
    ctx.save_for_backward(a, v, weight, bias)  # A and GELU(a) are recomputed, never saved
    ctx.config = (act, fusion, weighting)


def _backward(ctx, grad: Tensor) -> tuple:
    a, v, weight, bias = ctx.saved_tensors
    act, fusion, weighting = ctx.config
    need_a, need_v, need_w, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and bias is not None
    need_pre = need_a or need_w or need_b
    grad_pre = grad_v = None
    if fusion == 'sum' and weighting == 'none':  # dA_pre = dv = grad: nothing to recompute
        grad_pre, grad_v = grad, grad
    else:
        need_dv = need_v and fusion == 'mul'  # dv of a sum is the incoming gradient
        outs = _grad_pre_op(grad, a, v, weight, bias, act, fusion, weighting, need_pre, need_dv) \
            if need_pre or need_dv else []
        grad_pre = outs[0] if need_pre else None
        grad_v = outs[-1] if need_dv else grad
    grad_a = _grad_input_op(grad_pre, a, weight, act) if need_a else None
    grad_w = grad_b = None
    if need_w or need_b:
        grad_w, grad_b = _grad_weight_op(grad_pre, a, weight.shape[-1], act)
    return (grad_a, grad_v if need_v else None, grad_w if need_w else None, grad_b if need_b else None,
            None, None, None)


_conv_modulation_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------- public API

def _validate(a: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor], act, fusion, weighting) -> None:
    """Raise ValueError naming what was expected and what came."""
    if weighting not in FUSED_WEIGHTINGS:
        raise ValueError(f'conv_modulation fuses the weightings {FUSED_WEIGHTINGS} only, got {weighting!r} '
                         "('l1' and 'minmax' need per-map statistics: use the unfused path for them)")
    if fusion not in FUSIONS:
        raise ValueError(f'conv_modulation fusion must be one of {FUSIONS}, got {fusion!r}')
    if not isinstance(act, bool):
        raise ValueError(f'conv_modulation act must be a bool (GELU or identity), got {act!r}')
    if v.shape != a.shape:
        raise ValueError(f'conv_modulation expects a and v of the same shape, got {tuple(a.shape)} and '
                         f'{tuple(v.shape)}')
    validate_inputs(a, weight, bias, op='conv_modulation', x_name='input a', others=(('v', v),))


def conv_modulation(a: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: bool = True,
                    fusion: str = 'mul', weighting: str = 'none') -> Tensor:
    """Fused ``fuse(w(F.conv2d(act(a), weight, bias, padding=k // 2, groups=C)), v)``, differentiable and compilable.

    Args:
        a: (B, C, H, W) pre-activation of the modulation branch (``a_proj(x)``), NCHW or channels_last,
            float32/float16/bfloat16 (float64 for gradcheck), on CUDA (or CPU with ``TRITON_INTERPRET=1``).
        v: (B, C, H, W) value branch (``v_proj(x)``), same shape, dtype and device as ``a``.
        weight: (C, 1, k, k) depthwise weight, odd k in [3, 31]. bias: (C,) or None.
        act: exact (erf) GELU on ``a`` before the conv (upstream) or the identity.
        fusion: ``'mul'`` (A * v) or ``'sum'`` (A + v). weighting: ``'none'`` or ``'sigmoid'`` (``FUSED_WEIGHTINGS``).

    Returns:
        (B, C, H, W) in a's dtype and memory format; sums accumulate in float32 (float64 for float64 inputs).

    Inside ``torch.autocast`` floating-point inputs are cast to the autocast dtype first, as F.conv2d would do.
    """
    if torch.is_autocast_enabled(a.device.type):
        dtype = torch.get_autocast_dtype(a.device.type)
        a, v, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point() else t
                              for t in (a, v, weight, bias))
    _validate(a, v, weight, bias, act, fusion, weighting)
    return _conv_modulation_op(a, v, weight, bias, act, fusion, weighting)
