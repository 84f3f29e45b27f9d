"""Running a sweep: plan the runs (variant x seed -> options of one run folder), validate every one before any
starts, then run them one after another (or ``parallel`` at once) through ``conv2former.api.train``. A run whose
``results.json`` exists is skipped; one with a checkpoint is resumed; wall seconds are kept per run in
``sweep_run.json``."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Optional

import timm
import yaml
from tqdm import tqdm

from ..engine.distributed import launched_as_main
from ..engine.options import RESUME_SAFE, as_dict
from ..engine.state import list_checkpoints
from ..fileio import atomic_write_text
from .aggregate import aggregate
from .grid import RUN_FILE, SWEEP_FILE, Sweep, run_name, variant_label

_logger = logging.getLogger('conv2former.sweep')


@dataclasses.dataclass
class PlannedRun:
    name: str
    variant: dict
    seed: int
    options: dict  # keyword arguments of conv2former.api.train

    def run_dir(self) -> Path:
        return Path(self.options['output']) / self.name


def plan_runs(sweep: Sweep, sweep_dir: Path) -> list[PlannedRun]:
    """One ``PlannedRun`` per variant and seed; model-keyword axes are merged into ``model_kwargs``."""
    runs = []
    for variant in sweep.variants():
        for seed in sweep.seeds:
            options = dict(sweep.options, seed=seed, output=Path(sweep_dir), experiment=run_name(variant, seed))
            model_kwargs = dict(options.get('model_kwargs') or {})
            for axis in sweep.axes:
                if axis.target == 'model':
                    model_kwargs[axis.key] = variant[axis.key]
                else:
                    options[axis.key] = variant[axis.key]
            options['model_kwargs'] = model_kwargs
            runs.append(PlannedRun(options['experiment'], variant, seed, options))
    return runs


def _check_model(model: str, model_kwargs: dict, label: str) -> None:
    """Build the model on the meta device (no memory, no time) to check it accepts ``model_kwargs``."""
    if not timm.is_model(model):
        raise ValueError(f'sweep variant {label}: unknown model {model!r} (not registered with timm)')
    try:
        timm.create_model(model, device='meta', **model_kwargs)
    except TypeError as e:
        if 'unexpected keyword' in str(e):
            bad = str(e).rsplit(' ', 1)[-1]
            raise ValueError(f'sweep variant {label}: unknown key {bad} for model {model} (neither a training '
                             f'option nor a keyword of its constructor)') from None
        raise ValueError(f'sweep variant {label}: model {model} rejects {model_kwargs}: {e}') from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(f'sweep variant {label}: model {model} rejects {model_kwargs}: {e}') from None


def validate_runs(runs: list[PlannedRun], task: str) -> dict:
    """Resolve every run's options and build every distinct model on the meta device; the first problem raises
    ValueError naming the variant. Returns ``{run name: resolved options}``."""
    from ..api import build_options
    resolved, checked = {}, set()
    for run in runs:
        label = variant_label(run.variant) or run.name
        try:
            opts = build_options(task, {k: v for k, v in run.options.items()}, source=f'sweep variant {label}')
        except ValueError as e:
            raise ValueError(str(e)) from None
        key = (opts.model, yaml.safe_dump(opts.model_kwargs, sort_keys=True)) if task == 'classification' else None
        if key is not None and key not in checked:
            _check_model(opts.model, dict(opts.model_kwargs), label)
            checked.add(key)
        resolved[run.name] = opts
    return resolved


def run_state(run_dir: Path, options) -> str:
    """'done' (results.json written for these epochs), 'resume' (a checkpoint exists) or 'new'."""
    config = run_dir / 'config.yaml'
    if config.is_file():
        _check_same_settings(run_dir, yaml.safe_load(config.read_text()) or {}, as_dict(options))
    if (run_dir / 'results.json').is_file() and config.is_file():
        if (yaml.safe_load(config.read_text()) or {}).get('epochs') == options.epochs:
            return 'done'
    return 'resume' if list_checkpoints(run_dir) else 'new'


def _check_same_settings(run_dir: Path, saved: dict, planned: dict) -> None:
    ignore = set(RESUME_SAFE) | {'resume', 'config', 'output'}
    diff = [k for k in planned if k not in ignore and k in saved and saved[k] != planned[k]]
    if diff:
        k = diff[0]
        raise ValueError(f'{run_dir} was run with {k}={saved[k]!r}, this sweep asks for {planned[k]!r}: a sweep '
                         f'folder holds one set of settings; choose another --experiment for a different sweep')


def train_one(task: str, options: dict, run_dir: str, state: str, record: bool = True) -> dict:
    """Train (or resume) one run; with ``record``, adds the wall seconds of this invocation to ``sweep_run.json``
    (on rank 0: a submitted job may be several DDP ranks)."""
    from ..api import train
    start = time.perf_counter()
    root = logging.getLogger('conv2former')
    handlers = list(root.handlers)
    try:
        if state == 'resume':
            safe = {k: options[k] for k in ('epochs', 'workers', 'progress', 'device') if k in options}
            result = train(task, resume=run_dir, **safe)
        else:
            result = train(task, **options)
    finally:  # the run's log.txt handler: without this, every later run of the sweep would log into it too
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
    plain = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None}
    if not record or not launched_as_main():
        return plain
    record_file = Path(run_dir) / RUN_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else dict(wall_seconds=0.0, invocations=0)
    record['wall_seconds'] += time.perf_counter() - start
    record['invocations'] += 1
    atomic_write_text(record_file, json.dumps(record, indent=2) + '\n')
    return plain


def write_sweep_file(sweep: Sweep, runs: list[PlannedRun], sweep_dir: Path) -> None:
    payload = dict(task=sweep.task, axes=[dataclasses.asdict(a) for a in sweep.axes], seeds=sweep.seeds,
                   options={k: v for k, v in as_plain(sweep.options).items()},
                   runs=[dict(name=r.name, variant=r.variant, seed=r.seed) for r in runs])
    atomic_write_text(Path(sweep_dir) / SWEEP_FILE, json.dumps(payload, indent=2) + '\n')


def as_plain(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def run_sweep(sweep: Sweep, sweep_dir: Path, progress: bool = True) -> Optional[dict]:
    """Validate, run what is not finished, aggregate. Returns the aggregate's summary."""
    todo, runs, states = plan_sweep(sweep, sweep_dir)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit='run', desc='sweep', disable=not progress)
    if sweep.parallel > 1 and len(todo) > 1:
        _run_parallel(sweep, todo, states, bar)
    else:
        for run in todo:
            bar.set_postfix_str(run.name)
            train_one(sweep.task, run.options, str(run.run_dir()), states[run.name])
            bar.update(1)
    bar.close()
    return aggregate(sweep_dir)


def plan_sweep(sweep: Sweep, sweep_dir: Path) -> tuple[list[PlannedRun], list[PlannedRun], dict]:
    """(runs still to do, all runs, each run's state 'done' / 'resume' / 'new') after validating every run and
    writing ``sweep.json``: what the local runner and a SLURM job array both start from."""
    sweep_dir = Path(sweep_dir)
    runs = plan_runs(sweep, sweep_dir)
    resolved = validate_runs(runs, sweep.task)
    states = {r.name: run_state(r.run_dir(), resolved[r.name]) for r in runs}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_sweep_file(sweep, runs, sweep_dir)
    todo = [r for r in runs if states[r.name] != 'done']
    _logger.info('sweep %s: %d runs (%d variants x %d seeds), %d finished, %d to resume, %d new', sweep_dir, len(runs),
                 len(runs) // len(sweep.seeds), len(sweep.seeds), len(runs) - len(todo),
                 sum(states[r.name] == 'resume' for r in todo), sum(states[r.name] == 'new' for r in todo))
    return todo, runs, states


def finish_if_complete(sweep_dir: Path) -> Optional[dict]:
    """Aggregate the sweep when every run listed in its ``sweep.json`` has finished (the last job of a SLURM array
    to finish does it; several doing it at once write the same files atomically); None while runs are missing."""
    planned = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())['runs']
    if all((Path(sweep_dir) / r['name'] / 'results.json').is_file() for r in planned):
        return aggregate(sweep_dir)
    return None


def _run_parallel(sweep: Sweep, todo: list[PlannedRun], states: dict, bar) -> None:
    """``sweep.parallel`` runs at once, each in its own (spawned) process, without per-run progress bars."""
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(sweep.parallel, mp_context=context) as pool:
        futures = {pool.submit(train_one, sweep.task, dict(r.options, progress=False), str(r.run_dir()),
                               states[r.name]): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            bar.update(1)
