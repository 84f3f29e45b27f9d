"""Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition.

Paper: Qibin Hou, Cheng-Ze Lu, Ming-Ming Cheng, Jiashi Feng, IEEE TPAMI 2024, https://arxiv.org/abs/2211.11943
Origin: https://github.com/HVision-NKU/Conv2Former (MIT). Written anew for this project as a timm model family.

Defaults reproduce the upstream code exactly (same outputs, parameters, MACs; upstream checkpoints load through
``checkpoint_filter_fn``). Keyword options expose the paper's ablations and its text form.
"""
from functools import partial
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, calculate_drop_path_rates
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from .base import Conv2FormerBase, build_variant
from .checkpoint import remap_upstream_state_dict
from .layers import Conv2FormerBlock, check_kernel_size, create_stem, to_stage_tuple

__all__ = ['Conv2Former', 'checkpoint_filter_fn']


class Conv2FormerStage(nn.Module):
    """Optional downsampling (LayerNorm → conv 2x2 stride 2) followed by a sequence of blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool,
            drop_path_rates: Sequence[float],
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, **dd), nn.Conv2d(in_chs, out_chs, 2, stride=2, **dd))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            Conv2FormerBlock(out_chs, drop_path=drop_path_rates[i], **block_kwargs, **dd) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Conv2Former(Conv2FormerBase):
    """Hierarchical Conv2Former (four stages at strides 4, 8, 16, 32).

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0: no classifier, ``forward`` returns pooled features).
        global_pool: Pooling type of the head (``'avg'``, ``'max'``, ... or ``''`` for none).
        depths: Blocks per stage.
        dims: Channels per stage.
        kernel_size: Depthwise kernel of the modulation, odd 3-31, one int or one per stage (paper Fig. 4a).
        mlp_ratio: MLP hidden width / dim.
        ls_init_value: Layer-scale init (upstream 1e-6; None disables layer scale).
        fusion: ``'mul'`` A ⊙ V (default) or ``'sum'`` A + V (paper Fig. 4b).
        weighting: Weighting of A before fusion: ``'none'`` (default), ``'sigmoid'``, ``'l1'``, ``'minmax'``
            (rescaled into (0, 1]) (paper Table 6).
        attn_act: GELU between W1 and the depthwise conv (upstream); False = the paper's formula.
        mlp_dwconv: The MLP's residual 3x3 depthwise conv (upstream); False = the paper's text.
        kernels: Backend of the k x k depthwise conv: None (auto: ``$CONV2FORMER_KERNELS``, else PyTorch),
            ``'torch'``, ``'triton'``, or ``'fused'`` (the whole modulation as one Triton op). Weights and outputs
            are the same on every path.
        stem: ``'conv3'`` upstream 3-conv stem (default) or ``'patch'`` ConvNeXt-style 4x4 patchify stem.
        head: ``'conv'`` upstream head (1x1 conv to ``head_hidden_size`` → GELU → LN, then pool → fc) or
            ``'norm'`` (pool → LN → fc).
        head_hidden_size: Width of the conv head (upstream 1280).
        head_init_scale: Scale applied to the classifier's initial weights and bias.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, ramped linearly 0 → rate over all blocks.
        device, dtype: Factory kwargs for every parameter (e.g. ``device='meta'``).

    ``depths`` to ``head`` are this family's own keywords; the others (``**kwargs``) are the constructor keywords
    both families share, taken by ``Conv2FormerBase``.
    """

    def __init__(
            self,
            depths: Sequence[int] = (3, 3, 12, 3),
            dims: Sequence[int] = (72, 144, 288, 576),
            kernel_size: Union[int, Sequence[int]] = 11,
            mlp_ratio: float = 4.,
            stem: str = 'conv3',
            head: str = 'conv',
            **kwargs,
    ):
        num_stages = len(depths)
        if len(dims) != num_stages:
            raise ValueError(f'dims and depths need one entry per stage, got {len(dims)} dims and {num_stages} depths')
        kernel_sizes = [check_kernel_size(k) for k in to_stage_tuple(kernel_size, num_stages, 'kernel_size')]
        super().__init__(partial(self._build_stages, depths, dims, kernel_sizes, mlp_ratio, stem), head, **kwargs)

    def _build_stages(self, depths: Sequence[int], dims: Sequence[int], kernel_sizes: Sequence[int], mlp_ratio: float,
                      stem: str, in_chans: int, drop_path_rate: float, block_kwargs: dict, dd: dict) -> None:
        num_stages = len(depths)
        self.feature_info = []
        self.stem = create_stem(stem, in_chans, dims[0], stride=4, **dd)
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        prev_chs = dims[0]
        for i in range(num_stages):
            stages.append(Conv2FormerStage(prev_chs, dims[i], depth=depths[i], downsample=i > 0,
                                           drop_path_rates=dp_rates[i], kernel_size=kernel_sizes[i],
                                           mlp_ratio=mlp_ratio, **block_kwargs))
            prev_chs = dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # smallest input whose last stage keeps one pixel: stride-2 layers floor, as upstream
        self.stem.min_size = next(s for s in range(1, 4097) if self.stem.output_size(s) >> (num_stages - 1) >= 1)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.stages(x)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an upstream (HVision-NKU) or our own checkpoint onto ``model``'s parameter names.

    Accepts the usual wrappers ('state_dict', 'model', 'state_dict_ema', 'module.' prefixes) and raises a
    ValueError listing every key and shape that does not fit the model (the classifier and the first conv's
    input channels may differ: timm adapts those).
    """
    return remap_upstream_state_dict(state_dict, model)


def pretrained_cfg_entry(url: str = '', **kwargs) -> dict:
    """A pretrained-cfg entry of the family (timm's ``_cfg``): input size, crop, mean/std, classifier name."""
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0',
        'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2211.11943',
        'paper_name': 'Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition',
        'origin_url': 'https://github.com/HVision-NKU/Conv2Former',
        **kwargs,
    }


# The released weights live on a file host timm cannot fetch: load them with
# pretrained_cfg_overlay=dict(file=path) (or convert them once to safetensors).
default_cfgs = generate_default_cfgs({
    'conv2former_n.in1k': pretrained_cfg_entry(),
    'conv2former_t.in1k': pretrained_cfg_entry(),
    'conv2former_s.in1k': pretrained_cfg_entry(),
    'conv2former_b.in1k': pretrained_cfg_entry(),
    'conv2former_b_22k.in22k_ft_in1k': pretrained_cfg_entry(),
    'conv2former_l.in22k_ft_in1k': pretrained_cfg_entry(),
})

# name: (dims, depths, kernel_size), as the upstream code (and its released weights) build them
MODEL_CONFIGS = {
    'conv2former_n': ((64, 128, 256, 512), (2, 2, 8, 2), 7),
    'conv2former_t': ((72, 144, 288, 576), (3, 3, 12, 3), 11),
    'conv2former_s': ((72, 144, 288, 576), (4, 4, 32, 4), 11),
    'conv2former_b': ((96, 192, 384, 768), (4, 4, 34, 4), 11),
    'conv2former_b_22k': ((96, 192, 384, 768), (4, 4, 34, 4), 7),
    'conv2former_l': ((128, 256, 512, 1024), (4, 4, 48, 4), 11),
}


def _create_variant(name: str, pretrained: bool, kwargs: dict) -> Conv2Former:
    dims, depths, kernel_size = MODEL_CONFIGS[name]
    return build_variant(Conv2Former, name, pretrained, dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                         dict(dims=dims, depths=depths, kernel_size=kernel_size), kwargs)


@register_model
def conv2former_n(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-N: 14.99M params, 2.33 GMACs (kernel 7, as the released weights)."""
    return _create_variant('conv2former_n', pretrained, kwargs)


@register_model
def conv2former_t(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-T: 26.70M params, 4.36 GMACs."""
    return _create_variant('conv2former_t', pretrained, kwargs)


@register_model
def conv2former_s(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-S: 50.03M params, 8.71 GMACs."""
    return _create_variant('conv2former_s', pretrained, kwargs)


@register_model
def conv2former_b(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-B: 90.03M params, 15.89 GMACs."""
    return _create_variant('conv2former_b', pretrained, kwargs)


@register_model
def conv2former_b_22k(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-B as released for ImageNet-22k pre-training (kernel 7): 88.79M params, 15.57 GMACs."""
    return _create_variant('conv2former_b_22k', pretrained, kwargs)


@register_model
def conv2former_l(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-L: 198.89M params, 36.04 GMACs."""
    return _create_variant('conv2former_l', pretrained, kwargs)
