import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conv2former  # noqa: F401  (registers the models)

FIXTURES = Path(os.environ.get('CONV2FORMER_FIXTURES', Path(__file__).resolve().parents[2] / 'shared/fixtures/official'))
HIERARCHICAL = ['conv2former_n', 'conv2former_t', 'conv2former_s', 'conv2former_b', 'conv2former_b_22k', 'conv2former_l']
ISOTROPIC = ['conv2former_is', 'conv2former_ib']
ALL_MODELS = HIERARCHICAL + ISOTROPIC


def tiny_kwargs(name: str) -> dict:
    """Shrink depth (keep widths, kernels, stems, heads) so every registered model runs fast on 2 cores."""
    return dict(depths=(1, 1, 1, 1)) if name in HIERARCHICAL else dict(depth=2)


def write_toy_images(root: Path, n_train: int = 12, n_val: int = 6, classes=(('dark', 60), ('bright', 190))) -> Path:
    """A tiny learnable ImageFolder under ``root``: noisy 32 px squares around each class's grey level."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for cls, base in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


def kill_at_checkpoint(argv, run: Path, prefix: str, env: dict, timeout: float = 120) -> None:
    """Run ``python -m conv2former *argv`` and SIGKILL it as soon as ``run`` holds a checkpoint whose name starts
    with ``prefix`` (e.g. ``epoch-0001-step-00000004``), with its data-loader workers; fails if the run ended first
    or finished before the kill."""
    import signal
    import subprocess
    import sys
    import time
    from conv2former.engine.state import list_checkpoints
    proc = subprocess.Popen([sys.executable, '-m', 'conv2former', *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not any(p.name.startswith(prefix) for p in list_checkpoints(run)):
        assert proc.poll() is None and time.time() < deadline, 'the run ended before it could be killed'
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its data-loader workers, as a crash of the node would
    proc.wait()
    assert not (run / 'last').exists(), 'the run finished before the kill: the test proved nothing'


@pytest.fixture(scope='session')
def toy_images():
    """``write_toy_images`` for tests that need their own variant of the toy data."""
    return write_toy_images


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        if os.environ.get('CONV2FORMER_REQUIRE_FIXTURES'):
            pytest.fail(f'upstream fixtures not found at {FIXTURES}')
        pytest.skip(f'upstream fixtures not found at {FIXTURES} (set CONV2FORMER_FIXTURES)')
    return FIXTURES


@pytest.fixture(scope='session')
def fixture_config(fixtures_dir) -> dict:
    cfg = json.loads((fixtures_dir / 'tiny_k7_config.json').read_text())
    return dict(dims=cfg['dims'], depths=cfg['depths'], kernel_size=cfg['kernel_size'], num_classes=cfg['num_classes'])
