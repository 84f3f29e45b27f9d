"""Side-by-side table of the downstream miniature (experiments/downstream.sh): one row per backbone, then the wall
time of each stage (RUNS_DIR/stage_times.tsv, written by downstream.sh).

    python experiments/collect_downstream.py RUNS_DIR BACKBONE [BACKBONE ...]

Writes RUNS_DIR/downstream.md and RUNS_DIR/downstream.json and prints the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (header, run suffix, results.json key)
    ('Imagenette top-1', 'imagenette', 'top1'),
    ('Penn-Fudan box AP', 'pennfudan-maskrcnn', 'bbox_AP'),
    ('box AP50', 'pennfudan-maskrcnn', 'bbox_AP50'),
    ('mask AP', 'pennfudan-maskrcnn', 'segm_AP'),
    ('mask AP50', 'pennfudan-maskrcnn', 'segm_AP50'),
    ('CamVid mIoU', 'camvid-upernet', 'mIoU'),
    ('pixel acc', 'camvid-upernet', 'pixel_acc'),
]


def collect(runs: Path, backbones: list[str]) -> dict:
    table = {}
    for backbone in backbones:
        row = {}
        for header, suffix, key in COLUMNS:
            results = runs / f'{backbone}-{suffix}' / 'results.json'
            row[header] = json.loads(results.read_text()).get(key) if results.is_file() else None
        table[backbone] = row
    return table


def stage_times(runs: Path) -> list[dict]:
    """Rows of stage_times.tsv (stage, seconds, status, limit_s); [] when there is none."""
    path = runs / 'stage_times.tsv'
    if not path.is_file():
        return []
    header, *rows = [line.split('\t') for line in path.read_text().splitlines() if line.strip()]
    return [dict(zip(header, row)) for row in rows]


def markdown(table: dict, times: list[dict]) -> str:
    headers = ['backbone'] + [h for h, _, _ in COLUMNS]
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    for backbone, row in table.items():
        cells = ['–' if v is None else f'{v:.2f}' for v in row.values()]
        lines.append('| ' + ' | '.join([backbone] + cells) + ' |')
    if times:
        lines += ['', '| stage | wall s | status (124: cut at the limit) | limit s |', '|---|---|---|---|']
        lines += [f"| {t['stage']} | {t['seconds']} | {t['status']} | {t['limit_s']} |" for t in times]
    return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    runs = Path(argv[0])
    table, times = collect(runs, argv[1:]), stage_times(runs)
    text = markdown(table, times)
    (runs / 'downstream.md').write_text(text)
    (runs / 'downstream.json').write_text(json.dumps(dict(table=table, stage_times=times), indent=2))
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
