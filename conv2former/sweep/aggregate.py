"""Aggregating a sweep folder: ``sweep.csv`` (one row per run), ``sweep.md`` (one row per variant: mean ± std of
top-1 over seeds) and PNG plots (``plots.py``). Works on a finished or a partial sweep: runs without
``results.json`` are listed as unfinished and left out of the means."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import yaml

from ..engine.report import read_jsonl
from ..fileio import atomic_write_text
from .grid import variant_label
from .runner import RUN_FILE, SWEEP_FILE

CSV_COLUMNS = ('best_top1', 'final_top1', 'params', 'macs', 'train_img_per_sec', 'wall_seconds', 'epochs', 'run')


def _model_size(config: dict, num_classes: int) -> tuple:
    """(params, MACs) of a run's model at its image size, built on the meta device."""
    from ..info import count_macs
    import timm
    model = timm.create_model(config['model'], device='meta', num_classes=num_classes,
                              **(config.get('model_kwargs') or {})).eval()
    params = sum(p.numel() for p in model.parameters())
    size = config.get('img_size') or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    return params, count_macs(model, size, getattr(model, 'in_chans', 3))


def _history(run_dir: Path) -> list:
    """Per-epoch metrics: ``metrics.jsonl``, else ``metrics.csv`` (run records kept without the JSON lines, e.g.
    the committed ones of experiments/results) with its empty cells as None."""
    if (run_dir / 'metrics.jsonl').is_file():
        return read_jsonl(run_dir / 'metrics.jsonl')
    if not (run_dir / 'metrics.csv').is_file():
        return []
    with open(run_dir / 'metrics.csv', newline='') as f:
        return [{k: float(v) if v not in ('', None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def run_row(sweep_dir: Path, entry: dict, axes: list) -> dict:
    """The ``sweep.csv`` row of one run (metrics empty when it has not finished)."""
    run_dir = sweep_dir / entry['name']
    row = {a['key']: entry['variant'][a['key']] for a in axes}
    row.update(seed=entry['seed'], run=entry['name'], best_top1=None, final_top1=None, params=None, macs=None,
               train_img_per_sec=None, wall_seconds=None, epochs=None)
    results, config = run_dir / 'results.json', run_dir / 'config.yaml'
    if not (results.is_file() and config.is_file()):
        return row
    cfg = yaml.safe_load(config.read_text())
    history = _history(run_dir)
    tops = [r['val_top1'] for r in history if r.get('val_top1') is not None]
    rates = [r['img_per_sec'] for r in history if r.get('img_per_sec')]
    res = json.loads(results.read_text())
    params, macs = _model_size(cfg, len(res.get('per_class_accuracy') or {}) or 1000)
    record = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    row.update(best_top1=max(tops) if tops else None, final_top1=res.get('top1'), params=params, macs=macs,
               train_img_per_sec=statistics.fmean(rates) if rates else None,
               wall_seconds=record.get('wall_seconds'), epochs=len(history))
    return row


def summarize(rows: list, axes: list) -> list:
    """One entry per variant (grid order): mean and sample std of best and final top-1 over finished seeds."""
    keys = [a['key'] for a in axes]
    groups = {}
    for row in rows:
        groups.setdefault(tuple(yaml.safe_dump(row[k]) for k in keys), []).append(row)
    summary = []
    for group in groups.values():
        done = [r for r in group if r['final_top1'] is not None]
        entry = {k: group[0][k] for k in keys}
        for metric in ('final_top1', 'best_top1', 'train_img_per_sec'):
            values = [r[metric] for r in done if r[metric] is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[metric + '_std'] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        entry.update(n=len(done), runs=len(group), params=done[0]['params'] if done else None,
                     macs=done[0]['macs'] if done else None)
        summary.append(entry)
    return summary


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return format(value, spec)


def write_csv(path: Path, rows: list, axes: list) -> None:
    fields = [a['key'] for a in axes] + ['seed'] + list(CSV_COLUMNS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows])
    atomic_write_text(path, buffer.getvalue())


def write_markdown(path: Path, summary: list, axes: list, meta: dict, plots: list) -> None:
    keys = [a['key'] for a in axes]
    head = '| ' + ' | '.join(keys) + ' | final top-1 (%) | best top-1 (%) | n | params | MMACs | train img/s |'
    lines = [f'# Sweep: {", ".join(keys)} x seeds {meta["seeds"]}', '',
             f'Task {meta["task"]}; shared options: `{json.dumps(meta["options"], sort_keys=True)}`.', '',
             'Mean ± sample standard deviation over the finished seeds (n); final = top-1 after the last epoch, best = '
             'the highest per-epoch top-1 (selected on the validation set itself, so optimistic).', '',
             head, '|' + '---|' * (len(keys) + 6)]
    for e in summary:
        cells = [str(e[k]) for k in keys] + [
            f'{_fmt(e["final_top1"], ".2f")} ± {_fmt(e["final_top1_std"], ".2f")}',
            f'{_fmt(e["best_top1"], ".2f")} ± {_fmt(e["best_top1_std"], ".2f")}',
            f'{e["n"]}/{e["runs"]}', _fmt(e['params'], ',d'),
            _fmt(e['macs'] / 1e6 if e['macs'] else None, '.1f'), _fmt(e['train_img_per_sec'], '.0f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [''] + [f'![{p.stem}]({p.name})' for p in plots]
    atomic_write_text(path, '\n'.join(lines) + '\n')


def aggregate(sweep_dir) -> dict:
    """Write ``sweep.csv``, ``sweep.md`` and the plots of ``sweep_dir``; returns the summary and the files."""
    from .plots import plot_sweep
    sweep_dir = Path(sweep_dir)
    meta_file = sweep_dir / SWEEP_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f'--report {sweep_dir}: no {SWEEP_FILE} there (expected a folder written by '
                                f'conv2former sweep)')
    meta = json.loads(meta_file.read_text())
    rows = [run_row(sweep_dir, entry, meta['axes']) for entry in meta['runs']]
    summary = summarize(rows, meta['axes'])
    write_csv(sweep_dir / 'sweep.csv', rows, meta['axes'])
    plots = plot_sweep(sweep_dir, rows, summary, meta['axes'])
    write_markdown(sweep_dir / 'sweep.md', summary, meta['axes'], meta, plots)
    return dict(rows=rows, summary=summary, files=[sweep_dir / 'sweep.csv', sweep_dir / 'sweep.md', *plots],
                labels=[variant_label({a['key']: e[a['key']] for a in meta['axes']}) for e in summary])
