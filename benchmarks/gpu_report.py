"""benchmarks/gpu_check's results: the proposed automatic backend rule, the model ratios, and summary.md, with the
AOT resource numbers (registers, spills, shared memory, occupancy on sm_90) of the launches it timed."""
from __future__ import annotations

import math

from .common import footer
from .correctness import REL_ERR_LIMIT

__all__ = ['SECTIONS', 'auto_rule', 'add_model_ratios', 'aot_lines', 'markdown']

SECTIONS = ('correctness', 'kernels', 'models', 'compile')


def auto_rule(rows: dict) -> dict:
    """"Never slower than cuDNN": Triton for a (k, layout, shape) when its best forward and best forward+backward are
    both at most cuDNN's; condensed per (k, layout): 'triton' (all measured shapes), 'torch' (none) or the list."""
    per_case, by_group = [], {}
    for key, row in rows.items():
        tiles = row.get('tiles') or {}
        fwd = min(row['triton fwd ms'], tiles.get('tuned_fwd_ms', math.inf))
        fwd_bwd = min(row['triton fwd+bwd ms'], tiles.get('tuned_fwd_bwd_ms', math.inf))
        speedup = dict(fwd=row['cudnn fwd ms'] / fwd, fwd_bwd=row['cudnn fwd+bwd ms'] / fwd_bwd)
        choice = 'triton' if min(speedup.values()) >= 1 else 'torch'
        per_case.append(dict(case=key, k=row['k'], layout=row['layout'], shape=[row['C'], row['H'], row['W']],
                             speedup={m: round(s, 2) for m, s in speedup.items()}, choice=choice,
                             tiles=tiles.get('best')))
        by_group.setdefault(f"k={row['k']} {row['layout']}", []).append((row['C'], row['H'], row['W'], choice))
    summary = {}
    for group, shapes in sorted(by_group.items()):
        winners = [list(s[:3]) for s in shapes if s[3] == 'triton']
        summary[group] = ('triton' if len(winners) == len(shapes) else 'torch' if not winners
                          else dict(triton_for=winners, measured=len(shapes)))
    return dict(criterion='Triton where its best fwd and fwd+bwd (heuristic tile or tuned, bf16, batch 128) are '
                          'both <= cuDNN; otherwise cuDNN. Shapes not measured stay on cuDNN.',
                by_k_layout=summary, per_case=per_case)


def add_model_ratios(rows: dict) -> None:
    """img/s relative to the pair's ConvNeXt (> 1: faster) for every measured throughput."""
    peers = {row['pair']: row for row in rows.values() if row['path'] == 'peer'}
    for row in rows.values():
        peer = peers.get(row['pair'], {})
        row['vs_peer'] = {key: round(row[key] / peer[key], 3) for key in ('infer_img_s', 'train_img_s',
                                                                          'compile_img_s')
                          if isinstance(row.get(key), float) and isinstance(peer.get(key), float)}


def aot_lines(aot: dict | None) -> list[str]:
    """Markdown of the AOT numbers: one row per distinct compilation the timed launches reach (benchmarks.gpu_aot)."""
    if not aot:
        return []
    lines = ['', f"## AOT resources of the timed launches (sm_{aot['arch']})", '',
             f"{aot['note']} Registers per thread, spill stores, shared bytes per block and the resident warps per SM "
             'they allow (of 64), to relate achieved bandwidth to occupancy.', '',
             '| launch | layout | k | tile / warps | regs | spill stores B | shared B | warps/SM | limiter | from '
             '| timed in |', '|' + '---|' * 11]
    groups: dict = {}
    for row in aot['rows']:
        groups.setdefault(row['key'], []).append(row)
    for rows in groups.values():
        r = rows[0]
        cases = list(dict.fromkeys(row['case'] for row in rows))
        launches = ', '.join(dict.fromkeys(row['variant'] for row in rows))
        lines.append(f"| {launches} | {r['layout']} | {r['k']} | {r['tile']} / {r['num_warps']} | "
                     f"{cell(r['regs'], 0)} | {cell(r['spill_stores'], 0)} | {cell(r['shared_bytes'], 0)} | "
                     f"{cell(r['warps_per_sm'], 0)} | "
                     f"{r['limiter'] or '—'} | {r['from']} | {'; '.join(cases[:3])}"
                     f"{f' (+{len(cases) - 3})' if len(cases) > 3 else ''} |")
    return lines


def aot_cell(row: dict | None) -> str:
    """'regs / warps per SM' of one AOT row, '—' when there is none (yet)."""
    return '—' if not row or row['regs'] is None else f"{row['regs']} / {row['warps_per_sm']}"


def cell(value, digits: int = 3) -> str:
    return '—' if value is None else f'{value:.{digits}f}'


def markdown(report: dict) -> str:
    env = report['environment']
    lines = [f"# GPU check: Triton kernels vs cuDNN ({env['device']})", '',
             f"torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, CUDA {env['cuda']}, "
             f"{env['date']}; `{env['command']}`", '']
    ops = report['correctness']['ops']
    passed = sum(r['conv_ok'] and r['fused_ok'] for r in ops.values())
    lines += ['## Correctness', '', f'{passed}/{len(ops)} op cases pass (conv and fused modulation; forward, input, '
              f"weight and bias grads vs float64; limits {REL_ERR_LIMIT}).", '']
    for name, results in report['correctness']['models'].items():
        for variant, r in results.items():
            lines.append(f"- {name} kernels={variant}: " + ', '.join(
                f"{k} {v:.2e} (tol {r['tolerance'][k]:.2e})" for k, v in r['errors'].items())
                + ('' if r['ok'] else ' **FAIL**'))
    lines += ['', '## Depthwise conv, bf16, batch ' + str(report['settings']['batch']), '',
              'ms = median (CUDA events, L2 flushed). Triton = heuristic tile (op); tuned = best tile per kernel, '
              'fwd+bwd = sum of the best fwd, input-grad and weight-grad kernels. ratio = ms / roofline.', '',
              '| k | C×H×W | layout | cuDNN fwd | Triton fwd | tuned fwd | × | cuDNN f+b | Triton f+b | tuned f+b '
              '| × | Triton GB/s | roofline ratio | fwd regs / warps per SM (AOT) | tiles won (fwd/dgrad/wgrad) | rule |',
              '|' + '---|' * 16]
    rule = {c['case']: c for c in (report.get('auto_rule') or {}).get('per_case', [])}
    aot_fwd = {r['case']: r for r in (report.get('aot') or {}).get('rows', [])
               if r['variant'] == 'dwconv.fwd bias' and r['requested_tile'] is None}
    for key, row in report['kernels']['conv'].items():
        tiles, choice = row.get('tiles') or {}, rule.get(key, {})
        best = tiles.get('best') or {}
        lines.append(
            f"| {row['k']} | {row['C']}×{row['H']}×{row['W']} | {row['layout']} | {cell(row['cudnn fwd ms'])} | "
            f"{cell(row['triton fwd ms'])} | {cell(tiles.get('tuned_fwd_ms'))} | "
            f"{cell(choice.get('speedup', {}).get('fwd'), 2)} | {cell(row['cudnn fwd+bwd ms'])} | "
            f"{cell(row['triton fwd+bwd ms'])} | {cell(tiles.get('tuned_fwd_bwd_ms'))} | "
            f"{cell(choice.get('speedup', {}).get('fwd_bwd'), 2)} | {row['triton fwd']['gbps']:.0f} | "
            f"{row['triton fwd']['roofline_ratio']:.1f} | {aot_cell(aot_fwd.get(key))} | "
            f"{' / '.join(best.get(n, '—') for n in ('fwd', 'dgrad', 'wgrad'))}"
            f" | {choice.get('choice', '—')} |")
    if report['kernels']['fused']:
        lines += ['', '## Fused modulation vs unfused (GELU → cuDNN conv → ×v), bf16', '',
                  '| k | C×H×W | layout | unfused fwd | fused fwd | unfused f+b | fused f+b |', '|' + '---|' * 7]
        for row in report['kernels']['fused'].values():
            lines.append(f"| {row['k']} | {row['C']}×{row['H']}×{row['W']} | {row['layout']} | "
                         + ' | '.join(cell(row[f'{i} {m} ms']) for m in ('fwd', 'fwd+bwd') for i in ('unfused', 'fused'))
                         + ' |')
    lines += ['', '## Models (bf16 autocast, channels_last)', '',
              '| model | path | infer img/s | × peer | infer GiB | train img/s | × peer | train GiB | compiled img/s '
              '| × peer | compile s |', '|' + '---|' * 11]
    for label, row in report['models'].items():
        ratio = row.get('vs_peer', {})
        lines.append(f"| {row['model']} | {row['path']} | {cell(row.get('infer_img_s'), 0)} | "
                     f"{cell(ratio.get('infer_img_s'), 2)} | {cell(row.get('infer_peak_gib'), 2)} | "
                     f"{cell(row.get('train_img_s'), 0)} | {cell(ratio.get('train_img_s'), 2)} | "
                     f"{cell(row.get('train_peak_gib'), 2)} | {cell(row.get('compile_img_s'), 0)} | "
                     f"{cell(ratio.get('compile_img_s'), 2)} | {cell(row.get('compile_s'), 1)} |")
    if report.get('auto_rule'):
        lines += ['', '## Proposed automatic rule', '', report['auto_rule']['criterion'], '']
        lines += [f'- {group}: {choice}' for group, choice in report['auto_rule']['by_k_layout'].items()]
    lines += aot_lines(report.get('aot'))
    lines += ['', '## Budget', '', '| section | used s | skipped |', '|---|---|---|']
    for name in SECTIONS:
        used = report['sections'].get(name, {}).get('used_s')
        lines.append(f"| {name} | {cell(used, 1)} | {len(report['skipped'].get(name, []))} |")
    return '\n'.join(lines + footer(report)) + '\n'
