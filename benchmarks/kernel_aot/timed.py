"""AOT numbers of explicit launch configurations (the tiles benchmarks/gpu_check times) for one arch.

    python -m benchmarks.kernel_aot.timed --configs CONFIGS.json --out OUT.json [--arch 90] [--known AOT.json]

CONFIGS.json is a list of ``{"case": label, "variant": "dwconv.fwd bias", "dtype": "bf16", "layout":
"channels_last", "shape": [B, C, H, W], "k": 11, "tile": [C, H, W, warps] or null}`` (null: the heuristic's tile).
Each configuration's launches go through the real launchers (``launches.record_launches``); a compilation whose
record key is in the known report (default: the committed benchmarks/results/aot/aot.json) is read from there, the
others are compiled now, in the order of the configurations. OUT.json, ``{"arch": 90, "rows": [...]}``, is rewritten
after each compilation, so a caller that stops this early keeps what it got: one row per (configuration, launch)
with the configuration's fields (its ``tile`` as ``requested_tile``), the kernel, tile, warps and the record's numbers
(regs, spill stores, shared bytes, warps per SM, ...), ``from`` being 'aot.json', 'compiled' or 'pending'.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli import DEFAULT_OUT, private_cache, write_atomic
from .compiling import compile_all
from .family import ARCHS, DTYPES, make_tensors
from .launches import JobIndex, record_launches, select_variants

__all__ = ['NUMBERS', 'plan', 'resources', 'main']

NUMBERS = ('ok', 'regs', 'spill_stores', 'spill_loads', 'shared_bytes', 'warps_per_sm', 'occupancy', 'limiter',
           'error')


def plan(configs: list[dict], cc: int) -> tuple[list[dict], dict[str, dict]]:
    """(rows without numbers, jobs by record key) of ``configs`` on a ``cc`` GPU."""
    from conv2former.ops.launch import TileConfig
    index, rows = JobIndex(), []
    for config in configs:
        [variant] = select_variants([config['variant']])
        tile = None if config.get('tile') is None else TileConfig(*config['tile'])
        tensors = make_tensors(tuple(config['shape']), config['layout'], DTYPES[config['dtype']], config['k'])
        for launch in record_launches(variant, tensors, tile, ARCHS[cc].sms):
            job = index.add(launch, cc, config['dtype'], config['layout'], config['k'], tile, variant.name,
                            [config['case']])
            rows.append(dict(config, requested_tile=config.get('tile'), kernel=launch.kernel, tile=job['tile'],
                             num_warps=job['num_warps'], key=job['key']))
    return rows, index.jobs


def resources(configs: list[dict], cc: int, known: list[dict], out: Path | None = None, n_jobs: int = 1) -> dict:
    """The rows of ``configs`` with their numbers: from ``known`` records by key, the rest compiled now."""
    rows, jobs = plan(configs, cc)
    records = {r['key']: dict(r, **{'from': 'aot.json'}) for r in known if r['key'] in jobs}
    result = dict(arch=cc, rows=rows)

    def fill(record: dict | None = None) -> None:
        if record is not None:
            records[record['key']] = dict(record, **{'from': 'compiled'})
        for row in rows:
            found = records.get(row['key'])
            row.update({n: found.get(n) for n in NUMBERS} if found else dict.fromkeys(NUMBERS))
            row['from'] = found['from'] if found else 'pending'
        if out is not None:
            write_atomic(out, json.dumps(result, indent=1) + '\n')

    fill()
    todo = list(dict.fromkeys(row['key'] for row in rows if row['key'] not in records))  # configs' order
    print(f'kernel_aot.timed: {len(rows)} launches, {len(jobs)} distinct compilations, {len(todo)} to compile '
          f'for sm_{cc}', file=sys.stderr, flush=True)
    with private_cache():
        compile_all([jobs[key] for key in todo], n_jobs, on_record=fill)
    return result


def main(argv=None) -> int:
    os.environ.pop('TRITON_INTERPRET', None)  # compiled kernels only (read when the kernels are jitted, later)
    parser = argparse.ArgumentParser(prog='python -m benchmarks.kernel_aot.timed', description=__doc__.split('\n\n')[0])
    parser.add_argument('--configs', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--arch', type=int, default=90, choices=sorted(ARCHS))
    parser.add_argument('--known', type=Path, default=DEFAULT_OUT / 'aot.json')
    parser.add_argument('--jobs', type=int, default=1)
    args = parser.parse_args(argv)
    known = json.loads(args.known.read_text()) if args.known.is_file() else []
    result = resources(json.loads(args.configs.read_text()), args.arch, known, args.out, args.jobs)
    pending = sum(row['from'] == 'pending' for row in result['rows'])
    print(f"kernel_aot.timed: wrote {args.out} ({len(result['rows'])} launches, {pending} pending)", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
