"""Each ablation option (paper Fig. 4, Table 6, and the paper-text variants) does what it says."""
import pytest
import timm
import torch
import torch.nn.functional as F

from conv2former import Conv2Former
from conv2former.models.layers import ConvModulation

TINY = dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_classes=10)


def _modulation_parts(mod: ConvModulation, x):
    a = mod.dwconv(mod.a_act(mod.a_proj(x)))
    return a, mod.v_proj(x)


def test_mul_is_the_hadamard_formula():
    mod = ConvModulation(8, kernel_size=5).eval()
    x = torch.randn(2, 8, 9, 9)
    a, v = _modulation_parts(mod, x)
    torch.testing.assert_close(mod(x), mod.proj(a * v))
    assert torch.equal(a, mod.dwconv(F.gelu(mod.a_proj(x))))


def test_sum_differs_from_mul_with_the_same_weights():
    mul = timm.create_model('conv2former_n', depths=(1, 1, 1, 1), ls_init_value=1.0).eval()
    add = timm.create_model('conv2former_n', depths=(1, 1, 1, 1), ls_init_value=1.0, fusion='sum').eval()
    add.load_state_dict(mul.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(mul(x), add(x), atol=1e-4)
    mod = add.stages[0].blocks[0].attn
    h = torch.randn(1, mod.proj.in_channels, 8, 8)
    a, v = _modulation_parts(mod, h)
    torch.testing.assert_close(mod(h), mod.proj(a + v))


@pytest.mark.parametrize('weighting,low,high', [('sigmoid', 0.0, 1.0), ('minmax', 0.0, 1.0)])
def test_positive_weightings_keep_a_in_range(weighting, low, high):
    mod = ConvModulation(8, kernel_size=7, weighting=weighting)
    a = mod.modulation(torch.randn(3, 8, 12, 12) * 5)
    assert a.min() > low and a.max() <= high
    if weighting == 'minmax':  # rescaled into (0, 1]: the maximum of every map is exactly 1
        torch.testing.assert_close(a.amax(dim=(2, 3)), torch.ones(3, 8))


def test_l1_weighting_normalises_each_map():
    mod = ConvModulation(8, kernel_size=7, weighting='l1')
    a = mod.modulation(torch.randn(2, 8, 10, 10))
    torch.testing.assert_close(a.abs().mean(dim=(2, 3)), torch.ones(2, 8), atol=1e-4, rtol=1e-4)


def test_weighting_none_is_raw_a():
    mod = ConvModulation(8, kernel_size=7)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(mod.modulation(x), _modulation_parts(mod, x)[0])


def test_attn_act_off_is_the_paper_formula():
    mod = ConvModulation(8, kernel_size=3, attn_act=False)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(mod(x), mod.proj(mod.dwconv(mod.a_proj(x)) * mod.v_proj(x)))
    on = Conv2Former(**TINY)
    off = Conv2Former(**TINY, attn_act=False)
    off.load_state_dict(on.state_dict())
    for m in (on, off):
        for blk in m.modules():
            if hasattr(blk, 'gamma'):
                blk.gamma.data.fill_(1.0)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(on.eval()(x), off.eval()(x), atol=1e-4)


def test_mlp_dwconv_off_removes_the_positional_conv():
    on, off = Conv2Former(**TINY), Conv2Former(**TINY, mlp_dwconv=False)
    hidden = [4 * d for d in TINY['dims']]
    removed = sum(h * 9 + h for h in hidden)  # one 3x3 depthwise conv (+ bias) per block
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on) - count(off) == removed
    assert off.stages[0].blocks[0].mlp.dwconv is None


def test_kernel_size_per_stage():
    model = Conv2Former(**TINY, kernel_size=(3, 5, 21, 31))
    assert [s.blocks[0].attn.dwconv.kernel_size[0] for s in model.stages] == [3, 5, 21, 31]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)  # 31x31 kernel on a 2x2 map works ("same" padding)
    model = timm.create_model('conv2former_t', kernel_size=21, device='meta')
    assert model.stages[2].blocks[0].attn.dwconv.weight.shape == (288, 1, 21, 21)


def test_patch_stem_and_norm_head():
    model = timm.create_model('conv2former_t', stem='patch', head='norm', depths=(1, 1, 1, 1)).eval()
    assert model.stem[0].kernel_size == (4, 4) and model.stem[0].stride == (4, 4)
    assert model.head_hidden_size == model.num_features == 576
    assert isinstance(model.head.conv, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 576)
    iso = timm.create_model('conv2former_is', stem='conv3', head='conv', depth=1)
    assert [m.stride[0] for m in iso.stem if isinstance(m, torch.nn.Conv2d)] == [2, 2, 4]
    assert iso.head_hidden_size == 1280 and iso(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_mlp_ratio_ls_init_drop_rate():
    model = timm.create_model('conv2former_n', mlp_ratio=2, ls_init_value=0.5, drop_rate=0.3, depths=(1, 1, 1, 1))
    blk = model.stages[1].blocks[0]
    assert blk.mlp.fc1.out_channels == 2 * 128
    assert torch.all(blk.ls1.gamma == 0.5) and torch.all(blk.ls2.gamma == 0.5)
    assert model.head.drop.p == 0.3
    no_ls = Conv2Former(**TINY, ls_init_value=None)
    assert not any('gamma' in n for n, _ in no_ls.named_parameters())


def test_drop_path_ramps_linearly_and_is_stochastic_only_in_training():
    model = timm.create_model('conv2former_n', drop_path_rate=0.3, ls_init_value=1.0)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.0
             for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    assert len(rates) == 14
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(y1, model(x))


@pytest.mark.parametrize('kwargs,match', [
    (dict(fusion='add'), "fusion must be one of"),
    (dict(weighting='softmax'), "weighting must be one of"),
    (dict(stem='conv4'), "stem must be one of"),
    (dict(head='mlp'), "head must be one of"),
    (dict(kernel_size=8), "odd int in \\[3, 31\\]"),
    (dict(kernel_size=33), "got 33"),
    (dict(kernel_size=1), "got 1"),
    (dict(kernel_size=7.0), "got 7.0"),
    (dict(kernel_size=(7, 7, 7)), "one value per stage \\(4\\), got 3"),
    (dict(dims=(8, 16)), "one entry per stage"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('conv2former_n', **dict(dict(depths=(1, 1, 1, 1)), **kwargs))
