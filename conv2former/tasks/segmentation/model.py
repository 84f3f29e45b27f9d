"""UperNet semantic segmentation on a Conv2Former (or any hierarchical timm) backbone, and its inference modes.

The model is segmentation_models_pytorch's ``UPerNet`` with the timm encoder ``tu-<backbone>``: smp builds the
backbone with ``timm.create_model(backbone, features_only=True, ...)``, so it takes the classifier's keywords and
weights. :func:`predict_segmentation` runs mmsegmentation-style whole-image or sliding-window inference with
multi-scale and flip averaging.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import split_model_name_tag

from ...data import pair as _pair
from ...fileio import pretrained_overlay, unwrap_module
from ...models import MODEL_NAMES

__all__ = ['PREDICT_MODES', 'build_segmenter', 'backbone_of', 'sliding_windows', 'predict_segmentation']

PREDICT_MODES = ('whole', 'slide')
# strides smp's UPerNet accepts with stride 4-32 maps: ConvNeXt-style (4..32) and ResNet-style (2..32)
_PYRAMIDS = ([4, 8, 16, 32], [2, 4, 8, 16, 32])
_UPSTREAM_CLASSIFIER = 'pred'  # the classifier's name in upstream Conv2Former checkpoints (ours: 'head.fc')


def _feature_strides(backbone: str, backbone_kwargs: dict) -> list[int]:
    """Strides of the backbone's feature maps, from a weightless (meta-device) features_only build."""
    try:
        with torch.device('meta'):
            probe = timm.create_model(backbone, features_only=True, **backbone_kwargs)
    except (AssertionError, IndexError, RuntimeError, AttributeError, NotImplementedError) as e:
        raise ValueError(f'{backbone} has no feature pyramid (timm features_only failed: {e}); UperNet needs a '
                         f'hierarchical backbone with maps at strides 4, 8, 16, 32 (e.g. conv2former_t)') from None
    return list(probe.feature_info.reduction())


def _classifier_names(backbone: str) -> set[str]:
    cfg = timm.models.get_pretrained_cfg(backbone)
    classifier = (cfg.classifier if cfg is not None else None) or 'head.fc'
    names = {classifier} if isinstance(classifier, str) else set(classifier)
    if backbone.startswith('conv2former'):
        names.add(_UPSTREAM_CLASSIFIER)
    return names


def _backbone_weights_overlay(backbone: str, path: str | Path) -> dict:
    """timm ``pretrained_cfg_overlay`` with the classifier's weights minus its classifier, for a classifier-less load.

    With ``num_classes=0`` the model is built without a classifier and timm loads strictly, so any key other than
    the classifier that is missing, unexpected or of another shape raises.
    """
    path = Path(path)
    config_file = path / 'config.json'
    if path.is_dir() and config_file.is_file():
        architecture = json.loads(config_file.read_text()).get('architecture')
        if architecture and architecture != split_model_name_tag(backbone)[0]:
            raise ValueError(f'{path} holds a {architecture} model, not the backbone {backbone}')
    state_dict = pretrained_overlay(path)['state_dict']
    classifier = _classifier_names(backbone)
    state_dict = {k: v for k, v in state_dict.items() if k.rsplit('.', 1)[0] not in classifier}
    return dict(state_dict=state_dict, num_classes=0)


def build_segmenter(
        backbone: str = 'conv2former_t',
        num_classes: int = 150,
        pretrained_backbone: str | Path | None = None,
        decoder_channels: int = 512,
        **backbone_kwargs,
) -> nn.Module:
    """UperNet (``smp.UPerNet(encoder_name='tu-<backbone>')``) returning logits [N, num_classes, H, W].

    Args:
        backbone: A timm model with feature maps at strides 4-32: a hierarchical Conv2Former, ConvNeXt, ...
        num_classes: Output classes (>= 1).
        pretrained_backbone: Classification weights for the encoder: a model folder, .safetensors, or upstream
            .pth/.pth.tar. Its classifier is dropped; any other key that does not fit raises a ValueError.
        decoder_channels: Width of the UperNet decoder (PSP + FPN), 512 in the mmseg ConvNeXt/Swin configs.
        backbone_kwargs: timm model keywords, e.g. ``drop_path_rate=0.3``, ``kernel_size=7``, ``depths=...``.

    Inputs must be divisible by 32 (:func:`predict_segmentation` pads them).
    """
    if not timm.is_model(backbone):
        raise ValueError(f'unknown backbone {backbone!r}; registered Conv2Former models: '
                         f'{", ".join(MODEL_NAMES)}')
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
    if not isinstance(decoder_channels, int) or decoder_channels < 1:
        raise ValueError(f'decoder_channels must be an integer >= 1, got {decoder_channels!r}')
    strides = _feature_strides(backbone, backbone_kwargs)
    if strides not in _PYRAMIDS:
        raise ValueError(f'{backbone} gives feature maps at strides {strides}; UperNet needs a hierarchical backbone '
                         f'with maps at strides 4, 8, 16, 32 (e.g. conv2former_t), not an isotropic one')
    kwargs = dict(encoder_name=f'tu-{backbone}', classes=num_classes, decoder_channels=decoder_channels,
                  **backbone_kwargs)
    if pretrained_backbone is None:
        return smp.UPerNet(encoder_weights=None, **kwargs)
    overlay = _backbone_weights_overlay(backbone, pretrained_backbone)
    try:
        return smp.UPerNet(encoder_weights=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError) as e:  # the checkpoint filter's or load_state_dict's key/shape report
        raise ValueError(f'{pretrained_backbone} does not fit the backbone {backbone}: {e}') from None


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm feature module (a ``FeatureListNet``) of a :func:`build_segmenter` model (torch.compile / DDP
    wrappers are looked through).

    Its parameter names are the classifier's with each stage flattened to the top level: for Conv2Former
    ``stem.0.weight``, ``stages_0.blocks.0.norm1.weight``, ``stages_1.downsample.1.weight``; for ConvNeXt
    ``stem_0.weight``, ``stages_0.blocks.0.gamma``. In the whole model they carry the prefix ``encoder.model.``.
    """
    inner = getattr(getattr(unwrap_module(model), 'encoder', None), 'model', None)
    if not isinstance(inner, nn.Module):
        raise ValueError(f'expected a model from build_segmenter (a timm encoder at .encoder.model), '
                         f'got a {type(model).__name__}')
    return inner


def sliding_windows(
        height: int,
        width: int,
        crop_size: int | Sequence[int],
        stride: int | Sequence[int],
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` covering a ``height`` x ``width`` image (mmseg's slide inference).

    ``ceil((size - crop) / stride) + 1`` windows per axis at multiples of ``stride``; the last one is moved back to
    end at the image edge; windows are cut to the image where it is smaller than the crop.
    """
    crop_h, crop_w = _pair(crop_size, 'crop_size')
    stride_h, stride_w = _pair(stride, 'stride')
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f'stride {(stride_h, stride_w)} must not exceed crop_size {(crop_h, crop_w)} '
                         f'(pixels between windows would be left out)')

    def starts(size: int, crop: int, step: int) -> list[tuple[int, int]]:
        count = max(size - crop + step - 1, 0) // step + 1
        spans = []
        for i in range(count):
            end = min(i * step + crop, size)
            spans.append((max(end - crop, 0), end))
        return spans

    rows, cols = starts(height, crop_h, stride_h), starts(width, crop_w, stride_w)
    return [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]


def _run_padded(model: nn.Module, x: torch.Tensor, num_classes: int, size_divisor: int) -> torch.Tensor:
    """Logits [N, C, h, w] of ``x`` [N, 3, h, w]: padded right/bottom with zeros to a ``size_divisor`` multiple,
    run, resized to the padded size if the model outputs another one, and cropped back to (h, w)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % size_divisor, -width % size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[1] != num_classes:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f'the model returns {got}, expected logits (N, {num_classes}, H, W)')
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
    return logits[..., :height, :width].float()


def _slide(model: nn.Module, x: torch.Tensor, num_classes: int, crop_size: tuple[int, int],
           stride: tuple[int, int], size_divisor: int) -> torch.Tensor:
    """Window logits summed into a canvas and divided by the number of windows covering each pixel."""
    height, width = x.shape[-2:]
    canvas = x.new_zeros((x.shape[0], num_classes, height, width), dtype=torch.float32)
    count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in sliding_windows(height, width, crop_size, stride):
        canvas[..., y1:y2, x1:x2] += _run_padded(model, x[..., y1:y2, x1:x2], num_classes, size_divisor)
        count[..., y1:y2, x1:x2] += 1
    return canvas / count


@torch.no_grad()
def predict_segmentation(
        model: nn.Module,
        images: torch.Tensor,
        num_classes: int,
        mode: str = 'whole',
        crop_size: int | Sequence[int] = (512, 512),
        stride: int | Sequence[int] = (341, 341),
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        size_divisor: int = 32,
) -> torch.Tensor:
    """Softmax probabilities [N, num_classes, H, W] of normalized images [N, 3, H, W], at the input size.

    For each scale the batch is resized (bilinear, align_corners=False; size rounded) and, with ``flip``, also
    mirrored horizontally; each pass runs in ``mode``:

    * ``'whole'``: the image padded right/bottom to a multiple of ``size_divisor`` (UperNet needs 32);
    * ``'slide'``: ``crop_size`` windows every ``stride`` pixels (:func:`sliding_windows`), each padded to a
      ``size_divisor`` multiple if needed; overlapping logits are averaged.

    Each pass's logits are resized back to (H, W) and softmaxed; the result is the mean over passes. The model runs
    in eval mode and gets its train/eval state back afterwards.
    """
    if mode not in PREDICT_MODES:
        raise ValueError(f'mode must be one of {PREDICT_MODES}, got {mode!r}')
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f'images must be a tensor [N, C, H, W], got {got}')
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
    if not isinstance(size_divisor, int) or size_divisor < 1:
        raise ValueError(f'size_divisor must be an integer >= 1, got {size_divisor!r}')
    scales = tuple(scales)
    if not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise ValueError(f'scales must be a non-empty sequence of positive numbers, got {scales!r}')
    crop_size, stride = _pair(crop_size, 'crop_size'), _pair(stride, 'stride')
    if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
        raise ValueError(f'stride {stride} must not exceed crop_size {crop_size} '
                         f'(pixels between windows would be left out)')

    height, width = images.shape[-2:]
    flips = (False, True) if flip else (False,)
    probs = images.new_zeros((images.shape[0], num_classes, height, width), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for scale in scales:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            scaled = images if size == (height, width) else F.interpolate(
                images, size=size, mode='bilinear', align_corners=False)
            for flipped in flips:
                x = scaled.flip(-1) if flipped else scaled
                if mode == 'whole':
                    logits = _run_padded(model, x, num_classes, size_divisor)
                else:
                    logits = _slide(model, x, num_classes, crop_size, stride, size_divisor)
                if flipped:
                    logits = logits.flip(-1)
                if size != (height, width):
                    logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)
                probs += logits.softmax(dim=1)
    finally:
        model.train(was_training)
    return probs / (len(scales) * len(flips))
