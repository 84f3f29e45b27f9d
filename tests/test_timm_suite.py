"""timm's own model tests, run on our models as a timm user would run them.

``tests/test_models.py`` of the installed timm version (with the files it needs: ``tests/__init__.py``,
``tests/conftest.py`` and the pytest markers in timm's ``pyproject.toml``) comes from timm's source distribution on
the package registry, fetched at test time and cached under ``~/.cache/conv2former/timm-sdist``
(``$CONV2FORMER_TIMM_SDIST_CACHE``); nothing of it is committed. The file runs unmodified in a fresh pytest process
that imports conv2former first, so the module-level ``timm.list_models(...)`` its tests are parametrised over lists
our models; ``-k`` selects conv2former_n and conv2former_is. Every collected test must pass: forward, backward,
default config, TorchScript, features_only, FX forward/backward and FX + TorchScript. Without the download the test
fails, saying so.
"""
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get('CONV2FORMER_TIMM_SDIST_CACHE', Path.home() / '.cache' / 'conv2former' / 'timm-sdist'))
INDEX = os.environ.get('PIP_INDEX_URL', 'https://pypi.org/simple').rstrip('/')
MODELS = ('conv2former_n', 'conv2former_is')
# what the sdist's test run needs; the library itself is the installed timm
MEMBERS = ('tests/test_models.py', 'tests/__init__.py', 'tests/conftest.py', 'pyproject.toml')
# timm's per-model tests (test_models.py, timm 1.0.x): each must be collected for each model
EXPECTED_TESTS = ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs',
                  'test_model_forward_torchscript', 'test_model_forward_features', 'test_model_forward_fx',
                  'test_model_backward_fx', 'test_model_forward_fx_torchscript')


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the package registry
        return response.read()


def fetch_timm_tests(version: str) -> Path:
    """The folder holding MEMBERS of timm ``version``'s sdist, downloaded (and its sha256 checked) on first use."""
    folder = CACHE / f'timm-{version}'
    if all((folder / m).is_file() for m in MEMBERS):
        return folder
    filename = f'timm-{version}.tar.gz'
    page = _download(f'{INDEX}/timm/').decode()
    links = re.findall(r'href="([^"]*/' + re.escape(filename) + r'(?:#sha256=([0-9a-f]{64}))?)"', page)
    if not links:
        raise RuntimeError(f'{INDEX}/timm/ lists no {filename}')
    url, sha256 = links[0]
    data = _download(url.split('#')[0] if url.startswith('http') else f'{INDEX}/timm/{url}'.split('#')[0])
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f'{filename}: sha256 mismatch')
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        for member in MEMBERS:
            source = tar.extractfile(f'timm-{version}/{member}')
            if source is None:
                raise RuntimeError(f'{filename} has no {member}')
            target = folder / member
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + '.part')
            tmp.write_bytes(source.read())
            tmp.replace(target)
    return folder


def test_timm_test_models_pass_on_our_models(tmp_path):
    try:
        timm_tests = fetch_timm_tests(timm.__version__)
    except Exception as exc:  # noqa: BLE001 - any failure to get the file is the same failure for this test
        pytest.fail(f'could not download the sdist of timm {timm.__version__} from {INDEX} to run timm\'s own '
                    f'tests/test_models.py on our models: {type(exc).__name__}: {exc}', pytrace=False)
    report = tmp_path / 'junit.xml'
    runner = textwrap.dedent(f'''
        import sys
        import conv2former  # registers our models before test_models.py lists them at import
        import pytest
        sys.exit(pytest.main({[
            str(timm_tests / 'tests' / 'test_models.py'), '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
            '-p', 'no:randomly', '--rootdir', str(timm_tests), '-k', ' or '.join(MODELS), f'--junitxml={report}',
        ]!r}))
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    for var in ('CONV2FORMER_KERNELS', 'TRITON_INTERPRET', 'GITHUB_ACTIONS', 'TORCH_DEVICE', 'TORCH_BACKEND'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-c', runner], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report.is_file(), output
    cases = ET.parse(report).getroot().iter('testcase')
    outcomes = {}
    for case in cases:
        failed = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        outcomes[case.get('name')] = failed[0] if failed else 'passed'
    bad = {name: outcome for name, outcome in outcomes.items() if outcome != 'passed'}
    assert not bad, f'timm tests not passed: {bad}\n{output}'
    assert proc.returncode == 0, output
    for model in MODELS:
        for test in EXPECTED_TESTS:
            assert any(name.startswith(test + '[') and model in name for name in outcomes), \
                f'{test} was not collected for {model}: {sorted(outcomes)}'
