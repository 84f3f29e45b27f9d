"""The model reproduces the upstream implementation: fixture outputs, key layout, params and MACs."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import conv2former
from conv2former.info import count_macs

# upstream values (params, MACs at 224 from torch.utils.flop_counter / 2)
UPSTREAM = {
    'conv2former_n': (14.993e6, 2.330e9),
    'conv2former_t': (26.697e6, 4.361e9),
    'conv2former_s': (50.033e6, 8.708e9),
    'conv2former_b': (90.029e6, 15.890e9),
    'conv2former_b_22k': (88.785e6, 15.565e9),
    'conv2former_l': (198.894e6, 36.037e9),
}


def _fixture_model(fixtures_dir, fixture_config, **kwargs):
    model = conv2former.Conv2Former(**fixture_config, **kwargs).eval()
    state_dict = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    return model, state_dict


def test_fixture_logits_and_pre_logits(fixtures_dir, fixture_config):
    model, state_dict = _fixture_model(fixtures_dir, fixture_config)
    model.load_state_dict(conv2former.checkpoint_filter_fn(state_dict, model))
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    x = io['input'].float()
    with torch.no_grad():
        logits = model(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (logits - io['logits'].float()).abs().max() <= 1e-4
    assert (pre_logits - io['pre_logits'].float()).abs().max() <= 1e-4


def test_fixture_detects_a_missing_piece(fixtures_dir, fixture_config):
    """The exactness check has teeth: dropping the MLP's 3x3 DW conv moves the logits far beyond tolerance."""
    model, state_dict = _fixture_model(fixtures_dir, fixture_config, mlp_dwconv=False)
    state_dict = {k: v for k, v in state_dict.items() if '.mlp.pos.' not in k}
    model.load_state_dict(conv2former.checkpoint_filter_fn(state_dict, model))
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    with torch.no_grad():
        assert (model(io['input'].float()) - io['logits'].float()).abs().max() > 0.1


@pytest.mark.parametrize('name', list(UPSTREAM))
def test_every_upstream_key_maps_to_a_parameter_of_the_same_shape(fixtures_dir, name):
    upstream = json.loads((fixtures_dir / 'upstream_state_dict_keys.json').read_text())[name]
    model = timm.create_model(name, device='meta')
    fake = {k: torch.empty(shape, device='meta') for k, shape in upstream.items()}
    mapped = conv2former.checkpoint_filter_fn(fake, model)  # raises on any missing/unexpected/mis-shaped key
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    assert len(mapped) == len(upstream)


@pytest.mark.parametrize('name', list(UPSTREAM))
def test_params_and_macs_match_upstream(name):
    params, macs = UPSTREAM[name]
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    assert count_macs(model, 224) == pytest.approx(macs, rel=1e-3)


@pytest.mark.parametrize('name,low,high', [('conv2former_is', 22e6, 24e6), ('conv2former_ib', 80e6, 90e6)])
def test_isotropic_sizes(name, low, high):
    model = timm.create_model(name, device='meta')
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert len(model.blocks) == 18
