"""Aggregating a sweep folder: ``sweep.csv`` (one row per run), ``sweep.md`` (one row per variant: mean ± std of
the task's metric over seeds) and PNG plots (``plots.py``). Works on a finished or a partial sweep: runs without
``results.json`` are listed as unfinished and left out of the means.

The metric is the task's ``best_metric`` (``SweepMetric``): top-1 for classification (columns ``best_top1`` /
``final_top1``, as the committed sweep records have them), box AP for detection (``best_bbox_AP`` /
``final_bbox_AP``), mIoU for segmentation (``best_mIoU`` / ``final_mIoU``)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from pathlib import Path

import torch
import yaml

from ..engine.report import column_header, read_jsonl
from ..fileio import atomic_write_text
from ..tasks import get_task
from .grid import RUN_FILE, SWEEP_FILE, variant_label
from .plots import plot_sweep

CSV_COLUMNS = ('params', 'macs', 'train_img_per_sec', 'wall_seconds', 'epochs', 'run')  # after the metric's two


@dataclasses.dataclass(frozen=True)
class SweepMetric:
    """What a sweep reports of each run of a task: the task's ``best_metric``."""
    task: str    # the task name ('classification', 'detection', 'segmentation')
    key: str     # per-epoch key in metrics.jsonl (the task's best_metric: 'val_top1', 'bbox_AP', 'mIoU')
    name: str    # the task's best_key without 'best_': the columns best_<name>, final_<name> and the results.json
    #              key of the final value ('top1', 'bbox_AP', 'mIoU')
    label: str   # in sweep.md and the plots: the task's report header of the metric ('top-1', 'box AP', 'mIoU')

    @property
    def best(self) -> str:
        return f'best_{self.name}'

    @property
    def final(self) -> str:
        return f'final_{self.name}'


def sweep_metric(task: str) -> SweepMetric:
    """The ``SweepMetric`` of a task name, from what its engine task declares."""
    task_cls = get_task(task)[0]
    return SweepMetric(task, task_cls.best_metric, task_cls.best_key.removeprefix('best_'),
                       column_header(task_cls.columns, task_cls.best_metric))


def _model_size(config: dict, num_classes: int) -> tuple:
    """(params, MACs) of a classification run's model at its image size, built on the meta device."""
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


def _dense_size(run_dir: Path, task: str) -> tuple:
    """(params, None) of a detection / segmentation run's model, rebuilt on the meta device from its task folder
    (``last/config.json``); (None, None) without one. MACs are left out: a detector's depend on its detections."""
    config_file = run_dir / 'last' / 'config.json'
    if not config_file.is_file():
        return None, None
    with torch.device('meta'):
        model = get_task(task)[0].build(json.loads(config_file.read_text()), None)
    return sum(p.numel() for p in model.parameters()), None


def run_row(sweep_dir: Path, entry: dict, axes: list, metric: SweepMetric | None = None) -> dict:
    """The ``sweep.csv`` row of one run (metrics empty when it has not finished); ``metric``: classification's
    top-1 unless given."""
    metric = metric or sweep_metric('classification')
    run_dir = sweep_dir / entry['name']
    row = {a['key']: entry['variant'][a['key']] for a in axes}
    row.update(seed=entry['seed'], run=entry['name'], params=None, macs=None, train_img_per_sec=None,
               wall_seconds=None, epochs=None, **{metric.best: None, metric.final: None})
    results, config = run_dir / 'results.json', run_dir / 'config.yaml'
    if not (results.is_file() and config.is_file()):
        return row
    cfg = yaml.safe_load(config.read_text())
    history = _history(run_dir)
    values = [r[metric.key] for r in history if r.get(metric.key) is not None]
    rates = [r['img_per_sec'] for r in history if r.get('img_per_sec')]
    res = json.loads(results.read_text())
    if metric.task == 'classification':
        params, macs = _model_size(cfg, len(res.get('per_class_accuracy') or {}) or 1000)
    else:
        params, macs = _dense_size(run_dir, metric.task)
    record = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    row.update(params=params, macs=macs, train_img_per_sec=statistics.fmean(rates) if rates else None,
               wall_seconds=record.get('wall_seconds'), epochs=len(history),
               **{metric.best: max(values) if values else None, metric.final: res.get(metric.name)})
    return row


def summarize(rows: list, axes: list, metric: SweepMetric) -> list:
    """One entry per variant (grid order): mean and sample std of the best and final metric over finished seeds."""
    keys = [a['key'] for a in axes]
    groups = {}
    for row in rows:
        groups.setdefault(tuple(yaml.safe_dump(row[k]) for k in keys), []).append(row)
    summary = []
    for group in groups.values():
        done = [r for r in group if r[metric.final] is not None]
        entry = {k: group[0][k] for k in keys}
        for column in (metric.final, metric.best, 'train_img_per_sec'):
            values = [r[column] for r in done if r[column] is not None]
            entry[column] = statistics.fmean(values) if values else None
            entry[column + '_std'] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        entry.update(n=len(done), runs=len(group), params=done[0]['params'] if done else None,
                     macs=done[0]['macs'] if done else None)
        summary.append(entry)
    return summary


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return format(value, spec)


def write_csv(path: Path, rows: list, axes: list, metric: SweepMetric) -> None:
    fields = [a['key'] for a in axes] + ['seed', metric.best, metric.final, *CSV_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows])
    atomic_write_text(path, buffer.getvalue())


def write_markdown(path: Path, summary: list, axes: list, meta: dict, plots: list, metric: SweepMetric) -> None:
    keys, label = [a['key'] for a in axes], metric.label
    head = '| ' + ' | '.join(keys) + f' | final {label} (%) | best {label} (%) | n | params | MMACs | train img/s |'
    lines = [f'# Sweep: {", ".join(keys)} x seeds {meta["seeds"]}', '',
             f'Task {meta["task"]}; shared options: `{json.dumps(meta["options"], sort_keys=True)}`.', '',
             f'Mean ± sample standard deviation over the finished seeds (n); final = {label} after the last epoch, '
             f'best = the highest per-epoch {label} (selected on the validation set itself, so optimistic).', '',
             head, '|' + '---|' * (len(keys) + 6)]
    for e in summary:
        cells = [str(e[k]) for k in keys] + [
            f'{_fmt(e[metric.final], ".2f")} ± {_fmt(e[metric.final + "_std"], ".2f")}',
            f'{_fmt(e[metric.best], ".2f")} ± {_fmt(e[metric.best + "_std"], ".2f")}',
            f'{e["n"]}/{e["runs"]}', _fmt(e['params'], ',d'),
            _fmt(e['macs'] / 1e6 if e['macs'] else None, '.1f'), _fmt(e['train_img_per_sec'], '.0f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [''] + [f'![{p.stem}]({p.name})' for p in plots]
    atomic_write_text(path, '\n'.join(lines) + '\n')


def aggregate(sweep_dir) -> dict:
    """Write ``sweep.csv``, ``sweep.md`` and the plots of ``sweep_dir``; returns the rows, the summary, the metric
    and the files."""
    sweep_dir = Path(sweep_dir)
    meta_file = sweep_dir / SWEEP_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f'--report {sweep_dir}: no {SWEEP_FILE} there (expected a folder written by '
                                f'conv2former sweep)')
    meta = json.loads(meta_file.read_text())
    metric = sweep_metric(meta.get('task', 'classification'))
    rows = [run_row(sweep_dir, entry, meta['axes'], metric) for entry in meta['runs']]
    summary = summarize(rows, meta['axes'], metric)
    write_csv(sweep_dir / 'sweep.csv', rows, meta['axes'], metric)
    plots = plot_sweep(sweep_dir, rows, summary, meta['axes'], metric)
    write_markdown(sweep_dir / 'sweep.md', summary, meta['axes'], meta, plots, metric)
    return dict(rows=rows, summary=summary, metric=metric,
                files=[sweep_dir / 'sweep.csv', sweep_dir / 'sweep.md', *plots],
                labels=[variant_label({a['key']: e[a['key']] for a in meta['axes']}) for e in summary])
