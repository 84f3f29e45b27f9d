"""benchmarks/gpu_check.py (issue 14's one GPU run) and the explicit tile configurations of the Triton launchers.

Fast: the launchers with non-default tiles against F.conv2d, tile validation, the budget's interruption, one
correctness case, the "never slower than cuDNN" rule on hand-made timings, the AOT configurations of the timed
launches and their table. Slow: ``bash benchmarks/gpu_check.sh --smoke`` on CPU (Triton interpreter; one to two
minutes of CPU time, the AOT numbers of its launches compiled alongside).
"""
from __future__ import annotations

import os

os.environ['TRITON_INTERPRET'] = '1'  # before the kernels are jitted (see test_ops_dwconv)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import gpu_aot, gpu_cases, gpu_report  # noqa: E402
from conv2former.ops import convmod, dwconv, launch  # noqa: E402
from conv2former.ops.dwconv import TileConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.py'


@pytest.fixture(scope='module')
def gpu_check():
    from benchmarks import gpu_check
    return gpu_check


@pytest.mark.parametrize('tile, channels_last', [(TileConfig(4, 4, 4, 1), False), (TileConfig(8, 8, 16, 2), True)])
def test_launchers_with_explicit_tiles_match_conv2d(tile, channels_last):
    x = torch.randn(1, 5, 7, 9)  # with the first tile: 2 channel blocks x 2 x 3 spatial tiles
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    weight, bias, dy = torch.randn(5, 1, 3, 3), torch.randn(5), torch.randn_like(x)
    ref = F.conv2d(x, weight, bias, padding=1, groups=5)
    torch.testing.assert_close(dwconv.launch_forward(x, weight, bias, flip=False, tile=tile), ref)
    grad_x = dwconv.launch_forward(dy, weight, None, flip=True, tile=tile)
    torch.testing.assert_close(grad_x, F.conv2d(dy, weight.flip(-1, -2), padding=1, groups=5))
    grad_w, grad_b = dwconv.launch_weight_grad(dy, x, 3, tile=tile)
    torch.testing.assert_close(grad_w, torch.nn.grad.conv2d_weight(x, weight.shape, dy, padding=1, groups=5),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_b, dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-4)

    v = torch.randn_like(x)
    [out] = convmod.launch_modulate(x, v, weight, bias, act=True, fusion='mul', weighting='none', tile=tile)
    torch.testing.assert_close(out, F.conv2d(F.gelu(x), weight, bias, padding=1, groups=5) * v, rtol=1e-4, atol=1e-4)
    da = convmod.launch_input_grad(dy, x, weight, act=False, tile=tile)
    torch.testing.assert_close(da, grad_x)


def test_default_tile_is_the_heuristic_with_its_warps():
    x = torch.randn(1, 72, 56, 56).to(memory_format=torch.channels_last)
    assert launch.resolve_tile(x, None) == TileConfig(*launch.tile_config(72, 56, 56, True), 4)
    small = torch.randn(1, 576, 7, 7)  # NCHW stage 4: 16 channels x 8 x 8 at 8 warps (occupancy, aot.md)
    assert launch.resolve_tile(small, None) == TileConfig(16, 8, 8, 8)
    assert launch.resolve_tile(small.to(memory_format=torch.channels_last), None) == TileConfig(32, 4, 8, 4)
    assert launch.resolve_tile(torch.randn(1, 72, 56, 56), None) == TileConfig(4, 8, 32, 4)
    assert launch.resolve_tile(x, (8, 4, 4, 2)) == TileConfig(8, 4, 4, 2)


@pytest.mark.parametrize('tile, message', [
    (TileConfig(3, 4, 4, 4), 'block_c must be a power of two'),
    (TileConfig(4, 0, 4, 4), 'block_h must be a power of two'),
    (TileConfig(4, 4, 4, 64), 'num_warps must be a power of two in [1, 32]'),
    (TileConfig(64, 16, 16, 4), 'more than 8192 elements'),
])
def test_bad_tiles_are_refused(tile, message):
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
        dwconv.launch_forward(x, torch.randn(4, 1, 3, 3), None, flip=False, tile=tile)


def test_budget_interrupts_a_step_and_passes_unused_time_on(gpu_check):
    budget = gpu_check.Budget(2.0, dict(a=1, b=1))
    assert budget.deadlines['b'] - budget.deadlines['a'] == pytest.approx(1.0)
    with budget.section('a'):
        assert budget.run(lambda: 7) == 7
        start = time.monotonic()
        with pytest.raises(gpu_check.Overrun):
            budget.run(lambda: time.sleep(5), cap=0.2)
        assert time.monotonic() - start < 1.0
    with budget.section('b'):
        assert 1.0 < budget.left() <= 2.0  # a's unused time is b's
    assert set(budget.used) == {'a', 'b'}
    wrapped = RuntimeError('interpreter failed')
    wrapped.__cause__ = gpu_check.Overrun('stopped after 1 s')
    assert isinstance(gpu_check.overrun_in(wrapped), gpu_check.Overrun)
    assert gpu_check.overrun_in(ValueError('x')) is None


def test_check_case_and_tile_check_on_an_odd_shape(gpu_check):
    case = dict(model='odd', C=5, H=7, W=3, k=3, layout='channels_last')
    result = gpu_check.check_case(case, 'fp32', 1, torch.device('cpu'))
    assert result['conv_ok'] and result['fused_ok']
    assert set(result['conv']) == {'out', 'grad_x', 'grad_weight', 'grad_bias'}
    assert set(result['fused']) == {'out', 'grad_a', 'grad_v', 'grad_weight', 'grad_bias'}
    assert max(result['conv'].values()) < 1e-6  # fp32 kernel vs float64 reference
    tile = gpu_cases.clamp_tile((64, 4, 4, 4), case)
    assert tile == TileConfig(8, 4, 4, 4)
    assert gpu_check.check_tile(case, tile, torch.device('cpu')) < 1e-2


def test_kernel_cases_put_each_models_own_k_first(gpu_check):
    args = gpu_check.parse_args([])
    cases = gpu_check.kernel_cases(args)
    assert len(cases) == (len(args.stages['N']) + len(args.stages['T']) + len(args.odd)) * 3 * 2
    assert [c['k'] for c in cases[:8]] == [11] * 8 and cases[8]['k'] == 7 and cases[8]['model'] == 'N'
    assert {(c['C'], c['H'], c['W']) for c in cases} >= {(72, 56, 56), (512, 7, 7), (33, 13, 9)}


def test_auto_rule_never_slower_than_cudnn(gpu_check):
    def row(k, layout, C, cudnn, triton, tuned=None):
        tiles = None if tuned is None else dict(tuned_fwd_ms=tuned[0], tuned_fwd_bwd_ms=tuned[1], best={})
        return dict(k=k, layout=layout, C=C, H=56, W=56, tiles=tiles, **{
            'cudnn fwd ms': cudnn[0], 'cudnn fwd+bwd ms': cudnn[1], 'triton fwd ms': triton[0],
            'triton fwd+bwd ms': triton[1]})

    rows = {'a': row(11, 'channels_last', 72, (4.8, 15.7), (0.3, 1.5)),
            'b': row(11, 'channels_last', 144, (2.4, 7.1), (0.2, 9.0), tuned=(0.2, 6.0)),  # tuned fwd+bwd wins
            'c': row(7, 'channels_last', 64, (0.3, 1.1), (0.4, 1.0)),  # fwd slower: cuDNN
            'd': row(7, 'NCHW', 64, (1.0, 4.3), (0.5, 4.4)),  # fwd+bwd slower: cuDNN
            'e': row(7, 'NCHW', 128, (1.0, 4.3), (0.5, 2.0))}
    rule = gpu_check.auto_rule(rows)
    assert rule['by_k_layout'] == {'k=11 channels_last': 'triton', 'k=7 channels_last': 'torch',
                                   'k=7 NCHW': dict(triton_for=[[128, 56, 56]], measured=2)}
    by_case = {c['case']: c for c in rule['per_case']}
    assert by_case['b']['speedup'] == dict(fwd=12.0, fwd_bwd=pytest.approx(7.1 / 6.0, abs=0.01))
    assert [by_case[k]['choice'] for k in 'abcde'] == ['triton', 'triton', 'torch', 'torch', 'triton']


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_without_cuda_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and 'gpu_check.py needs a CUDA GPU' in proc.stderr
    assert not any(tmp_path.iterdir())


def test_aot_configurations_are_the_timed_launches(gpu_check):
    args = gpu_check.parse_args(['--smoke'])
    cases = gpu_cases.kernel_cases(args)
    fused = gpu_cases.fused_cases(args, cases)
    tuned = [(case, gpu_cases.candidates(case, args.tiles)) for case in cases[:args.tune_cases]]
    configs = gpu_aot.configs(cases, fused, tuned, args.batch, gpu_cases.case_key)
    assert len(cases) == 4 and len(fused) == 2 and len(tuned[0][1]) == 2  # the heuristic's tile and one candidate
    assert len(configs) == 4 * 3 + 2 * 4 + 2 * 3
    first = configs[0]
    assert first == dict(case='k3 8x6x6 channels_last bf16', variant='dwconv.fwd bias', dtype='bf16',
                         layout='channels_last', shape=[2, 8, 6, 6], k=3, tile=None)
    assert {c['variant'] for c in configs} == set(gpu_aot.CONV_LAUNCHES + gpu_aot.FUSED_LAUNCHES)
    assert [c['tile'] for c in configs[-3:]] == [list(tuned[0][1][1])] * 3


def test_aot_numbers_in_the_summary(gpu_check):
    row = dict(case='k11 72x56x56 channels_last bf16', variant='dwconv.fwd bias', layout='channels_last', k=11,
               requested_tile=None, tile='32x4x8', num_warps=4, key='abc', regs=40, spill_stores=0, shared_bytes=0,
               warps_per_sm=48, limiter='registers', **{'from': 'aot.json'})
    lines = gpu_report.aot_lines(dict(arch=90, note='From a test.', rows=[row, dict(row, case='k11 other')]))
    table = '\n'.join(lines)
    assert '## AOT resources of the timed launches (sm_90)' in table
    assert ('| dwconv.fwd bias | channels_last | 11 | 32x4x8 / 4 | 40 | 0 | 0 | 48 | registers | aot.json | '
            'k11 72x56x56 channels_last bf16; k11 other |') in table
    assert gpu_report.aot_cell(row) == '40 / 48' and gpu_report.aot_cell(None) == '—'


@pytest.mark.slow
def test_smoke_run_covers_every_section(tmp_path):
    """``bash benchmarks/gpu_check.sh --smoke``: every section, and the AOT numbers of every timed launch."""
    env = {k: v for k, v in os.environ.items() if k not in ('CONV2FORMER_KERNELS', 'TRITON_INTERPRET')}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_check.sh'), '--smoke'], capture_output=True,
                          text=True, env=env, timeout=900, cwd=tmp_path)
    out = tmp_path / 'gpu_check'
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / 'summary.json').read_text())
    summary = (out / 'summary.md').read_text()
    assert summary in proc.stdout and summary in (out / 'log.txt').read_text()
    assert report['complete'] and report['failures'] == [] and report['skipped'] == {}
    env_ = report['environment']
    assert {'device', 'torch', 'triton', 'cudnn', 'date', 'command'} <= env_.keys()
    assert env_['command'].endswith(f'gpu_check.py --out {out} --smoke')
    assert set(report['sections']) == {'correctness', 'kernels', 'models', 'compile'}

    ops = report['correctness']['ops']
    assert len(ops) == 8 and all(r['conv_ok'] and r['fused_ok'] for r in ops.values())  # 4 cases x fp32/bf16
    models = report['correctness']['models']['conv2former_t']
    assert set(models) == {'triton fp32', 'fused fp32', 'triton bf16', 'fused bf16'}
    assert all(r['ok'] for r in models.values())

    conv = report['kernels']['conv']
    assert len(conv) == 4 and all(r['cudnn fwd ms'] > 0 and r['triton fwd+bwd ms'] > 0 for r in conv.values())
    tuned = [r['tiles'] for r in conv.values() if r.get('tiles')]
    assert len(tuned) == 1 and set(tuned[0]['best']) == {'fwd', 'dgrad', 'wgrad'}
    assert len(report['kernels']['fused']) == 2
    assert len(report['auto_rule']['per_case']) == 4

    rows = report['models']
    assert set(rows) == {'conv2former_t triton', 'conv2former_t fused', 'conv2former_t torch', 'convnext_tiny'}
    for label, row in rows.items():
        assert row['infer_img_s'] > 0 and row['train_img_s'] > 0 and row['train_peak_gib'] > 0, label
    assert 'compile_img_s' in rows['conv2former_t fused'] and 'compile_img_s' in rows['convnext_tiny']
    assert rows['convnext_tiny']['vs_peer']['infer_img_s'] == 1.0

    aot = report['aot']  # the toy shapes are not in the committed report: compiled for sm_90 during the run
    assert aot['arch'] == 90 and aot['complete'] and len(aot['rows']) == 4 * 3 + 2 * 4 + 2 * 3
    for row in aot['rows']:
        assert row['ok'] and row['from'] in ('aot.json', 'compiled'), row
        assert 16 <= row['regs'] <= 255 and row['spill_stores'] == 0 and row['shared_bytes'] >= 0, row
        assert 0 < row['warps_per_sm'] <= 64 and row['kernel'] in ('dwconv.forward', 'dwconv.weight_grad',
                                                                   'convmod.modulate', 'convmod.input_grad')
    assert {row['case'] for row in aot['rows']} == {f'{key}' for key in conv}
    assert '## AOT resources of the timed launches (sm_90)' in summary
    for key in conv:  # the forward's registers and warps per SM beside its GB/s
        fwd = next(r for r in aot['rows'] if r['case'] == key and r['variant'] == 'dwconv.fwd bias')
        assert f"| {fwd['regs']} / {fwd['warps_per_sm']} |" in summary
    assert 'AOT sm_90 ' in proc.stdout and (out / 'aot-sm90.json').is_file()
