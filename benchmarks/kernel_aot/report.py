"""The report: the bandwidth lower bound of the reference shape and ``aot.md`` rendered from the records.

``bandwidth_bounds``: bytes one forward and one backward call of the depthwise conv and of the fused modulation
move for C2F-T stage 1 (every tensor once), at H100 bandwidth, beside cuDNN's measured times. ``render_markdown``:
the runs, the occupancy model, a summary per arch and kernel, a table per kernel, the failures / spills / low
occupancy, the bounds.
"""
from __future__ import annotations

from typing import Iterable

from .family import ARCHS, CUDNN_MS, DTYPES, H100_BANDWIDTH, LAYOUTS, REFERENCE, Case, k_range, make_tensors
from .launches import KERNEL_FLAGS, record_launches, variants

__all__ = ['LOW_OCCUPANCY', 'launch_bytes', 'bandwidth_bounds', 'render_markdown', 'fmt_range', 'flag_text']

LOW_OCCUPANCY = 0.5  # flagged below this share of the 64 warps an SM holds


def _tensor_roles(kernel: str, flags: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read, written) pointer arguments of one launch, from the kernel's code paths."""
    if kernel == 'dwconv.forward':
        return ('x_ptr', 'w_ptr') + (('b_ptr',) if flags['HAS_BIAS'] else ()), ('y_ptr',)
    if kernel == 'dwconv.weight_grad':
        return ('x_ptr', 'dy_ptr'), ('dw_part_ptr', 'db_part_ptr')
    if kernel == 'convmod.input_grad':
        return ('g_ptr', 'w_ptr') + (('a_ptr',) if flags['ACT'] else ()), ('da_ptr',)
    if kernel == 'convmod.modulate':
        reads = []
        if flags['RECOMPUTE']:
            reads += ['a_ptr', 'w_ptr'] + (['b_ptr'] if flags['HAS_BIAS'] else [])
        if flags['GRAD']:
            reads.append('g_ptr')
            if flags['STORE_OUT'] and flags['MUL']:
                reads.append('v_ptr')
            writes = (['out_ptr'] if flags['STORE_OUT'] else []) + (['dv_ptr'] if flags['STORE_DV'] else [])
        else:
            reads.append('v_ptr')
            writes = ['out_ptr']
        return tuple(reads), tuple(writes)
    raise KeyError(kernel)


def launch_bytes(launch) -> dict:
    """Bytes each tensor of one launch moves if read or written exactly once (halos and re-reads cached)."""
    names = [p.name for p in launch.jit.params]
    args = dict(zip(names, launch.args))
    flags = {n: launch.kwargs.get(n) for n in KERNEL_FLAGS}
    reads, writes = _tensor_roles(launch.kernel, flags)
    size = {n: args[n].numel() * args[n].element_size() for n in reads + writes}
    out = dict(read=sum(size[n] for n in reads), written=sum(size[n] for n in writes))
    if launch.kernel == 'dwconv.weight_grad':  # the launcher's torch.sum over the partials reads them once more
        out['read'] += size['dw_part_ptr'] + size['db_part_ptr']
    return out


def bandwidth_bounds(dtypes: Iterable[str] = ('bf16', 'fp32'), layouts: Iterable[str] = LAYOUTS) -> list[dict]:
    """Bytes and time at H100 bandwidth of one forward and one backward call of the depthwise conv (bias) and of
    the fused modulation (upstream: GELU, mul, no weighting, bias; all gradients) for C2F-T stage 1, k=11."""
    case = Case(REFERENCE['model'], REFERENCE['stage'], REFERENCE['batch'])
    by_name = {v.name: v for v in variants()}
    ops = {'dwconv': (('dwconv.fwd bias',), ('dwconv.dgrad', 'dwconv.wgrad')),
           'convmod (fused)': (('convmod.fwd act mul none bias',),
                               ('convmod.grad_pre act mul none bias pre+dv', 'convmod.dgrad act',
                                'convmod.wgrad act'))}
    rows = []
    for op, (forward, backward) in ops.items():
        for layout in layouts:
            for dtype in dtypes:
                tensors = make_tensors(case.shape, layout, DTYPES[dtype], REFERENCE['kernel_size'])
                row = dict(op=op, layout=layout, dtype=dtype, shape=f'{case.batch}x{case.channels}x{case.size}x'
                           f'{case.size}', kernel_size=REFERENCE['kernel_size'])
                for phase, names in (('fwd', forward), ('bwd', backward)):
                    launches = [launch for name in names
                                for launch in record_launches(by_name[name], tensors, None, ARCHS[90].sms)]
                    moved = sum(sum(launch_bytes(launch).values()) for launch in launches)
                    row[f'{phase}_launches'] = len(launches)
                    row[f'{phase}_bytes'] = moved
                    row[f'{phase}_bound_ms'] = moved / H100_BANDWIDTH * 1e3
                if op == 'dwconv' and dtype == 'bf16':
                    row['cudnn_fwd_ms'] = CUDNN_MS[layout]['fwd']
                    row['cudnn_bwd_ms'] = round(CUDNN_MS[layout]['fwd_bwd'] - CUDNN_MS[layout]['fwd'], 2)
                rows.append(row)
    return rows


def fmt_range(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '—'
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f'{lo}–{hi}'


def flag_text(record: dict) -> str:
    """The kernel's boolean constexprs that are True (the others are False)."""
    return ' '.join(n for n in KERNEL_FLAGS if n not in ('K', 'ACC_DTYPE') and record.get(n) is True) or '(none)'


def is_low(record: dict) -> bool:
    return record['occupancy'] is not None and record['occupancy'] < LOW_OCCUPANCY


def render_markdown(records: list[dict], runs: list[dict], bounds: list[dict]) -> str:
    archs = sorted({r['arch'] for r in records}, reverse=True)
    lines = ['# Triton kernels compiled ahead of time: registers, spills, shared memory, occupancy', '',
             'Written by `python -m benchmarks.kernel_aot` (issue 25) without a GPU: every launch goes through the real '
             'launchers on meta tensors and triton\'s own argument binder (int/pointer specialisation as on the GPU), '
             'then `triton.compile` for `GPUTarget(\'cuda\', arch, 32)` and the wheel\'s ptxas (`-v` log). One row of '
             '`aot.json` per distinct compilation (kernel, constexprs, specialisation, options, arch).', '']
    lines += ['## Runs', '', '| command | when | triton | compilations | failed | compile s (sum) | wall s |',
              '|---|---|---|---|---|---|---|']
    for run_ in runs:
        lines.append(f"| `{run_['command']}` | {run_['date']} | {run_['triton']} | {run_['compiled']} | "
                     f"{run_['failed']} | {run_['compile_seconds']:.0f} | {run_['wall_seconds']:.0f} |")
    lines += ['', 'What each run covered (archs; selection):', '']
    lines += [f"{i}. sm_{', sm_'.join(map(str, run_['archs']))}; {run_['selection']}"
              + (f". {run_['note']}" if run_.get('note') else '') for i, run_ in enumerate(runs, 1)]
    lines.append('')
    lines += ['## Occupancy model', '',
              'Per SM on sm_80 and sm_90 (as cuda_occupancy.h computes it): 65,536 registers in 4 sub-partitions, '
              'allocated per warp in units of 256 (the per-thread count rounded up to 8), so warps by registers = '
              '4 × ⌊16,384 / registers per warp⌋; at most 64 warps and 32 blocks; shared memory in 128-byte units '
              'plus 1 KB reserved per block, 228 KB/SM and 227 KB/block on sm_90, 164 KB/SM and 163 KB/block on sm_80. '
              f'"warps/SM" = resident warps (of 64); "low" below {LOW_OCCUPANCY:.0%}. Limiter: what caps the blocks '
              '(registers, warps = the 64-warp cap, shared, blocks = the 32-block cap).', '']
    kernels = sorted({r['kernel'] for r in records})
    lines += ['## Summary', '', '| arch | kernel | tiles from | compilations | failed | regs | spill stores B (max) | '
              'shared B (max) | warps/SM | tiles / warps |', '|---|---|---|---|---|---|---|---|---|---|']
    for arch in archs:
        for kernel in kernels:
            for source in ('heuristic', 'hand'):
                rows = [r for r in records
                        if r['arch'] == arch and r['kernel'] == kernel and r['tile_source'] == source]
                if not rows:
                    continue
                tiles = sorted({f"{r['tile']}/{r['num_warps']}" for r in rows})
                lines.append(f"| sm_{arch} | {kernel} | {source} | {len(rows)} | {sum(not r['ok'] for r in rows)} | "
                             f"{fmt_range([r['regs'] for r in rows])} | {max(r['spill_stores'] or 0 for r in rows)} | "
                             f"{max(r['shared_bytes'] or 0 for r in rows)} | "
                             f"{fmt_range([r['warps_per_sm'] for r in rows])} | {', '.join(tiles)} |")
    lines.append('')
    for arch in archs:
        arch_records = [r for r in records if r['arch'] == arch]
        n_ok = sum(r['ok'] for r in arch_records)
        lines += [f'## sm_{arch} ({ARCHS[arch].gpu}): {len(arch_records)} compilations, {n_ok} ok', '']
        for kernel in kernels:
            rows = [r for r in arch_records if r['kernel'] == kernel]
            if not rows:
                continue
            lines += [f'### `{kernel}` (sm_{arch})', '',
                      'Grouped over kernel sizes and argument specialisations; flags: the boolean constexprs that are '
                      'True (the others False); regs per dtype fp32 / bf16 / fp16 (— where not compiled).', '',
                      '| constexpr flags | layout | tile / warps | source | k | compiles | regs fp32 / bf16 / fp16 '
                      '| spill stores B (max) | stack B (max) | shared B (max) | warps/SM (min) | limiter |',
                      '|---|---|---|---|---|---|---|---|---|---|---|---|']
            groups: dict = {}
            for r in rows:
                groups.setdefault((flag_text(r), r['layout'], r['tile'], r['num_warps'], r['tile_source']),
                                  []).append(r)
            for (flags, layout, tile, warps, source), group in sorted(groups.items()):
                regs = ' / '.join(fmt_range([r['regs'] for r in group if r['dtype'] == d]) for d in DTYPES)
                worst = min(group, key=lambda r: (r['warps_per_sm'] if r['warps_per_sm'] is not None else -1))
                failed = sum(not r['ok'] for r in group)
                low = ' **low**' if is_low(worst) else ''
                lines.append(
                    f"| {flags} | {layout} | {tile} / {warps} | {source} | "
                    f"{k_range([r['kernel_size'] for r in group])}"
                    f" | {len(group)}{f' ({failed} failed)' if failed else ''} | {regs} | "
                    f"{fmt_range([max((r['spill_stores'] or 0) for r in group)])} | "
                    f"{fmt_range([max((r['stack_bytes'] or 0) for r in group)])} | "
                    f"{fmt_range([max((r['shared_bytes'] or 0) for r in group)])} | "
                    f"{worst['warps_per_sm']}{low} | {worst['limiter']} |")
            lines.append('')
    bad = [r for r in records if not r['ok'] or (r['spill_stores'] or 0) > 0 or is_low(r)]
    lines += ['## Failures, spills and low occupancy', '']
    if not bad:
        lines += ['None: every compilation succeeded without spills, at or above '
                  f'{LOW_OCCUPANCY:.0%} occupancy.', '']
    for source, title in (('heuristic', "Tiles the heuristic picks"), ('hand', 'Hand-passed tiles')):
        rows = [r for r in bad if r['tile_source'] == source]
        if not rows:
            continue
        lines += [f'### {title}', '', 'Grouped over kernel sizes and specialisations.', '',
                  '| arch | kernel | flags | dtype | layout | tile / warps | k | failed | regs | spill stores B | '
                  'spill loads B | shared B | warps/SM | limiter | error |', '|' + '---|' * 15]
        groups: dict = {}
        for r in rows:
            groups.setdefault((-r['arch'], r['kernel'], r['tile'], r['num_warps'], flag_text(r), r['dtype'],
                               r['layout']), []).append(r)
        for (arch, kernel, tile, warps, flags, dtype, layout), group in sorted(groups.items()):
            errors = sorted({r['error'] for r in group if r['error']})
            lines.append(f"| sm_{-arch} | {kernel} | {flags} | {dtype} | {layout} | {tile} / {warps} | "
                         f"{k_range([r['kernel_size'] for r in group])} | {sum(not r['ok'] for r in group)} | "
                         f"{fmt_range([r['regs'] for r in group])} | "
                         f"{fmt_range([r['spill_stores'] for r in group])} | "
                         f"{fmt_range([r['spill_loads'] for r in group])} | "
                         f"{fmt_range([r['shared_bytes'] for r in group])} | "
                         f"{fmt_range([r['warps_per_sm'] for r in group])} | "
                         f"{', '.join(sorted({str(r['limiter']) for r in group}))} | {'; '.join(errors)[:200]} |")
        lines.append('')
    if bounds:
        lines += ['## Bandwidth lower bound: C2F-T stage 1 (128×72×56×56, k=11) on H100 (3.35 TB/s)', '',
                  'Bytes = every tensor the launches read or write, once (perfect reuse of halos and taps); the weight '
                  'gradient\'s float32 partials (SPLITS from the launcher\'s heuristic for 132 SMs) are written and '
                  'read back by its torch.sum. Forward = one call of the op; backward = its kernels for all '
                  'gradients (dwconv: input-gradient + weight-gradient kernels; fused modulation: grad_pre (dA_pre and '
                  'dv), input gradient, weight gradient). cuDNN: measured, bf16 (docs/performance-baseline.md; '
                  'backward = fwd+bwd − fwd).', '',
                  '| op | layout | dtype | fwd MB | fwd bound ms | cuDNN fwd ms (× bound) | bwd launches | bwd MB | '
                  'bwd bound ms | cuDNN bwd ms (× bound) |', '|---|---|---|---|---|---|---|---|---|---|']

        def cudnn(b, phase):
            ms = b.get(f'cudnn_{phase}_ms')
            return '—' if ms is None else f"{ms} ({ms / b[f'{phase}_bound_ms']:.0f}×)"
        for b in bounds:
            lines.append(f"| {b['op']} | {b['layout']} | {b['dtype']} | {b['fwd_bytes'] / 1e6:.1f} | "
                         f"{b['fwd_bound_ms']:.3f} | {cudnn(b, 'fwd')} | {b['bwd_launches']} | "
                         f"{b['bwd_bytes'] / 1e6:.1f} | {b['bwd_bound_ms']:.3f} | {cudnn(b, 'bwd')} |")
        lines.append('')
    return '\n'.join(lines)
