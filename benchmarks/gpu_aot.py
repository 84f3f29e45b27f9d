"""The AOT resource numbers (benchmarks.kernel_aot) of the launches benchmarks/gpu_check times, for sm_90.

``configs`` lists every launch gpu_check may time: the depthwise conv's three kernels at the heuristic tile per
kernel case, the fused modulation's four launches at each model's own k, and the tile candidates of the tuned cases.
``AotNumbers`` hands them to ``python -m benchmarks.kernel_aot.timed`` in a background process when the run starts
(no GPU needed: the committed report benchmarks/results/aot/aot.json answers what it holds, the rest is compiled on
the host's CPUs while the GPU measures) and collects the rows at the end, however far it got.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .common import log

__all__ = ['ARCH', 'CONV_LAUNCHES', 'FUSED_LAUNCHES', 'configs', 'AotNumbers']

ARCH = 90
CONV_LAUNCHES = ('dwconv.fwd bias', 'dwconv.dgrad', 'dwconv.wgrad')  # depthwise_conv2d: forward, backward
FUSED_LAUNCHES = ('convmod.fwd act mul none bias', 'convmod.grad_pre act mul none bias pre+dv', 'convmod.dgrad act',
                  'convmod.wgrad act')  # conv_modulation as the upstream block calls it
ROOT = Path(__file__).resolve().parents[1]


def configs(cases: list[dict], fused_cases: list[dict], tuned: list[tuple[dict, list]], batch: int,
            case_key: Callable[[dict], str]) -> list[dict]:
    """kernel_aot.timed configurations (bf16, ``batch``) of the timed launches, in gpu_check's order; ``tuned``:
    (case, candidate tiles) pairs."""
    def config(case, variant, tile=None):
        return dict(case=case_key(case), variant=variant, dtype='bf16', layout=case['layout'],
                    shape=[batch, case['C'], case['H'], case['W']], k=case['k'],
                    tile=None if tile is None else list(tile))

    out = [config(case, variant) for case in cases for variant in CONV_LAUNCHES]
    out += [config(case, variant) for case in fused_cases for variant in FUSED_LAUNCHES]
    out += [config(case, variant, tile) for case, tiles in tuned for tile in tiles for variant in CONV_LAUNCHES]
    return out


class AotNumbers:
    """``python -m benchmarks.kernel_aot.timed`` on ``configs`` in the background, writing into ``folder``."""

    def __init__(self, configs: list[dict], folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.configs_path, self.out = folder / 'aot-configs.json', folder / f'aot-sm{ARCH}.json'
        self.configs_path.write_text(json.dumps(configs) + '\n')
        self.out.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ('TRITON_INTERPRET', 'CONV2FORMER_KERNELS')}
        jobs = max(1, min(4, (os.cpu_count() or 1) // 4))  # the GPU run keeps most cores
        self.log = open(folder / 'aot-log.txt', 'w')  # noqa: SIM115 - closed in collect
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'benchmarks.kernel_aot.timed', '--configs', str(self.configs_path), '--out',
             str(self.out), '--arch', str(ARCH), '--jobs', str(jobs)], cwd=ROOT, env=env, stdout=self.log,
            stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))
        log(f'AOT numbers of {len(configs)} timed launches for sm_{ARCH}: in the background '
            f'(pid {self.proc.pid}, {folder / "aot-log.txt"})')

    def collect(self, wait: float) -> dict:
        """The rows so far, after waiting up to ``wait`` s for the process (stopped if still running)."""
        try:
            self.proc.wait(timeout=max(wait, 0.1))
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()
        rows = json.loads(self.out.read_text())['rows'] if self.out.is_file() else []
        pending = sum(row['from'] == 'pending' for row in rows)
        status = 'complete' if self.proc.returncode == 0 and not pending else (
            f'stopped (exit {self.proc.returncode}), {pending} of {len(rows)} launches pending')
        by = {source: sum(row['from'] == source for row in rows) for source in ('aot.json', 'compiled')}
        note = (f"From `python -m benchmarks.kernel_aot.timed` ({status}): {by['aot.json']} launches read from the "
                f"committed benchmarks/results/aot/aot.json, {by['compiled']} compiled during this run.")
        log(f'AOT numbers: {note}')
        for row in {row['key']: row for row in rows}.values():  # one line per distinct compilation
            if row['regs'] is not None:
                log(f"AOT sm_{ARCH} {row['case']} {row['variant']} {row['tile']}/{row['num_warps']}: {row['regs']} "
                    f"regs, {row['spill_stores']} B spill stores, {row['shared_bytes']} B shared, "
                    f"{row['warps_per_sm']} warps/SM")
        return dict(arch=ARCH, note=note, complete=status == 'complete', rows=rows)
