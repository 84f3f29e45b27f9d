"""COCO box / mask AP (pycocotools), accumulated per process and merged across ``torch.distributed`` ranks with
``synchronize()`` (a no-op without a process group). Results are percentages.

Conventions: the ground truth is a pycocotools ``COCO`` whose category ids are the model's labels 1..K and
whose image ids are the dataset items' ``image_id`` (crowd regions as ``iscrowd=1``); predictions are torchvision's
per-image dicts (``boxes`` XYXY in original pixels, ``scores``, ``labels``, and ``masks`` [N, 1, H, W] probabilities
for Mask R-CNN).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ['CocoEvaluator']

_logger = logging.getLogger(__name__)

IOU_TYPES = ('bbox', 'segm')
AP_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[0:6]


def _percent(value: float) -> float | None:
    """A pycocotools value in [0, 1] as a percentage rounded to 2 decimals; its -1 ("undefined") as None."""
    return None if value < 0 else round(100 * float(value), 2)


class CocoEvaluator:
    """COCO AP of torchvision detections against a ``COCO`` ground truth, over the images passed to ``update``.

    ``update`` turns predictions into COCO results right away (XYWH boxes; masks binarized at ``> mask_threshold``
    and RLE-encoded) held as plain python lists on the CPU, so ``synchronize`` can gather them. A later prediction for
    an image replaces an earlier one, so gathering twice or duplicated images count once. ``summarize`` evaluates
    only the updated image ids and keeps pycocotools' printed table in ``summary_text[iou_type]``.
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] | str = IOU_TYPES, mask_threshold: float = 0.5):
        if not isinstance(coco_gt, COCO):
            raise ValueError(f'coco_gt must be a pycocotools COCO object, got {type(coco_gt).__name__}')
        iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(dict.fromkeys(iou_types))
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f'iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}')
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f'mask_threshold must be in [0, 1), got {mask_threshold}')
        self.coco_gt = coco_gt
        self.iou_types = iou_types
        self.mask_threshold = mask_threshold
        self.summary_text: dict[str, str] = {}
        self._results: dict[int, dict[str, list[dict]]] = {}  # image id → iou type → COCO result dicts

    @property
    def img_ids(self) -> list[int]:
        """The image ids updated so far (sorted)."""
        return sorted(self._results)

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add ``{image_id: prediction}``; each prediction is converted to COCO results at once."""
        if not isinstance(predictions, Mapping):
            raise ValueError(f'predictions must be a dict image_id → prediction, got {type(predictions).__name__}')
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f'image_id {image_id} is not in the ground truth ({len(self.coco_gt.imgs)} images; '
                                 f'expected the dataset items\' image_id)')
            self._results[image_id] = self._to_coco(image_id, prediction)

    def _to_coco(self, image_id: int, prediction: Mapping[str, torch.Tensor]) -> dict[str, list[dict]]:
        missing = [k for k in ('boxes', 'scores', 'labels') if k not in prediction]
        if missing:
            raise ValueError(f'prediction for image {image_id} lacks {missing}; expected torchvision detection output '
                             f'with boxes, scores, labels (and masks for segm)')
        boxes = torch.as_tensor(prediction['boxes']).detach().cpu().double()
        scores = torch.as_tensor(prediction['scores']).detach().cpu().double()
        labels = torch.as_tensor(prediction['labels']).detach().cpu()
        labels = (labels.round() if labels.is_floating_point() else labels).long()  # engines may pass float labels
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        n = len(scores)
        if boxes.shape != (n, 4) or labels.shape != (n,) or scores.shape != (n,):
            raise ValueError(f'prediction for image {image_id}: boxes {tuple(boxes.shape)}, scores '
                             f'{tuple(scores.shape)}, labels {tuple(labels.shape)}; expected [N, 4], [N], [N]')
        unknown = sorted(set(labels.tolist()) - set(self.coco_gt.cats))
        if unknown:
            raise ValueError(f'prediction for image {image_id} has labels {unknown} that are no ground-truth category '
                             f'id (categories {sorted(self.coco_gt.cats)})')
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        common = [dict(image_id=image_id, category_id=int(c), score=float(s))
                  for c, s in zip(labels.tolist(), scores.tolist())]
        out: dict[str, list[dict]] = {}
        if 'bbox' in self.iou_types:
            out['bbox'] = [dict(r, bbox=b) for r, b in zip(common, xywh.tolist())]
        if 'segm' in self.iou_types:
            rles = self._encode_masks(image_id, prediction, n)
            out['segm'] = [dict(r, segmentation=rle) for r, rle in zip(common, rles)]
        return out

    def _encode_masks(self, image_id: int, prediction: Mapping[str, torch.Tensor], n: int) -> list[dict]:
        if 'masks' not in prediction:
            raise ValueError(f"iou_types includes 'segm' but the prediction for image {image_id} has no masks "
                             f"(a Mask R-CNN output is needed; use iou_types=('bbox',) otherwise)")
        masks = torch.as_tensor(prediction['masks']).detach().cpu()
        info = self.coco_gt.imgs[image_id]
        size = (info['height'], info['width'])
        shape = tuple(masks.shape)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or len(masks) != n or tuple(masks.shape[1:]) != size:
            raise ValueError(f'masks for image {image_id} have shape {shape}; expected [{n}, 1, {size[0]}, {size[1]}] '
                             f'(one per detection, at the image size in the ground truth)')
        if n == 0:
            return []
        binary = masks if masks.dtype == torch.bool else masks > self.mask_threshold
        rles = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8)))
        return [dict(size=[int(s) for s in rle['size']], counts=rle['counts'].decode('ascii')) for rle in rles]

    def synchronize(self) -> None:
        """Gather every rank's results onto rank 0 (all_gather_object); a no-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._results)
        if dist.get_rank() == 0:
            merged: dict[int, dict[str, list[dict]]] = {}
            for part in gathered:
                merged.update(part)
            self._results = merged

    def _load_results(self, results: list[dict]) -> COCO:
        """``coco_gt.loadRes`` that also takes no results (pycocotools' own indexes ``anns[0]``)."""
        if results:
            return self.coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the dicts
        empty = COCO()
        empty.dataset = dict(images=list(self.coco_gt.dataset['images']), annotations=[],
                             categories=copy.deepcopy(self.coco_gt.dataset['categories']))
        empty.createIndex()
        return empty

    def summarize(self) -> dict[str, dict]:
        """``{iou_type: {AP, AP50, AP75, APs, APm, APl, per_class}}`` in percent (2 decimals), pycocotools' "undefined"
        (no ground truth in that area range / class) as None. ``per_class`` maps category id → AP at IoU .5:.95, all
        areas, 100 detections. Without any prediction everything defined is 0.0 (and a warning is logged)."""
        if not self._results:
            raise ValueError('nothing to evaluate: update() was never called with an image '
                             '(on a distributed run, call synchronize() first and summarize() on rank 0)')
        img_ids = self.img_ids
        if not any(self._results[i][self.iou_types[0]] for i in img_ids):
            _logger.warning('no predictions on the %d evaluated images: every defined AP is 0', len(img_ids))
        summary: dict[str, dict] = {}
        for iou_type in self.iou_types:
            results = [r for i in img_ids for r in self._results[i][iou_type]]
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = COCOeval(self.coco_gt, self._load_results(results), iou_type)
                coco_eval.params.imgIds = img_ids
                coco_eval.evaluate()
                coco_eval.accumulate()
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                coco_eval.summarize()
            self.summary_text[iou_type] = text.getvalue()
            stats = dict(zip(AP_KEYS, (_percent(v) for v in coco_eval.stats[:len(AP_KEYS)])))
            precision = coco_eval.eval['precision']  # [IoU thresholds, recall points, classes, areas, max dets]
            per_class = {}
            for k, cat_id in enumerate(coco_eval.params.catIds):
                p = precision[:, :, k, 0, -1]  # area 'all', maxDets 100
                per_class[int(cat_id)] = _percent(float(np.mean(p[p > -1]))) if (p > -1).any() else None
            summary[iou_type] = dict(stats, per_class=per_class)
        return summary
