"""What detection and segmentation share: their common options and the engine-task base class (task folders, the
optimizer with layer-wise lr decay over the backbone (``engine.optim``), the step schedule, overlays and results).
The subclasses in ``tasks.detection`` and ``tasks.segmentation`` add data, model, loss and metrics; their commands
are in ``tasks.dense_cli``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from ..data import canonical_split, load_rgb
from ..engine.optim import BackboneLayers, create_optimizer
from ..engine.options import RunOptions, non_negative_float, option, positive_int, probability, redefault
from ..fileio import WEIGHTS_NAME, atomic_write_text, infer_num_classes, read_task_folder, write_task_folder
from ..models import load_state_dict_file, unwrap_state_dict
from ..models.keywords import check_model_kwargs

__all__ = ['DenseOptions', 'DenseTask', 'load_task_model']

_logger = logging.getLogger('conv2former.tasks')


def _loaded_summary(backbone: nn.Module, path) -> str:
    """What ``--pretrained-backbone`` loaded: the file, the classifier it came from, the tensors used and left out
    (timm loads strictly: every backbone tensor comes from the file, or the build fails)."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    weights = unwrap_state_dict(load_state_dict_file(file))
    config = file.parent / 'config.json'
    arch = json.loads(config.read_text()).get('architecture') if config.is_file() else None
    used = backbone.state_dict()
    values = sum(t.numel() for t in used.values())
    return (f'loaded {len(used)} tensors ({values / 1e6:.2f}M values) from {file} (a {arch or "classifier"} with '
            f'{infer_num_classes(weights)} classes, {len(weights)} tensors); its classifier and stage outputs the '
            f'backbone does not use are left out')


# ------------------------------------------------------------------------------------------------------------ options
@dataclasses.dataclass
class DenseOptions(RunOptions):
    """Options shared by ``detect train`` and ``segment train``."""
    data: Optional[str] = redefault(RunOptions, 'data', None, help='dataset folder or .tar/.tar.gz archive (required)')
    train_split: str = option('train', '--train-split')
    val_split: str = option('val', '--val-split')
    backbone: str = option('conv2former_t', '--backbone', help='hierarchical timm model name', group='model')
    backbone_kwargs: dict = option({}, '--backbone-kwargs', kind='keywords', group='model',
                                   help='backbone constructor keywords, e.g. kernel_size=7 depths=[1,1,3,1]')
    pretrained_backbone: Optional[Path] = option(None, '--pretrained-backbone', type=Path, group='model',
                                                 help='classification weights: our model or run folder, '
                                                      '.safetensors, or upstream .pth/.pth.tar')
    drop_path: float = option(0.2, '--drop-path', type=probability, help='backbone stochastic depth rate',
                              group='model')
    epochs: int = redefault(RunOptions, 'epochs', 12)
    iters: Optional[int] = option(None, '--iters', type=positive_int, group='optimisation',
                                  help='optimizer steps (overrides --epochs, rounded up to whole epochs)')
    batch_size: int = redefault(RunOptions, 'batch_size', 2, help='images per process')
    lr: float = redefault(RunOptions, 'lr', 1e-4)
    min_lr: float = redefault(RunOptions, 'min_lr', 0.0)
    decay_milestones: tuple = option((8, 11), '--decay-milestones', type=int, nargs='+', group='optimisation',
                                     help='multistep: epochs to decay at')
    warmup_ratio: float = option(1e-3, '--warmup-ratio', type=non_negative_float, group='optimisation',
                                 help='warm-up starts at lr x this')
    hflip: float = option(0.5, '--hflip', type=probability, group='data and augmentation')
    overlays: int = option(4, '--overlays', type=int, help='prediction PNGs of the first N val images (0: none)',
                           group='checkpoints and logging')

    def finalize(self, training: bool = True) -> None:
        if training and not self.data:
            raise ValueError('training needs --data (a dataset folder or archive)')
        self.decay_milestones = tuple(self.decay_milestones)


# --------------------------------------------------------------------------------------------------------------- task
class DenseTask:
    """The engine-task behaviour detection and segmentation share; subclasses set ``name`` ('detect'/'segment'),
    the report attributes, and implement ``_dataset``, ``model_config``, ``build``, ``backbone``, ``loss``,
    ``evaluate``, ``predict`` and ``overlays``."""
    name = ''
    collate = None
    record_keys: tuple = ()  # eval flags that default to the run's config.yaml values (besides data)
    find_unused_parameters = False
    ema_decay = None        # no EMA and no torch.compile for the dense tasks
    compile_backend = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.best_key = f'best_{cls.best_metric}'  # on the class: a sweep's aggregation reads it without a task

    def merge_data_counts(self, env) -> None:
        """The dense datasets count nothing per process."""

    def __init__(self, options):
        self.options = options
        self.model_id = f'{self.name}:{options.model}:{options.backbone}'
        self.run_name = f'{options.model}-{options.backbone}'
        self.title = f'Conv2Former {self.name} run ({options.model} on {options.backbone})'

    def datasets(self) -> tuple[Dataset, Dataset]:
        o = self.options
        train, val = self._dataset(o.train_split, True), self._dataset(o.val_split, False)
        if val.class_names != train.class_names:
            raise ValueError(f'{o.val_split} classes {val.class_names} differ from {o.train_split} classes '
                             f'{train.class_names}')
        return train, val

    def log_data(self, train: Dataset, val: Dataset) -> None:
        for split, ds in (('train', train), ('val', val)):
            counts = {k: v for k, v in getattr(ds, 'stats', {}).items() if v}
            if counts:
                _logger.warning('%s data clean-up: %s', split, counts)

    def backbone_kwargs(self) -> dict:
        return dict(self.options.backbone_kwargs, drop_path_rate=self.options.drop_path)

    def build_model(self, class_names: Sequence[str], resuming: bool) -> nn.Module:
        self.config = self.model_config(class_names)
        pretrained = None if resuming else self.options.pretrained_backbone
        check_model_kwargs(self.options.backbone, self.options.backbone_kwargs, '--backbone-kwargs')
        try:
            model = self.build(self.config, pretrained)
        except TypeError as e:  # a keyword the backbone does not take
            raise ValueError(f'{self.options.backbone}: {e} (check --backbone-kwargs)') from None
        if pretrained:
            _logger.info('backbone %s: %s', self.options.backbone, _loaded_summary(self.backbone(model), pretrained))
        return model

    def optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
        o = self.options
        layers = BackboneLayers(model, self.backbone(model), o.backbone) if o.layer_decay is not None else None
        return create_optimizer(model, o.opt, o.lr, o.weight_decay, o.layer_decay, layers)

    def schedule(self, steps_per_epoch: int) -> dict:
        o = self.options
        epochs = math.ceil(o.iters / steps_per_epoch) if o.iters else o.epochs
        return dict(sched=o.sched, num_epochs=epochs, decay_milestones=list(o.decay_milestones),
                    decay_rate=o.decay_rate, warmup_epochs=o.warmup_iters / steps_per_epoch,
                    warmup_lr=o.lr * o.warmup_ratio, min_lr=o.min_lr)

    def write_model(self, model: nn.Module, folder: Path, ema_state_dict: Optional[dict] = None) -> Path:
        return write_task_folder(model, folder, self.config, ema_state_dict)

    def finish(self, model: nn.Module, val: Dataset, run_dir: Path, final: dict, last_eval: Optional[dict]) -> dict:
        o = self.options
        images = {}
        if o.overlays:
            paths = self.overlays(model, val, run_dir / 'overlays', o.overlays, next(model.parameters()).device)
            images = {p.stem: p.relative_to(run_dir).as_posix() for p in paths}
        results = dict(final, model=o.model, backbone=o.backbone, data=str(o.data), val_split=o.val_split)
        results.update(last_eval or {})
        atomic_write_text(run_dir / 'results.json', json.dumps(results, indent=2, default=str))
        return images

    # -------------------------------------------------------------------------------- evaluation of a saved model
    @classmethod
    def from_config(cls, config: dict, args: argparse.Namespace) -> 'DenseTask':
        """A task for evaluating / predicting with a saved model: its folder's config plus the command's flags."""
        raise NotImplementedError

    def train_overlap(self, dataset: Dataset, split: str, record: dict) -> int:
        """How many images of ``dataset`` (``split`` of this task's data) trained the run whose ``config.yaml`` is
        ``record``: all of them when it is the run's training split of the same data, else none."""
        if not record or not same_data(self.options.data, record.get('data')):
            return 0
        return len(dataset) if _split_key(split) == _split_key(record.get('train_split', 'train')) else 0

    def eval_dataset(self, split: str) -> Dataset:
        dataset = self._dataset(split, False)
        if dataset.class_names != self.config['class_names']:
            raise ValueError(f'{self.options.data} ({split}) classes {dataset.class_names} differ from the '
                             f"model's {self.config['class_names']}")
        return dataset


def same_data(a, b) -> bool:
    """Whether two data paths name the same dataset."""
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _split_key(split: str) -> str:
    try:
        return canonical_split(split)
    except ValueError:
        return split


def image_tensor(path) -> torch.Tensor:
    """An image file as uint8 [3, H, W] (any mode → RGB)."""
    return pil_to_tensor(load_rgb(path))


def normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def load_task_model(path, task: str, device='cpu', build=None) -> tuple[nn.Module, dict]:
    """A trained detector / segmenter (``build(config)`` rebuilds it) and its config from a task folder or a run
    folder, in eval mode."""
    config, weights, folder = read_task_folder(path)
    if config.get('task') != task:
        raise ValueError(f'{folder} holds a {config.get("task") or "classification"} model, not a {task} model')
    model = build(config, None)
    model.load_state_dict(weights)
    return model.to(device).eval(), config
