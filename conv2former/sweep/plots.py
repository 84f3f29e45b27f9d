"""Sweep plots: the task's metric (top-1, box AP, mIoU: ``aggregate.SweepMetric``) against a numeric axis with error
bars over seeds (the shape of the paper's Fig. 4a), grouped bars for categorical axes (Fig. 4b, Table 6). Seeds are
drawn as dots on top of the means. ``metric`` is always the sweep's ``aggregate.SweepMetric``."""
from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_path


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout='constrained')
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    return path


def _others(entry: dict, axes: list, key: str, metric) -> str:
    return ', '.join(f'{a["key"]}={entry[a["key"]]}' for a in axes if a['key'] != key) or metric.label


def _numeric_plot(path: Path, rows: list, summary: list, axes: list, axis: dict, metric) -> Path:
    fig, ax = _figure()
    key, final = axis['key'], metric.final
    series = {}
    for entry in summary:
        if entry[final] is not None:
            series.setdefault(_others(entry, axes, key, metric), []).append(entry)
    for label, entries in series.items():
        entries = sorted(entries, key=lambda e: e[key])
        ax.errorbar([e[key] for e in entries], [e[final] for e in entries],
                    yerr=[e[final + '_std'] for e in entries], marker='o', capsize=4, label=label)
    dots = [(r[key], r[final]) for r in rows if r[final] is not None]
    ax.scatter([x for x, _ in dots], [y for _, y in dots], s=10, color='grey', alpha=0.6, zorder=3, label='seeds')
    ax.set_xticks(sorted(set(axis['values'])))
    ax.set(xlabel=key, ylabel=f'final {metric.label} (%)', title=f'{metric.label} vs {key} (mean ± std over seeds)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bar_plot(path: Path, rows: list, summary: list, axes: list, axis: dict, metric) -> Path:
    fig, ax = _figure()
    key, final = axis['key'], metric.final
    groups = list(dict.fromkeys(_others(e, axes, key, metric) for e in summary))
    values = axis['values']
    width = 0.8 / len(values)
    for j, value in enumerate(values):
        xs, ys, errs = [], [], []
        for g, group in enumerate(groups):
            match = [e for e in summary if e[key] == value and _others(e, axes, key, metric) == group
                     and e[final] is not None]
            if match:
                xs.append(g + (j - (len(values) - 1) / 2) * width)
                ys.append(match[0][final])
                errs.append(match[0][final + '_std'])
        ax.bar(xs, ys, width, yerr=errs, capsize=4, label=f'{key}={value}')
        seeds = [(x, r[final]) for x, g in zip(xs, groups) for r in rows
                 if r[key] == value and r[final] is not None and _others(r, axes, key, metric) == g]
        ax.scatter([x for x, _ in seeds], [y for _, y in seeds], s=10, color='black', zorder=3)
    finished = [r[final] for r in rows if r[final] is not None]
    if finished:
        ax.set_ylim(max(0.0, min(finished) - 5), min(100.0, max(finished) + 3))
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set(ylabel=f'final {metric.label} (%)', title=f'{metric.label} by {key} (mean ± std over seeds; dots: seeds)')
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(sweep_dir: Path, rows: list, summary: list, axes: list, metric) -> list:
    """One PNG per axis with values of more than one kind: ``<metric>_vs_<key>.png`` (numeric) or
    ``<metric>_by_<key>.png`` (categorical), ``<metric>`` the metric's column name (``top1``, ``bbox_AP``,
    ``mIoU``). No plot when no run has finished."""
    if not any(r[metric.final] is not None for r in rows):
        return []
    paths = []
    for axis in axes:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis['values'])
        if numeric and len(axis['values']) > 1:
            paths.append(_numeric_plot(sweep_dir / f'{metric.name}_vs_{axis["key"]}.png', rows, summary, axes, axis,
                                       metric))
        else:
            paths.append(_bar_plot(sweep_dir / f'{metric.name}_by_{axis["key"]}.png', rows, summary, axes, axis,
                                   metric))
    return paths
