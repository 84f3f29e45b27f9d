"""Optimizer parameter groups for dense tasks: layer-wise lr decay over a timm feature backbone."""
from __future__ import annotations

import re

import timm
import torch
import torch.nn as nn
from timm.models._manipulate import group_with_matcher

__all__ = ['layer_decay_param_groups']


def _original_name(feature_param: str) -> str:
    """A timm FeatureListNet parameter name → the classifier's ('stages_1.blocks.0.x' → 'stages.1.blocks.0.x')."""
    return re.sub(r'^([A-Za-z]\w*?)_(\d+)\.', r'\1.\2.', feature_param)


def layer_decay_param_groups(model: nn.Module, backbone: nn.Module, backbone_name: str, weight_decay: float,
                             layer_decay: float | None) -> list[dict]:
    """AdamW parameter groups: no weight decay on 1-D parameters (norms, biases, layer scales); with
    ``layer_decay``, backbone layer ``i`` of ``L`` (stem = 0, one per block, downsampling with the stage's first
    block, as the classifier's ``group_matcher`` says) gets lr scale ``layer_decay ** (L - i)``; everything outside
    the backbone (FPN, heads, decoder) gets 1. timm's schedulers apply ``lr_scale``."""
    layer_of = {}
    if layer_decay is not None:
        with torch.device('meta'):
            matcher = timm.create_model(backbone_name, num_classes=0).group_matcher(coarse=False)
        named = ((_original_name(n), p) for n, p in backbone.named_parameters())
        layers = group_with_matcher(named, matcher, return_values=True)  # {layer id: [params]}
        layer_of = {id(p): layer for layer, params in layers.items() for p in params}
    num_layers = max(layer_of.values(), default=-1) + 1
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(id(param), num_layers)
        scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
        decay = 0.0 if param.ndim <= 1 else weight_decay
        group = groups.setdefault((layer, decay), dict(params=[], weight_decay=decay, lr_scale=scale))
        group['params'].append(param)
    return list(groups.values())
