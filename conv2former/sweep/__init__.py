"""Sweeps: a grid of training runs x seeds through the engine's Python API, each run a normal run folder under the
sweep folder, aggregated into ``sweep.csv``, ``sweep.md`` and PNG plots.

``conv2former sweep --grid kernel_size=5,7,11 --seeds 0 1 2 --recipe small --data DATA`` or
``conv2former sweep --config experiments/sweeps/kernel-size.yaml --data DATA``; ``conv2former sweep --report DIR``
re-aggregates a sweep folder. Re-invoking a sweep skips finished runs and resumes interrupted ones.
"""
from .aggregate import aggregate
from .grid import Axis, Sweep, load_sweep_config, parse_grid_arg
from .runner import plan_runs, run_sweep, validate_runs

__all__ = ['Axis', 'Sweep', 'aggregate', 'load_sweep_config', 'parse_grid_arg', 'plan_runs', 'run_sweep',
           'validate_runs']
