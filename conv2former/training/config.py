"""Command-line flags of ``conv2former train`` (named as in timm's train.py) and their resolution.

Precedence, lowest first: flag defaults < ``--recipe`` < ``--config YAML`` < flags given on the command line.
"""
import argparse
from pathlib import Path
from typing import List, Optional

import yaml

from .recipes import DROP_PATH, RECIPES


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {value}')
    return n


def non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {value}')
    return x


def probability(value: str) -> float:
    x = float(value)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f'expected a probability in [0, 1], got {value}')
    return x


def model_kwargs(value: str) -> dict:
    """``key=value`` pairs; values parsed as YAML (``depths=[1,1,3,1]``, ``stem=patch``, ``kernel_size=7``)."""
    if '=' not in value:
        raise argparse.ArgumentTypeError(f'expected key=value, got {value!r}')
    key, raw = value.split('=', 1)
    return {key.strip().replace('-', '_'): yaml.safe_load(raw)}


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('setup')
    g.add_argument('--config', type=Path, help='YAML file of flag values (keys as flag names, - or _)')
    g.add_argument('--recipe', choices=sorted(RECIPES), help='preset of flag defaults: ' + ', '.join(sorted(RECIPES)))
    g.add_argument('--data', help='ImageFolder tree (train/ and val/ inside), a .tar/.tar.gz of one, or a timm '
                                  'source (torch/cifar10, hfds/<hub id>); default: the bundled Fashion-MNIST subset')
    g.add_argument('--data-dir', type=Path, help='root folder of a timm source (default: the cache)')
    g.add_argument('--dataset-download', action='store_true', help='let a torch/ source download missing files')
    g.add_argument('--output', type=Path, default=Path('runs'), help='parent folder of run folders (default runs/)')
    g.add_argument('--experiment', help='run folder name (default: <model>-<date>-<time>)')
    g.add_argument('--resume', type=Path, help='run folder or checkpoint folder to continue exactly where it stopped')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' (default: cuda if available)")
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes per training process')
    g.add_argument('--strict', action='store_true', help='fail on unreadable images instead of skipping them')
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='conv2former_n', help='registered model name (default conv2former_n)')
    g.add_argument('--model-kwargs', type=model_kwargs, action='append', default=[], metavar='KEY=VALUE',
                   help='extra model constructor keywords, e.g. --model-kwargs kernel_size=7 (repeatable)')
    g.add_argument('--pretrained', type=Path, help='initial weights: our model folder / .safetensors or an upstream '
                                                   '.pth/.pth.tar (classifier re-initialised if classes differ)')
    g.add_argument('--drop-path', default=None, help="stochastic depth rate, or 'per-model' (the paper's value)")
    g.add_argument('--drop', type=non_negative_float, default=0.0, help='dropout before the classifier')
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--sync-bn', action='store_true', help='synchronised BatchNorm across processes (the stem has BN)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=positive_int, default=10)
    g.add_argument('-b', '--batch-size', type=positive_int, default=64, help='per process')
    g.add_argument('--grad-accum-steps', type=positive_int, default=1)
    g.add_argument('--lr', type=non_negative_float, default=None, help='absolute learning rate (overrides --blr)')
    g.add_argument('--blr', type=non_negative_float, default=1e-3, help='lr = blr * global batch / 1024')
    g.add_argument('--opt', default='adamw', help="timm optimizer name (default 'adamw')")
    g.add_argument('--weight-decay', type=non_negative_float, default=0.05)
    g.add_argument('--layer-decay', type=non_negative_float, default=None, help='layer-wise lr decay, e.g. 0.8')
    g.add_argument('--clip-grad', type=non_negative_float, default=None, help='max gradient norm')
    g.add_argument('--sched', default='cosine', help="timm scheduler name (default 'cosine')")
    g.add_argument('--warmup-epochs', type=int, default=1)
    g.add_argument('--warmup-lr', type=non_negative_float, default=1e-6)
    g.add_argument('--min-lr', type=non_negative_float, default=1e-6)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (evaluated and saved)')
    g.add_argument('--model-ema-decay', type=probability, default=0.9998)
    g.add_argument('--amp', nargs='?', const='bf16', default=None, choices=['bf16', 'fp16'],
                   help='mixed precision (bare --amp = bf16; fp16 uses a grad scaler)')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help="torch.compile the model (bare --compile: 'inductor')")

    g = p.add_argument_group('data and augmentation (timm pipeline)')
    g.add_argument('--img-size', type=positive_int, default=None, help='train/eval resolution (default: model cfg)')
    g.add_argument('--interpolation', default=None, help="'bicubic', 'bilinear', ... (default: model cfg)")
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'),
                   help='random-resized-crop area range')
    g.add_argument('--hflip', type=probability, default=0.5)
    g.add_argument('--color-jitter', type=non_negative_float, default=0.4)
    g.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    g.add_argument('--reprob', type=probability, default=0.0, help='random erasing probability')
    g.add_argument('--mixup', type=non_negative_float, default=0.0, help='mixup alpha')
    g.add_argument('--cutmix', type=non_negative_float, default=0.0, help='cutmix alpha')
    g.add_argument('--mixup-switch-prob', type=probability, default=0.5)
    g.add_argument('--smoothing', type=probability, default=0.1, help='label smoothing')

    g = p.add_argument_group('checkpoints and logging')
    g.add_argument('--checkpoint-steps', type=int, default=0, help='also checkpoint every N optimizer steps')
    g.add_argument('--checkpoint-hist', type=positive_int, default=3, help='keep the last N checkpoints')
    g.add_argument('--eval-every', type=positive_int, default=1, help='evaluate every N epochs (and at the end)')


def _flag_dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions if a.dest != 'help'}


def _load_yaml(path: Path, known: set) -> dict:
    if not path.is_file():
        raise ValueError(f'--config file not found: {path}')
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f'--config {path} must hold a mapping of flag names to values, got {type(values).__name__}')
    values = {k.replace('-', '_'): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f'--config {path}: unknown keys {unknown}; valid keys: {sorted(known)}')
    return values


def parse_train_args(parser: argparse.ArgumentParser, argv: Optional[List[str]], recipes: dict = RECIPES,
                     finalize_fn=None) -> argparse.Namespace:
    """Parse with recipe and YAML values as defaults, so explicit flags always win; then derive values
    (``finalize_fn``, default: the classification trainer's ``finalize``)."""
    args = parser.parse_args(argv)
    defaults = {}
    if args.recipe:
        defaults.update(recipes[args.recipe])
    if args.config:
        defaults.update(_load_yaml(args.config, _flag_dests(parser)))
    if defaults:
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return (finalize_fn or finalize)(args)


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    """Merge --model-kwargs, resolve 'per-model' drop path, check value combinations."""
    if isinstance(args.model_kwargs, list):
        merged = {}
        for kv in args.model_kwargs:
            merged.update(kv)
        args.model_kwargs = merged
    if args.drop_path == 'per-model':
        args.drop_path = DROP_PATH.get(args.model, 0.1)
    try:
        args.drop_path = float(args.drop_path or 0.0)
    except ValueError:
        raise ValueError(f"--drop-path must be a number or 'per-model', got {args.drop_path!r}") from None
    if not 0 <= args.drop_path < 1:
        raise ValueError(f'--drop-path must be in [0, 1), got {args.drop_path}')
    args.scale = tuple(args.scale)
    if not 0 < args.scale[0] <= args.scale[1] <= 1:
        raise ValueError(f'--scale must satisfy 0 < MIN <= MAX <= 1, got {args.scale}')
    return args
