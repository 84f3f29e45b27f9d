"""Issue 15's GPU call on CPU: experiments/shrink_datasets.py on the real archives (a few images of each), the
collected table with stage times, and (slow) experiments/gpu_run.sh with SMOKE=1: the same script path as on the GPU
(pre-training, Mask R-CNN, UperNet through the project's CLI, then the resolution benchmark), one step each."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get('CONV2FORMER_DATASETS', '/work/shared/datasets'))
pytestmark = pytest.mark.skipif(not (DATASETS / 'camvid.tar.gz').is_file(), reason=f'no dataset archives in {DATASETS}')


@pytest.fixture(scope='module')
def shrunk(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp('shrunk')
    proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'shrink_datasets.py'), '--smoke', '--src',
                           str(DATASETS), '--dest', str(dest)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest


def read(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_shrunk_archives_keep_the_layouts(shrunk):
    manifest = json.loads((shrunk / 'manifest.json').read_text())
    assert [a['file'] for a in manifest['archives']] == ['imagenette2-64.tar.gz', 'pennfudan.tar.gz', 'camvid.tar.gz']
    assert manifest['total_mib'] < 1

    imagenette = read(shrunk / 'imagenette2-64.tar.gz')
    assert len([n for n in imagenette if n.startswith('imagenette2-64/train/')]) == 20  # 2 per class
    assert len([n for n in imagenette if n.startswith('imagenette2-64/val/')]) == 10
    with Image.open(io.BytesIO(next(iter(imagenette.values())))) as image:
        assert image.size == (64, 64) and image.format == 'JPEG'

    pennfudan = read(shrunk / 'pennfudan.tar.gz')
    images = sorted(Path(n).stem for n in pennfudan if '/JPEGImages/' in n)
    assert len(images) == 4
    assert sorted(Path(n).stem.removesuffix('_mask') for n in pennfudan if '/PedMasks/' in n) == images
    assert sorted(Path(n).stem for n in pennfudan if '/Annotation/' in n) == images

    camvid = read(shrunk / 'camvid.tar.gz')
    assert not any('/test' in n for n in camvid)
    for split in ('train', 'val'):
        stems = sorted(Path(n).stem for n in camvid if f'/{split}/' in n)
        assert len(stems) == 3 and sorted(Path(n).stem for n in camvid if f'/{split}annot/' in n) == stems
        assert len(camvid[f'CamVid/{split}.txt'].decode().split()) == 6  # image and label per kept line
    label = next(n for n in camvid if '/trainannot/' in n)
    with tarfile.open(DATASETS / 'camvid.tar.gz') as tar:
        original = np.array(Image.open(tar.extractfile(label)))
    small = np.array(Image.open(io.BytesIO(camvid[label])))
    assert small.shape == (180, 240) and set(np.unique(small)) <= set(np.unique(original))  # ids exact (nearest)


def test_collect_adds_stage_times(tmp_path):
    run = tmp_path / 'conv2former_n-imagenette'
    run.mkdir()
    (run / 'results.json').write_text(json.dumps(dict(top1=71.5)))
    (tmp_path / 'stage_times.tsv').write_text('stage\tseconds\tstatus\tlimit_s\nconv2former_n-imagenette\t61\t0\t65\n'
                                              'conv2former_n-pennfudan-maskrcnn\t70\t124\t70\n')
    proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'collect_downstream.py'), str(tmp_path),
                           'conv2former_n'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '| conv2former_n | 71.50 | – |' in proc.stdout
    assert '| conv2former_n-pennfudan-maskrcnn | 70 | 124 | 70 |' in proc.stdout
    saved = json.loads((tmp_path / 'downstream.json').read_text())
    assert saved['table']['conv2former_n']['Imagenette top-1'] == 71.5 and len(saved['stage_times']) == 2


@pytest.mark.slow
def test_gpu_run_smoke(shrunk, tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, SMOKE='1', OUT=str(out), DATA=str(shrunk), PYTHON=sys.executable,
               BACKBONES='conv2former_n', PYTHONPATH=str(ROOT))
    env.pop('TRITON_INTERPRET', None)
    proc = subprocess.run(['bash', str(ROOT / 'experiments' / 'gpu_run.sh')], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    downstream = out / 'downstream'
    for stage in ('imagenette', 'pennfudan-maskrcnn', 'camvid-upernet'):
        assert (downstream / f'conv2former_n-{stage}' / 'results.json').is_file(), stage
    times = (downstream / 'stage_times.tsv').read_text().splitlines()
    assert times[0] == 'stage\tseconds\tstatus\tlimit_s' and len(times) == 4
    assert all(line.split('\t')[2] == '0' for line in times[1:])
    table = (downstream / 'downstream.md').read_text()
    assert '| conv2former_n |' in table and '–' not in table.split('\n')[2]
    assert 'downstream: status 0' in (out / 'log.txt').read_text()
    assert 'resolution: status 0' in (out / 'log.txt').read_text()
    assert list((out / 'resolution').glob('bench_resolution-cpu-smoke-*.png'))
