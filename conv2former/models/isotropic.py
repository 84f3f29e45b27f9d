"""Isotropic Conv2Former (paper §4.3): one stride-16 patch embedding, then blocks at a single width.

The paper gives only the sizes (IS ≈ 23M params, IB "80M+") and depth 18. Widths, MLP ratio and kernel are
reconstructed here, as DeiT and isotropic ConvNeXt do: width 384 (IS) / 768 (IB), patch 16, MLP ratio 2.5,
kernel 11, pooled-LayerNorm head. That gives IS 23.02M and IB 88.50M params (ratio 3 would give 25.7M / 99.2M).
The paper's "3-conv patch embedding" variant is ``stem='conv3'``:
conv3x3 s2 → GELU → BN → conv3x3 s2 → GELU → BN → conv4x4 s4.
"""
from typing import Optional

import torch
import torch.nn as nn

from timm.layers import calculate_drop_path_rates
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, named_apply, register_model

from .base import Conv2FormerBase
from .checkpoint import remap_upstream_state_dict, resolve_pretrained_file
from .conv2former import pretrained_cfg_entry, init_weights
from .layers import Conv2FormerBlock, Conv2FormerHead, check_kernel_size, create_stem

__all__ = ['Conv2FormerIsotropic']


class Conv2FormerIsotropic(Conv2FormerBase):
    """Isotropic (ViT-shaped) Conv2Former.

    Args:
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in ``Conv2Former``.
        depth: Number of blocks (18 in the paper).
        dim: Width of every block.
        patch_size: Stride of the stem (16).
        kernel_size, mlp_ratio, ls_init_value, fusion, weighting, attn_act, mlp_dwconv, kernels: as in ``Conv2Former``.
        stem: ``'patch'`` (default, conv patch_size x patch_size → LN) or ``'conv3'`` (3-conv patch embedding).
        head: ``'norm'`` (default, pool → LN → fc) or ``'conv'`` (upstream-style 1x1 conv head).
    """
    trunk_name = 'blocks'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depth: int = 18,
            dim: int = 384,
            patch_size: int = 16,
            kernel_size: int = 11,
            mlp_ratio: float = 2.5,
            ls_init_value: Optional[float] = 1e-6,
            fusion: str = 'mul',
            weighting: str = 'none',
            attn_act: bool = True,
            mlp_dwconv: bool = True,
            kernels: Optional[str] = None,
            stem: str = 'patch',
            head: str = 'norm',
            head_hidden_size: int = 1280,
            head_init_scale: float = 1.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_kernel_size(kernel_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NCHW'
        self.grad_checkpointing = False

        self.stem = create_stem(stem, in_chans, dim, stride=patch_size, **dd)
        self.stem.min_size = next(s for s in range(1, 4097) if self.stem.output_size(s) >= 1)
        dp_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Conv2FormerBlock(
                dim,
                kernel_size=kernel_size,
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                drop_path=dp_rates[i],
                fusion=fusion,
                weighting=weighting,
                attn_act=attn_act,
                mlp_dwconv=mlp_dwconv,
                kernels=kernels,
                **dd,
            )
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = dim
        self.head = Conv2FormerHead(
            dim, num_classes, pool_type=global_pool, head_type=head, hidden_size=head_hidden_size,
            drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        named_apply(lambda module, name: init_weights(module, name, head_init_scale), self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _create_isotropic(variant: str, pretrained: bool = False, **kwargs) -> Conv2FormerIsotropic:
    kwargs = resolve_pretrained_file(pretrained, kwargs)
    return build_model_with_cfg(
        Conv2FormerIsotropic,
        variant,
        pretrained,
        pretrained_filter_fn=remap_upstream_state_dict,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'conv2former_is.untrained': pretrained_cfg_entry(pool_size=(14, 14)),
    'conv2former_ib.untrained': pretrained_cfg_entry(pool_size=(14, 14)),
})


@register_model
def conv2former_is(pretrained: bool = False, **kwargs) -> Conv2FormerIsotropic:
    """Conv2Former-IS (reconstructed): 18 blocks at width 384, 23.02M params."""
    model_args = dict(depth=18, dim=384, mlp_ratio=2.5)
    return _create_isotropic('conv2former_is', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv2former_ib(pretrained: bool = False, **kwargs) -> Conv2FormerIsotropic:
    """Conv2Former-IB (reconstructed): 18 blocks at width 768, 88.50M params."""
    model_args = dict(depth=18, dim=768, mlp_ratio=2.5)
    return _create_isotropic('conv2former_ib', pretrained=pretrained, **dict(model_args, **kwargs))
