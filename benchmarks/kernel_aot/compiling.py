"""Compiling one job for a named target without a GPU, reading ptxas's log, and the occupancy the numbers allow.

``compile_job``: ``triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))``, which ends with the wheel's
ptxas; its ``-v`` log (registers, spill stores/loads, stack) is captured, and the dynamic shared memory is triton's
``metadata.shared``. ``occupancy``: resident warps per SM as cuda_occupancy.h computes them.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .family import ARCHS
from .launches import KERNEL_FLAGS, compiled_kernel

__all__ = ['ptxas_path', 'parse_ptxas_log', 'compile_job', 'occupancy', 'make_record', 'compile_all']

_LOG_PATTERNS = dict(regs=r'Used (\d+) registers', stack_bytes=r'(\d+) bytes stack frame',
                     spill_stores=r'(\d+) bytes spill stores', spill_loads=r'(\d+) bytes spill loads',
                     static_smem=r'(\d+) bytes smem')


def ptxas_path(cc: int = 90) -> Optional[str]:
    """The ptxas triton uses for ``cc`` (the wheel's, unless TRITON_PTXAS_PATH says otherwise), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(cc).path
    except Exception:  # noqa: BLE001 (no nvidia backend, no binary)
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads and static shared memory from a ``ptxas -v`` log (one kernel)."""
    out = {}
    for name, pattern in _LOG_PATTERNS.items():
        match = re.search(pattern, log)
        out[name] = int(match.group(1)) if match else (None if name == 'regs' else 0)
    return out


def _rerun_ptxas(ptx: str, cc: int, fp_fusion: bool) -> str:
    """``ptxas -v`` on ``ptx`` with the flags of triton's make_cubin (used when triton did not run ptxas)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'k.ptx'
        src.write_text(ptx)
        cmd = [ptxas_path(cc), '-lineinfo', *([] if fp_fusion else ['--fmad=false']), '-v', '--regAllocOptLevel=2',
               f'--gpu-name={sm_arch_from_capability(cc)}', str(src), '-o', str(Path(tmp) / 'k.o')]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_job(job: dict) -> dict:
    """Compile one job (from ``enumerate_jobs``) and measure it: ok, regs, spill_stores, shared_bytes, seconds."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(compiled_kernel(job['kernel']), job['signature'], job['constexprs'], job['attrs'])
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and with it the log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log to stdout
    out = dict(ok=False, regs=None, spill_stores=None, spill_loads=None, stack_bytes=None, shared_bytes=None,
               static_smem=None, error=None, ptxas_log='triton')
    buffer = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buffer):
            kernel = triton.compile(src, target=GPUTarget('cuda', job['arch'], 32), options=job['options'])
    except Exception as error:  # noqa: BLE001 (recorded: a failed compilation is a result)
        out.update(seconds=round(time.perf_counter() - start, 3),
                   error=f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0]}'[:500])
        return out
    seconds = time.perf_counter() - start
    log = buffer.getvalue()
    if 'Used' not in log:
        log = _rerun_ptxas(kernel.asm['ptx'], job['arch'], job['options'].get('enable_fp_fusion', True))
        out['ptxas_log'] = 'rerun'
    stats = parse_ptxas_log(log)
    out.update(stats, ok=stats['regs'] is not None, seconds=round(seconds, 3),
               shared_bytes=int(kernel.metadata.shared) + stats['static_smem'])
    if stats['regs'] is None:
        out['error'] = 'no register count in the ptxas log'
    return out


def occupancy(regs: Optional[int], shared: Optional[int], num_warps: int, cc: int) -> dict:
    """Resident warps per SM that ``regs`` registers per thread and ``shared`` bytes per block allow on ``cc``."""
    arch = ARCHS[cc]
    if regs is None or shared is None:
        return dict(warps_per_sm=None, occupancy=None, limiter=None, blocks_per_sm=None)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_unit) * arch.reg_unit
    # cuda_occupancy.h (cudaOccMaxBlocksPerSMRegsLimit): registers are allocated in each of the 4 sub-partitions
    warps_by_regs = (arch.regs_per_sm // arch.sub_partitions // regs_per_warp) * arch.sub_partitions
    limits = dict(warps=arch.max_warps // num_warps, blocks=arch.max_blocks, registers=warps_by_regs // num_warps)
    warps_assumed = math.ceil(num_warps / arch.sub_partitions) * arch.sub_partitions  # the hardware's launch check
    if regs > 255 or regs_per_warp * warps_assumed > arch.regs_per_sm:
        limits['registers'] = 0
    if shared > arch.smem_per_block:
        limits['shared'] = 0
    else:
        per_block = math.ceil((shared + arch.smem_reserved) / arch.smem_unit) * arch.smem_unit
        limits['shared'] = arch.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda n: (limits[n], n != 'registers'))
    warps = blocks * num_warps
    return dict(warps_per_sm=warps, occupancy=round(warps / arch.max_warps, 4), blocks_per_sm=blocks,
                limiter=limiter if warps < arch.max_warps else 'none')


def make_record(job: dict, result: dict) -> dict:
    """One row of aot.json: the job's identity, the compile result, the occupancy, the flags, who reaches it."""
    flags = {name: job['flags'].get(name) for name in KERNEL_FLAGS}
    return dict(arch=job['arch'], kernel=job['kernel'], dtype=job['dtype'], layout='+'.join(job['layouts']),
                tile=job['tile'], num_warps=job['num_warps'], kernel_size=job['flags'].get('K'),
                ok=result['ok'], regs=result['regs'], spill_stores=result['spill_stores'],
                shared_bytes=result['shared_bytes'], seconds=result['seconds'], error=result['error'],
                spill_loads=result['spill_loads'], stack_bytes=result['stack_bytes'],
                **occupancy(result['regs'], result['shared_bytes'], job['num_warps'], job['arch']),
                **flags, tile_source=job['tile_source'], variants=job['variants'], uses=job['uses'],
                specialization=job['specialization'], ptxas_log=result['ptxas_log'], source=job['source'],
                key=job['key'])


def compile_all(jobs: list[dict], n_jobs: int = 1, progress: bool = False, on_record=None) -> list[dict]:
    """``make_record`` of every job, compiled in ``n_jobs`` forked processes; ``on_record(record)`` after each."""
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc='compile', unit='kernel', disable=not progress, file=sys.stderr)
    records: list = [None] * len(jobs)

    def done(i: int, result: dict) -> None:
        records[i] = make_record(jobs[i], result)
        bar.update()
        if on_record is not None:
            on_record(records[i])

    if n_jobs <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            done(i, compile_job(job))
    else:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context('fork')) as pool:
            futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result())
    bar.close()
    return records
