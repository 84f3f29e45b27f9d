"""The pre-registered analysis of the CPU ablations (issue 23; experiments/results/ablations-cpu/README.md).

Reads the collected run records (``<records>/runs/*/config.yaml`` + ``results.json``: final top-1 on the Imagenette
val split) and, per pre-registered comparison, prints / writes mean ± sample std, n and Welch's two-sided t-test
(scipy ``ttest_ind(equal_var=False)``), with Holm-adjusted p-values over the 9 pre-registered comparisons as a secondary column.

    python experiments/sweeps/cpu-ablations-stats.py [RECORDS] [--out stats.md]
    python experiments/sweeps/cpu-ablations-stats.py [RECORDS] --extra-seeds   # prints yes / no (decision rule)

Decision rule for the extra mul/sum seeds (``--extra-seeds``, from seeds 0, 1, 2 only): 'yes' when
|mean(mul) - mean(sum)| <= 2 * sqrt((s_mul^2 + s_sum^2) / 2) (s: sample std over the three seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

BASE = dict(model='conv2former_n', fusion='mul', weighting='none', kernel_size=7)
BASE_SEEDS = (0, 1, 2)  # every comparison except mul vs sum uses the baseline's seeds 0-2 only
# (label, arm A, arm B, seeds of both arms: None = all collected seeds); the 9 pre-registered comparisons
COMPARISONS = [
    ('fusion: sum vs mul (all seeds run: 0-2, or 0-4 by the extra-seed rule)', dict(fusion='sum'), {}, None),
    ('weighting: sigmoid vs none', dict(weighting='sigmoid'), {}, BASE_SEEDS),
    ('weighting: l1 vs none', dict(weighting='l1'), {}, BASE_SEEDS),
    ('weighting: minmax vs none', dict(weighting='minmax'), {}, BASE_SEEDS),
    ('kernel: 3 vs 7', dict(kernel_size=3), {}, BASE_SEEDS),
    ('kernel: 11 vs 7', dict(kernel_size=11), {}, BASE_SEEDS),
    ('kernel: 21 vs 7', dict(kernel_size=21), {}, BASE_SEEDS),
    ('kernel: 21 vs 3 (trend end points)', dict(kernel_size=21), dict(kernel_size=3), BASE_SEEDS),
    ('ConvNeXt-nano vs Conv2Former (baseline)', dict(model='convnext_nano'), {}, BASE_SEEDS),
]
# shown beside them, not counted in the Holm adjustment: the fusion test on the first three seeds
SUPPLEMENTARY = [('(fusion: sum vs mul, seeds 0-2 only)', dict(fusion='sum'), {}, BASE_SEEDS)]


def load_runs(records: Path) -> list[dict]:
    runs = []
    for results in sorted(records.glob('runs/*/results.json')):
        cfg = yaml.safe_load((results.parent / 'config.yaml').read_text())
        kw = cfg.get('model_kwargs') or {}
        key = dict(model=cfg['model'])
        if cfg['model'].startswith('conv2former'):
            key.update(fusion=kw.get('fusion', 'mul'), weighting=kw.get('weighting', 'none'),
                       kernel_size=kw.get('kernel_size', 7))
        runs.append(dict(key=key, seed=cfg['seed'], top1=json.loads(results.read_text())['top1'],
                         run=results.parent.name))
    return runs


def arm(runs: list[dict], change: dict, seeds) -> list[float]:
    want = dict(BASE, **change)
    if want['model'] != 'conv2former_n':
        want = dict(model=want['model'])
    return [r['top1'] for r in sorted(runs, key=lambda r: r['seed'])
            if r['key'] == want and (seeds is None or r['seed'] in seeds)]


def welch(a: list[float], b: list[float]):
    if len(a) < 2 or len(b) < 2:
        return None, None
    from scipy import stats
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return None, (1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0)
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def holm(pvalues: list) -> list:
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted, running = [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def fmt(values: list[float]) -> str:
    if not values:
        return '–'
    std = statistics.stdev(values) if len(values) > 1 else float('nan')
    return f'{statistics.fmean(values):.2f} ± {std:.2f}'


def extra_seeds(runs: list[dict]) -> bool:
    mul, sum_ = arm(runs, {}, BASE_SEEDS), arm(runs, dict(fusion='sum'), BASE_SEEDS)
    if len(mul) < 3 or len(sum_) < 3:
        raise SystemExit(f'extra-seed rule needs 3 finished seeds of mul and sum, have {len(mul)} and {len(sum_)}')
    gap = abs(statistics.fmean(mul) - statistics.fmean(sum_))
    pooled = math.sqrt((statistics.variance(mul) + statistics.variance(sum_)) / 2)
    print(f'mul {fmt(mul)}, sum {fmt(sum_)}: gap {gap:.2f}, 2 x pooled std {2 * pooled:.2f}', file=sys.stderr)
    return gap <= 2 * pooled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('records', nargs='?', type=Path, default=Path('experiments/results/ablations-cpu'))
    p.add_argument('--extra-seeds', action='store_true', help='print yes/no: run seeds 3 and 4 of mul and sum')
    p.add_argument('--out', type=Path, help='also write the table as markdown here')
    args = p.parse_args()
    runs = load_runs(args.records)
    if args.extra_seeds:
        print('yes' if extra_seeds(runs) else 'no')
        return
    rows = []
    for label, a_change, b_change, seeds in COMPARISONS + SUPPLEMENTARY:
        a, b = arm(runs, a_change, seeds), arm(runs, b_change, seeds)
        t, pv = welch(a, b)
        diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
        rows.append(dict(label=label, a=a, b=b, diff=diff, t=t, p=pv, holm=None))
    primary = rows[:len(COMPARISONS)]
    for row, adj in zip(primary, holm([r['p'] for r in primary])):
        row['holm'] = adj
    lines = ['| comparison (A vs B) | A: top-1 % (mean ± std) | n | B: top-1 % | n | A − B | Welch t | p (two-sided) '
             '| p (Holm, over the 9 comparisons) |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        cell = lambda v, spec: '–' if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['label']} | {fmt(r['a'])} | {len(r['a'])} | {fmt(r['b'])} | {len(r['b'])} | "
                     f"{cell(r['diff'], '+.2f')} | {cell(r['t'], '.2f')} | {cell(r['p'], '.3f')} | "
                     f"{cell(r['holm'], '.3f')} |")
    text = '\n'.join(lines) + '\n'
    print(text, end='')
    if args.out:
        args.out.write_text(text)


if __name__ == '__main__':
    main()
