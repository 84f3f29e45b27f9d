"""The ``detect`` / ``segment`` commands: ``train`` (through the Python API), ``eval`` (metrics and overlays of a
saved model on a split) and ``predict`` (overlays for image files), shared by both dense tasks; each task's ``cli``
module adds its own flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..engine.distributed import init_distributed, launched_as_main
from ..engine.options import add_arguments, positive_int
from ..engine.record import from_record, refuse_train_overlap, run_record
from ..engine.runtime import AMP_DTYPES
from ..fileio import atomic_write_text
from ..slurm import add_slurm_arguments
from .dense import load_task_model

__all__ = ['add_task_parsers', 'cmd_eval', 'cmd_predict', 'cmd_train']


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
    from ..slurm import print_submitted, submit_run, train_options
    task_cls = get_task(task)[0]
    options, request = train_options(args)
    if request is not None:
        return print_submitted(submit_run(task, options, request))
    final = train(task, **options)
    metric, shown_keys = task_cls.best_metric, set(task_cls.curves.values())
    shown = ', '.join(f'{k} {v:.2f}' for k, v in final.items() if isinstance(v, float) and k in shown_keys)
    best = final.get(task_cls.best_key)
    if not launched_as_main():
        return 0
    print(f'final: {shown or "no evaluation"}  (best {metric}: {"–" if best is None else f"{best:.2f}"})  '
          f'run folder: {final["run_dir"]}')
    return 0
