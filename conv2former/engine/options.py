"""Typed run options, shared by the command line and the Python API.

Each task declares its options as a dataclass whose fields carry their command-line flag, converter and help
(``option(...)``); ``add_arguments`` turns such a class into argparse flags and ``resolve`` into a validated
instance. Precedence, lowest first: field defaults < ``recipe`` < ``config`` (YAML) < explicit values. A run's
resolved options are saved as its ``config.yaml``; ``resume`` restores them (see ``resolve``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

# options a resumed run may change: they do not alter what is computed
RESUME_SAFE = ('epochs', 'iters', 'workers', 'progress', 'device', 'checkpoint_steps', 'checkpoint_hist')


# ------------------------------------------------------------------------------------------------------ converters
def positive_int(value) -> int:
    n = int(value)
    if n < 1 or n != float(value):
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {value}')
    return n


def non_negative_int(value) -> int:
    n = int(value)
    if n < 0 or n != float(value):
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {value}')
    return n


def non_negative_float(value) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {value}')
    return x


def probability(value) -> float:
    x = float(value)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f'expected a probability in [0, 1], got {value}')
    return x


def keyword(value) -> dict:
    """``key=value`` (value parsed as YAML: ``depths=[1,1,3,1]``, ``stem=patch``, ``kernel_size=7``) as a dict."""
    if isinstance(value, dict):
        return {str(k).replace('-', '_'): v for k, v in value.items()}
    if not isinstance(value, str) or '=' not in value:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {value!r} (a flag taking KEY=VALUE pairs takes '
                                         f'every word after it: put other arguments before it, or end it with --)')
    key, raw = value.split('=', 1)
    return {key.strip().replace('-', '_'): yaml.safe_load(raw)}


def add_keywords_argument(parser, *flags: str, dest: str = 'model_kwargs', help: str = '',
                          default: Any = None, metavar: str = 'KEY=VALUE') -> None:
    """The one grammar of ``--model-kwargs`` (and ``--backbone-kwargs``) in every command, as in timm's train.py:
    one or more ``KEY=VALUE`` per flag, the flag repeatable, values parsed as YAML; ``default`` None keeps the
    flag out of the namespace when not given (training options), else e.g. ``[]``."""
    parser.add_argument(*(flags or ('--model-kwargs',)), dest=dest, action='extend', nargs='+', type=keyword,
                        metavar=metavar, help=help,
                        default=argparse.SUPPRESS if default is None else default)


def keywords(values) -> dict:
    """Merge ``key=value`` strings / dicts (a single one or a list of them) into one dict."""
    merged = {}
    for value in values if isinstance(values, (list, tuple)) else [values]:
        merged.update(keyword(value))
    return merged


# ------------------------------------------------------------------------------------------------ option metadata
def option(default: Any = None, *flags: str, type: Optional[Callable] = None, help: str = '',
           choices: Optional[Sequence] = None, nargs: Any = None, const: Any = None, kind: str = 'value',
           metavar: Any = None, group: str = 'setup') -> Any:
    """A dataclass field that is also a command-line flag. ``kind``: 'value', 'flag' (store_true), 'no-flag'
    (``--no-x`` stores False), 'bool' (``--x/--no-x``), 'keywords' (key=value pairs, one or more per flag as in
    timm's train.py, the flag repeatable, merged into a dict)."""
    meta = dict(flags=flags, type=type, help=help, choices=choices, nargs=nargs, const=const, kind=kind,
                metavar=metavar, group=group)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def redefault(cls, name: str, default: Any, **changes) -> Any:
    """The field ``name`` of options class ``cls`` with another default (and optionally other metadata)."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = dict(base.metadata, **changes)
    flags = meta.pop('flags')
    return option(default, *flags, **meta)


def _fields(cls) -> list:
    return [f for f in dataclasses.fields(cls) if f.metadata.get('flags')]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per option of ``cls``; values not given on the command line stay out of the namespace (their
    defaults are applied by ``resolve``, after the recipe and the YAML config)."""
    groups = {}
    for f in _fields(cls):
        meta = f.metadata
        group = groups.get(meta['group']) or groups.setdefault(meta['group'], parser.add_argument_group(meta['group']))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f' (default: {_plain(default)})' if default not in (None, False, [], {}) and meta['kind'] != 'no-flag' \
            else ''
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=meta['help'] + shown)
        if meta['kind'] == 'flag':
            kwargs.update(action='store_true')
        elif meta['kind'] == 'no-flag':
            kwargs.update(action='store_false')
        elif meta['kind'] == 'bool':
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif meta['kind'] == 'keywords':
            add_keywords_argument(group, *meta['flags'], dest=f.name, help=kwargs['help'],
                                  metavar=meta['metavar'] or 'KEY=VALUE')
            continue
        else:
            kwargs.update(type=meta['type'], choices=meta['choices'], nargs=meta['nargs'], metavar=meta['metavar'])
            if meta['const'] is not None:
                kwargs.update(const=meta['const'])
        group.add_argument(*meta['flags'], **{k: v for k, v in kwargs.items() if v is not None})


# ------------------------------------------------------------------------------------------------------ resolution
def _plain(value):
    """A YAML/JSON-friendly copy of an option value."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_dict(options) -> dict:
    """The options as plain values (what ``config.yaml`` holds)."""
    return {f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _flag(cls, name: str) -> str:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags = fields[name].metadata.get('flags') if name in fields else None
    return max(flags, key=len) if flags else name


def _convert(f: dataclasses.Field, value: Any) -> Any:
    """Validate one value (from a flag, the API or YAML) with the field's converter and choices."""
    meta = f.metadata
    if value is None or meta.get('kind') in ('flag', 'no-flag', 'bool'):
        if meta.get('kind') in ('flag', 'no-flag', 'bool') and not isinstance(value, bool) and value is not None:
            raise ValueError(f'expected true or false, got {value!r}')
        return value
    if meta.get('kind') == 'keywords':
        return keywords(value)
    convert = meta.get('type') or (lambda v: v)
    if meta.get('nargs') in ('+', '*') or isinstance(meta.get('nargs'), int):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(meta['nargs'], int) and len(values) != meta['nargs']:
            raise ValueError(f'expected {meta["nargs"]} values, got {values}')
        converted = tuple(convert(v) for v in values)
        bad = [v for v in converted if meta.get('choices') and v not in meta['choices']]
    else:
        converted = convert(value)
        bad = [converted] if meta.get('choices') and converted not in meta['choices'] else []
    if bad:
        raise ValueError(f'invalid choice {bad[0]!r} (choose from {", ".join(map(str, meta["choices"]))})')
    return converted


def _check_known(cls, values: dict, source: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {str(k).replace('-', '_'): v for k, v in values.items()}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f'; did you mean {close[0]!r}?' if close else ''
            raise ValueError(f'{source}: unknown option {key!r}{hint} (valid: {", ".join(sorted(names))})')
    return values


def load_yaml_mapping(path, what: str = 'option names to values') -> dict:
    """The mapping a ``--config`` YAML file holds (clear errors for a missing file or another kind of content)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'--config file not found: {path}')
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f'--config {path} must hold a mapping of {what}, got {type(values).__name__}')
    return values


def _build(cls, values: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = _convert(fields[key], value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f'{source}: {_flag(cls, key)}: {e}') from None
    options = cls(**converted)
    options.finalize()
    return options


def resolve(cls, explicit: dict, recipes: dict, source: str = 'options', saved: Optional[dict] = None):
    """Options of class ``cls`` from ``explicit`` values (flags given, or API keywords): field defaults < recipe
    (``explicit['recipe']``, else the YAML's) < YAML (``explicit['config']``) < explicit values.

    With ``saved`` (the ``config.yaml`` of a run being resumed) the saved values are the run's settings; explicit
    values may change only ``RESUME_SAFE`` options (``epochs`` only upwards), anything else that differs is an
    error naming the option and both values."""
    explicit = _check_known(cls, dict(explicit), source)
    yaml_values = _check_known(cls, load_yaml_mapping(explicit['config']), f'--config {explicit["config"]}') \
        if explicit.get('config') else {}
    if saved is not None:
        return _resume(cls, explicit, yaml_values, saved, source)
    recipe = explicit.get('recipe') or yaml_values.get('recipe')
    values = {}
    if recipe is not None:
        if recipe not in recipes:
            raise ValueError(f'{source}: unknown recipe {recipe!r}; choose from {", ".join(sorted(recipes))}')
        values.update(recipes[recipe], recipe=recipe)
    values.update(yaml_values)
    values.update(explicit)
    return _build(cls, values, source)


def _resume(cls, explicit: dict, yaml_values: dict, saved: dict, source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    run = _build(cls, {k: v for k, v in saved.items() if k in names}, 'the run\'s config.yaml')
    wanted = dict(yaml_values, **explicit)
    wanted.pop('resume', None)
    wanted.pop('config', None)
    changes = {}
    for key, value in wanted.items():
        new = getattr(_build(cls, {**as_dict(run), key: value}, source), key)
        old = getattr(run, key)
        if _plain(new) == _plain(old):
            continue
        if key not in RESUME_SAFE or (key in ('epochs', 'iters') and old is not None and new is not None
                                      and new < old):
            raise ValueError(
                f'{_flag(cls, key)} {_plain(new)!r} differs from the run being resumed ({_plain(old)!r}); a resumed '
                f'run keeps its settings (only {", ".join(_flag(cls, k) for k in RESUME_SAFE if k in names)} may '
                f'change, epochs only upwards): drop the flag, or start a new run')
        changes[key] = value
    return _build(cls, {**as_dict(run), **changes, 'resume': explicit.get('resume')}, source)


# ------------------------------------------------------------------------------------------------ shared options
@dataclasses.dataclass
class RunOptions:
    """Options every task shares: run folder, devices, optimisation, checkpoints."""
    config: Optional[Path] = option(None, '--config', type=Path,
                                    help='YAML file of option values (keys as flag names, - or _)')
    recipe: Optional[str] = option(None, '--recipe', help='preset of option values (see the task\'s recipes)')
    data: Optional[str] = option(None, '--data', help='dataset folder or .tar/.tar.gz archive')
    output: Path = option(Path('runs'), '--output', type=Path, help='parent folder of run folders')
    experiment: Optional[str] = option(None, '--experiment', help='run folder name (default: <model>-<date>-<time>)')
    resume: Optional[Path] = option(None, '--resume', type=Path,
                                    help='run or checkpoint folder to continue exactly where it stopped; the run\'s '
                                         'settings are restored (only --epochs, --workers, --no-progress, --device, '
                                         '--checkpoint-steps/-hist may be given)')
    seed: int = option(42, '--seed', type=int)
    device: Optional[str] = option(None, '--device', help="'cpu', 'cuda', 'cuda:1' (default: cuda if available)")
    workers: int = option(2, '-j', '--workers', type=int, help='data loader processes per training process (training '
                          'batches of an in-memory dataset such as --data-cache load without them)')
    progress: bool = option(True, '--no-progress', kind='no-flag', help='no progress bars')

    epochs: int = option(10, '--epochs', type=positive_int, group='optimisation')
    batch_size: int = option(64, '-b', '--batch-size', type=positive_int, help='per process', group='optimisation')
    grad_accum_steps: int = option(1, '--grad-accum-steps', type=positive_int, group='optimisation')
    lr: Optional[float] = option(None, '--lr', type=non_negative_float, help='learning rate', group='optimisation')
    opt: str = option('adamw', '--opt', help='timm optimizer name', group='optimisation')
    weight_decay: float = option(0.05, '--weight-decay', type=non_negative_float, group='optimisation')
    layer_decay: Optional[float] = option(None, '--layer-decay', type=non_negative_float,
                                          help='layer-wise lr decay, e.g. 0.8', group='optimisation')
    clip_grad: Optional[float] = option(None, '--clip-grad', type=non_negative_float, help='max gradient norm',
                                        group='optimisation')
    sched: str = option('cosine', '--sched', help='timm scheduler name', group='optimisation')
    min_lr: float = option(1e-6, '--min-lr', type=non_negative_float, group='optimisation')
    amp: Optional[str] = option(None, '--amp', nargs='?', const='bf16', choices=('bf16', 'fp16'),
                                help='mixed precision (bare --amp = bf16; fp16 uses a grad scaler)',
                                group='optimisation')
    sync_bn: bool = option(False, '--sync-bn', kind='flag', help='synchronised BatchNorm across processes (CUDA)',
                           group='model')

    checkpoint_steps: int = option(0, '--checkpoint-steps', type=non_negative_int,
                                   help='also checkpoint every N optimizer steps (0: only at the end of each epoch)',
                                   group='checkpoints and logging')
    checkpoint_hist: int = option(3, '--checkpoint-hist', type=positive_int, help='keep the last N checkpoints',
                                  group='checkpoints and logging')
    eval_every: int = option(1, '--eval-every', type=positive_int, help='evaluate every N epochs (and at the end)',
                             group='checkpoints and logging')

    def finalize(self, training: bool = True) -> None:
        """Derive values and check combinations (tasks extend this); ``training=False`` when a saved model is
        evaluated (no training data needed)."""
