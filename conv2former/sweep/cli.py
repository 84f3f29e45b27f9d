"""``conv2former sweep``: a grid of classification runs x seeds (every ``train`` flag sets the shared options), or
``--report DIR`` to re-aggregate a sweep folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.options import add_arguments
from ..slurm import add_slurm_arguments
from .grid import SWEEP_KEYS, build_sweep, load_sweep_config, parse_grid


def _sweep_from_args(args: argparse.Namespace):
    """The ``Sweep`` and its folder: the sweep YAML (``--config``) < flags; ``--grid`` adds to or replaces the
    YAML's axes by key."""
    from ..tasks import get_task
    from ..slurm import FLAGS as CLUSTER_FLAGS  # where the runs go, not how they train
    explicit = {k: v for k, v in vars(args).items()
                if k not in ('func', 'command', 'grid', 'seeds', 'parallel', 'report', 'config', *CLUSTER_FLAGS)}
    for key, hint in (('seed', 'use --seeds'), ('resume', 're-invoke the same sweep command to resume it')):
        if key in explicit:
            raise ValueError(f'conv2former sweep sets --{key} per run; {hint}')
    values = load_sweep_config(args.config) if getattr(args, 'config', None) else {}
    where = f'--config {args.config}' if values else 'sweep'
    grid = parse_grid(values.get('grid') or {}, where)
    grid.update(parse_grid(args.grid or [], 'sweep'))
    seeds = args.seeds if args.seeds is not None else values.get('seeds', [0])
    parallel = args.parallel if args.parallel is not None else values.get('parallel', 1)
    task = values.get('task', 'classification')
    options = {k: v for k, v in values.items() if k not in SWEEP_KEYS}
    options.update(explicit)
    _, options_cls = get_task(task)
    sweep = build_sweep(grid, seeds, options, options_cls, task=task, parallel=parallel, where=where)
    name = explicit.get('experiment') or values.get('name') or 'sweep-' + '-'.join(a.key for a in sweep.axes)
    sweep.options.pop('experiment', None)
    output = Path(sweep.options.pop('output', 'runs'))
    return sweep, output / name


def _print_summary(result: dict) -> None:
    for label, entry in zip(result['labels'], result['summary']):
        mean, std = entry['final_top1'], entry['final_top1_std']
        shown = f'{mean:6.2f} ± {std:.2f}' if mean is not None else '   (no finished run)'
        print(f'{label:<40} top-1 {shown}  (n={entry["n"]}/{entry["runs"]})')
    print('wrote ' + ', '.join(str(p) for p in result['files']))


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .aggregate import aggregate
    from ..slurm import pop_request, print_submitted_sweep, submit_sweep
    from .runner import run_sweep
    if args.report is not None:
        _print_summary(aggregate(args.report))
        return 0
    request = pop_request(args)
    sweep, sweep_dir = _sweep_from_args(args)
    if request is not None:
        return print_submitted_sweep(submit_sweep(sweep, sweep_dir, request), sweep_dir)
    _print_summary(run_sweep(sweep, sweep_dir, progress=sweep.options.get('progress', True)))
    return 0


def add_parsers(sub) -> None:
    """Add ``sweep`` to the top-level sub-parsers."""
    from ..tasks.classification.task import ClassificationOptions
    p = sub.add_parser(
        'sweep', help='a grid of training runs x seeds, aggregated into sweep.csv / sweep.md / plots',
        description='Each run is a normal run folder under --output/<sweep name>; re-invoking skips finished runs '
                    'and resumes interrupted ones. --config is a sweep YAML (grid:, seeds:, parallel:, name: and '
                    'training options, e.g. experiments/sweeps/*.yaml); flags override it.')
    p.add_argument('--grid', action='append', metavar='KEY=V1,V2,...',
                   help='one grid axis (repeatable): a training option (lr, model, img_size, ...) or a model keyword '
                        '(kernel_size, fusion, weighting, attn_act, mlp_dwconv, ...)')
    p.add_argument('--seeds', type=int, nargs='+', help='seeds of every variant (default 0)')
    p.add_argument('--parallel', type=int, help='runs at once, each in its own process (default 1)')
    p.add_argument('--report', type=Path, metavar='DIR', help='only re-aggregate the sweep folder DIR')
    add_arguments(p, ClassificationOptions)
    add_slurm_arguments(p, sweep=True)
    p.set_defaults(func=_cmd_sweep)
