"""Training-run report: curves from ``metrics.jsonl`` / ``lr_schedule.jsonl`` and a markdown summary, ``report.md``."""
from __future__ import annotations

import json
import math
import warnings
from datetime import datetime
from pathlib import Path

from ..fileio import atomic_path, atomic_write_text

_EPOCH_COLUMNS = [  # (header, metrics.jsonl key, format)
    ('epoch', 'epoch', 'd'),
    ('train loss', 'train_loss', '.4f'),
    ('val loss', 'val_loss', '.4f'),
    ('top-1', 'val_top1', '.2f'),
    ('top-5', 'val_top5', '.2f'),
    ('EMA top-1', 'ema_top1', '.2f'),
    ('lr', 'lr', '.3e'),
    ('img/s', 'img_per_sec', '.1f'),
]


def column_header(columns: list[tuple[str, str, str]] | None, key: str) -> str:
    """The report's name of the ``metrics.jsonl`` key ``key`` among a task's ``columns`` (None: classification's):
    'top-1' for val_top1, a dense task's 'box AP' or 'mIoU'; the key itself when no column shows it."""
    return next((header for header, k, _ in columns or _EPOCH_COLUMNS if k == key), key)


def read_jsonl(path) -> list[dict]:
    """Records of a JSON-lines file. A truncated last line (a run killed mid-write) is skipped silently; any other line
    that is not a JSON object (e.g. a partial line that a resumed run appended to) is skipped with a warning."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text(encoding='utf-8').splitlines(), 1) if line.strip()]
    records = []
    for index, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif index < len(lines) - 1:
            warnings.warn(f'{path}:{lineno}: skipping a line that is not a JSON object', stacklevel=2)
    return records


def _load(path: Path, key: str) -> list[dict]:
    """Records of ``path`` (none if missing) with a non-null ``key``, sorted by it; the last record wins for a repeated
    ``key`` (epochs redone after a resume)."""
    records = read_jsonl(path) if path.is_file() else []
    return sorted({r[key]: r for r in records if r.get(key) is not None}.values(), key=lambda r: r[key])


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    points = [(r[x_key], r[y_key]) for r in records if r.get(x_key) is not None and r.get(y_key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _line_plot(path: Path, curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> Path | None:
    """Plot the non-empty ``curves`` ({label: (xs, ys)}) into a PNG; None (and no file) when all are empty."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker='o' if len(xs) <= 50 else None, markersize=4, label=label)
    all_x = [x for xs, _ in curves.values() for x in xs]
    if max(all_x) - min(all_x) < 1:  # a single epoch/step: avoid a fractional axis around one point
        ax.set_xlim(min(all_x) - 0.5, max(all_x) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    return path


CLASSIFICATION_CURVES = {'val top-1': 'val_top1', 'val top-5': 'val_top5', 'EMA top-1': 'ema_top1'}


def plot_training_curves(run_dir, metric_curves: dict[str, str] | None = None, metric_label: str = 'accuracy (%)',
                         metric_title: str = 'Validation accuracy') -> dict[str, Path]:
    """Write ``plots/loss.png``, ``plots/<metric>.png`` and ``plots/lr.png`` under ``run_dir`` from its
    ``metrics.jsonl`` and ``lr_schedule.jsonl`` (lr falls back to the per-epoch values); nulls are skipped.
    ``metric_curves`` maps curve labels to ``metrics.jsonl`` keys (default: classification accuracy, plotted as
    ``accuracy.png``; otherwise ``metrics.png``). Returns ``{name: path}`` for the plots that had data."""
    run_dir = Path(run_dir)
    metrics = _load(run_dir / 'metrics.jsonl', 'epoch')
    lr_schedule = _load(run_dir / 'lr_schedule.jsonl', 'step') or metrics
    plots = run_dir / 'plots'
    metric_name = 'accuracy' if metric_curves is None else 'metrics'
    metric_curves = CLASSIFICATION_CURVES if metric_curves is None else metric_curves
    paths = {
        'loss': _line_plot(plots / 'loss.png', {
            'train': _series(metrics, 'epoch', 'train_loss'),
            'val': _series(metrics, 'epoch', 'val_loss'),
        }, 'epoch', 'loss', 'Loss'),
        metric_name: _line_plot(plots / f'{metric_name}.png', {
            label: _series(metrics, 'epoch', key) for label, key in metric_curves.items()
        }, 'epoch', metric_label, metric_title),
        'lr': _line_plot(plots / 'lr.png', {'lr': _series(lr_schedule, 'step', 'lr')}, 'optimizer step',
                         'learning rate', 'Learning-rate schedule'),
    }
    return {name: path for name, path in paths.items() if path is not None}


def _cell(value, width: int = 80) -> str:
    """One markdown table cell: floats as ``.6g``, pipes escaped, newlines flattened, long text truncated."""
    text = format(value, '.6g') if isinstance(value, float) else str(value)
    text = ' '.join(text.split())
    if len(text) > width:
        text = text[:width - 1] + '…'
    return text.replace('|', '\\|')


def _flatten(config: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _epoch_value(value, fmt: str) -> str:
    if value is None:
        return '–'
    if isinstance(value, float) and math.isnan(value):
        return 'nan'
    return format(value, fmt)


def write_report(run_dir, config: dict, final_metrics: dict, title: str = 'Conv2Former training run',
                 columns: list[tuple[str, str, str]] | None = None, metric_curves: dict[str, str] | None = None,
                 metric_label: str = 'accuracy (%)', images: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/report.md`` atomically, results first: final metrics, per-epoch table, the training curves
    (rendered here via ``plot_training_curves``), ``confusion_matrix.png`` if present, prediction images, and last
    the configuration (nested keys dotted, sorted).

    Dense tasks pass their own ``columns`` ((header, metrics.jsonl key, format) triples; a column whose values are
    all null is left out; of the default classification columns only 'EMA top-1' is), ``metric_curves`` ({label: key}) and ``images`` ({caption: path relative to run_dir}, e.g.
    prediction overlays)."""
    run_dir = Path(run_dir)
    plots = plot_training_curves(run_dir, metric_curves, metric_label,
                                 'Validation accuracy' if metric_curves is None else 'Validation metrics')
    metrics = _load(run_dir / 'metrics.jsonl', 'epoch')

    generated = f'{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}'
    lines = [f'# {title}', '', f'Run folder: `{run_dir.name}` · generated {generated}', '', '## Final metrics', '']
    metric_rows = [[_cell(k), _cell(v)] for k, v in final_metrics.items()]
    lines += _table(['metric', 'value'], metric_rows) if metric_rows else ['_No final metrics recorded._']
    lines += ['', '## Per-epoch metrics', '']
    if metrics:
        optional = {c[1] for c in columns} if columns else {'ema_top1'}  # classification: only EMA may go
        columns = [c for c in columns or _EPOCH_COLUMNS
                   if c[1] not in optional or any(r.get(c[1]) is not None for r in metrics)]
        rows = [[_epoch_value(r.get(key), fmt) for _, key, fmt in columns] for r in metrics]
        lines += _table([header for header, _, _ in columns], rows)
    else:
        lines += ['_No per-epoch metrics recorded._']
    if plots:
        lines += ['', '## Training curves']
        for name, path in plots.items():
            lines += ['', f'![{name}]({path.relative_to(run_dir).as_posix()})']
    if (run_dir / 'confusion_matrix.png').is_file():
        lines += ['', '## Confusion matrix', '', '![confusion matrix](confusion_matrix.png)']
    if images:
        lines += ['', '## Predictions (left: ground truth, right: prediction)']
        for caption, path in images.items():
            lines += ['', f'![{caption}]({path})']
    lines += ['', '## Configuration', '']
    config_rows = [[_cell(k), _cell(v)] for k, v in sorted(_flatten(config).items())]
    lines += _table(['key', 'value'], config_rows) if config_rows else ['_No configuration recorded._']
    return atomic_write_text(run_dir / 'report.md', '\n'.join(lines) + '\n')
