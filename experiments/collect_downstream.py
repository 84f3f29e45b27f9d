"""Side-by-side table of the downstream miniature (experiments/downstream.sh): one row per backbone.

    python experiments/collect_downstream.py RUNS_DIR BACKBONE [BACKBONE ...]

Writes RUNS_DIR/downstream.md and RUNS_DIR/downstream.json and prints the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (header, run suffix, results.json key)
    ('Imagenette top-1', 'imagenette', 'val_top1'),
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


def markdown(table: dict) -> str:
    headers = ['backbone'] + [h for h, _, _ in COLUMNS]
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    for backbone, row in table.items():
        cells = ['–' if v is None else f'{v:.2f}' for v in row.values()]
        lines.append('| ' + ' | '.join([backbone] + cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    runs = Path(argv[0])
    table = collect(runs, argv[1:])
    text = markdown(table)
    (runs / 'downstream.md').write_text(text)
    (runs / 'downstream.json').write_text(json.dumps(table, indent=2))
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
