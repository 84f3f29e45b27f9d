"""benchmarks/bench_model.py and bench_resolution.py: each --smoke run covers the whole code path on CPU (CUDA-only
calls aside); without CUDA they refuse with exit 2. The resolution report's ratios, exponents, OOM cells and plot are
also checked on hand-made numbers. bench_model runs as ``python -m benchmarks.bench_model``, bench_resolution as a
file (``python benchmarks/bench_resolution.py``, as experiments/gpu_run.sh runs it)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import bench_resolution

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = ROOT / 'benchmarks' / 'bench_resolution.py'
NUMBER_KEYS = ('infer_img_s', 'compile_img_s', 'compile_s', 'train_img_s', 'train_peak_gib')


def run_script(*args: str, script: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m benchmarks.bench_model ARGS`` from the repository root, or ``python SCRIPT ARGS`` from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ('CONV2FORMER_KERNELS', 'TRITON_INTERPRET')}
    command = ['-m', 'benchmarks.bench_model'] if script is None else [str(script)]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_smoke_writes_json_and_markdown(tmp_path):
    proc = run_script('--smoke', '--out', str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_file] = tmp_path.glob('bench_model-cpu-smoke-*.json')
    assert json_file.with_suffix('.md').is_file()
    report = json.loads(json_file.read_text())

    env = report['environment']
    assert {'device', 'torch', 'timm', 'triton', 'cuda', 'date'} <= env.keys()
    assert env['torch'] == torch.__version__ and env['date'].endswith('+00:00')
    assert env['command'].endswith(f"bench_model.py --smoke --out {tmp_path}")
    assert report['complete'] and report['failures'] == []
    assert report['settings']['smoke'] and report['settings']['pairs'] == ['n']

    variants = ['torch', 'triton'] + (['fused'] if report['fused_variant']['kwargs'] else []) + ['convnext']
    assert [row['variant'] for row in report['rows']] == variants
    for row in report['rows']:
        for key in NUMBER_KEYS:
            assert isinstance(row[key], float) and row[key] > 0, (row['variant'], key, row[key])
        ratios = row['vs_peer'].values()
        assert all(isinstance(r, float) for r in ratios), row['vs_peer']
    for result in report['agreement']['n'].values():
        assert result['ok'] and 0 <= result['max_abs_diff'] <= result['tolerance']
    assert report['agreement']['n'].keys() == set(variants[1:-1])

    table = json_file.with_suffix('.md').read_text()
    assert table in proc.stdout
    assert '| n | conv2former_n (triton) |' in table and '| n | convnext_nano |' in table


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_without_cuda_exits_2(tmp_path):
    proc = run_script('--out', str(tmp_path))
    assert proc.returncode == 2
    assert 'bench_model.py needs a CUDA GPU' in proc.stderr and '--smoke' in proc.stderr
    assert not any(tmp_path.iterdir())


def test_resolution_smoke_writes_json_markdown_and_plot(tmp_path):
    proc = run_script('--smoke', '--out', str(tmp_path), script=RESOLUTION, cwd=tmp_path.parent)  # a file, elsewhere
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_file] = tmp_path.glob('bench_resolution-cpu-smoke-*.json')
    assert sorted(path.name for path in tmp_path.iterdir()) == [json_file.name, json_file.stem + '.md',
                                                                 json_file.stem + '.png']  # no temporary files left
    report = json.loads(json_file.read_text())

    env = report['environment']
    assert env['torch'] == torch.__version__ and env['date'].endswith('+00:00') and env['cuda'] is None
    assert env['command'].endswith(f"bench_resolution.py --smoke --out {tmp_path}")
    assert report['complete'] and report['failures'] == []
    cfg = report['settings']
    assert cfg['smoke'] and cfg['sizes'] == [32, 64] and cfg['batch'] == 1 and cfg['dtype'] == 'bf16'
    assert cfg['models'] == ['conv2former_t', 'convnext_t', 'swin_t', 'vit_s']

    variants = ['torch', 'triton'] + (['fused'] if report['fused_variant']['kwargs'] else [])
    assert [row['label'] for row in report['rows']] == [f'Conv2Former-T ({v})' for v in variants] + [
        'ConvNeXt-T', 'Swin-T', 'ViT-S']
    assert report['agreement'].keys() == set(variants[1:])
    assert all(result['ok'] for result in report['agreement'].values())
    peer = report['rows'][len(variants)]
    for row in report['rows']:
        assert row['cells'].keys() == {'32', '64'}, row['label']
        for size, cell in row['cells'].items():
            assert isinstance(cell['ms'], float) and cell['ms'] > 0, (row['label'], size, cell)
            assert isinstance(cell['peak_gib'], float) and cell['peak_gib'] > 0, (row['label'], size, cell)
            for key in ('ms', 'peak_gib'):
                assert cell['vs_peer'][key] == pytest.approx(cell[key] / peer['cells'][size][key])
        expected = math.log(row['cells']['64']['ms'] / row['cells']['32']['ms']) / math.log(4)
        assert row['exponent']['ms'] == pytest.approx(expected)
    assert [row['kwargs'].get('kernels') for row in report['rows'][:len(variants)]] == variants

    table = json_file.with_suffix('.md').read_text()
    assert table in proc.stdout
    assert '| model | 32 px | 64 px | k |' in table and '| ViT-S |' in table and 'Fused variant:' in table
    with Image.open(json_file.with_suffix('.png')) as image:
        assert image.format == 'PNG' and image.size == (1200, 480)


@pytest.fixture(scope='module')
def bench():
    return bench_resolution


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_resolution_without_cuda_exits_2(bench, tmp_path, capsys):
    assert bench.main(['--out', str(tmp_path / 'results')]) == 2
    err = capsys.readouterr().err
    assert 'bench_resolution.py needs a CUDA GPU' in err and '--smoke' in err
    assert not any(tmp_path.iterdir())


def test_resolution_sizes_are_checked(bench, capsys):
    assert bench.parse_args(['--sizes', '448,224']).sizes == (224, 448)
    assert bench.parse_args(['--smoke']).sizes == (32, 64)
    assert bench.parse_args(['--smoke', '--sizes', '96', '--batch', '2']).batch == 2
    for bad in ('224,300', '224,224', '0', 'big', ''):
        with pytest.raises(SystemExit):
            bench.parse_args(['--sizes', bad])
        assert 'each a positive multiple of 32' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(['--batch', '0'])
    assert 'expected an integer >= 1' in capsys.readouterr().err


def test_resolution_attempt_records_oom_and_errors(bench):
    cpu = torch.device('cpu')

    def out_of_memory():
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    def broken():
        raise ValueError('window size 7 does not divide 9\nsecond line')

    assert bench.attempt(lambda: dict(ms=1.0), cpu) == dict(ms=1.0)
    assert bench.attempt(out_of_memory, cpu) == 'OOM'
    assert bench.attempt(broken, cpu) == 'error: ValueError: window size 7 does not divide 9'


def test_resolution_ratios_exponents_and_oom_cells(bench, tmp_path):
    assert bench.scaling_exponent([224, 448, 896], [5.0, 10.0, 40.0]) == pytest.approx(1.0)  # 4x pixels, 4x time
    assert bench.scaling_exponent([224, 448, 896], [5.0, 10.0, 'OOM']) == pytest.approx(0.5)  # 4x pixels, 2x
    assert bench.scaling_exponent([224, 448], [5.0, 'OOM']) is None

    ours = dict(model='conv2former_t', variant='torch', label='Conv2Former-T (torch)',
                cells={'224': dict(ms=30.0, peak_gib=1.0), '448': dict(ms='OOM', peak_gib='OOM')})
    peer = dict(model='convnext_t', variant=None, label='ConvNeXt-T',
                cells={'224': dict(ms=10.0, peak_gib=0.5), '448': dict(ms=40.0, peak_gib=1.0)})
    rows = [ours, peer]
    bench.add_ratios(rows)
    assert ours['cells']['224']['vs_peer'] == dict(ms=3.0, peak_gib=2.0)
    assert ours['cells']['448']['vs_peer'] == dict(ms=None, peak_gib=None)
    assert ours['exponent'] == dict(ms=None, peak_gib=None)
    assert peer['exponent'] == pytest.approx(dict(ms=1.0, peak_gib=0.5))

    report = dict(environment=dict(device='Test GPU', torch='t', timm='m', triton='r', cuda='c', date='d',
                                   command='python bench_resolution.py'),
                  settings=dict(sizes=[224, 448], batch=8, warmup=3, iters=10, windows=3), complete=False,
                  fused_variant=dict(kwargs=None, note='skipped: test'), agreement={}, rows=rows, failures=[])
    table = bench.markdown(report)
    assert '| Conv2Former-T (torch) | 30.0 (3.00×) | OOM | — |' in table
    assert '| ConvNeXt-T | 10.0 | 40.0 | 1.00 |' in table
    assert '| Conv2Former-T (torch) | 1.00 (2.00×) | OOM | — |' in table
    assert '| ConvNeXt-T | 0.50 | 1.00 | 0.50 |' in table
    assert 'Incomplete' in table and 'ViT-S 81 ms' in table

    png = tmp_path / 'plot.png'
    bench.plot(report, png)
    with Image.open(png) as image:
        assert image.format == 'PNG' and image.size == (1200, 480)
    assert [path.name for path in tmp_path.iterdir()] == ['plot.png']
