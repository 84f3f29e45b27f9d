"""Every model scripts with torch.jit.script and the scripted model's output equals eager's.

TorchScript runs the plain PyTorch path: the depthwise conv through F.conv2d (no environment-driven dispatch), the
modulation unfused, the blocks without the lean backward (``conv2former/models/lean.py`` is eager-only).
"""
import warnings

import pytest
import timm
import torch
from timm import set_scriptable

import conv2former  # noqa: F401
from conftest import ALL_MODELS, tiny_kwargs

OPTIONS = [
    dict(fusion='sum', weighting='sigmoid', attn_act=False),
    dict(weighting='l1', mlp_dwconv=False, ls_init_value=None),
    dict(weighting='minmax', stem='patch', head='norm'),
    dict(kernels='fused'),  # scripted: the unfused PyTorch path (no Triton in TorchScript)
    dict(global_pool='', num_classes=0),
]


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated upstream, still supported
        return torch.jit.script(model)


def _check(name: str, size: int = 64, **kwargs) -> None:
    with set_scriptable(True):
        model = timm.create_model(name, **tiny_kwargs(name), **kwargs).eval()
    scripted = _script(model)
    if kwargs.get('kernels') == 'fused':  # eager reference on the PyTorch path (Triton needs a GPU or interpreter)
        reference = timm.create_model(name, **tiny_kwargs(name), **dict(kwargs, kernels='torch')).eval()
        reference.load_state_dict(model.state_dict())
        model = reference
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_every_model_scripts_and_matches_eager(name):
    _check(name)


@pytest.mark.parametrize('options', OPTIONS, ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_options_script(options):
    _check('conv2former_n', **options)


def test_scripted_model_trains_and_checks_its_input():
    model = timm.create_model('conv2former_n', **tiny_kwargs('conv2former_n'), num_classes=3).train()
    scripted = _script(model)
    scripted(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in scripted.parameters())
    with pytest.raises(torch.jit.Error, match=r'4-D input .* got a 3-D tensor of shape \(3, 64, 64\)'):
        scripted(torch.randn(3, 64, 64))
    with pytest.raises(torch.jit.Error, match='built for 3 input channels, got 1'):
        scripted(torch.randn(1, 1, 64, 64))


def test_saved_and_loaded(tmp_path):
    model = timm.create_model('conv2former_is', **tiny_kwargs('conv2former_is')).eval()
    path = tmp_path / 'model.pt'
    _script(model).save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)
