"""What the hierarchical and the isotropic Conv2Former share: the constructor keywords of both (the order stem →
trunk → head → upstream init) and the timm-contract methods."""
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, named_apply
from timm.models._features import feature_take_indices

from .checkpoint import remap_upstream_state_dict, resolve_pretrained_file
from .layers import Conv2FormerHead


def init_weights(module: nn.Module, name: Optional[str] = None, head_init_scale: float = 1.0) -> None:
    """Upstream init: truncated normal (std .02) conv/linear weights, zero biases; classifier scaled."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if name and name.endswith('head.fc'):
            module.weight.data.mul_(head_init_scale)
            module.bias.data.mul_(head_init_scale)


def build_variant(cls: type, variant: str, pretrained: bool, feature_cfg: dict, model_args: dict, kwargs: dict):
    """The registered ``variant`` of the family ``cls``: its sizes ``model_args``, overridden by the caller's
    ``kwargs``, through timm's builder (pretrained weights from a local file, upstream parameter names remapped,
    ``feature_cfg`` for ``features_only``)."""
    kwargs = resolve_pretrained_file(pretrained, dict(model_args, **kwargs))
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=remap_upstream_state_dict,
                                feature_cfg=feature_cfg, **kwargs)


class Conv2FormerBase(nn.Module):
    """A subclass takes its own architecture keywords and passes the rest (``**kwargs``: the keywords below, which
    ``Conv2Former`` documents) to this constructor with ``build_trunk(in_chans, drop_path_rate, block_kwargs, dd)``.
    That sets ``stem``, ``feature_info`` and the trunk, the ``nn.Sequential`` named by ``trunk_name`` whose i-th
    element outputs ``feature_info[i]`` (a list of dicts: deliberately not annotated, as TorchScript cannot type it
    and scripted code never reads it), from ``block_kwargs`` (the ``Conv2FormerBlock`` keywords both families take
    alike) and ``dd`` (device and dtype). Then the ``Conv2FormerHead`` ``head`` (``'conv'`` or ``'norm'``) is built
    and every module initialised as upstream. ``models.keywords`` reads the keywords of both constructors.
    """
    trunk_name = 'stages'
    num_classes: int
    num_features: int
    head_hidden_size: int

    def __init__(
            self,
            build_trunk: Callable[[int, float, dict, dict], None],
            head: str,
            /,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            ls_init_value: Optional[float] = 1e-6,
            fusion: str = 'mul',
            weighting: str = 'none',
            attn_act: bool = True,
            mlp_dwconv: bool = True,
            kernels: Optional[str] = None,
            head_hidden_size: int = 1280,
            head_init_scale: float = 1.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NCHW'
        block_kwargs = dict(ls_init_value=ls_init_value, fusion=fusion, weighting=weighting, attn_act=attn_act,
                            mlp_dwconv=mlp_dwconv, kernels=kernels, **dd)
        build_trunk(in_chans, drop_path_rate, block_kwargs, dd)
        self.num_features = self.feature_info[-1]['num_chs']
        self.head = Conv2FormerHead(self.num_features, num_classes, pool_type=global_pool, head_type=head,
                                    hidden_size=head_hidden_size, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        named_apply(partial(init_weights, head_init_scale=head_init_scale), self)

    @torch.jit.ignore
    def set_lean_backward(self, enable: bool = True) -> None:
        """Lean backward of every block (default on): the blocks save a few tensors and recompute the rest in
        backward (``conv2former.models.lean``), about a third of plain autograd's activation memory, same outputs
        and gradients. Off: autograd saves every intermediate, as plain PyTorch modules do."""
        from .layers import Conv2FormerBlock
        for module in self.modules():
            if isinstance(module, Conv2FormerBlock):
                module.lean = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # norms, biases and layer scales are 1-D: timm's optimizer factory already excludes them
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Trunk outputs selected by ``indices`` (None: all, int n: last n, list, negatives from the end).

        ``norm`` is accepted for API compatibility: there is no norm between the trunk and the head.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        trunk = getattr(self, self.trunk_name)
        take_indices, max_index = feature_take_indices(len(trunk), indices)
        if stop_early and not torch.jit.is_scripting():
            trunk = trunk[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        for idx, layer in enumerate(trunk):
            x = layer(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the trunk layers (and head) not needed for the given intermediates; returns the kept indices."""
        trunk = getattr(self, self.trunk_name)
        take_indices, max_index = feature_take_indices(len(trunk), indices)
        prune_end = max_index < len(trunk) - 1
        setattr(self, self.trunk_name, trunk[:max_index + 1])
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            # the conv head is sized for the last layer: once cut, the features end at the last kept layer
            self.head.in_features = self.num_features
            self.reset_classifier(0, '', reset_other=prune_end or prune_norm)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
