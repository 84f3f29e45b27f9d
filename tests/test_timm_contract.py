"""The timm model contract (mirrors timm's tests/test_models.py) for every registered Conv2Former."""
import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from conftest import ALL_MODELS, HIERARCHICAL, ISOTROPIC, tiny_kwargs

SIZE = 64


def _create(name, **kwargs):
    return timm.create_model(name, **dict(tiny_kwargs(name), **kwargs)).eval()


EXPECTED_TAGS = dict(conv2former_n='in1k', conv2former_t='in1k', conv2former_s='in1k', conv2former_b='in1k',
                     conv2former_b_22k='in22k_ft_in1k', conv2former_l='in22k_ft_in1k',
                     conv2former_is='untrained', conv2former_ib='untrained')


@pytest.mark.parametrize('name', ALL_MODELS)
def test_registered_with_its_pretrained_cfg(name):
    assert name in timm.list_models('conv2former*')
    cfg = timm.get_pretrained_cfg(name)
    assert (cfg.architecture, cfg.tag) == (name, EXPECTED_TAGS[name])
    assert cfg.first_conv == 'stem.0' and cfg.classifier == 'head.fc'
    assert timm.models.get_arch_name(f'{name}.{cfg.tag}') == name


def test_registry_lists_exactly_the_family():
    assert set(timm.list_models('conv2former*')) == set(ALL_MODELS) == set(EXPECTED_TAGS)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_default_cfg_and_shapes_at_input_size(name):
    """Full-size models on meta: pool_size, num_features, head_hidden_size, first_conv/classifier names."""
    model = timm.create_model(name, device='meta').eval()
    cfg = model.pretrained_cfg
    assert all(p.device.type == 'meta' for p in model.parameters())
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict
    assert cfg['classifier'] + '.weight' in state_dict
    assert model.get_classifier() is model.head.fc
    x = torch.empty(2, *cfg['input_size'], device='meta')
    feat = model.forward_features(x)
    assert feat.shape[1] == model.num_features
    assert tuple(feat.shape[-2:]) == tuple(cfg['pool_size'])
    assert model.forward_head(feat, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model(x).shape == (2, cfg['num_classes'])


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_backward_and_grads(name):
    model = _create(name, num_classes=7).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad}'


@pytest.mark.parametrize('name', ALL_MODELS)
def test_reset_classifier_and_no_pool(name):
    model = _create(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, '')
    assert model(x).ndim == 4
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (1, 5)
    model = _create(name, num_classes=0, global_pool='')
    out = model(x)
    assert out.ndim == 4 and out.shape[-2:] == model.forward_features(x).shape[-2:]


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_intermediates(name):
    model = _create(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == len(model.feature_info)
    for t, info in zip(inter, model.feature_info):
        assert t.shape[1] == info['num_chs']
        assert t.shape[-1] == SIZE // info['reduction']
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(last2) == 2
    torch.testing.assert_close(last2[-1], inter[-1])
    first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(first[0], inter[0])
    neg = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    torch.testing.assert_close(neg[0], inter[-1])


@pytest.mark.parametrize('name', HIERARCHICAL)
def test_prune_intermediate_layers(name):
    model = _create(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    full = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2
    pruned = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(pruned, full[:2]):
        torch.testing.assert_close(a, b)
    out = model(x)  # the head goes with the pruned stages: forward now ends at stage 1
    torch.testing.assert_close(out, full[1])


@pytest.mark.parametrize('name', HIERARCHICAL)
def test_features_only(name):
    model = _create(name)
    feat_model = timm.create_model(
        name, features_only=True, out_indices=(1, 2, 3), pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=model.state_dict()), **tiny_kwargs(name)).eval()
    assert feat_model.feature_info.reduction() == [8, 16, 32]
    assert feat_model.feature_info.channels() == [model.feature_info[i]['num_chs'] for i in (1, 2, 3)]
    x = torch.randn(1, 3, 96, 96)
    feats = feat_model(x)
    ref = model.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r)


@pytest.mark.parametrize('name', ISOTROPIC)
def test_features_only_isotropic(name):
    model = timm.create_model(name, features_only=True, out_indices=(0, 1), **tiny_kwargs(name)).eval()
    assert model.feature_info.reduction() == [16, 16]
    feats = model(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[-1] for f in feats] == [SIZE // 16] * 2


@pytest.mark.parametrize('name', ALL_MODELS)
def test_grad_checkpointing_matches(name):
    model = _create(name).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():  # float32 sums in another order: tolerance relative to the largest grad
        scale = grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=n)


@pytest.mark.parametrize('name', ['conv2former_t', 'conv2former_is'])
def test_group_matcher_layer_decay(name):
    model = _create(name)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    param_name = {id(p): n for n, p in model.named_parameters()}
    names = [param_name[id(p)] for g in groups for p in g['params']]
    assert sorted(names) == sorted(param_name.values())
    scale = {param_name[id(p)]: g['lr_scale'] for g in groups for p in g['params']}
    assert scale['stem.0.weight'] < scale[next(n for n in names if '.blocks.' in n or n.startswith('blocks.'))]
    assert scale['head.fc.weight'] == scale['head.norm.weight'] == 1.0  # head layers train at the full lr
    assert model.no_weight_decay() == set()
    assert model.group_matcher(coarse=True)['stem'] == r'^stem'


@pytest.mark.parametrize('name', ALL_MODELS)
def test_torch_compile_fullgraph(name):
    """No graph breaks (dynamo's eager backend traces the full graph; inductor is covered by the slow test)."""
    model = _create(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor():
    model = _create('conv2former_n')
    x = torch.randn(1, 3, SIZE, SIZE)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_torch_export(name):
    model = _create(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize('name', ['conv2former_n', 'conv2former_is'])
def test_channels_last_and_reset_on_meta(name):
    model = _create(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)
    meta = timm.create_model(name, device='meta')
    meta.reset_classifier(3)
    assert meta.get_classifier().weight.device.type == 'meta' and meta.get_classifier().out_features == 3


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans(in_chans):
    model = _create('conv2former_n', in_chans=in_chans)
    assert model.stem[0].weight.shape[1] == in_chans
    assert model(torch.randn(1, in_chans, SIZE, SIZE)).shape == (1, 1000)


@pytest.mark.parametrize('size,expected', [((31, 31), (1, 1)), ((65, 97), (2, 3)), ((100, 33), (3, 1))])
def test_any_size_floors_like_upstream(size, expected):
    model = _create('conv2former_n', num_classes=0, global_pool='')
    out = model.forward_features(torch.randn(1, 3, *size))
    assert tuple(out.shape[-2:]) == expected  # ceil(H/2) // 2 // 8, as upstream's stride-2 convs floor


def test_fx_feature_extraction():
    """Shape checks are registered as FX leaves, so timm's FX feature extractor traces the model."""
    model = timm.create_model('conv2former_n', features_only=True, feature_cls='fx', **tiny_kwargs('conv2former_n'))
    feats = model(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
