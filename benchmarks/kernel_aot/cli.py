"""``python -m benchmarks.kernel_aot``: enumerate, compile, write ``DIR/aot.json``, ``runs.json`` and ``aot.md``."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

from .compiling import compile_all, ptxas_path
from .family import ARCHS, DTYPES, KERNEL_SIZES, LAYOUTS, MODELS, Selection, full_selection, quick_selection
from .launches import enumerate_jobs, source_hash, variants
from .report import bandwidth_bounds, render_markdown

__all__ = ['DEFAULT_OUT', 'run', 'write_atomic', 'private_cache', 'parse_args', 'main']

DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'results' / 'aot'


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def write_records(path: Path, records: list[dict]) -> None:
    write_atomic(path, '[\n' + ',\n'.join(json.dumps(r) for r in records) + '\n]\n')  # a line each


class private_cache:
    """A private triton cache for the compilations: nothing stale, nothing left in ~/.triton."""

    def __enter__(self):
        from triton import knobs
        self._tmp = tempfile.TemporaryDirectory(prefix='kernel-aot-cache-')
        self._saved, knobs.cache.dir = knobs.cache.dir, self._tmp.name

    def __exit__(self, *exc):
        from triton import knobs
        knobs.cache.dir = self._saved
        self._tmp.cleanup()


def run(selection: Selection, archs: Iterable[int], out_dir: Path, n_jobs: int = 1, append: bool = False,
        progress: bool = True, command: str = '', note: str = '') -> list[dict]:
    """Enumerate, compile (skipping keys already in ``out_dir/aot.json`` when ``append``; records of an older
    kernel source are dropped there), write aot.json, runs.json and aot.md."""
    from triton import __version__ as triton_version
    archs = list(dict.fromkeys(archs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = enumerate_jobs(selection, archs)
    old: list[dict] = []
    runs: list[dict] = []
    if append and (out_dir / 'aot.json').is_file():
        old = json.loads((out_dir / 'aot.json').read_text())
        runs = json.loads((out_dir / 'runs.json').read_text()) if (out_dir / 'runs.json').is_file() else []
        stale = [r for r in old if r.get('source') != source_hash(r['kernel'])]
        if stale:
            print(f'dropping {len(stale)} records of an older kernel source from {out_dir / "aot.json"}',
                  file=sys.stderr)
            old = [r for r in old if r not in stale]
    known = {r['key'] for r in old}
    todo = [job for job in jobs if job['key'] not in known]
    print(f'{len(jobs)} distinct compilations ({len(jobs) - len(todo)} already in {out_dir / "aot.json"}), '
          f'enumerated in {time.perf_counter() - start:.1f} s', file=sys.stderr)
    with private_cache():
        records = compile_all(todo, n_jobs, progress)
    merged = {r['key']: r for r in old}
    merged.update({r['key']: r for r in records})
    all_records = sorted(merged.values(), key=lambda r: (-r['arch'], r['kernel'], r['dtype'], r['layout'],
                                                          r['tile'], r['num_warps'], r['kernel_size'] or 0,
                                                          r['specialization']))
    runs.append(dict(command=command or 'kernel_aot.run(...)',
                     date=datetime.datetime.now().isoformat(timespec='seconds'),
                     triton=triton_version, torch=torch.__version__, python=platform.python_version(),
                     cpus=os.cpu_count(), jobs=n_jobs, archs=archs, selection=selection.describe(), note=note,
                     compiled=len(records), failed=sum(not r['ok'] for r in records),
                     compile_seconds=round(sum(r['seconds'] or 0 for r in records), 1),
                     wall_seconds=round(time.perf_counter() - start, 1)))
    write_records(out_dir / 'aot.json', all_records)
    write_atomic(out_dir / 'runs.json', json.dumps(runs, indent=1) + '\n')
    write_atomic(out_dir / 'aot.md', render_markdown(all_records, runs, bandwidth_bounds()) + '\n')
    return records


def _tile(text: str) -> tuple:
    """'64x8x16/2' -> (64, 8, 16, 2); warps default to 4."""
    match = re.fullmatch(r'(\d+)x(\d+)x(\d+)(?:/(\d+))?', text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f'a tile is CxHxW[/warps], e.g. 64x8x16/2, got {text!r}')
    return tuple(int(g) if g else 4 for g in match.groups())


def _csv(cast=str, choices=None):
    def parse(text: str) -> tuple:
        items = tuple(cast(s.strip()) for s in text.split(',') if s.strip())
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'expected a comma-separated subset of {choices}, got {text!r}')
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    from . import __doc__ as package_doc
    parser = argparse.ArgumentParser(prog='python -m benchmarks.kernel_aot', description=package_doc.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', type=int, action='append', choices=sorted(ARCHS), help='compute capability '
                        '(repeat for several; default 90 and 80)')
    parser.add_argument('--quick', action='store_true', help='one representative configuration per kernel variant '
                        'and dtype (C2F-T stage 1, k=11, heuristic tile), ~1-2 minutes')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    parser.add_argument('--jobs', type=int, default=1, help='compile in N processes (default 1)')
    parser.add_argument('--models', type=_csv(str, tuple(MODELS)))
    parser.add_argument('--stages', type=_csv(int, (1, 2, 3, 4)))
    parser.add_argument('--batches', type=_csv(int))
    parser.add_argument('--kernel-sizes', type=_csv(int, KERNEL_SIZES))
    parser.add_argument('--dtypes', type=_csv(str, tuple(DTYPES)))
    parser.add_argument('--layouts', type=_csv(str, LAYOUTS))
    parser.add_argument('--variants', type=_csv(str), help='fnmatch patterns on launcher variant names, e.g. '
                        '"dwconv.*,convmod.fwd act*" (--list-variants shows them)')
    parser.add_argument('--tiles', type=_csv(_tile), default=(), help='hand-passed tiles CxHxW/warps besides the '
                        "heuristic's, e.g. 64x8x16/1,64x8x16/2")
    parser.add_argument('--no-heuristic', action='store_true', help="only the --tiles, not the heuristic's tile")
    parser.add_argument('--append', action='store_true', help='add to DIR/aot.json (skip compilations already there)')
    parser.add_argument('--dry-run', action='store_true', help='count the distinct compilations, compile nothing')
    parser.add_argument('--render-only', action='store_true', help='rewrite DIR/aot.md from DIR/aot.json and '
                        'DIR/runs.json, compile nothing')
    parser.add_argument('--list-variants', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--note', default='', help='a sentence for the report (e.g. what this run leaves out)')
    return parser.parse_args(argv)


def _dry_run(selection: Selection, archs: list[int]) -> None:
    start = time.perf_counter()
    jobs = enumerate_jobs(selection, archs)
    by_kernel: dict = {}
    for job in jobs:
        by_kernel[(job['arch'], job['kernel'])] = by_kernel.get((job['arch'], job['kernel']), 0) + 1
    for (arch, kernel), n in sorted(by_kernel.items()):
        print(f'sm_{arch} {kernel}: {n}')
    print(f'{len(jobs)} distinct compilations ({selection.describe()}), enumerated in '
          f'{time.perf_counter() - start:.1f} s')


def main(argv=None) -> int:
    os.environ.pop('TRITON_INTERPRET', None)  # compiled kernels only (read when the kernels are jitted, later)
    args = parse_args(argv)
    if args.list_variants:
        print('\n'.join(v.name for v in variants()))
        return 0
    if ptxas_path() is None:
        print('kernel_aot: triton\'s ptxas is missing (triton/backends/nvidia/bin/ptxas); nothing to compile with',
              file=sys.stderr)
        return 2
    if args.render_only:
        records = json.loads((args.out / 'aot.json').read_text())
        runs = json.loads((args.out / 'runs.json').read_text()) if (args.out / 'runs.json').is_file() else []
        write_atomic(args.out / 'aot.md', render_markdown(records, runs, bandwidth_bounds()) + '\n')
        print(f"wrote {args.out / 'aot.md'} ({len(records)} records)")
        return 0
    selection = quick_selection(args.layouts or ('channels_last',)) if args.quick else full_selection()
    for field in ('models', 'stages', 'batches', 'kernel_sizes', 'dtypes', 'layouts', 'variants'):
        value = getattr(args, field)
        if value:
            setattr(selection, field, value)
    selection.tiles = tuple(args.tiles)
    selection.heuristic = not args.no_heuristic
    archs = args.arch or [90, 80]
    if args.dry_run:
        _dry_run(selection, archs)
        return 0
    command = 'python -m benchmarks.kernel_aot ' + shlex.join(sys.argv[1:] if argv is None else list(argv))
    records = run(selection, archs, args.out, n_jobs=args.jobs, append=args.append, progress=not args.no_progress,
                  command=command, note=args.note)
    failed = [r for r in records if not r['ok']]
    spilled = [r for r in records if (r['spill_stores'] or 0) > 0]
    print(f"{len(records)} compiled, {len(failed)} failed, {len(spilled)} spill; wrote {args.out / 'aot.json'} and "
          f"{args.out / 'aot.md'}")
    for r in failed[:10]:
        print(f"FAILED sm_{r['arch']} {r['kernel']} {r['dtype']} {r['layout']} {r['tile']}/{r['num_warps']} "
              f"k={r['kernel_size']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
