"""Semantic segmentation as an engine task: UperNet (segmentation_models_pytorch, timm encoder ``tu-<backbone>``)
trained with the ConvNeXt/Swin ADE20k recipe, evaluated with mIoU (whole image, sliding window, multi-scale, flip)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ...data import pair
from ...engine.distributed import DistEnv
from ...fileio import atomic_path
from ...visualize import segmentation_overlay
from ..dense import DenseTask, image_tensor, normalize
from .data import build_segmentation_dataset, segmentation_transforms
from .metrics import SegmentationMetric
from .model import backbone_of, build_segmenter, predict_segmentation
from .options import SegmentationOptions
from .recipes import SEGMENTATION_RECIPES


class SegmentationTask(DenseTask):
    """UperNet (segmentation_models_pytorch, timm encoder ``tu-<backbone>``) for semantic segmentation."""
    name = 'segment'
    best_metric = 'mIoU'
    columns = [('epoch', 'epoch', 'd'), ('train loss', 'train_loss', '.4f'), ('mIoU', 'mIoU', '.2f'),
               ('pixel acc', 'pixel_acc', '.2f'), ('mean acc', 'mean_acc', '.2f'), ('lr', 'lr', '.3e'),
               ('img/s', 'img_per_sec', '.1f')]
    curves = {'mIoU': 'mIoU', 'pixel accuracy': 'pixel_acc', 'mean class accuracy': 'mean_acc'}
    metric_label = '%'
    recipes = SEGMENTATION_RECIPES

    def __init__(self, options: SegmentationOptions):
        super().__init__(options)
        self.criterion = nn.CrossEntropyLoss(ignore_index=options.ignore_index)
        self.settings = options.inference_settings()

    def _dataset(self, split: str, train: bool):
        o = self.options
        transforms = segmentation_transforms(train, crop_size=o.crop_size, scale_range=o.scale_range,
                                              base_size=o.base_size, hflip=o.hflip, photometric=o.photometric,
                                              ignore_index=o.ignore_index)
        return build_segmentation_dataset(o.data, split, class_names=o.class_names, num_classes=o.num_classes,
                                          ignore_index=o.ignore_index, reduce_zero_label=o.reduce_zero_label,
                                          transforms=transforms)

    def model_config(self, class_names: Sequence[str]) -> dict:
        o = self.options
        return dict(task=self.name, model=o.model, backbone=o.backbone, backbone_kwargs=self.backbone_kwargs(),
                    num_classes=len(class_names), class_names=list(class_names), ignore_index=o.ignore_index,
                    reduce_zero_label=o.reduce_zero_label, decoder_channels=o.decoder_channels,
                    inference=self.settings)

    @staticmethod
    def build(config: dict, pretrained_backbone=None) -> nn.Module:
        """The segmenter described by a task-folder ``config``."""
        return build_segmenter(config['backbone'], num_classes=config['num_classes'],
                               pretrained_backbone=pretrained_backbone, decoder_channels=config['decoder_channels'],
                               **(config.get('backbone_kwargs') or {}))

    backbone = staticmethod(backbone_of)
    collate = None  # fixed-size crops: default stacking

    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        images, masks = batch
        logits = model(images.to(device, non_blocking=True))
        return self.criterion(logits, masks.to(device, non_blocking=True).long())

    def probabilities(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, C, H, W] of normalized images [N, 3, H, W] with the inference settings."""
        settings = self.settings
        return predict_segmentation(model, image, model_num_classes(model), mode=settings['mode'],
                                    crop_size=tuple(settings['crop_size']), stride=tuple(settings['stride']),
                                    scales=tuple(settings['scales']), flip=settings['flip'])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False
                 ) -> dict | None:
        """mIoU, pixel and mean accuracy (%) at the labels' resolution; rank 0 gets them, the others None."""
        was_training = model.training
        model.eval()
        metric = SegmentationMetric(len(dataset.class_names), ignore_index=self.options.ignore_index)
        loader = DataLoader(dataset, batch_size=1, sampler=env.shard(len(dataset)), num_workers=self.options.workers)
        for images, masks in tqdm(loader, desc='evaluate', unit='img', disable=not progress, leave=False,
                                  dynamic_ncols=True):
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = self.probabilities(model, images.to(env.device))
            metric.update(probs.argmax(1).cpu(), masks.long())
        metric.synchronize()
        model.train(was_training)
        if not env.is_main:
            return None
        result = metric.compute()
        out = {k: result[k] for k in ('mIoU', 'pixel_acc', 'mean_acc')}
        out['per_class_iou'] = dict(zip(dataset.class_names, result['per_class_iou']))
        return out

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Label maps [H, W] for uint8 [3, H, W] images."""
        model.eval()
        return [self.probabilities(model, normalize(im)[None].to(device))[0].argmax(0).cpu()
                for im in images]

    def overlays(self, model: nn.Module, dataset: Dataset, out_dir: Path, count: int, device: torch.device
                 ) -> list[Path]:
        paths = []
        for i in range(min(count, len(dataset))):
            image = image_tensor(dataset.image_path(i))
            _, target = dataset[i]
            prediction = self.predict(model, [image], device)[0]
            paths.append(segmentation_overlay(image, prediction, torch.as_tensor(target), dataset.class_names,
                                              out_dir / f'{Path(dataset.image_path(i)).stem}.png',
                                              ignore_index=self.options.ignore_index))
        return paths

    @classmethod
    def from_config(cls, config: dict, args: argparse.Namespace) -> 'SegmentationTask':
        """The saved inference settings, overridden by the command's --crop-size / --eval-* flags."""
        inference = dict(config.get('inference') or {})
        for key in ('mode', 'scales', 'flip'):
            value = getattr(args, f'eval_{key}', None)
            if value is not None:
                inference[key] = list(value) if isinstance(value, (tuple, list)) else value
        if getattr(args, 'crop_size', None):
            inference['crop_size'] = list(pair(args.crop_size, '--crop-size'))
            inference['stride'] = [max(1, c * 2 // 3) for c in inference['crop_size']]
        if getattr(args, 'eval_stride', None):
            inference['stride'] = list(pair(args.eval_stride, '--eval-stride'))
        options = SegmentationOptions(data=getattr(args, 'data', None), backbone=config['backbone'],
                                      ignore_index=config.get('ignore_index', 255),
                                      reduce_zero_label=config.get('reduce_zero_label'),
                                      class_names=config['class_names'], workers=getattr(args, 'workers', 0))
        options.finalize(training=False)  # evaluation / prediction: data only where the command has it
        task = cls(options)
        task.config, task.settings = config, inference
        return task

    def eval_record(self) -> dict:
        return dict(inference=self.settings)

    def predict_file(self, model: nn.Module, path: Path, out_dir: Path, device: torch.device,
                     args: argparse.Namespace) -> dict:
        """The label map of one image file (a PNG of class indices), its overlay and the class shares."""
        image = image_tensor(path)
        labels = self.predict(model, [image], device)[0]
        names = self.config['class_names']
        with atomic_path(out_dir / f'{path.stem}_labels.png') as tmp:
            Image.fromarray(labels.to(torch.uint8).numpy(), mode='L').save(tmp, format='PNG')
        overlay = segmentation_overlay(image, labels, None, names, out_dir / f'{path.stem}.png',
                                       ignore_index=self.options.ignore_index)
        counts = torch.bincount(labels.flatten(), minlength=len(names))
        return dict(image=str(path), labels=str(out_dir / f'{path.stem}_labels.png'), classes={
            names[c]: round(100 * int(n) / labels.numel(), 2) for c, n in enumerate(counts.tolist()) if n},
            overlay=str(overlay))

    @staticmethod
    def summary(record: dict) -> str:
        return ', '.join(f'{k} {v:.1f}%' for k, v in sorted(record['classes'].items(), key=lambda kv: -kv[1]))


def model_num_classes(model: nn.Module) -> int:
    """Output classes of an smp segmentation model (its head's last conv)."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


