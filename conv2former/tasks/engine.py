"""What differs between the dense tasks: the model and its folder on disk, the datasets, the loss of a batch,
evaluation, prediction and the overlays. ``tasks/train.py`` runs one loop for both.

A *task folder* holds ``config.json`` (``task``, ``model``, ``backbone``, ``backbone_kwargs``, ``num_classes``,
``class_names`` and the task's own settings: everything needed to rebuild the model) and ``model.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from ..data import load_rgb
from ..fileio import atomic_folder
from ..inference import unwrap_module
from ..training.distributed import DistEnv
from .datasets import (build_detection_dataset, build_segmentation_dataset, collate_detection, detection_transforms,
                       segmentation_transforms)
from .detection import build_detector
from .metrics import CocoEvaluator, SegmentationMetric
from .segmentation import backbone_of, build_segmenter, predict_segmentation
from .visualize import detection_overlay, segmentation_overlay

__all__ = ['TASKS', 'DetectionTask', 'SegmentationTask', 'build_task_model', 'load_task_model', 'write_task_folder']

_logger = logging.getLogger(__name__)
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
SEGMENTERS = ('upernet',)


# ------------------------------------------------------------------------------------------------------ task folders
def write_task_folder(model: nn.Module, folder: str | Path, config: dict) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a detector or segmenter, atomically."""
    model = unwrap_module(model)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        weights = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(weights, str(tmp / WEIGHTS_NAME))
    return Path(folder)


def build_task_model(config: dict, pretrained_backbone: str | Path | None = None) -> nn.Module:
    """Rebuild a detector or segmenter from its task-folder ``config``."""
    try:
        return _build_task_model(config, pretrained_backbone)
    except TypeError as e:  # a keyword the backbone does not take
        raise ValueError(f"{config.get('backbone')}: {e} (check --backbone-kwargs)") from None


def _build_task_model(config: dict, pretrained_backbone: str | Path | None) -> nn.Module:
    kwargs = dict(config.get('backbone_kwargs') or {})
    if config.get('task') == 'detect':
        return build_detector(config['model'], backbone=config['backbone'], num_classes=config['num_classes'],
                              pretrained_backbone=pretrained_backbone, min_size=tuple(config['min_size']),
                              max_size=config['max_size'], **kwargs)
    if config.get('task') == 'segment':
        return build_segmenter(config['backbone'], num_classes=config['num_classes'],
                               pretrained_backbone=pretrained_backbone,
                               decoder_channels=config['decoder_channels'], **kwargs)
    raise ValueError(f"task config has task={config.get('task')!r}; expected 'detect' or 'segment'")


def _find_task_folder(path: Path) -> Path:
    """``path`` if it is a task folder, else the ``best/`` (or ``last/``) task folder of a run folder."""
    for folder in (path, path / 'best', path / 'last'):
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            return folder
    raise FileNotFoundError(f'--checkpoint {path}: no {CONFIG_NAME} + {WEIGHTS_NAME} there or in its best/ or last/ '
                            f'(expected a detect/segment run folder or one of its model folders)')


def load_task_model(path: str | Path, task: str, device: str | torch.device = 'cpu') -> tuple[nn.Module, dict]:
    """A trained detector / segmenter and its config from a task folder or a run folder, in eval mode."""
    folder = _find_task_folder(Path(path))
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get('task') != task:
        raise ValueError(f'{folder} holds a {config.get("task") or "classification"} model, not a {task} model')
    model = build_task_model(config)
    state = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    model.load_state_dict(state)
    return model.to(device).eval(), config


def _image_tensor(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W] (any mode → RGB)."""
    return pil_to_tensor(load_rgb(path))


def _normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def _shard(n: int, env: DistEnv) -> list[int]:
    """This rank's share of 0..n-1, without the padding DistributedSampler adds (each image counted once)."""
    return list(range(env.rank, n, env.world_size))


def _backbone_kwargs(cfg: argparse.Namespace) -> dict:
    return dict(cfg.backbone_kwargs, drop_path_rate=cfg.drop_path)


# --------------------------------------------------------------------------------------------------------- detection
class DetectionTask:
    """Faster / Mask R-CNN, RetinaNet or FCOS (torchvision) on an FPN over the backbone's four stages."""
    name = 'detect'
    best_metric = 'bbox_AP'
    columns = [('epoch', 'epoch', 'd'), ('train loss', 'train_loss', '.4f'), ('box AP', 'bbox_AP', '.2f'),
               ('box AP50', 'bbox_AP50', '.2f'), ('mask AP', 'segm_AP', '.2f'), ('mask AP50', 'segm_AP50', '.2f'),
               ('lr', 'lr', '.3e'), ('img/s', 'img_per_sec', '.1f')]
    curves = {'box AP': 'bbox_AP', 'box AP50': 'bbox_AP50', 'mask AP': 'segm_AP', 'mask AP50': 'segm_AP50'}
    metric_label = 'COCO AP (%)'

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg

    @property
    def masks(self) -> bool:
        return self.cfg.model == 'maskrcnn'

    def datasets(self) -> tuple[Dataset, Dataset]:
        cfg = self.cfg
        train = build_detection_dataset(cfg.data, cfg.train_split, masks=self.masks, skip_empty=cfg.skip_empty,
                                        holdout=cfg.holdout,
                                        transforms=detection_transforms(True, hflip=cfg.hflip,
                                                                        photometric=cfg.photometric))
        val = build_detection_dataset(cfg.data, cfg.val_split, masks=self.masks, holdout=cfg.holdout,
                                      transforms=detection_transforms(False))
        if val.class_names != train.class_names:
            raise ValueError(f'{cfg.val_split} classes {val.class_names[1:]} differ from {cfg.train_split} classes '
                             f'{train.class_names[1:]}')
        return train, val

    def model_config(self, class_names: Sequence[str]) -> dict:
        cfg = self.cfg
        return dict(task=self.name, model=cfg.model, backbone=cfg.backbone, backbone_kwargs=_backbone_kwargs(cfg),
                    num_classes=len(class_names), class_names=list(class_names), min_size=list(cfg.min_size),
                    max_size=cfg.max_size)

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
    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False,
                 batch_size: int = 2, workers: int = 0) -> dict | None:
        """COCO box (and mask) AP of ``model`` on ``dataset``; every rank evaluates its share, rank 0 gets the
        summary (flat keys ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``...), the others None."""
        was_training = model.training
        model.eval()
        iou_types = ('bbox', 'segm') if self.masks_of(model) else ('bbox',)
        evaluator = CocoEvaluator(dataset.coco_gt(), iou_types=iou_types)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=_shard(len(dataset), env), num_workers=workers,
                            collate_fn=collate_detection)
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
            image = _image_tensor(dataset.image_path(i))
            _, target = dataset[i]  # eval transforms: no flip, original size
            prediction = self.predict(model, [image], device)[0]
            paths.append(detection_overlay(image, prediction, target, dataset.class_names,
                                           out_dir / f'{Path(dataset.image_path(i)).stem}.png',
                                           score_threshold=score_threshold))
        return paths


# ------------------------------------------------------------------------------------------------------ segmentation
class SegmentationTask:
    """UperNet (segmentation_models_pytorch, timm encoder ``tu-<backbone>``) for semantic segmentation."""
    name = 'segment'
    best_metric = 'mIoU'
    columns = [('epoch', 'epoch', 'd'), ('train loss', 'train_loss', '.4f'), ('mIoU', 'mIoU', '.2f'),
               ('pixel acc', 'pixel_acc', '.2f'), ('mean acc', 'mean_acc', '.2f'), ('lr', 'lr', '.3e'),
               ('img/s', 'img_per_sec', '.1f')]
    curves = {'mIoU': 'mIoU', 'pixel accuracy': 'pixel_acc', 'mean class accuracy': 'mean_acc'}
    metric_label = '%'

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.criterion = nn.CrossEntropyLoss(ignore_index=cfg.ignore_index)

    def _dataset(self, split: str, train: bool):
        cfg = self.cfg
        transforms = segmentation_transforms(train, crop_size=tuple(cfg.crop_size), scale_range=tuple(cfg.scale_range),
                                              base_size=cfg.base_size, hflip=cfg.hflip, photometric=cfg.photometric,
                                              ignore_index=cfg.ignore_index)
        return build_segmentation_dataset(cfg.data, split, class_names=cfg.class_names, num_classes=cfg.num_classes,
                                          ignore_index=cfg.ignore_index, reduce_zero_label=cfg.reduce_zero_label,
                                          transforms=transforms)

    def datasets(self) -> tuple[Dataset, Dataset]:
        train, val = self._dataset(self.cfg.train_split, True), self._dataset(self.cfg.val_split, False)
        if val.class_names != train.class_names:
            raise ValueError(f'{self.cfg.val_split} classes {val.class_names} differ from {self.cfg.train_split} '
                             f'classes {train.class_names}')
        return train, val

    def model_config(self, class_names: Sequence[str]) -> dict:
        cfg = self.cfg
        return dict(task=self.name, model=cfg.model, backbone=cfg.backbone, backbone_kwargs=_backbone_kwargs(cfg),
                    num_classes=len(class_names), class_names=list(class_names), ignore_index=cfg.ignore_index,
                    reduce_zero_label=cfg.reduce_zero_label, decoder_channels=cfg.decoder_channels,
                    inference=self.inference_settings(cfg))

    @staticmethod
    def inference_settings(cfg: argparse.Namespace) -> dict:
        return dict(mode=cfg.eval_mode, crop_size=list(cfg.crop_size), stride=list(cfg.eval_stride or cfg.crop_size),
                    scales=list(cfg.eval_scales), flip=cfg.eval_flip)

    backbone = staticmethod(backbone_of)
    collate = None  # fixed-size crops: default stacking

    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        images, masks = batch
        logits = model(images.to(device, non_blocking=True))
        return self.criterion(logits, masks.to(device, non_blocking=True).long())

    def probabilities(self, model: nn.Module, image: torch.Tensor, settings: dict) -> torch.Tensor:
        """Class probabilities [N, C, H, W] of normalized images [N, 3, H, W] with the run's inference settings."""
        return predict_segmentation(model, image, model_num_classes(model), mode=settings['mode'],
                                    crop_size=tuple(settings['crop_size']), stride=tuple(settings['stride']),
                                    scales=tuple(settings['scales']), flip=settings['flip'])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False,
                 batch_size: int = 1, workers: int = 0, settings: dict | None = None) -> dict | None:
        """mIoU, pixel and mean accuracy (%) at the labels' resolution; rank 0 gets them, the others None."""
        settings = settings or self.inference_settings(self.cfg)
        was_training = model.training
        model.eval()
        metric = SegmentationMetric(len(dataset.class_names), ignore_index=self.cfg.ignore_index)
        loader = DataLoader(dataset, batch_size=1, sampler=_shard(len(dataset), env), num_workers=workers)
        for images, masks in tqdm(loader, desc='evaluate', unit='img', disable=not progress, leave=False,
                                  dynamic_ncols=True):
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = self.probabilities(model, images.to(env.device), settings)
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
    def predict(self, model: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
                settings: dict) -> list[torch.Tensor]:
        """Label maps [H, W] for uint8 [3, H, W] images."""
        model.eval()
        return [self.probabilities(model, _normalize(im)[None].to(device), settings)[0].argmax(0).cpu()
                for im in images]

    def overlays(self, model: nn.Module, dataset: Dataset, out_dir: Path, count: int, device: torch.device,
                 settings: dict | None = None) -> list[Path]:
        settings = settings or self.inference_settings(self.cfg)
        paths = []
        for i in range(min(count, len(dataset))):
            image = _image_tensor(dataset.image_path(i))
            _, target = dataset[i]
            prediction = self.predict(model, [image], device, settings)[0]
            paths.append(segmentation_overlay(image, prediction, torch.as_tensor(target), dataset.class_names,
                                              out_dir / f'{Path(dataset.image_path(i)).stem}.png',
                                              ignore_index=self.cfg.ignore_index))
        return paths


def model_num_classes(model: nn.Module) -> int:
    """Output classes of an smp segmentation model (its head's last conv)."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


TASKS = {'detect': DetectionTask, 'segment': SegmentationTask}
