"""benchmarks/bench_model.py: the --smoke run covers the whole code path on CPU; without CUDA it refuses with exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_model.py'
NUMBER_KEYS = ('infer_img_s', 'compile_img_s', 'compile_s', 'train_img_s', 'train_peak_gib')


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('CONV2FORMER_KERNELS', 'TRITON_INTERPRET')}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


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
    assert 'needs a CUDA GPU' in proc.stderr and '--smoke' in proc.stderr
    assert not any(tmp_path.iterdir())
