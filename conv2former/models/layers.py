"""Building blocks of Conv2Former: convolutional modulation, the MLP, stems, the classifier head.

Every module is NCHW and built from plain ``nn.Conv2d`` / timm layers, so parameter names and shapes
follow the upstream code one-to-one (see ``checkpoint_filter_fn``) and ``nn.Conv2d`` weights load as-is.
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.fx import _symbolic_trace

from timm.layers import (DropPath, LayerNorm2d, LayerScale2d, SelectAdaptivePool2d, register_notrace_function,
                         register_notrace_module)

from ..ops import FUSED_WEIGHTINGS, conv_modulation, dwconv2d
from .lean import lean_supported, mlp_branch, modulation_branch

# symbolic tracing (torch.fx, timm's feature extraction); torch < 2.5 has only the broader is_fx_tracing
_is_fx_tracing = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', _symbolic_trace.is_fx_tracing)
_is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)
_functorch_active = getattr(torch._C, '_are_functorch_transforms_active', lambda: False)

FUSIONS = ('mul', 'sum')
WEIGHTINGS = ('none', 'sigmoid', 'l1', 'minmax')
STEMS = ('conv3', 'patch')
HEADS = ('conv', 'norm')
MIN_KERNEL, MAX_KERNEL = 3, 31


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise a ValueError naming the option, the valid values and what came."""
    if value not in choices:
        raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')


def check_kernel_size(kernel_size: int) -> int:
    """Validate a depthwise kernel size: an odd int in [3, 31]."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f'kernel_size must be an odd int in [{MIN_KERNEL}, {MAX_KERNEL}], got {kernel_size!r}')
    if kernel_size % 2 == 0 or not MIN_KERNEL <= kernel_size <= MAX_KERNEL:
        raise ValueError(
            f'kernel_size must be an odd int in [{MIN_KERNEL}, {MAX_KERNEL}] ("same" padding needs an odd size), '
            f'got {kernel_size}')
    return kernel_size


def _shape_str(shape: List[int]) -> str:
    """``tuple(shape)`` as Python prints it, in a form TorchScript compiles too."""
    if len(shape) == 1:
        return '(' + str(shape[0]) + ',)'
    return '(' + ', '.join([str(s) for s in shape]) + ')'


@register_notrace_function  # shape checks are data-independent: keep them out of FX graphs
def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ValueError unless ``x`` is (B, in_chans, H, W) with H, W >= min_size (TorchScript-compatible)."""
    if x.ndim != 4:
        raise ValueError(
            f'Conv2Former expects a 4-D input (batch, channels, height, width), got a {x.ndim}-D tensor of shape '
            + _shape_str(x.shape))
    if x.shape[1] != in_chans:
        raise ValueError(
            f'Conv2Former was built for {in_chans} input channels, got {x.shape[1]} (input shape '
            + _shape_str(x.shape) + f'); build the model with in_chans={x.shape[1]} or convert the images')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'Conv2Former needs an input of at least {min_size}x{min_size} pixels so that the last stage keeps '
            f'one pixel, got {x.shape[2]}x{x.shape[3]}')


def weight_modulation(a: torch.Tensor, weighting: str, eps: float = 1e-6) -> torch.Tensor:
    """Apply the paper's Table 6 weightings to the modulation map A (B, C, H, W).

    - ``none``: A as is (upstream, best).
    - ``sigmoid``: sigmoid(A), in (0, 1).
    - ``l1``: A divided by the mean of |A| over the spatial positions of each (sample, channel), i.e. L1
      normalisation over positions scaled by H*W so the magnitude stays O(1).
    - ``minmax``: A rescaled linearly per (sample, channel) into (0, 1]: (A - min + eps) / (max - min + eps).

    TorchScript-compatible (no module-level constants, plain messages).
    """
    if weighting == 'none':
        return a
    if weighting == 'sigmoid':
        return a.sigmoid()
    if weighting == 'l1':
        return a / (a.abs().mean(dim=(2, 3), keepdim=True) + eps)
    if weighting == 'minmax':
        a_min = a.amin(dim=(2, 3), keepdim=True)
        a_max = a.amax(dim=(2, 3), keepdim=True)
        return (a - a_min + eps) / (a_max - a_min + eps)
    raise ValueError("weighting must be one of ('none', 'sigmoid', 'l1', 'minmax'), got '" + weighting + "'")


KERNELS = (None, 'torch', 'triton', 'fused')


@register_notrace_module  # its backend choice reads the device: a leaf for FX tracing
class DepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k conv with "same" padding that runs ``conv2former.ops.dwconv2d``: the Triton kernel on CUDA
    (or when forced), ``F.conv2d`` otherwise. Parameters and state-dict keys are those of ``nn.Conv2d``.

    Args:
        kernels: ``None`` (automatic: ``$CONV2FORMER_KERNELS``, else PyTorch), ``'torch'`` or ``'triton'``.
    """

    def __init__(self, dim: int, kernel_size: int, kernels: Optional[str] = None, device=None, dtype=None):
        check_choice('kernels', kernels, KERNELS[:3])
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the backend dispatch reads the environment: TorchScript runs PyTorch's conv
            return F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)
        return dwconv2d(x, self.weight, self.bias, backend=self.kernels)


class ConvModulation(nn.Module):
    """Convolutional modulation: Z = W3 · (DWConv_k(act(W1·X)) ⊙ W2·X).

    Args:
        dim: Channels.
        kernel_size: Depthwise kernel size (odd, 3-31), "same" padding.
        fusion: ``'mul'`` (Hadamard product, upstream and paper) or ``'sum'`` (A + V, paper Fig. 4b ablation).
        weighting: How A is weighted before fusion, see ``weight_modulation`` (paper Table 6).
        attn_act: GELU between W1 and the depthwise conv (upstream code); False gives the paper's formula.
        kernels: Backend of the depthwise conv, see ``DepthwiseConv2d``; ``'fused'`` runs GELU, the depthwise conv,
            the weighting and the fusion with V as one Triton op (``conv2former.ops.conv_modulation``: A is never
            written to memory), for the weightings it supports (none, sigmoid; others use the Triton conv).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 11,
            fusion: str = 'mul',
            weighting: str = 'none',
            attn_act: bool = True,
            kernels: Optional[str] = None,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_kernel_size(kernel_size)
        check_choice('fusion', fusion, FUSIONS)
        check_choice('weighting', weighting, WEIGHTINGS)
        check_choice('kernels', kernels, KERNELS)
        self.fusion = fusion
        self.weighting = weighting
        self.fused = kernels == 'fused' and weighting in FUSED_WEIGHTINGS
        self.a_proj = nn.Conv2d(dim, dim, 1, **dd)
        self.a_act = act_layer() if attn_act else nn.Identity()
        self.dwconv = DepthwiseConv2d(dim, kernel_size, kernels='triton' if kernels == 'fused' else kernels, **dd)
        self.v_proj = nn.Conv2d(dim, dim, 1, **dd)
        self.proj = nn.Conv2d(dim, dim, 1, **dd)

    def modulation(self, x: torch.Tensor) -> torch.Tensor:
        """The (weighted) modulation map A for a normalised input x."""
        return weight_modulation(self.dwconv(self.a_act(self.a_proj(x))), self.weighting)

    def fuse(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Weighting of the depthwise conv's output ``a`` and its fusion with V."""
        a = weight_modulation(a, self.weighting)
        return a * v if self.fusion == 'mul' else a + v

    @torch.jit.unused
    def fused_modulation(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused Triton op for W1's output ``a`` and V: everything between the 1x1 projections."""
        return conv_modulation(a, v, self.dwconv.weight, self.dwconv.bias, act=not isinstance(self.a_act, nn.Identity),
                               fusion=self.fusion, weighting=self.weighting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript runs the unfused PyTorch path
            if self.fused:
                return self.proj(self.fused_modulation(self.a_proj(x), self.v_proj(x)))
        a = self.modulation(x)
        v = self.v_proj(x)
        x = a * v if self.fusion == 'mul' else a + v
        return self.proj(x)


class ConvMlp(nn.Module):
    """fc1 → GELU → h + GELU(DWConv3x3(h)) → fc2, all 1x1 / depthwise convs.

    The residual 3x3 depthwise conv is in the upstream code (and its published params/MACs) but not in the
    paper text (upstream issue #3); ``dwconv=False`` drops it.
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            dwconv: bool = True,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.act = act_layer()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd) if dwconv else None
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        if self.dwconv is not None:
            x = x + self.act(self.dwconv(x))
        return self.fc2(x)


class Conv2FormerBlock(nn.Module):
    """Pre-norm residual block: x + γ1·ConvMod(LN(x)), then x + γ2·MLP(LN(x)), each with stochastic depth.

    When autograd records (training), each branch runs as one autograd function that saves only a few tensors and
    recomputes the rest in backward (``conv2former.models.lean``): same outputs, same gradients up to float
    rounding, about a third of the activation memory. ``lean = False`` (``model.set_lean_backward(False)``) makes
    autograd save every intermediate instead.
    """
    lean: bool

    def __init__(
            self,
            dim: int,
            kernel_size: int = 11,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-6,
            drop_path: float = 0.,
            fusion: str = 'mul',
            weighting: str = 'none',
            attn_act: bool = True,
            mlp_dwconv: bool = True,
            kernels: Optional[str] = None,
            act_layer=nn.GELU,
            norm_layer=LayerNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ConvModulation(dim, kernel_size, fusion, weighting, attn_act, kernels, act_layer=act_layer, **dd)
        self.ls1 = LayerScale2d(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), dwconv=mlp_dwconv, act_layer=act_layer, **dd)
        self.ls2 = LayerScale2d(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.lean = True

    @torch.jit.unused
    def _use_lean(self, x: torch.Tensor) -> bool:
        """The lean backward applies when autograd records this block in eager mode; tracers, compilers and
        exporters see the plain modules."""
        if not self.lean or not torch.is_grad_enabled():
            return False
        if _is_fx_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_exporting():
            return False
        if _functorch_active() or torch.autograd.forward_ad._current_level >= 0:  # torch.func, forward-mode AD
            return False
        if x.is_meta:
            return False
        if not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return lean_supported(self)

    @torch.jit.unused
    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(modulation_branch(self, x))
        return x + self.drop_path2(mlp_branch(self, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._use_lean(x):
                return self._forward_lean(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class _Stem(nn.Module):
    """A stem that validates its input, so every forward path (features_only included) checks it.

    Layers are children named '0', '1', ... (state-dict keys ``stem.0.weight`` as upstream); deliberately not an
    ``nn.Sequential``, which timm's feature wrappers would flatten, dropping the check.
    """
    in_chans: int
    min_size: int

    def __init__(self, in_chans: int, *layers: nn.Module):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.in_chans, self.min_size = in_chans, 1

    def __getitem__(self, idx: int) -> nn.Module:
        return list(self.children())[idx]

    def __iter__(self):
        return iter(self.children())

    def __len__(self) -> int:
        return len(self._modules)

    def output_size(self, size: int) -> int:
        """Spatial size after the stem for an input of ``size`` (convs floor, as in PyTorch)."""
        for m in self.children():
            if isinstance(m, nn.Conv2d):
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.min_size)
        for layer in self.children():
            x = layer(x)
        return x


class ConvStem(_Stem):
    """The upstream stem: conv3x3 s2 → GELU → BN → conv3x3 → GELU → BN → conv s (no biases; GELU before BN).

    For ``stride=4`` (hierarchical model) the second conv has stride 1 and the last is 2x2 s2; for larger strides
    (isotropic models, 16) the second conv has stride 2 and the last is a (stride/4)x(stride/4) patch conv.
    """

    def __init__(self, in_chans: int, out_chs: int, stride: int = 4, act_layer=nn.GELU, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        if stride < 4 or stride & (stride - 1):
            raise ValueError(f'ConvStem stride must be a power of two >= 4, got {stride}')
        mid, s2 = out_chs // 2, (1 if stride == 4 else 2)
        last = stride // (2 * s2)
        super().__init__(
            in_chans,
            nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False, **dd),
            act_layer(),
            nn.BatchNorm2d(mid, **dd),
            nn.Conv2d(mid, mid, 3, stride=s2, padding=1, bias=False, **dd),
            act_layer(),
            nn.BatchNorm2d(mid, **dd),
            nn.Conv2d(mid, out_chs, last, stride=last, bias=False, **dd),
        )


class PatchStem(_Stem):
    """ConvNeXt-style patchify stem: conv s x s, stride s → LayerNorm."""

    def __init__(self, in_chans: int, out_chs: int, stride: int = 4, norm_layer=LayerNorm2d, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__(in_chans, nn.Conv2d(in_chans, out_chs, stride, stride=stride, **dd), norm_layer(out_chs, **dd))


def create_stem(stem: str, in_chans: int, out_chs: int, stride: int, device=None, dtype=None) -> _Stem:
    check_choice('stem', stem, STEMS)
    cls = ConvStem if stem == 'conv3' else PatchStem
    return cls(in_chans, out_chs, stride=stride, device=device, dtype=dtype)


class Conv2FormerHead(nn.Module):
    """Classifier head with the two layouts the project offers.

    - ``'conv'`` (upstream): 1x1 conv (C → hidden_size) → GELU → LayerNorm, on the feature map, then pool → fc.
    - ``'norm'``: pool → LayerNorm → fc (ConvNeXt's head).

    ``forward(x, pre_logits=True)`` returns the pooled features before ``fc`` (width ``num_features``).
    With ``pool_type=''`` nothing is pooled and ``fc`` is applied at every position.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int = 1000,
            pool_type: str = 'avg',
            head_type: str = 'conv',
            hidden_size: int = 1280,
            drop_rate: float = 0.,
            act_layer=nn.GELU,
            norm_layer=LayerNorm2d,
            device=None,
            dtype=None,
    ):
        check_choice('head', head_type, HEADS)
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.norm_first = head_type == 'conv'
        if self.norm_first:
            self.conv = nn.Conv2d(in_features, hidden_size, 1, **dd)
            self.act = act_layer()
            self.num_features = hidden_size
        else:
            self.conv, self.act = nn.Identity(), nn.Identity()
            self.num_features = in_features
        self.norm = norm_layer(self.num_features, **dd)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type)
        self.flatten = nn.Flatten(1) if pool_type else nn.Identity()
        self.pooled = bool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False) -> None:
        """Replace the classifier (and pooling); ``reset_other`` also drops the conv/norm layers."""
        ref = next(self.parameters(), None)
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type)
            self.flatten = nn.Flatten(1) if pool_type else nn.Identity()
            self.pooled = bool(pool_type)
        if reset_other:
            self.conv, self.act, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.in_features
        self.fc = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.train(self.training)  # the new modules follow the head's train/eval mode

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.conv(x))
        if self.norm_first:
            x = self.norm(x)
        x = self.global_pool(x)
        if not self.norm_first:
            x = self.norm(x)
        x = self.drop(self.flatten(x))
        if pre_logits:
            return x
        if not self.pooled:  # classify every position
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x)


def to_stage_tuple(value: Union[int, Sequence[int]], num_stages: int, name: str) -> tuple:
    """Broadcast an int to every stage, or check a per-stage sequence has one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f'{name} needs one value per stage ({num_stages}), got {len(value)}: {tuple(value)}')
        return tuple(value)
    return (value,) * num_stages
