"""Isotropic Conv2Former (paper §4.3): one stride-16 patch embedding, then blocks at a single width.

The paper gives only the sizes (IS ≈ 23M params, IB "80M+") and depth 18. Widths, MLP ratio and kernel are
reconstructed here, as DeiT and isotropic ConvNeXt do: width 384 (IS) / 768 (IB), patch 16, MLP ratio 2.5,
kernel 11, pooled-LayerNorm head. That gives IS 23.02M and IB 88.50M params (ratio 3 would give 25.7M / 99.2M).
The paper's "3-conv patch embedding" variant is ``stem='conv3'``:
conv3x3 s2 → GELU → BN → conv3x3 s2 → GELU → BN → conv4x4 s4.
"""
from functools import partial

import torch
import torch.nn as nn

from timm.layers import calculate_drop_path_rates
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from .base import Conv2FormerBase, build_variant
from .conv2former import pretrained_cfg_entry
from .layers import Conv2FormerBlock, check_kernel_size, create_stem

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
        head_hidden_size, head_init_scale, device, dtype: as in ``Conv2Former`` (the ``**kwargs`` that
            ``Conv2FormerBase`` takes, as there).
    """
    trunk_name = 'blocks'

    def __init__(
            self,
            depth: int = 18,
            dim: int = 384,
            patch_size: int = 16,
            kernel_size: int = 11,
            mlp_ratio: float = 2.5,
            stem: str = 'patch',
            head: str = 'norm',
            **kwargs,
    ):
        check_kernel_size(kernel_size)
        super().__init__(partial(self._build_blocks, depth, dim, patch_size, kernel_size, mlp_ratio, stem), head,
                         **kwargs)
        self.grad_checkpointing = False

    def _build_blocks(self, depth: int, dim: int, patch_size: int, kernel_size: int, mlp_ratio: float, stem: str,
                      in_chans: int, drop_path_rate: float, block_kwargs: dict, dd: dict) -> None:
        self.stem = create_stem(stem, in_chans, dim, stride=patch_size, **dd)
        self.stem.min_size = next(s for s in range(1, 4097) if self.stem.output_size(s) >= 1)
        dp_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Conv2FormerBlock(dim, kernel_size=kernel_size, mlp_ratio=mlp_ratio, drop_path=dp_rates[i], **block_kwargs)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]

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


def _create_isotropic(variant: str, dim: int, pretrained: bool, kwargs: dict) -> Conv2FormerIsotropic:
    return build_variant(Conv2FormerIsotropic, variant, pretrained, dict(out_indices=3, feature_cls='getter'),
                         dict(depth=18, dim=dim, mlp_ratio=2.5), kwargs)


default_cfgs = generate_default_cfgs({
    'conv2former_is.untrained': pretrained_cfg_entry(pool_size=(14, 14)),
    'conv2former_ib.untrained': pretrained_cfg_entry(pool_size=(14, 14)),
})


@register_model
def conv2former_is(pretrained: bool = False, **kwargs) -> Conv2FormerIsotropic:
    """Conv2Former-IS (reconstructed): 18 blocks at width 384, 23.02M params."""
    return _create_isotropic('conv2former_is', 384, pretrained, kwargs)


@register_model
def conv2former_ib(pretrained: bool = False, **kwargs) -> Conv2FormerIsotropic:
    """Conv2Former-IB (reconstructed): 18 blocks at width 768, 88.50M params."""
    return _create_isotropic('conv2former_ib', 768, pretrained, kwargs)
