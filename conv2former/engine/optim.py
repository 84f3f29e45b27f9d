"""The optimizer of every task: timm's optimizer factory (``create_optimizer_v2``) and its parameter groups — no
weight decay on 1-D parameters (norms, biases, layer scales) and, with ``layer_decay``, layer ``i`` of ``L`` gets lr
scale ``layer_decay ** (L - 1 - i)`` (timm's ``param_groups_layer_decay``; timm's schedulers apply ``lr_scale``).

A classifier numbers its layers itself (its ``group_matcher``: stem = 0, one per block, downsampling with its
stage's first block, head last). A detector or segmenter has no ``group_matcher``: its backbone is a timm
``features_only`` wrapper whose parameter names differ from the classifier's (``stages_1.`` for ``stages.1.``), and
everything around it (FPN, heads, decoder) should learn at the full rate. ``BackboneLayers`` gives timm's function
what it reads of a model — ``named_parameters()`` and ``group_matcher()`` — for such a model: the backbone's
parameters under the classifier's names with the classifier's matcher, the rest under names no matcher pattern
matches, which timm puts in the top layer (scale 1). So timm computes every group, as it does for the classifier
(its function on the detector itself finds no ``group_matcher`` and falls back to ``auto_group_layers``, which
groups by module depth instead). These are the groups the dense tasks' own implementation gave before (same
parameters, order, scales and weight decay; compared on Faster / Mask R-CNN and UperNet over Conv2Former and
ConvNeXt backbones)."""
from __future__ import annotations

import re
from typing import Iterator, Optional

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, param_groups_layer_decay

__all__ = ['BackboneLayers', 'create_optimizer']

_OUTSIDE = '<outside the backbone>.'  # no matcher pattern (anchored at the start of a name) matches this prefix


def _original_name(feature_param: str) -> str:
    """A timm FeatureListNet parameter name → the classifier's ('stages_1.blocks.0.x' → 'stages.1.blocks.0.x')."""
    return re.sub(r'^([A-Za-z]\w*?)_(\d+)\.', r'\1.\2.', feature_param)


class BackboneLayers:
    """``model`` as timm's layer-decay grouping sees it: ``backbone`` (a timm ``features_only`` build of
    ``backbone_name``) numbered by the classifier's ``group_matcher``, every other parameter in the top layer."""

    def __init__(self, model: nn.Module, backbone: nn.Module, backbone_name: str):
        with torch.device('meta'):
            self.matcher = timm.create_model(backbone_name, num_classes=0).group_matcher(coarse=False)
        classifier_names = {id(p): _original_name(n) for n, p in backbone.named_parameters()}
        self.named = [(classifier_names.get(id(p), _OUTSIDE + n), p) for n, p in model.named_parameters()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.named)

    def group_matcher(self, coarse: bool = False):
        return self.matcher


def create_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, layer_decay: Optional[float],
                     layers: Optional[BackboneLayers] = None) -> torch.optim.Optimizer:
    """``--opt`` at ``lr`` over timm's parameter groups of ``model``: with ``layer_decay``, numbered by ``layers``
    when given, else by the model's own ``group_matcher``; without, timm's two weight-decay groups."""
    if layer_decay is None or layers is None:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    groups = param_groups_layer_decay(layers, weight_decay=weight_decay, layer_decay=layer_decay)
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay)
