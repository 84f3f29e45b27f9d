"""benchmarks.kernel_aot (issue 25): the Triton kernels compiled ahead of time for sm_90 and sm_80 without a GPU.

The quick report (C2F-T stage 1, k=11, the heuristic's tile, the representative launcher variants, three dtypes,
both archs) runs once in a subprocess (no TRITON_INTERPRET there; ~30-60 s on 2 cores): every kernel compiles, none
spills, the records carry their fields, and the dwconv forward at 32x4x8 / 4 warps uses ~40 registers on sm_90 as
with the JIT's own specialisation (an all-i32 signature without divisibility hints gives ~91). The rest checks,
without compiling, that launches go through the real launchers and triton's binder, and that ``kernel_aot.timed``
(gpu_check's numbers) reads known compilations from a report and compiles the others. The full sweep is slow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_aot as aot
from benchmarks.kernel_aot import timed
from conv2former.ops import launch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(aot.ptxas_path(90) is None,
                                reason="triton's ptxas (triton/backends/nvidia/bin/ptxas) is absent: nothing to "
                                       'compile the kernels with')

FIELDS = ('arch', 'kernel', 'dtype', 'layout', 'tile', 'num_warps', 'kernel_size', 'ok', 'regs', 'spill_stores',
          'shared_bytes', 'seconds', 'error', *aot.KERNEL_FLAGS, 'warps_per_sm', 'occupancy', 'limiter', 'variants',
          'uses', 'specialization')


def _run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('TRITON_INTERPRET', 'CONV2FORMER_KERNELS')}
    return subprocess.run([sys.executable, '-m', 'benchmarks.kernel_aot', *args, '--no-progress'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def quick(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp('aot-quick')
    proc = _run_cli('--quick', '--arch', '90', '--arch', '80', '--out', str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / 'aot.md').is_file()
    return dict(records=json.loads((out / 'aot.json').read_text()), md=(out / 'aot.md').read_text())


def test_quick_compiles_everything_without_spills(quick):
    records = quick['records']
    assert {r['arch'] for r in records} == {90, 80}
    failed = [(r['arch'], r['kernel'], r['dtype'], r['error']) for r in records if not r['ok']]
    assert not failed
    spilled = [(r['arch'], r['kernel'], r['variants'], r['dtype'], r['spill_stores']) for r in records
               if r['spill_stores'] or r['spill_loads']]
    assert not spilled
    for arch in (90, 80):  # every representative variant in every dtype, on each arch
        reached = {(v, r['dtype']) for r in records if r['arch'] == arch for v in r['variants']}
        assert reached == {(v, d) for v in aot.QUICK_VARIANTS for d in aot.DTYPES}


def test_quick_record_fields(quick):
    for r in quick['records']:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r['kernel'], missing)
        assert r['layout'] == 'channels_last' and r['tile'] == '32x4x8' and r['num_warps'] == 4
        assert r['kernel_size'] == 11 and r['K'] == 11 and r['ACC_DTYPE'] == 'fp32'
        assert isinstance(r['regs'], int) and 16 <= r['regs'] <= 255
        assert r['shared_bytes'] >= 0 and r['seconds'] > 0 and r['error'] is None
        assert 0 < r['warps_per_sm'] <= 64 and r['uses'] == ['T1@128']
    kernels = {r['kernel'] for r in quick['records']}
    assert kernels == {'dwconv.forward', 'dwconv.weight_grad', 'convmod.modulate', 'convmod.input_grad'}
    md = quick['md']
    for kernel in kernels:
        assert f'### `{kernel}` (sm_90)' in md and f'### `{kernel}` (sm_80)' in md
    assert '4.83' in md and 'Bandwidth lower bound' in md


def test_dwconv_forward_registers_match_the_jit_specialisation(quick, compiled_mode):
    """~40 registers on sm_90 for the heuristic's 32x4x8 / 4 warps (fp32, channels_last), as a real launch."""
    assert launch.tile_config(72, 56, 56, True) == (32, 4, 8)
    [r] = [r for r in quick['records'] if r['arch'] == 90 and r['kernel'] == 'dwconv.forward' and r['dtype'] == 'fp32'
           and 'dwconv.fwd bias' in r['variants']]
    assert 36 <= r['regs'] <= 44, r
    assert r['FLIP'] is False and r['HAS_BIAS'] is True
    assert 'sxc=1' in r['specialization'] and 'sxh:i32:16' in r['specialization'], r['specialization']


# ----------------------------------------------------------------------------------------- without compiling
@pytest.fixture
def compiled_mode(monkeypatch):
    """Other test modules set TRITON_INTERPRET=1 at import; the binder needs the compiled JITFunctions."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)


def test_launches_are_the_launchers_own_and_binder_specialised(compiled_mode):
    case = aot.Case('T', 1, 128)
    tensors = aot.make_tensors(case.shape, 'channels_last', aot.DTYPES['bf16'], 11)
    by_name = {v.name: v for v in aot.variants()}
    [launch] = aot.record_launches(by_name['dwconv.wgrad act'], tensors, None, aot.ARCHS[90].sms)
    assert launch.kernel == 'dwconv.weight_grad'
    assert launch.kwargs['ACT'] is True and launch.kwargs['K'] == 11
    assert (launch.kwargs['BLOCK_C'], launch.kwargs['BLOCK_H'], launch.kwargs['BLOCK_W']) == (32, 4, 8)
    names = [p.name for p in launch.jit.params]
    args = dict(zip(names, launch.args))
    # the launcher's SPLITS heuristic for 132 SMs: cdiv(4 * 132, 128 batch * 3 channel blocks) = 2 (1 for 108 SMs)
    assert args['SPLITS'] == 2
    [launch80] = aot.record_launches(by_name['dwconv.wgrad act'], tensors, None, aot.ARCHS[80].sms)
    assert dict(zip(names, launch80.args))['SPLITS'] == 2  # cdiv(432, 384)
    info = aot.specialise(launch, 90)
    spec = info['specialization'].split()
    assert 'x_ptr:*bf16:16' in spec and 'dw_part_ptr:*fp32:16' in spec
    assert 'B:i32:16' in spec and 'C:i32' in spec and 'sxc=1' in spec and 'sxw:i32' in spec  # 72 is not 16k
    assert info['flags']['ACT'] is True and info['num_warps'] == 4
    # the same launch on NCHW: the width stride is the constant 1, the heuristic's tile wide along W
    nchw = aot.make_tensors(case.shape, 'NCHW', aot.DTYPES['bf16'], 11)
    [launch] = aot.record_launches(by_name['dwconv.fwd bias'], nchw, None, aot.ARCHS[90].sms)
    assert (launch.kwargs['BLOCK_C'], launch.kwargs['BLOCK_H'], launch.kwargs['BLOCK_W']) == (4, 8, 32)
    assert 'sxw=1' in aot.specialise(launch, 90)['specialization'].split()


def test_identical_compilations_are_deduplicated(compiled_mode):
    """T and S share stage shapes; the dwconv weight gradient of convmod is dwconv's: one job each."""
    selection = aot.Selection(models=('T', 'S'), stages=(1,), batches=(128,), kernel_sizes=(11,), dtypes=('bf16',),
                              layouts=('channels_last',), variants=('dwconv.wgrad act', 'convmod.wgrad act'))
    [job] = aot.enumerate_jobs(selection, [90])
    assert sorted(job['variants']) == ['convmod.wgrad act', 'dwconv.wgrad act']
    assert job['uses'] == ['T1@128', 'S1@128']
    assert len(aot.enumerate_jobs(selection, [90, 80])) == 2


def test_hand_passed_tiles_reach_the_kernel(compiled_mode):
    selection = aot.Selection(models=('T',), stages=(1,), batches=(128,), kernel_sizes=(11,), dtypes=('fp32',),
                              layouts=('channels_last',), variants=('dwconv.fwd bias',), tiles=((64, 8, 16, 2),),
                              heuristic=False)
    [job] = aot.enumerate_jobs(selection, [90])
    assert job['tile'] == '64x8x16' and job['num_warps'] == 2 and job['tile_source'] == 'hand'


def test_timed_reads_known_compilations_and_compiles_the_rest(quick, compiled_mode, tmp_path):
    """gpu_check's AOT numbers: the reference shape's forward from the quick report, an odd shape compiled now."""
    config = dict(case='ref', variant='dwconv.fwd bias', dtype='bf16', layout='channels_last', shape=[128, 72, 56, 56],
                  k=11, tile=None)
    odd = dict(config, case='odd', shape=[2, 5, 7, 3], k=3, tile=[8, 4, 4, 2])
    result = timed.resources([config, odd], 90, quick['records'], out=tmp_path / 'timed.json')
    ref, new = result['rows']
    assert ref['from'] == 'aot.json' and ref['tile'] == '32x4x8' and ref['requested_tile'] is None
    known = next(r for r in quick['records'] if r['key'] == ref['key'])
    assert (ref['regs'], ref['warps_per_sm']) == (known['regs'], known['warps_per_sm'])
    assert new['from'] == 'compiled' and new['tile'] == '8x4x4' and new['num_warps'] == 2 and new['ok']
    assert 16 <= new['regs'] <= 255 and new['spill_stores'] == 0 and new['kernel'] == 'dwconv.forward'
    assert json.loads((tmp_path / 'timed.json').read_text())['rows'] == result['rows']


def test_heuristic_tiles_compile_without_spills_within_limits(compiled_mode):
    """Walks the tile heuristic over the family's shapes (every model, stage and layout): each tile holds at most 8
    accumulator elements per thread, and the committed report (benchmarks/results/aot, compiled from this kernel
    source) has it for both archs, every record compiled, without spills, at half the SM's warps or more."""
    from benchmarks.kernel_aot.launches import source_hash
    records = json.loads((ROOT / 'benchmarks' / 'results' / 'aot' / 'aot.json').read_text())
    stale = sorted({r['kernel'] for r in records if r['source'] != source_hash(r['kernel'])})
    assert not stale, (f'benchmarks/results/aot is of an older source of {stale}: regenerate it (its runs.json lists '
                       'the commands)')
    tiles = {launch.heuristic_tile(channels, size, size, layout == 'channels_last')
             for channels_per_stage in aot.MODELS.values() for channels, size in zip(channels_per_stage, aot.MAPS)
             for layout in aot.LAYOUTS}
    for tile in tiles:
        assert tile.block_c * tile.block_h * tile.block_w // (32 * tile.num_warps) <= 8, tile
        for arch in aot.ARCHS:
            found = [r for r in records if r['arch'] == arch and r['tile_source'] == 'heuristic'
                     and r['tile'] == 'x'.join(map(str, tile[:3])) and r['num_warps'] == tile.num_warps]
            assert {r['kernel'] for r in found} == {'dwconv.forward', 'dwconv.weight_grad', 'convmod.modulate',
                                                    'convmod.input_grad'}, (arch, tile)
            bad = [(r['kernel'], r['regs'], r['spill_stores'], r['warps_per_sm']) for r in found
                   if not r['ok'] or r['spill_stores'] or r['spill_loads'] or r['warps_per_sm'] < 32
                   or r['shared_bytes'] > aot.ARCHS[arch].smem_per_block]
            assert not bad, (arch, tile, bad)


def test_occupancy_model():
    assert aot.occupancy(40, 0, 4, 90)['warps_per_sm'] == 48  # 4 x floor(16384 / 1280) = 48
    assert aot.occupancy(32, 0, 4, 90) == dict(warps_per_sm=64, occupancy=1.0, blocks_per_sm=16, limiter='none')
    assert aot.occupancy(40, 0, 1, 90)['warps_per_sm'] == 32  # the 32-block cap
    assert aot.occupancy(255, 0, 4, 80)['warps_per_sm'] == 8  # 4 x floor(16384 / 8192), two blocks
    big = aot.occupancy(32, 200 * 1024, 4, 80)
    assert big['warps_per_sm'] == 0 and big['limiter'] == 'shared'  # over sm_80's 163 KB per block
    assert aot.occupancy(32, 100 * 1024, 4, 90)['blocks_per_sm'] == 2  # 228 KB / (100 KB + 1 KB)


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function '_dwconv_fwd_kernel' for 'sm_90a'\n"
           'ptxas info    : Function properties for _dwconv_fwd_kernel\n'
           '    48 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads\n'
           'ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n')
    assert aot.parse_ptxas_log(log) == dict(regs=255, stack_bytes=48, spill_stores=20, spill_loads=24,
                                            static_smem=16)


def test_bandwidth_bound_of_the_reference_shape(compiled_mode):
    rows = {(b['op'], b['layout'], b['dtype']): b for b in aot.bandwidth_bounds(('bf16',))}
    fwd = rows[('dwconv', 'channels_last', 'bf16')]
    n = 128 * 72 * 56 * 56 * 2  # one bf16 activation
    assert n * 2 < fwd['fwd_bytes'] < n * 2 * 1.01  # x and y; weight and bias are tiny
    assert fwd['fwd_bound_ms'] == pytest.approx(fwd['fwd_bytes'] / 3.35e12 * 1e3)
    assert fwd['cudnn_fwd_ms'] == 4.83 and fwd['bwd_bytes'] > n * 4  # dy twice, x, dx, float32 partials


@pytest.mark.slow
def test_full_sweep(tmp_path):
    """Every launcher variant x dtype x layout x heuristic tile x Conv2Former N/T/S/B/L stage shape (batch 1 and
    128) x odd k in 3..31, for sm_90 and sm_80 (~28,800 compilations: hours on 2 cores)."""
    proc = _run_cli('--arch', '90', '--arch', '80', '--out', str(tmp_path), '--jobs', str(os.cpu_count() or 1),
                    timeout=24 * 3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    records = json.loads((tmp_path / 'aot.json').read_text())
    assert all(r['ok'] for r in records)
    assert not [r for r in records if r['tile_source'] == 'heuristic' and r['spill_stores']]
