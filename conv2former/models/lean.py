"""Lean backward for the Conv2Former block: store few tensors, recompute the cheap ones in backward.

Plain autograd keeps 27 or more floats per channel and pixel for each block: the LayerNorm outputs, W1's output and
its GELU, A, V and A ⊙ V, the MLP's four 4C-wide tensors (fc1 output, its GELU, the 3x3 depthwise output and its
GELU) and their sum. Each branch of the block here is one ``torch.autograd.Function`` whose forward runs the very
same modules (outputs are bit-identical) but saves only

- modulation branch: the block input x, W1's output a, the depthwise conv's output A (the fused Triton path: not A,
  its kernel recomputes it, as it does without the lean backward) and V;
- MLP branch: its input (the mid-block sum) and fc1's output (4C).

That is 9 floats per channel and pixel (ConvNeXt keeps 12-13). Backward recomputes LayerNorm, the GELUs, A ⊙ V
(weighting and fusion), the MLP's 3x3 depthwise branch and its sum; none of them is a matrix product, and no
convolution is differentiated twice. The layer scale's gradient needs the projection's output, which is not kept:
with M = Σ g ⊗ m (the weight gradient of the unscaled projection) it is ``Σ_k W[c, k] M[c, k] + b_c Σ g_c``, and the
weight gradient is ``γ_c M[c, k]``.

Backward is cheaper than plain autograd's on CPU, which pays for the recomputation: GELU and its derivative run on
contiguous NHWC views of the channels-last activations (PyTorch's CPU kernels are several times faster there), the
1x1 convs' gradients are two matrix products on those views, and the k x k (k >= 7) depthwise conv's weight gradient
is one grouped convolution (oneDNN's is many times slower than the conv itself). On CUDA the convolutions are
differentiated by ``convolution_backward`` (cuDNN) or the Triton ops, as plain autograd does.

Gradients equal plain autograd's up to float rounding (float64 ``gradcheck`` passes). Autocast is replayed in backward
as forward ran. With ``create_graph=True`` (double backward), or when the block's parameters are no longer those
forward used (``torch.func.functional_call``), the branch is recomputed with a graph from the saved input and the
saved parameters and differentiated like a checkpoint. TorchScript, FX tracing, ``torch.compile``/export,
``torch.jit.trace``, ``torch.func`` transforms and forward-mode AD use the plain path
(``Conv2FormerBlock._use_lean``).
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import LayerScale2d

from ..ops import kernel_backend

__all__ = ['modulation_branch', 'mlp_branch', 'lean_supported']


def lean_supported(block: nn.Module) -> bool:
    """Whether the block's parts are those the lean branches know how to differentiate."""
    scales_ok = all(isinstance(ls, nn.Identity) or (isinstance(ls, LayerScale2d) and not ls.inplace)
                    for ls in (block.ls1, block.ls2))
    acts_ok = not any(True for act in (block.attn.a_act, block.mlp.act) for _ in act.parameters())
    mlp_dw = block.mlp.dwconv
    return scales_ok and acts_ok and (mlp_dw is None or isinstance(mlp_dw, nn.Conv2d))


def _leaf(t: Tensor, requires_grad: bool = True) -> Tensor:
    return t.detach().requires_grad_(requires_grad)


def _vjp(output: Tensor, inputs: Sequence[Optional[Tensor]], grad: Tensor,
         create_graph: bool = False) -> List[Optional[Tensor]]:
    """Gradients of ``output`` (with incoming ``grad``) for each input; None for inputs that do not need one."""
    want = [t for t in inputs if t is not None and t.requires_grad]
    if not want or not output.requires_grad:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(output, want, grad, allow_unused=True, create_graph=create_graph))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and conv.dilation == (1, 1))


def _raw_conv_grads(grad: Tensor, inp: Tensor, conv: nn.Conv2d, weight: Tensor,
                    mask: List[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad input, grad weight, grad bias) of ``conv`` in ``grad``'s dtype; the input gradient goes through
    ``weight``. A 1x1 conv is differentiated as two matrix products on channels-last views (faster on CPU than
    ``convolution_backward``, which for channels-last 1x1 convs takes a slow path); others by
    ``convolution_backward``, as autograd would."""
    dtype = grad.dtype
    if _is_pointwise(conv):
        batch, c_out, height, width = grad.shape
        g2 = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c_out)
        gi = gw = gb = None
        if mask[0]:
            c_in = weight.shape[1]
            gi = (g2 @ weight.reshape(c_out, c_in).to(dtype)).view(batch, height, width, c_in).permute(0, 3, 1, 2)
        if mask[1]:
            x2 = inp.to(dtype).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            gw = (g2.t() @ x2.reshape(-1, x2.shape[-1])).view(conv.weight.shape)
        if mask[2]:
            gb = g2.sum(0)
        return gi, gw, gb
    bias = conv.bias
    return torch.ops.aten.convolution_backward(
        grad, inp.to(dtype), weight.to(dtype), None if bias is None else [weight.shape[0]], list(conv.stride),
        list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups, mask)


def _conv_backward(grad: Tensor, inp: Tensor, conv: nn.Conv2d,
                   need_input: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad input, grad weight, grad bias) of ``conv``, computed in ``grad``'s dtype as autocast ran the conv;
    the gradients come back in the dtypes of ``inp`` and of the parameters."""
    bias = conv.bias
    mask = [need_input, conv.weight.requires_grad, bias is not None and bias.requires_grad]
    if not any(mask):
        return None, None, None
    gi, gw, gb = _raw_conv_grads(grad, inp, conv, conv.weight, mask)
    return (gi.to(inp.dtype) if mask[0] else None, gw.to(conv.weight.dtype) if mask[1] else None,
            gb.to(bias.dtype) if mask[2] else None)


def _project_backward(grad: Tensor, inp: Tensor, conv: nn.Conv2d, scale: nn.Module, out_dtype: torch.dtype,
                      grads: Dict[int, Optional[Tensor]]) -> Tensor:
    """Backward of ``scale(conv(inp))`` (a 1x1 conv and a layer scale or identity): fills ``grads`` for their
    parameters and returns the gradient of ``inp``. The conv's output is not needed (see the module docstring)."""
    g = grad.to(out_dtype)
    if isinstance(scale, nn.Identity):
        dinp, grads[id(conv.weight)], db = _conv_backward(g, inp, conv, True)
        if conv.bias is not None:
            grads[id(conv.bias)] = db
        return dinp
    gamma = scale.gamma
    w = conv.weight
    bias = conv.bias
    # input gradient through W * gamma; weight gradient M and bias gradient of the *unscaled* conv
    dinp, m_grad, g_sum = _raw_conv_grads(g, inp, conv, w * gamma.view(-1, 1, 1, 1),
                                          [True, w.requires_grad or gamma.requires_grad, bias is not None])
    if m_grad is not None:
        m_grad = m_grad.to(w.dtype)
        if w.requires_grad:
            grads[id(w)] = m_grad * gamma.view(-1, 1, 1, 1).to(w.dtype)
    if bias is not None:
        g_sum = g_sum.to(bias.dtype)
        if bias.requires_grad:
            grads[id(bias)] = g_sum * gamma.to(bias.dtype)
    if gamma.requires_grad:
        dgamma = (w.flatten(1) * m_grad.flatten(1)).sum(1)
        if bias is not None:
            dgamma = dgamma + bias * g_sum
        grads[id(gamma)] = dgamma.to(gamma.dtype)
    return dinp.to(inp.dtype)


def _nhwc(t: Tensor) -> Optional[Tensor]:
    """The contiguous NHWC view of a channels-last (and not NCHW-contiguous) 4-D tensor, else None."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1)
    return None


def _gelu(act: nn.GELU, inp: Tensor) -> Tensor:
    """GELU for backward's use. On a channels-last tensor it runs on the contiguous NHWC view: PyTorch's CPU kernel
    is several times faster on contiguous memory (results may differ from the strided kernel's in the last bit;
    the forward keeps the module's own call, so its outputs are unchanged)."""
    view = _nhwc(inp)
    if view is None:
        return act(inp)
    return torch.nn.functional.gelu(view, approximate=act.approximate).permute(0, 3, 1, 2)


def _act_backward(act: nn.Module, inp: Tensor, out: Tensor, grad: Tensor) -> Tensor:
    """Gradient through ``out = act(inp)``: GELU's own backward kernel for nn.GELU (on contiguous NHWC views of
    channels-last tensors, see ``_gelu``), else autograd on ``out``'s graph (``inp`` is then a leaf)."""
    if isinstance(act, nn.Identity):
        return grad
    if type(act) is nn.GELU:
        view = _nhwc(inp)
        if view is None:
            return torch.ops.aten.gelu_backward(grad, inp, approximate=act.approximate)
        grad = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return torch.ops.aten.gelu_backward(grad, view, approximate=act.approximate).permute(0, 3, 1, 2)
    return _vjp(out, [inp], grad)[0]


def _act(act: nn.Module, inp: Tensor) -> Tuple[Tensor, Tensor]:
    """(input, act(input)) for ``_act_backward``: a leaf with a graph only for activations other than GELU."""
    if isinstance(act, nn.Identity):
        return inp, inp
    if type(act) is nn.GELU:
        return inp, _gelu(act, inp)
    leaf = _leaf(inp)
    with torch.enable_grad():
        return leaf, act(leaf)


def _depthwise_weight_grad(grad: Tensor, inp: Tensor, kernel_size: int) -> Tensor:
    """Weight gradient (C, 1, k, k) of a "same" depthwise conv, as one grouped convolution of the input with the
    output gradient as kernel (per image and channel), summed over the batch. On CPU this is 2-40x faster than
    oneDNN's depthwise weight gradient for k >= 7 (which is many times slower than the conv itself)."""
    batch, channels, height, width = inp.shape
    x = inp.transpose(0, 1).reshape(1, channels * batch, height, width)
    g = grad.transpose(0, 1).reshape(channels * batch, 1, height, width)
    out = torch.nn.functional.conv2d(x, g, padding=kernel_size // 2, groups=channels * batch)
    return out.view(channels, batch, kernel_size, kernel_size).sum(1, keepdim=True)


def _dwconv_backward(grad: Tensor, inp: Tensor, dwconv: nn.Conv2d, backend: str,
                     grads: Dict[int, Optional[Tensor]]) -> Tensor:
    """Backward of the modulation's k x k depthwise conv on the backend its forward ran on."""
    weight, bias = dwconv.weight, dwconv.bias
    need_w, need_b = weight.requires_grad, bias is not None and bias.requires_grad
    if backend == 'triton':
        w = weight.to(grad.dtype)
        dinp = torch.ops.conv2former.depthwise_conv2d_input_grad(grad, w)
        if need_w or need_b:
            gw, gb = torch.ops.conv2former.depthwise_conv2d_weight_grad(grad, inp.to(grad.dtype), w.shape[-1])
            grads[id(weight)] = gw.to(weight.dtype)
            if bias is not None:
                grads[id(bias)] = gb.to(bias.dtype)
        return dinp.to(inp.dtype)
    k = weight.shape[-1]
    if grad.device.type != 'cpu' or k < 7:
        dinp, grads[id(weight)], db = _conv_backward(grad, inp, dwconv, True)
        if bias is not None:
            grads[id(bias)] = db
        return dinp
    dinp = _raw_conv_grads(grad, inp, dwconv, weight, [True, False, False])[0].to(inp.dtype)
    if need_w:
        grads[id(weight)] = _depthwise_weight_grad(grad, inp.to(grad.dtype), k).to(weight.dtype)
    if need_b:
        grads[id(bias)] = grad.sum((0, 2, 3)).to(bias.dtype)
    return dinp


class _AutocastState:
    """Autocast as forward saw it, replayed in backward (what ``torch.amp.custom_bwd`` does for one device type)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        try:
            self.enabled = torch.is_autocast_enabled(device_type)
            self.dtype = torch.get_autocast_dtype(device_type)
        except RuntimeError:  # a device type without autocast
            self.enabled, self.dtype = False, None

    def __call__(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


_MODULATION_PARTS = ('norm1', 'attn.a_proj', 'attn.dwconv', 'attn.v_proj', 'attn.proj', 'ls1')
_MLP_PARTS = ('norm2', 'mlp.fc1', 'mlp.dwconv', 'mlp.fc2', 'ls2')


def _named_params(block: nn.Module, parts: Sequence[str]) -> List[Tuple[str, Tensor]]:
    """(name in ``block``, tensor) of the parameters a branch uses, in a fixed order."""
    named = []
    for part in parts:
        module = block
        for attr in part.split('.'):
            module = getattr(module, attr)
        if module is not None:
            named.extend((f'{part}.{name}', p) for name, p in module.named_parameters())
    return named


def _plain_modulation(block: nn.Module, x: Tensor) -> Tensor:
    return block.ls1(block.attn(block.norm1(x)))


def _plain_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return block.ls2(block.mlp(block.norm2(x)))


def _saved_params(ctx, saved: Sequence[Tensor], parts: Sequence[str],
                  first: int) -> Tuple[List[str], List[Tensor], bool]:
    """The parameters forward used (``saved`` from index ``first``), their names, and whether the block still holds
    exactly these (False under ``torch.func.functional_call`` or after parameters were replaced)."""
    params = list(saved[first:])
    named = _named_params(ctx.block, parts)
    same = len(named) == len(params) and all(p is q for (_, p), q in zip(named, params))
    return [name for name, _ in named], params, same


def _recompute_backward(ctx, grad: Tensor, plain, x: Tensor, names: List[str], params: List[Tensor]) -> tuple:
    """Recompute the branch with a graph, from the saved input and with the parameters forward used, and
    differentiate it: for ``create_graph=True`` (double backward) and for parameters swapped since forward."""
    from torch.nn.utils.stateless import _reparametrize_module

    create_graph = torch.is_grad_enabled()
    with torch.enable_grad(), ctx.autocast(), _reparametrize_module(ctx.block, dict(zip(names, params))):
        x_ = x if create_graph and x.requires_grad else _leaf(x, ctx.needs_input_grad[0])
        out = plain(ctx.block, x_)
    grads = _vjp(out, [x_] + params, grad, create_graph=create_graph)
    return (grads[0] if ctx.needs_input_grad[0] else None, None, *grads[1:])


class _ModulationBranch(torch.autograd.Function):
    """``ls1(attn(norm1(x)))`` saving x, a, A (unless fused) and V."""

    @staticmethod
    def forward(ctx, x: Tensor, block: nn.Module, *params: Tensor) -> Tensor:
        attn = block.attn
        y = block.norm1(x)
        a = attn.a_proj(y)
        v = attn.v_proj(y)
        if attn.fused:
            pre = None
            m = attn.fused_modulation(a, v)
        else:
            act_a = attn.a_act(a)
            ctx.backend = kernel_backend(act_a, attn.dwconv.kernels)
            pre = attn.dwconv(act_a)
            m = attn.fuse(pre, v)
        p = attn.proj(m)
        ctx.block, ctx.out_dtype, ctx.autocast = block, p.dtype, _AutocastState(x.device.type)
        ctx.save_for_backward(x, a, v, pre, *params)
        return block.ls1(p)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        block = ctx.block
        saved = ctx.saved_tensors  # read once (non-reentrant checkpointing allows no more)
        x, a, v, pre = saved[:4]
        names, params, same = _saved_params(ctx, saved, _MODULATION_PARTS, 4)
        if torch.is_grad_enabled() or not same:
            return _recompute_backward(ctx, grad, _plain_modulation, x, names, params)
        attn = block.attn
        grads: Dict[int, Optional[Tensor]] = {}
        with ctx.autocast():
            with torch.enable_grad():
                x_ = _leaf(x, ctx.needs_input_grad[0])
                y = block.norm1(x_)
                v_ = _leaf(v)
                if attn.fused:  # recomputes M; the fused op's own backward recomputes A
                    a_ = _leaf(a)
                    m = attn.fused_modulation(a_, v_)
                else:
                    pre_ = _leaf(pre)
                    m = attn.fuse(pre_, v_)
            if not attn.fused:
                a_, act_a = _act(attn.a_act, a)
            dm = _project_backward(grad, m.detach(), attn.proj, block.ls1, ctx.out_dtype, grads)
            if attn.fused:
                da, dv, dw, db = _vjp(m, [a_, v_, attn.dwconv.weight, attn.dwconv.bias], dm)
                grads[id(attn.dwconv.weight)] = dw
                if attn.dwconv.bias is not None:
                    grads[id(attn.dwconv.bias)] = db
            else:
                dpre, dv = _vjp(m, [pre_, v_], dm)
                dact = _dwconv_backward(dpre, act_a.detach(), attn.dwconv, ctx.backend, grads)
                da = _act_backward(attn.a_act, a_, act_a, dact)
            y_d = y.detach()
            need_y = y.requires_grad
            dy_a, grads[id(attn.a_proj.weight)], db_a = _conv_backward(da, y_d, attn.a_proj, need_y)
            dy_v, grads[id(attn.v_proj.weight)], db_v = _conv_backward(dv, y_d, attn.v_proj, need_y)
            for conv, db in ((attn.a_proj, db_a), (attn.v_proj, db_v)):
                if conv.bias is not None:
                    grads[id(conv.bias)] = db
            dx = None
            if need_y:
                norm_params = list(block.norm1.parameters())
                dx, *dnorm = _vjp(y, [x_] + norm_params, dy_a + dy_v)
                grads.update(zip(map(id, norm_params), dnorm))
        return (dx, None, *(grads.get(id(p)) for p in params))


class _MlpBranch(torch.autograd.Function):
    """``ls2(mlp(norm2(x)))`` saving x and fc1's output."""

    @staticmethod
    def forward(ctx, x: Tensor, block: nn.Module, *params: Tensor) -> Tensor:
        mlp = block.mlp
        h0 = mlp.fc1(block.norm2(x))
        h = mlp.act(h0)
        if mlp.dwconv is not None:
            h = h + mlp.act(mlp.dwconv(h))
        q = mlp.fc2(h)
        ctx.block, ctx.out_dtype, ctx.autocast = block, q.dtype, _AutocastState(x.device.type)
        ctx.save_for_backward(x, h0, *params)
        return block.ls2(q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        block = ctx.block
        saved = ctx.saved_tensors  # read once (non-reentrant checkpointing allows no more)
        x, h0 = saved[:2]
        names, params, same = _saved_params(ctx, saved, _MLP_PARTS, 2)
        if torch.is_grad_enabled() or not same:
            return _recompute_backward(ctx, grad, _plain_mlp, x, names, params)
        mlp = block.mlp
        grads: Dict[int, Optional[Tensor]] = {}
        with ctx.autocast():
            with torch.enable_grad():
                x_ = _leaf(x, ctx.needs_input_grad[0])
                y = block.norm2(x_)
            h0_, h = _act(mlp.act, h0)
            s = h.detach()
            if mlp.dwconv is not None:
                d, act_d = _act(mlp.act, mlp.dwconv(s))
                s = s + act_d.detach()
            ds = _project_backward(grad, s, mlp.fc2, block.ls2, ctx.out_dtype, grads)
            dh = ds
            if mlp.dwconv is not None:
                dd = _act_backward(mlp.act, d, act_d, ds)
                dh_dw, grads[id(mlp.dwconv.weight)], db = _conv_backward(dd, h.detach(), mlp.dwconv, True)
                if mlp.dwconv.bias is not None:
                    grads[id(mlp.dwconv.bias)] = db
                dh = ds + dh_dw
            dh0 = _act_backward(mlp.act, h0_, h, dh)
            need_y = y.requires_grad
            dy, grads[id(mlp.fc1.weight)], db = _conv_backward(dh0, y.detach(), mlp.fc1, need_y)
            if mlp.fc1.bias is not None:
                grads[id(mlp.fc1.bias)] = db
            dx = None
            if need_y:
                norm_params = list(block.norm2.parameters())
                dx, *dnorm = _vjp(y, [x_] + norm_params, dy)
                grads.update(zip(map(id, norm_params), dnorm))
        return (dx, None, *(grads.get(id(p)) for p in params))


def modulation_branch(block: nn.Module, x: Tensor) -> Tensor:
    """``block.ls1(block.attn(block.norm1(x)))`` with the lean backward."""
    return _ModulationBranch.apply(x, block, *(p for _, p in _named_params(block, _MODULATION_PARTS)))


def mlp_branch(block: nn.Module, x: Tensor) -> Tensor:
    """``block.ls2(block.mlp(block.norm2(x)))`` with the lean backward."""
    return _MlpBranch.apply(x, block, *(p for _, p in _named_params(block, _MLP_PARTS)))
