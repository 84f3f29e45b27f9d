"""Bad inputs get errors naming what was expected and what came, on every forward path."""
import pytest
import timm
import torch

from conftest import tiny_kwargs
from conv2former.cli import main


@pytest.fixture(scope='module')
def model():
    return timm.create_model('conv2former_n', **tiny_kwargs('conv2former_n')).eval()


def test_non_4d_input(model):
    with pytest.raises(ValueError, match=r'4-D input .* got a 3-D tensor of shape \(3, 64, 64\)'):
        model(torch.randn(3, 64, 64))


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match='built for 3 input channels, got 1'):
        model(torch.randn(2, 1, 64, 64))


@pytest.mark.parametrize('name,min_size,kwargs', [
    ('conv2former_n', 31, {}), ('conv2former_n', 32, dict(stem='patch')), ('conv2former_is', 16, {})])
def test_too_small_input(name, min_size, kwargs):
    model = timm.create_model(name, **tiny_kwargs(name), **kwargs).eval()
    assert model(torch.randn(1, 3, min_size, min_size)).shape == (1, 1000)
    with pytest.raises(ValueError, match=f'at least {min_size}x{min_size} pixels.*got {min_size - 1}x{min_size}'):
        model(torch.randn(1, 3, min_size - 1, min_size))


def test_checks_cover_features_and_intermediates(model):
    feats = timm.create_model('conv2former_n', features_only=True, **tiny_kwargs('conv2former_n'))
    with pytest.raises(ValueError, match='got 4'):
        feats(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='at least 31x31'):
        model.forward_intermediates(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt='NHWC')


def test_cli_info(capsys):
    assert main(['info', 'conv2former_n', 'conv2former_is', '--json']) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]['name'] == 'conv2former_n' and rows[0]['params'] == 14992840
    assert [f['reduction'] for f in rows[0]['features']] == [4, 8, 16, 32]
    assert rows[1]['features'] == [dict(reduction=16, num_chs=384)]
    assert main(['info', 'resnet_nope']) == 2
    assert "unknown model 'resnet_nope'" in capsys.readouterr().err
