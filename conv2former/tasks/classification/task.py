"""Image classification as an engine task: options (flags named as in timm's ``train.py``), datasets with timm's
augmentation pipeline, the model, mixup/cutmix and label smoothing, top-1/top-5 evaluation, model folders and the
confusion matrix."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset

from ...engine.distributed import DistEnv
from ...engine.optim import create_optimizer
from ...engine.options import (RunOptions, non_negative_float, non_negative_int, option, positive_int, probability,
                               redefault)
from ...data import resolve_data_dir
from ...fileio import pretrained_overlay, write_model_folder
from ...shards import build_shard_datasets, is_shard_source
from .data import (ImageFolderDataset, allow_zero_bit_posterize, build_datasets, build_timm_datasets, check_auto_augment,
                   is_timm_source)
from .evaluate import evaluate, save_confusion_matrix_png, write_results
from .recipes import DROP_PATH, RECIPES
from ...models import MODEL_NAMES
from ...models.keywords import check_model_kwargs

_logger = logging.getLogger('conv2former.train')


@dataclasses.dataclass
class ClassificationOptions(RunOptions):
    """``conv2former train`` / ``conv2former.train(task='classification', ...)``."""
    recipe: Optional[str] = redefault(RunOptions, 'recipe', None, choices=tuple(sorted(RECIPES)),
                                      help='preset of option values: ' + ', '.join(sorted(RECIPES)))
    data: Optional[str] = redefault(RunOptions, 'data', None,
                                    help='ImageFolder tree (train/ and val/ inside), a .tar/.tar.gz of one, WebDataset '
                                         "shards (a folder of train/ and val/ *.tar, or 'shards/train-{0000..0127}.tar'"
                                         '), or a timm source (torch/cifar10, hfds/<hub id>); default: the bundled '
                                         'Fashion-MNIST subset')
    data_dir: Optional[Path] = option(None, '--data-dir', type=Path, help='root folder of a timm source')
    dataset_download: bool = option(False, '--dataset-download', kind='flag',
                                    help='let a torch/ source download missing files')
    strict: bool = option(False, '--strict', kind='flag',
                          help='fail on unreadable images (and links left out of the listing) instead of skipping them')
    data_cache: bool = option(False, '--data-cache', kind='flag',
                              help='decode the images once into a uint8 tensor cache and augment whole batches on '
                                   'the training device (crop, flip, RandAugment or colour jitter, random erasing: '
                                   'see batch_augment.py)')

    model: str = option('conv2former_n', '--model', help='registered model name', group='model')
    grad_checkpointing: bool = option(False, '--grad-checkpointing', kind='flag', group='model')
    model_kwargs: dict = option({}, '--model-kwargs', kind='keywords', group='model',
                                help='extra model constructor keywords, e.g. kernel_size=7 depths=[1,1,3,1]')
    pretrained: Optional[Path] = option(None, '--pretrained', type=Path, group='model',
                                        help='initial weights: our model folder / .safetensors or an upstream '
                                             '.pth/.pth.tar (classifier re-initialised if classes differ)')
    drop_path: Optional[str] = option(None, '--drop-path', group='model',
                                      help="stochastic depth rate, or 'per-model' (the paper's value)")
    drop: float = option(0.0, '--drop', type=non_negative_float, help='dropout before the classifier', group='model')

    blr: float = option(1e-3, '--blr', type=non_negative_float, help='lr = blr * global batch / 1024 (unless --lr)',
                        group='optimisation')
    warmup_epochs: int = option(1, '--warmup-epochs', type=non_negative_int, group='optimisation')
    warmup_lr: float = option(1e-6, '--warmup-lr', type=non_negative_float, group='optimisation')
    cooldown_epochs: int = option(0, '--cooldown-epochs', type=int, group='optimisation',
                                  help='epochs at the minimum lr after --epochs (added to them, as in timm; the in1k '
                                       'recipe sets 10)')
    model_ema: bool = option(False, '--model-ema', kind='flag', group='optimisation',
                             help='keep an EMA of the weights (evaluated and saved)')
    model_ema_decay: float = option(0.9998, '--model-ema-decay', type=probability, group='optimisation')
    channels_last: bool = option(False, '--channels-last', kind='flag', group='optimisation')
    compile: Optional[str] = option(None, '--compile', nargs='?', const='inductor', metavar='BACKEND',
                                    help="torch.compile the model (bare --compile: 'inductor')", group='optimisation')

    img_size: Optional[int] = option(None, '--img-size', type=positive_int, group='data and augmentation',
                                     help='train/eval resolution (default: the model cfg)')
    interpolation: Optional[str] = option(None, '--interpolation', group='data and augmentation',
                                          help="'bicubic', 'bilinear', ... (default: the model cfg)")
    scale: tuple = option((0.08, 1.0), '--scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
                          help='random-resized-crop area range', group='data and augmentation')
    hflip: float = option(0.5, '--hflip', type=probability, group='data and augmentation')
    color_jitter: float = option(0.4, '--color-jitter', type=non_negative_float, group='data and augmentation')
    aa: Optional[str] = option(None, '--aa', help="auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'",
                               group='data and augmentation')
    reprob: float = option(0.0, '--reprob', type=probability, help='random erasing probability',
                           group='data and augmentation')
    mixup: float = option(0.0, '--mixup', type=non_negative_float, help='mixup alpha', group='data and augmentation')
    cutmix: float = option(0.0, '--cutmix', type=non_negative_float, help='cutmix alpha',
                           group='data and augmentation')
    mixup_switch_prob: float = option(0.5, '--mixup-switch-prob', type=probability, group='data and augmentation')
    smoothing: float = option(0.1, '--smoothing', type=probability, help='label smoothing',
                              group='data and augmentation')

    def finalize(self, training: bool = True) -> None:
        """Resolve 'per-model' drop path and check value combinations."""
        if self.drop_path == 'per-model':
            self.drop_path = DROP_PATH.get(self.model, 0.1)
        try:
            self.drop_path = float(self.drop_path or 0.0)
        except ValueError:
            raise ValueError(f"--drop-path must be a number or 'per-model', got {self.drop_path!r}") from None
        if not 0 <= self.drop_path < 1:
            raise ValueError(f'--drop-path must be in [0, 1), got {self.drop_path}')
        self.scale = tuple(self.scale)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f'--scale must satisfy 0 < MIN <= MAX <= 1, got {self.scale}')
        if self.aa:
            check_auto_augment(self.aa)
        if self.data_cache:
            from .tensor_data import check_cache_options
            check_cache_options(self)

    def resolve_lr(self, world_size: int) -> float:
        """``lr`` if given, else the paper's linear rule: blr x global batch / 1024."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.batch_size * self.grad_accum_steps * world_size / 1024


def train_transform(data_config: dict, o: ClassificationOptions):
    """The PIL training transform (timm's ``create_transform``) of ``o``'s augmentation flags at ``data_config``."""
    return allow_zero_bit_posterize(create_transform(
        **data_config, is_training=True, scale=o.scale, hflip=o.hflip, color_jitter=o.color_jitter,
        auto_augment=o.aa, re_prob=o.reprob, re_mode='pixel', re_count=1))


class ClassificationTask:
    """Image classification with a timm model (any registered name; Conv2Former by default)."""
    recipes = RECIPES
    best_metric, best_key, ema_metric = 'val_top1', 'best_top1', 'ema_top1'
    title = 'Conv2Former training run'
    columns = None       # the report's classification columns
    curves = None        # and curves
    metric_label = 'accuracy (%)'
    collate = None
    name = ''
    find_unused_parameters = False

    def __init__(self, options: ClassificationOptions):
        self.options = options
        self.model_id = self.run_name = options.model
        self.mixup = self.criterion = self.data_config = self._datasets = self.batch_augment = None

    @property
    def ema_decay(self) -> Optional[float]:
        return self.options.model_ema_decay if self.options.model_ema else None

    @property
    def compile_backend(self) -> Optional[str]:
        return self.options.compile

    def merge_data_counts(self, env) -> None:
        for dataset in self._datasets:  # image folders count unreadable files per rank; the tensor cache once
            if isinstance(dataset, ImageFolderDataset):
                dataset.merge_skipped(env)

    def datasets(self) -> tuple[Dataset, Dataset]:
        o = self.options
        shards = is_shard_source(o.data)
        if o.data_cache:
            from .tensor_data import cached_datasets
            train, val = cached_datasets(o.data if shards else resolve_data_dir(o.data), self._data_config_on_meta(),
                                         strict=o.strict)
        elif is_timm_source(o.data):
            train, val, _ = build_timm_datasets(o.data, o.data_dir, download=o.dataset_download)
        else:
            train, val, _ = build_shard_datasets(o.data, strict=o.strict, progress=o.progress) if shards else \
                build_datasets(resolve_data_dir(o.data), strict=o.strict)
            if o.strict:  # fail before the run starts, not in a data-loader worker mid-epoch
                for dataset in (train, val):
                    dataset.check_readable(max(o.workers, 1), o.progress)
        self._datasets = (train, val)  # build_model gives them the model's transforms
        return train, val

    def _check_model(self) -> None:
        o = self.options
        if not timm.is_model(o.model):
            raise ValueError(f'unknown model {o.model!r}; registered Conv2Former models: {", ".join(MODEL_NAMES)}')
        check_model_kwargs(o.model, o.model_kwargs)

    def _data_config(self, model: nn.Module) -> dict:
        """The preprocessing of ``model`` at the run's image size and interpolation."""
        o = self.options
        return resolve_data_config(dict(img_size=o.img_size, interpolation=o.interpolation), model=model,
                                   verbose=False)

    def _data_config_on_meta(self) -> dict:
        """The data config ``build_model`` will resolve, from the model built on the meta device (no memory)."""
        self._check_model()
        return self._data_config(timm.create_model(self.options.model, device='meta', **self.options.model_kwargs))

    def log_data(self, train: Dataset, val: Dataset) -> None:
        for skipped_path, reason in train.skipped + val.skipped:
            _logger.warning('skipped %s: %s', skipped_path, reason)
        if train.num_skipped or val.num_skipped:
            _logger.warning('skipped %d file(s) (%d train, %d val): unreadable images, links left out of the listing; '
                            '--strict fails instead', train.num_skipped + val.num_skipped, train.num_skipped,
                            val.num_skipped)

    def build_model(self, class_names: Sequence[str], resuming: bool) -> nn.Module:
        """The timm model, with the data config saved in its pretrained cfg (so validate/predict preprocess as this
        run evaluated); also sets the datasets' transforms, the mixup and the loss."""
        o = self.options
        self._check_model()
        kwargs = dict(o.model_kwargs, num_classes=len(class_names), drop_path_rate=o.drop_path, drop_rate=o.drop)
        if o.pretrained and not resuming:
            overlay = pretrained_overlay(o.pretrained)
            if overlay['num_classes'] and overlay['num_classes'] != len(class_names):
                _logger.warning('head re-initialised: %d -> %d classes (%s has a %d-class classifier)',
                                overlay['num_classes'], len(class_names), o.pretrained, overlay['num_classes'])
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        model = timm.create_model(o.model, **kwargs)
        self.data_config = self._data_config(model)
        cfg_without_weights = {k: v for k, v in model.pretrained_cfg.items() if k != 'state_dict'}
        model.pretrained_cfg = model.default_cfg = dict(cfg_without_weights, num_classes=len(class_names),
                                                        **self.data_config)
        self.class_names = list(class_names)
        self._set_loss(len(class_names))
        self.set_transforms(*self._datasets)
        if o.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if o.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _set_loss(self, num_classes: int) -> None:
        o = self.options
        if o.mixup > 0 or o.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, switch_prob=o.mixup_switch_prob,
                               label_smoothing=o.smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif o.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=o.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def set_transforms(self, train: Dataset, val: Dataset) -> None:
        o = self.options
        if o.data_cache:  # the cache holds preprocessed images; training batches are augmented in ``loss``
            from .batch_augment import BatchAugment
            from .tensor_data import pass_batch
            self.collate = pass_batch
            self.batch_augment = BatchAugment(self.data_config['input_size'][-1], scale=o.scale, hflip=o.hflip,
                                              mean=self.data_config['mean'], std=self.data_config['std'],
                                              re_prob=o.reprob, aa=o.aa, color_jitter=o.color_jitter)
            if self.data_config['interpolation'] != 'bilinear':
                _logger.info('--data-cache: the cache is built with %s interpolation; training crops are resized '
                             'bilinearly', self.data_config['interpolation'])
            return
        train.transform = train_transform(self.data_config, o)
        val.transform = create_transform(**self.data_config)

    def optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
        o = self.options
        return create_optimizer(model, o.opt, o.resolve_lr(world_size), o.weight_decay, o.layer_decay)

    def schedule(self, steps_per_epoch: int) -> dict:
        o = self.options
        if o.warmup_epochs >= o.epochs + o.cooldown_epochs:
            _logger.warning('--warmup-epochs %d covers the whole run (--epochs %d): the learning rate is still '
                            'rising when the run ends and never decays; use fewer warm-up epochs', o.warmup_epochs,
                            o.epochs)
        return dict(sched=o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr,
                    min_lr=o.min_lr, cooldown_epochs=o.cooldown_epochs)

    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.batch_augment is not None:
            images = self.batch_augment(images)
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    def evaluate(self, model: nn.Module, dataset: Dataset, env: DistEnv, amp_dtype=None, progress: bool = False
                 ) -> dict:
        """Loss, top-1 and top-5 (%) on every rank (reduced across ranks); ``result`` holds the full EvalResult."""
        o = self.options
        sampler = env.shard(len(dataset)) if env.distributed else None  # every image once, no padding
        workers = 0 if getattr(dataset, 'batched', False) else o.workers  # the tensor cache: whole batches in-process
        loader = DataLoader(dataset, batch_size=o.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=self.collate, pin_memory=env.device.type == 'cuda')
        result = evaluate(model, loader, env.device, len(dataset.class_names), amp_dtype=amp_dtype,
                          channels_last=o.channels_last, distributed=env.distributed, progress=progress)
        return dict(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5, result=result)

    def write_model(self, model: nn.Module, folder: Path, ema_state_dict: Optional[dict] = None) -> Path:
        return write_model_folder(model, folder, dict(self.options.model_kwargs, num_classes=len(self.class_names)),
                                  label_names=self.class_names, ema_state_dict=ema_state_dict)

    def skipped_images(self) -> dict:
        """Images skipped so far (zero-byte or unreadable, in any process of this rank): {'train', 'val', 'total'}."""
        train, val = (ds.num_skipped for ds in self._datasets)
        return dict(train=train, val=val, total=train + val)

    def finish(self, model: nn.Module, val: Dataset, run_dir: Path, final: dict, last_eval: Optional[dict]) -> dict:
        """results.json and the confusion matrix; adds the complete skip count to ``final`` (the report's)."""
        skipped = self.skipped_images()
        final['skipped_images'] = skipped['total']
        if skipped['total']:
            _logger.warning('skipped %d file(s) in all (%d train, %d val), left out of every metric', skipped['total'],
                            skipped['train'], skipped['val'])
        if last_eval is not None:
            result = last_eval['result']
            save_confusion_matrix_png(result.confusion, self.class_names, run_dir / 'confusion_matrix.png')
            write_results(result, self.class_names, json_path=run_dir / 'results.json',
                          extra=dict(model=self.options.model, img_size=self.data_config['input_size'][-1],
                                     skipped_images=skipped['total'], skipped=skipped))
        return {}
