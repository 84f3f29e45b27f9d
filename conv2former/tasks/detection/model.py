"""torchvision detectors (Faster / Mask R-CNN, RetinaNet, FCOS) on a Conv2Former backbone with an FPN.

The backbone is any hierarchical registered model built by timm with ``features_only=True`` (strides 4, 8, 16, 32),
so it takes the same keywords (kernel size, drop path, ...) and the same pretrained weights as the classifier.
"""
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ...fileio import pretrained_overlay
from ...models import MODEL_NAMES

__all__ = ['DETECTORS', 'Conv2FormerFPN', 'build_detector']

DETECTORS = ('fasterrcnn', 'maskrcnn', 'retinanet', 'fcos')
_REDUCTIONS = [4, 8, 16, 32]


class Conv2FormerFPN(nn.Module):
    """Conv2Former stage outputs → FPN. Returns an OrderedDict of maps with ``out_channels`` channels each.

    ``levels='p2-p6'`` (R-CNNs): stages at strides 4-32 plus a max-pooled stride-64 map ('0'-'3', 'pool').
    ``levels='p3-p7'`` (RetinaNet, FCOS): stages at strides 8-32 plus P6, P7 from strided convs ('0'-'2', 'p6', 'p7').
    """

    def __init__(
            self,
            model_name: str = 'conv2former_t',
            out_channels: int = 256,
            levels: str = 'p2-p6',
            pretrained: Optional[Union[str, Path]] = None,
            **model_kwargs,
    ):
        super().__init__()
        if levels not in ('p2-p6', 'p3-p7'):
            raise ValueError(f"levels must be 'p2-p6' or 'p3-p7', got {levels!r}")
        if not timm.is_model(model_name):
            raise ValueError(f'unknown backbone {model_name!r}; registered Conv2Former models: '
                             f'{", ".join(MODEL_NAMES)}')
        out_indices = (0, 1, 2, 3) if levels == 'p2-p6' else (1, 2, 3)
        kwargs = dict(model_kwargs)
        if pretrained is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=pretrained_overlay(pretrained))
        try:
            self.body = timm.create_model(model_name, features_only=True, out_indices=out_indices, **kwargs)
        except (AssertionError, IndexError, RuntimeError) as e:
            raise ValueError(f'{model_name} has no feature pyramid at strides {_REDUCTIONS} ({e}); detection needs a '
                             f'hierarchical backbone (e.g. conv2former_t), not an isotropic one') from None
        reductions = self.body.feature_info.reduction()
        if reductions != [_REDUCTIONS[i] for i in out_indices]:
            raise ValueError(f'{model_name} gives features at strides {reductions}; detection needs a hierarchical '
                             f'backbone with strides {_REDUCTIONS} (e.g. conv2former_t), not an isotropic one')
        in_channels = self.body.feature_info.channels()
        extra = LastLevelMaxPool() if levels == 'p2-p6' else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_detector(
        detector: str,
        backbone: str = 'conv2former_t',
        num_classes: int = 91,
        pretrained_backbone: Optional[Union[str, Path]] = None,
        min_size: Union[int, Sequence[int]] = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        **backbone_kwargs,
) -> nn.Module:
    """A torchvision detector on a Conv2Former FPN.

    Args:
        detector: ``'fasterrcnn'``, ``'maskrcnn'``, ``'retinanet'`` or ``'fcos'``.
        backbone: A hierarchical registered model name (strides 4-32).
        num_classes: Classes including background (torchvision's convention for the R-CNNs).
        pretrained_backbone: Classification weights: a model folder, .safetensors, or upstream .pth/.pth.tar.
        min_size, max_size: torchvision's resize (a tuple of min sizes = multi-scale training).
        backbone_kwargs: Model keywords, e.g. ``drop_path_rate=0.2``, ``kernel_size=7``.
    """
    if detector not in DETECTORS:
        raise ValueError(f'detector must be one of {DETECTORS}, got {detector!r}')
    levels = 'p2-p6' if detector in ('fasterrcnn', 'maskrcnn') else 'p3-p7'
    body = Conv2FormerFPN(backbone, fpn_channels, levels=levels, pretrained=pretrained_backbone, **backbone_kwargs)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_DEFAULT_MEAN),
                  image_std=list(IMAGENET_DEFAULT_STD))
    if detector == 'fasterrcnn':
        return FasterRCNN(body, num_classes=num_classes, **common)
    if detector == 'maskrcnn':
        return MaskRCNN(body, num_classes=num_classes, **common)
    # RetinaNet's anchors: 3 scales x 3 ratios on P3-P7 (torchvision's defaults for its ResNet-FPN RetinaNet)
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
    if detector == 'retinanet':
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(body, num_classes=num_classes, anchor_generator=anchors, **common)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)  # FCOS: one point per location
    return FCOS(body, num_classes=num_classes, anchor_generator=anchors, **common)
