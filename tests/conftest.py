import json
import os
from pathlib import Path

import pytest
import torch

import conv2former  # noqa: F401  (registers the models)

FIXTURES = Path(os.environ.get('CONV2FORMER_FIXTURES', Path(__file__).resolve().parents[2] / 'shared/fixtures/official'))
HIERARCHICAL = ['conv2former_n', 'conv2former_t', 'conv2former_s', 'conv2former_b', 'conv2former_b_22k', 'conv2former_l']
ISOTROPIC = ['conv2former_is', 'conv2former_ib']
ALL_MODELS = HIERARCHICAL + ISOTROPIC


def tiny_kwargs(name: str) -> dict:
    """Shrink depth (keep widths, kernels, stems, heads) so every registered model runs fast on 2 cores."""
    return dict(depths=(1, 1, 1, 1)) if name in HIERARCHICAL else dict(depth=2)


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
