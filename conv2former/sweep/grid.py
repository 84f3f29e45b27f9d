"""Sweep grids: ``KEY=V1,V2,...`` axes (values parsed as YAML), sweep YAML files, the variants of a grid and their
run-folder names.

A key is a training option when the task's options have a field of that name (``lr``, ``model``, ``img_size``, ...),
otherwise a keyword of the model constructor (``kernel_size``, ``fusion``, ``weighting``, ``attn_act``,
``mlp_dwconv``, ``depths``, ...), merged into ``model_kwargs``. Whether the model accepts it is checked before any
run starts (``runner.validate_runs``).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

import yaml

from ..engine.options import load_yaml_mapping

# options a grid or a sweep config may not set: the sweep decides them per run
RESERVED = ('resume', 'experiment', 'output', 'seed', 'config')
SWEEP_KEYS = ('grid', 'seeds', 'parallel', 'task', 'name')
SWEEP_FILE = 'sweep.json'    # in a sweep folder: the task, axes, seeds, shared options and planned runs
RUN_FILE = 'sweep_run.json'  # in each run folder: wall seconds and invocations of the sweep's runs


@dataclasses.dataclass
class Axis:
    """One grid axis: ``key`` and its values; ``target`` is 'option' (a training option) or 'model' (a model
    constructor keyword)."""
    key: str
    values: list
    target: str = 'model'

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclasses.dataclass
class Sweep:
    """What a sweep runs: its axes, seeds, the training options shared by every run, and the task."""
    axes: list
    seeds: list
    options: dict
    task: str = 'classification'
    parallel: int = 1

    def variants(self) -> list[dict]:
        """Every combination of axis values, in grid order (first axis slowest)."""
        return [dict(zip([a.key for a in self.axes], combo))
                for combo in itertools.product(*[a.values for a in self.axes])]


def split_values(text: str) -> list[str]:
    """Split ``text`` on commas outside brackets and quotes: ``[1,1,3,1],[2,2,6,2]`` -> two values."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '[{(':
            depth += 1
        elif ch in ']})':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(''.join(current))
            current = []
            continue
        current.append(ch)
    parts.append(''.join(current))
    return [p.strip() for p in parts]


def parse_value(text: str):
    """A grid value as YAML, with numbers YAML 1.1 leaves as strings (``1e-3``) read as floats."""
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str) and re.fullmatch(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+', value):
        return float(value)
    return value


def _check_values(key: str, values: list, where: str) -> list:
    if not values or any(v is None or v == '' for v in values):
        raise ValueError(f'{where}: grid key {key!r} has an empty value; expected {key}=V1,V2,... with at least '
                         f'one non-empty value')
    seen = [yaml.safe_dump(v) for v in values]
    if len(set(seen)) != len(seen):
        raise ValueError(f'{where}: grid key {key!r} repeats a value: {values}')
    return values


def normalize_key(key: Any, where: str) -> str:
    key = str(key).strip().replace('-', '_')
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
        raise ValueError(f'{where}: grid key {key!r} is not an option or model keyword name')
    if key in RESERVED:
        raise ValueError(f'{where}: {key!r} cannot be a grid key (the sweep sets it per run; use --seeds for seeds)')
    if key == 'model_kwargs':
        raise ValueError(f'{where}: give model keywords as their own grid keys (kernel_size=5,7), not model_kwargs')
    return key


def parse_grid_arg(text: str) -> tuple[str, list]:
    """``'kernel_size=5,7,11'`` -> ``('kernel_size', [5, 7, 11])``; values are parsed as YAML."""
    where = f'--grid {text!r}'
    if not isinstance(text, str) or '=' not in text:
        raise ValueError(f'{where}: expected KEY=V1,V2,... (e.g. kernel_size=5,7,11)')
    key, raw = text.split('=', 1)
    key = normalize_key(key, where)
    values = [parse_value(v) for v in split_values(raw)]
    return key, _check_values(key, values, where)


def parse_grid(grid: Any, where: str) -> dict:
    """A grid mapping ``{key: [values]}`` (from YAML) or a list of ``KEY=V1,V2`` strings, validated."""
    if isinstance(grid, (list, tuple)):
        items = [parse_grid_arg(g) for g in grid]
    elif isinstance(grid, dict):
        items = []
        for key, values in grid.items():
            values = values if isinstance(values, list) else [values]
            items.append((normalize_key(key, where), _check_values(str(key), values, where)))
    else:
        raise ValueError(f'{where}: grid must be a mapping of keys to value lists, got {type(grid).__name__}')
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f'{where}: grid key given twice: {sorted(k for k in keys if keys.count(k) > 1)}')
    return dict(items)


def parse_seeds(seeds: Any, where: str) -> list[int]:
    seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f'{where}: seeds must be integers, got {seeds}') from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f'{where}: seeds must be distinct integers >= 0, got {seeds}')
    return out


def load_sweep_config(path) -> dict:
    """A sweep YAML: ``grid`` (mapping), ``seeds``, optional ``parallel`` / ``task``, and training options."""
    values = load_yaml_mapping(path, 'grid, seeds and training options')
    values = {str(k).replace('-', '_'): v for k, v in values.items()}
    for key in RESERVED:
        if key in values:
            raise ValueError(f'--config {path}: {key!r} cannot be set in a sweep config (the sweep sets it per run)')
    return values


def build_sweep(grid: Any, seeds: Any, options: dict, options_cls, task: str = 'classification',
                parallel: int = 1, where: str = 'sweep') -> Sweep:
    """A ``Sweep`` with each axis marked as a training option or a model keyword."""
    parsed = parse_grid(grid or {}, where)
    if not parsed:
        raise ValueError(f'{where}: no grid: give --grid KEY=V1,V2,... (or a grid: mapping in --config)')
    fields = {f.name for f in dataclasses.fields(options_cls)}
    axes = [Axis(k, v, 'option' if k in fields else 'model') for k, v in parsed.items()]
    options = dict(options)
    if options.get('model_kwargs'):
        from ..engine.options import keywords
        options['model_kwargs'] = keywords(options['model_kwargs'])
    clash = [a.key for a in axes if a.target == 'model' and a.key in (options.get('model_kwargs') or {})]
    if clash:
        raise ValueError(f'{where}: {clash} given both as grid keys and in model_kwargs; keep one')
    if int(parallel) < 1:
        raise ValueError(f'{where}: --parallel must be >= 1, got {parallel}')
    return Sweep(axes, parse_seeds(seeds if seeds is not None else [0], where), options, task, int(parallel))


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()
    return re.sub(r'[^A-Za-z0-9.+-]+', '', text.replace(', ', '-').replace(',', '-')) or 'none'


def run_name(variant: dict, seed: int) -> str:
    """The run folder name of a variant and seed: ``kernel_size-7_fusion-sum_seed-0``."""
    parts = [f'{k}-{_short(v)}' for k, v in variant.items()]
    return '_'.join(parts + [f'seed-{seed}'])


def variant_label(variant: dict) -> str:
    return ', '.join(f'{k}={_short(v)}' for k, v in variant.items())

