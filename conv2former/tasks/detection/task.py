"""Detection and instance segmentation as an engine task: torchvision's Faster / Mask R-CNN, RetinaNet and FCOS on
an FPN over a hierarchical backbone, trained with the ConvNeXt/Swin COCO recipe, evaluated with COCO AP."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ...engine.distributed import DistEnv
from ...visualize import detection_overlay
from ..dense import DenseTask, image_tensor, same_data
from .data import PennFudanDataset, build_detection_dataset, collate_detection, detection_transforms
from .metrics import CocoEvaluator
from .model import build_detector
from .options import DetectionOptions
from .recipes import DETECTION_RECIPES


class DetectionTask(DenseTask):
    """Faster / Mask R-CNN, RetinaNet or FCOS (torchvision) on an FPN over the backbone's four stages."""
    name = 'detect'
    record_keys = ('holdout',)
    best_metric = 'bbox_AP'
    columns = [('epoch', 'epoch', 'd'), ('train loss', 'train_loss', '.4f'), ('box AP', 'bbox_AP', '.2f'),
               ('box AP50', 'bbox_AP50', '.2f'), ('mask AP', 'segm_AP', '.2f'), ('mask AP50', 'segm_AP50', '.2f'),
               ('lr', 'lr', '.3e'), ('img/s', 'img_per_sec', '.1f')]
    curves = {'box AP': 'bbox_AP', 'box AP50': 'bbox_AP50', 'mask AP': 'segm_AP', 'mask AP50': 'segm_AP50'}
    metric_label = 'COCO AP (%)'
    recipes = DETECTION_RECIPES
    find_unused_parameters = True  # torchvision's detectors leave heads unused on batches without positives
    eval_batch_size = 2

    @property
    def masks(self) -> bool:
        return self.options.model == 'maskrcnn'

    def _dataset(self, split: str, train: bool) -> Dataset:
        o = self.options
        transforms = detection_transforms(train, hflip=o.hflip, photometric=o.photometric)
        return build_detection_dataset(o.data, split, masks=self.masks, skip_empty=train and o.skip_empty,
                                       holdout=o.holdout, transforms=transforms)

    def model_config(self, class_names: Sequence[str]) -> dict:
        o = self.options
        return dict(task=self.name, model=o.model, backbone=o.backbone, backbone_kwargs=self.backbone_kwargs(),
                    num_classes=len(class_names), class_names=list(class_names), min_size=list(o.min_size),
                    max_size=o.max_size)

    @staticmethod
    def build(config: dict, pretrained_backbone=None) -> nn.Module:
        """The detector described by a task-folder ``config``."""
        return build_detector(config['model'], backbone=config['backbone'], num_classes=config['num_classes'],
                              pretrained_backbone=pretrained_backbone, min_size=tuple(config['min_size']),
                              max_size=config['max_size'], **(config.get('backbone_kwargs') or {}))

    @staticmethod
    def backbone(model: nn.Module) -> nn.Module:
        return model.backbone.body  # GeneralizedRCNN.backbone is the Conv2FormerFPN, its .body the timm features

    collate = staticmethod(collate_detection)

    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return sum(model(images, targets).values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False
                 ) -> dict | None:
        """COCO box (and mask) AP of ``model`` on ``dataset``; every rank evaluates its share, rank 0 gets the
        summary (flat keys ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``...), the others None."""
        was_training = model.training
        model.eval()
        iou_types = ('bbox', 'segm') if self.masks_of(model) else ('bbox',)
        evaluator = CocoEvaluator(dataset.coco_gt(), iou_types=iou_types)
        loader = DataLoader(dataset, batch_size=self.eval_batch_size, sampler=env.shard(len(dataset)),
                            num_workers=self.options.workers, collate_fn=collate_detection)
        for images, targets in tqdm(loader, desc='evaluate', unit='batch', disable=not progress, leave=False,
                                    dynamic_ncols=True):
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model([im.to(env.device) for im in images])
            evaluator.update({int(t['image_id']): {k: v.float().cpu() for k, v in o.items()}
                              for t, o in zip(targets, outputs)})
        evaluator.synchronize()
        model.train(was_training)
        if not env.is_main:
            return None
        summary = evaluator.summarize()
        return {f'{iou}_{k}': v for iou in iou_types for k, v in summary[iou].items() if k != 'per_class'}

    @staticmethod
    def masks_of(model: nn.Module) -> bool:
        return getattr(getattr(model, 'roi_heads', None), 'mask_predictor', None) is not None

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> list[dict]:
        """Detections (original pixel coordinates) for uint8 [3, H, W] images."""
        model.eval()
        outputs = model([im.to(device).float() / 255 for im in images])
        return [{k: v.float().cpu() for k, v in o.items()} for o in outputs]

    def overlays(self, model: nn.Module, dataset: Dataset, out_dir: Path, count: int, device: torch.device,
                 score_threshold: float = 0.5) -> list[Path]:
        """Ground truth | prediction PNGs for the first ``count`` images of ``dataset``."""
        paths = []
        for i in range(min(count, len(dataset))):
            image = image_tensor(dataset.image_path(i))
            _, target = dataset[i]  # eval transforms: no flip, original size
            prediction = self.predict(model, [image], device)[0]
            paths.append(detection_overlay(image, prediction, target, dataset.class_names,
                                           out_dir / f'{Path(dataset.image_path(i)).stem}.png',
                                           score_threshold=score_threshold))
        return paths



    @classmethod
    def from_config(cls, config: dict, args: argparse.Namespace) -> 'DetectionTask':
        options = DetectionOptions(data=getattr(args, 'data', None), model=config['model'],
                                   backbone=config['backbone'], holdout=getattr(args, 'holdout', None) or 50,
                                   workers=getattr(args, 'workers', 0))
        options.finalize(training=False)  # evaluation / prediction: data only where the command has it
        task = cls(options)
        task.config, task.eval_batch_size = config, getattr(args, 'batch_size', 2)
        return task

    def eval_record(self) -> dict:
        return dict(holdout=self.options.holdout)

    def train_overlap(self, dataset: Dataset, split: str, record: dict) -> int:
        """Penn-Fudan: the images of the split that fall into the run's training part of the fixed split order (a
        larger hold-out than the run's reaches into it); other data: as for any dense task."""
        if not (isinstance(dataset, PennFudanDataset) and 'holdout' in record and same_data(self.options.data,
                                                                                            record.get('data'))):
            return super().train_overlap(dataset, split, record)
        n = dataset.num_images
        start = {'val': n - self.options.holdout, 'train': 0, 'all': 0}[dataset.split]
        end = {'val': n, 'train': n - self.options.holdout, 'all': n}[dataset.split]
        return max(0, min(end, n - record['holdout']) - start)

    def predict_file(self, model: nn.Module, path: Path, out_dir: Path, device: torch.device,
                     args: argparse.Namespace) -> dict:
        """Detections above ``--score-threshold`` for one image file, with its overlay PNG."""
        image = image_tensor(path)
        pred = self.predict(model, [image], device)[0]
        keep = pred['scores'] >= args.score_threshold
        names = self.config['class_names']
        overlay = detection_overlay(image, pred, None, names, out_dir / f'{path.stem}.png',
                                    score_threshold=args.score_threshold)
        return dict(image=str(path), detections=[
            dict(label=names[int(lbl)], score=round(float(s), 4), box=[round(float(c), 1) for c in box])
            for lbl, s, box in zip(pred['labels'][keep], pred['scores'][keep], pred['boxes'][keep])],
            overlay=str(overlay))

    @staticmethod
    def summary(record: dict) -> str:
        return ', '.join(f'{d["label"]} {d["score"]:.2f}' for d in record['detections']) or 'nothing'
