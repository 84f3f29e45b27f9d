"""What detection and segmentation share: their common options, the engine-task base class (task folders, AdamW
with layer-wise lr decay over the backbone, the step schedule, overlays and results) and the ``eval`` / ``predict``
commands. The subclasses in ``tasks.detection`` and ``tasks.segmentation`` add data, model, loss and metrics."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._manipulate import group_with_matcher
from timm.optim import create_optimizer_v2
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from ..data import canonical_split, load_rgb
from ..engine.distributed import init_distributed, launched_as_main
from ..engine.options import (RunOptions, add_arguments, non_negative_float, option, positive_int, probability,
                              redefault)
from ..engine.record import from_record, refuse_train_overlap, run_record
from ..engine.runtime import AMP_DTYPES
from ..fileio import WEIGHTS_NAME, atomic_write_text, infer_num_classes, read_task_folder, write_task_folder
from ..models import load_state_dict_file, unwrap_state_dict
from ..models.keywords import check_model_kwargs
from ..slurm import add_slurm_arguments

__all__ = ['DenseOptions', 'DenseTask', 'layer_decay_param_groups', 'load_task_model']

_logger = logging.getLogger('conv2former.tasks')


def _original_name(feature_param: str) -> str:
    """A timm FeatureListNet parameter name → the classifier's ('stages_1.blocks.0.x' → 'stages.1.blocks.0.x')."""
    return re.sub(r'^([A-Za-z]\w*?)_(\d+)\.', r'\1.\2.', feature_param)


def layer_decay_param_groups(model: nn.Module, backbone: nn.Module, backbone_name: str, weight_decay: float,
                             layer_decay: float | None) -> list[dict]:
    """AdamW parameter groups: no weight decay on 1-D parameters (norms, biases, layer scales); with
    ``layer_decay``, backbone layer ``i`` of ``L`` (stem = 0, one per block, downsampling with the stage's first
    block, as the classifier's ``group_matcher`` says) gets lr scale ``layer_decay ** (L - i)``; everything outside
    the backbone (FPN, heads, decoder) gets 1. timm's schedulers apply ``lr_scale``."""
    layer_of = {}
    if layer_decay is not None:
        with torch.device('meta'):
            matcher = timm.create_model(backbone_name, num_classes=0).group_matcher(coarse=False)
        named = ((_original_name(n), p) for n, p in backbone.named_parameters())
        layers = group_with_matcher(named, matcher, return_values=True)  # {layer id: [params]}
        layer_of = {id(p): layer for layer, params in layers.items() for p in params}
    num_layers = max(layer_of.values(), default=-1) + 1
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(id(param), num_layers)
        scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
        decay = 0.0 if param.ndim <= 1 else weight_decay
        group = groups.setdefault((layer, decay), dict(params=[], weight_decay=decay, lr_scale=scale))
        group['params'].append(param)
    return list(groups.values())


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

    def merge_data_counts(self, env) -> None:
        """The dense datasets count nothing per process."""

    def __init__(self, options):
        self.options = options
        self.model_id = f'{self.name}:{options.model}:{options.backbone}'
        self.run_name = f'{options.model}-{options.backbone}'
        self.best_key = f'best_{self.best_metric}'
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
        groups = layer_decay_param_groups(model, self.backbone(model), o.backbone, o.weight_decay, o.layer_decay)
        return create_optimizer_v2(groups, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay)

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


# ----------------------------------------------------------------------------------------------------------- commands
def cmd_eval(task: str, args: argparse.Namespace) -> int:
    """``detect eval`` / ``segment eval``: metrics and overlays of a saved model on a split."""
    from . import get_task
    task_cls = get_task(task)[0]
    run_dir, record = run_record(args.checkpoint)
    for key in ('data',) + task_cls.record_keys:
        setattr(args, key, from_record(getattr(args, key), record, key, run_dir))
    if args.data is None:
        raise ValueError(f'--data is needed: {args.checkpoint} is not inside a run folder with a config.yaml')
    env = init_distributed(args.device)
    model, config = load_task_model(args.checkpoint, task_cls.name, env.device, task_cls.build)
    task = task_cls.from_config(config, args)
    dataset = task.eval_dataset(args.split)
    refuse_train_overlap(task.train_overlap(dataset, args.split, record),
                         f'{args.data} --split {args.split} against the run {run_dir}', args.allow_train_overlap)
    metrics = task.evaluate(model, dataset, env, amp_dtype=AMP_DTYPES.get(args.amp), progress=True)
    checkpoint = Path(args.checkpoint)
    out = Path(args.results_file or (checkpoint if checkpoint.is_dir() else Path('.')) / 'eval_results.json')
    result = dict(metrics, checkpoint=str(checkpoint), data=str(args.data), split=args.split, images=len(dataset),
                  data_cleanup=getattr(dataset, 'stats', {}), **task.eval_record())
    atomic_write_text(out, json.dumps(result, indent=2, default=str))
    paths = task.overlays(model, dataset, out.parent / 'eval_overlays', args.overlays, env.device)
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f'{key}:')
            for name, v in value.items():
                print(f'  {name:<24} {"–" if v is None else f"{v:6.2f}"}')
        else:
            print(f'{key:<12} {"–" if value is None else f"{value:6.2f}"}')
    print(f'results: {out}' + (f'\noverlays: {paths[0].parent}' if paths else ''))
    return 0


def cmd_predict(task: str, args: argparse.Namespace) -> int:
    """``detect predict`` / ``segment predict``: predictions and overlay PNGs for image files."""
    from . import get_task
    task_cls = get_task(task)[0]
    device = torch.device(args.device or 'cpu')
    model, config = load_task_model(args.checkpoint, task_cls.name, device, task_cls.build)
    task = task_cls.from_config(config, args)
    out_dir = Path(args.output_dir)
    results = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f'image {path} not found')
        results.append(task.predict_file(model, Path(path), out_dir, device, args))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f'{r["image"]}: {task.summary(r)}  → {r["overlay"]}')
    return 0


def add_task_parsers(sub, command: str, task: str, title: str, options_cls, add_task_args) -> None:
    """Add ``command`` (``detect`` / ``segment``) with ``train``, ``eval`` and ``predict`` to the top-level
    sub-parsers; ``add_task_args(parser, 'eval' | 'predict')`` adds the task's own flags. The task's modules (and
    its extra's packages) load only when a command runs."""
    top = sub.add_parser(command, help=title)
    actions = top.add_subparsers(dest='action', required=True)
    p = actions.add_parser('train', help='train or fine-tune (torchrun for several processes)',
                           description='Precedence, lowest first: defaults < --recipe < --config YAML < flags given.')
    add_arguments(p, options_cls)
    add_slurm_arguments(p)
    p.set_defaults(func=lambda args: cmd_train(task, args))
    _add_eval_predict_parsers(actions, task, add_task_args)


def _add_eval_predict_parsers(actions, task: str, add_task_args) -> None:
    p = actions.add_parser('eval', help='metrics and overlays of a trained model on a split')
    p.add_argument('--checkpoint', required=True, help='run folder or its best/ / last/ model folder')
    p.add_argument('--data', help="dataset folder or archive (default: the run's)")
    p.add_argument('--split', default='val')
    p.add_argument('--allow-train-overlap', action='store_true',
                   help="score images the run trained on anyway (refused otherwise; logged as a warning)")
    p.add_argument('-b', '--batch-size', type=positive_int, default=2)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device')
    p.add_argument('--amp', nargs='?', const='bf16', choices=['bf16', 'fp16'])
    p.add_argument('--overlays', type=int, default=4, help='overlay PNGs of the first N images (0: none)')
    p.add_argument('--results-file', help='JSON file (default: <checkpoint>/eval_results.json)')
    add_task_args(p, 'eval')
    p.set_defaults(func=lambda args: cmd_eval(task, args))

    p = actions.add_parser('predict', help='predict images and write overlay PNGs')
    p.add_argument('images', nargs='+')
    p.add_argument('--checkpoint', required=True, help='run folder or its best/ / last/ model folder')
    p.add_argument('--output-dir', default='predictions', help='where overlays go (default predictions/)')
    p.add_argument('--device')
    p.add_argument('--json', action='store_true')
    add_task_args(p, 'predict')
    p.set_defaults(func=lambda args: cmd_predict(task, args))


def cmd_train(task: str, args: argparse.Namespace) -> int:
    """``detect train`` / ``segment train`` through the Python API."""
    from ..api import train
    from . import get_task
    from ..slurm import pop_request, print_submitted, submit_run
    task_cls = get_task(task)[0]
    request = pop_request(args)
    options = {k: v for k, v in vars(args).items() if k not in ('func', 'command', 'action')}
    if request is not None:
        return print_submitted(submit_run(task, options, request))
    final = train(task, **options)
    metric, shown_keys = task_cls.best_metric, set(task_cls.curves.values())
    shown = ', '.join(f'{k} {v:.2f}' for k, v in final.items() if isinstance(v, float) and k in shown_keys)
    best = final.get(f'best_{metric}')
    if not launched_as_main():
        return 0
    print(f'final: {shown or "no evaluation"}  (best {metric}: {"–" if best is None else f"{best:.2f}"})  '
          f'run folder: {final["run_dir"]}')
    return 0
