"""timm-contract methods shared by the hierarchical and the isotropic Conv2Former."""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.models._features import feature_take_indices


class Conv2FormerBase(nn.Module):
    """Subclasses build ``stem``, ``head`` (a ``Conv2FormerHead``), ``feature_info`` and a trunk, the
    ``nn.Sequential`` named by ``trunk_name`` whose i-th element outputs ``feature_info[i]`` (a list of dicts:
    deliberately not annotated, as TorchScript cannot type it and scripted code never reads it).
    """
    trunk_name = 'stages'
    num_classes: int
    num_features: int
    head_hidden_size: int

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
