"""PNG overlays of dense predictions next to the ground truth: titled panels side by side, written atomically.

Detection: boxes with class names (and scores), instance masks blended in the class colour. Segmentation: class
colours blended over the image (ignored pixels left as they are) and a legend of the classes shown. Class ``c`` is
drawn in ``palette(len(class_names))[c]``; for detection ``class_names`` is indexed by label (index 0 = background,
like the detection datasets' ``class_names``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .fileio import atomic_path

__all__ = ['palette', 'detection_overlay', 'segmentation_overlay']

_TITLE_HEIGHT = 18  # strip above each panel holding its title
_GAP = 4  # white columns between panels
_LEGEND_ROW = 18  # height of one legend row (swatch + name)
_SWATCH = 12
_MASK_ALPHA = 0.5  # instance masks in detection overlays
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct deterministic RGB colours: the PASCAL VOC palette (bits of the index interleaved over R, G, B
    from the most significant bit down; class 0 is black)."""
    if int(n) < 0:
        raise ValueError(f'palette size must be >= 0, got {n}')
    colours = []
    for index in range(int(n)):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


def _check_image(image: torch.Tensor) -> tuple[int, int]:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        got = f'{image.dtype} {tuple(image.shape)}' if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f'image must be a uint8 tensor [3, H, W], got {got}')
    return int(image.shape[1]), int(image.shape[2])


def _class_name(class_names: Sequence[str], label: int) -> str:
    if not 0 <= label < len(class_names):
        raise ValueError(f'label {label} has no name: class_names has {len(class_names)} entries (index = label)')
    return class_names[label]


def _compose(panels: Sequence[tuple[str, torch.Tensor]], legend: Sequence[tuple[str, tuple]] = ()) -> Image.Image:
    """Panels side by side under their titles, then legend rows (wrapped to the canvas width)."""
    font = ImageFont.load_default()
    height, width = panels[0][1].shape[1:]
    canvas_width = len(panels) * width + (len(panels) - 1) * _GAP
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    rows: list[list[tuple[int, str, tuple]]] = [[]]  # (x, name, colour) per row
    x = 0
    for name, colour in legend:
        entry_width = _SWATCH + 4 + int(measure.textlength(name, font=font)) + 12
        if x and x + entry_width > canvas_width:
            rows.append([])
            x = 0
        rows[-1].append((x, name, colour))
        x += entry_width
    legend_height = _LEGEND_ROW * len(rows) if legend else 0
    canvas = Image.new('RGB', (canvas_width, _TITLE_HEIGHT + height + legend_height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        left = i * (width + _GAP)
        canvas.paste(Image.fromarray(panel.permute(1, 2, 0).contiguous().numpy(), mode='RGB'), (left, _TITLE_HEIGHT))
        draw.text((left + 3, 3), title, fill=_BLACK, font=font)
    if legend:
        for r, row in enumerate(rows):
            top = _TITLE_HEIGHT + height + r * _LEGEND_ROW + (_LEGEND_ROW - _SWATCH) // 2
            for x, name, colour in row:
                draw.rectangle((x + 2, top, x + 2 + _SWATCH - 1, top + _SWATCH - 1), fill=tuple(colour), outline=_BLACK)
                draw.text((x + _SWATCH + 6, top), name, fill=_BLACK, font=font)
    return canvas


def _save(canvas: Image.Image, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format='PNG')
    return path


def _draw_instances(image: torch.Tensor, instances: Mapping[str, torch.Tensor], captions: list[str],
                    colours: list[tuple], mask_threshold: float, what: str) -> torch.Tensor:
    """Masks (blended one after the other, so overlaps keep a colour) and then labelled boxes on ``image``."""
    height, width = image.shape[1:]
    boxes = torch.as_tensor(instances['boxes']).detach().cpu().float().reshape(-1, 4)
    if len(boxes) != len(captions):
        raise ValueError(f'{what} has {len(boxes)} boxes but {len(captions)} labels')
    masks = instances.get('masks')
    if masks is not None and len(captions):
        masks = torch.as_tensor(masks).detach().cpu()
        shape = tuple(masks.shape)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or len(masks) != len(captions) or tuple(masks.shape[1:]) != (height, width):
            raise ValueError(f'{what} masks have shape {shape}; expected [{len(captions)}, (1,) '
                             f'{height}, {width}] (one per box, at the image size)')
        binary = masks.bool() if not masks.is_floating_point() else masks > mask_threshold
        for mask, colour in zip(binary, colours):
            if mask.any():
                image = draw_segmentation_masks(image, mask, alpha=_MASK_ALPHA, colors=colour)
    if len(captions):
        image = draw_bounding_boxes(image, boxes, labels=captions, colors=colours, width=2, fill_labels=True,
                                    label_colors=_WHITE)
    return image


def detection_overlay(image: torch.Tensor, prediction: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor] | None, class_names: Sequence[str], path,
                      score_threshold: float = 0.5, mask_threshold: float = 0.5) -> Path:
    """Write a PNG: "ground truth" | "prediction" panels (only "prediction" when ``target`` is None) of ``image``
    (uint8 [3, H, W]) with boxes, class names (plus scores for detections with score >= ``score_threshold``) and
    instance masks (> ``mask_threshold``) when present. ``class_names[label]`` names a label. Returns ``path``."""
    _check_image(image)
    colours = palette(len(class_names))
    panels = []
    if target is not None:
        labels = torch.as_tensor(target['labels']).detach().cpu().reshape(-1).long().tolist()
        crowd = torch.as_tensor(target.get('iscrowd', torch.zeros(len(labels)))).reshape(-1).tolist()
        captions = [_class_name(class_names, lbl) + (' (crowd)' if c else '') for lbl, c in zip(labels, crowd)]
        panels.append(('ground truth', _draw_instances(image, target, captions, [colours[lbl] for lbl in labels],
                                                       mask_threshold, 'target')))
    scores = torch.as_tensor(prediction['scores']).detach().cpu().float().reshape(-1)
    keep = scores >= score_threshold
    kept = {k: torch.as_tensor(prediction[k]).detach().cpu()[keep] for k in ('boxes', 'labels', 'masks')
            if k in prediction}
    labels = kept['labels'].float().round().long().reshape(-1).tolist()
    captions = [f'{_class_name(class_names, lbl)} {s:.2f}' for lbl, s in zip(labels, scores[keep].tolist())]
    panels.append(('prediction', _draw_instances(image, kept, captions, [colours[lbl] for lbl in labels],
                                                 mask_threshold, 'prediction')))
    return _save(_compose(panels), path)


def _colourize(image: torch.Tensor, labels: torch.Tensor, colours: list[tuple], ignore_index: int, alpha: float,
               what: str) -> torch.Tensor:
    """Class colours blended over ``image``; pixels labelled ``ignore_index`` keep their exact values."""
    labels = torch.as_tensor(labels).detach().cpu()
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(f'{what} has shape {tuple(labels.shape)}; expected the image size {tuple(image.shape[1:])}')
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f'{what} must be an integer label map, got dtype {labels.dtype}')
    labels = labels.long()
    bad = ((labels < 0) | (labels >= len(colours))) & (labels != ignore_index)
    if bad.any():
        raise ValueError(f'{what} has values {torch.unique(labels[bad]).tolist()[:10]}; expected 0..'
                         f'{len(colours) - 1} or ignore_index {ignore_index}')
    present = [c for c in torch.unique(labels).tolist() if c != ignore_index]
    if not present:
        return image.clone()
    out = draw_segmentation_masks(image, torch.stack([labels == c for c in present]), alpha=alpha,
                                  colors=[colours[c] for c in present])
    ignored = labels == ignore_index
    out[:, ignored] = image[:, ignored]  # undo float round-off of the blend on pixels no mask covers
    return out


def segmentation_overlay(image: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor | None,
                         class_names: Sequence[str], path, ignore_index: int = 255, alpha: float = 0.5) -> Path:
    """Write a PNG: "image" | "ground truth" | "prediction" panels (no ground truth panel when ``target`` is None),
    class colours blended at ``alpha`` over ``image`` (uint8 [3, H, W]), and a legend of the classes present in the
    ground truth or prediction. Pixels labelled ``ignore_index`` are not coloured. Returns ``path``."""
    _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}')
    colours = palette(len(class_names))
    panels = [('image', image)]
    shown = set()
    for title, labels in (('ground truth', target), ('prediction', prediction)):
        if labels is None:
            continue
        panels.append((title, _colourize(image, labels, colours, ignore_index, alpha, title)))
        shown |= set(torch.as_tensor(labels).unique().tolist()) - {ignore_index}
    legend = [(class_names[c], colours[c]) for c in sorted(shown)]
    return _save(_compose(panels, legend), path)
