"""UperNet segmenters on Conv2Former backbones (smp tu- encoders); whole, slide, multi-scale and flip inference."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import HIERARCHICAL, tiny_kwargs
from conv2former.fileio import write_model_folder
from conv2former.models import MODEL_CONFIGS
from conv2former.tasks.segmentation.model import backbone_of, build_segmenter, predict_segmentation, sliding_windows

TINY_N = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))


def _classifier_key(feature_key: str) -> str:
    """FeatureListNet name → the classifier's ('stages_2.blocks.0.x' → 'stages.2.blocks.0.x')."""
    return feature_key.replace('stages_', 'stages.', 1).replace('stem_', 'stem.', 1)


# ---------------------------------------------------------------------------------------------------------------
# build_segmenter


@pytest.mark.parametrize('name', HIERARCHICAL)
def test_every_hierarchical_variant_segments(name):
    model = build_segmenter(name, num_classes=5, decoder_channels=32, **tiny_kwargs(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 5, 64, 96)
    body = backbone_of(model)
    assert body.feature_info.reduction() == [4, 8, 16, 32]
    assert body.feature_info.channels() == list(MODEL_CONFIGS[name][0])


def test_convnext_backbone_builds():
    model = build_segmenter('convnext_nano', num_classes=4, decoder_channels=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)
    names = [n for n, _ in backbone_of(model).named_parameters()]
    assert names[0] == 'stem_0.weight' and 'stages_0.blocks.0.gamma' in names


def test_backbone_parameter_names_and_keywords_reach_timm():
    model = build_segmenter('conv2former_n', num_classes=3, decoder_channels=16, kernel_size=5, **TINY_N)
    body = backbone_of(model)
    names = [n for n, _ in body.named_parameters()]
    assert names[:2] == ['stem.0.weight', 'stem.2.weight']
    assert 'stages_0.blocks.0.norm1.weight' in names and 'stages_3.downsample.1.weight' in names
    assert not any(n.startswith('head') for n in names)
    assert body.stages_1.blocks[0].attn.dwconv.weight.shape[-2:] == (5, 5)
    assert all(n.startswith('encoder.model.') for n, p in model.named_parameters()
               if any(p is q for q in body.parameters()))


def test_backbone_of_rejects_other_models():
    with pytest.raises(ValueError, match='build_segmenter'):
        backbone_of(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(backbone='conv2former_is', depth=2), ValueError, 'hierarchical backbone'),
    (dict(backbone='conv2former_ib'), ValueError, 'hierarchical backbone'),
    (dict(backbone='conv2former_t', depths=(1, 1, 1), dims=(8, 16, 32)), ValueError, 'hierarchical backbone'),
    (dict(backbone='resnet_nope'), ValueError, "unknown backbone 'resnet_nope'; registered Conv2Former models: .*_n"),
    (dict(backbone='conv2former_n', num_classes=0), ValueError, 'num_classes must be an integer >= 1'),
    (dict(backbone='conv2former_n', decoder_channels=0), ValueError, 'decoder_channels'),
    (dict(backbone='conv2former_n', pretrained_backbone='/nonexistent/cls.safetensors'), FileNotFoundError,
     'nonexistent'),
])
def test_bad_segmenter_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_segmenter(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# pretrained backbones


def test_encoder_takes_the_classifier_weights_from_a_model_folder(tmp_path):
    cls = timm.create_model('conv2former_n', num_classes=4, **TINY_N).eval()
    folder = write_model_folder(cls, tmp_path / 'cls', model_args=dict(TINY_N), label_names=['a', 'b', 'c', 'd'])
    model = build_segmenter('conv2former_n', num_classes=3, pretrained_backbone=folder, decoder_channels=16, **TINY_N)
    body = backbone_of(model).eval()
    torch.testing.assert_close(body.stages_2.blocks[0].attn.dwconv.weight, cls.stages[2].blocks[0].attn.dwconv.weight)
    expected = cls.state_dict()
    for key, value in body.state_dict().items():  # every encoder tensor, not just one
        assert torch.equal(value, expected[_classifier_key(key)]), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(body(x), cls.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want)


def test_weights_that_do_not_fit_fail_loudly(tmp_path):
    cls = timm.create_model('conv2former_n', num_classes=4, **TINY_N)
    folder = write_model_folder(cls, tmp_path / 'cls', model_args=dict(TINY_N))
    with pytest.raises(ValueError, match=r'(?s)does not fit the backbone conv2former_n.*missing from the checkpoint'):
        build_segmenter('conv2former_n', pretrained_backbone=folder, depths=(1, 1, 2, 1), dims=TINY_N['dims'])
    with pytest.raises(ValueError, match='holds a conv2former_n model, not the backbone conv2former_t'):
        build_segmenter('conv2former_t', pretrained_backbone=folder, **TINY_N)


def test_convnext_weights_load_strictly_without_the_classifier(tmp_path):
    cls = timm.create_model('convnext_nano', num_classes=7)
    weights = cls.state_dict()
    save_file(weights, str(tmp_path / 'convnext.safetensors'))
    model = build_segmenter('convnext_nano', num_classes=3, pretrained_backbone=tmp_path / 'convnext.safetensors',
                            decoder_channels=16)
    for key, value in backbone_of(model).state_dict().items():
        assert torch.equal(value, weights[_classifier_key(key)]), key
    save_file(dict(weights, extra=torch.zeros(2)), str(tmp_path / 'extra.safetensors'))
    with pytest.raises(ValueError, match=r'(?s)extra.safetensors does not fit.*Unexpected key.*extra'):
        build_segmenter('convnext_nano', pretrained_backbone=tmp_path / 'extra.safetensors', decoder_channels=16)
    weights.pop('stages.1.blocks.0.gamma')
    save_file(weights, str(tmp_path / 'missing.safetensors'))
    with pytest.raises(ValueError, match=r'(?s)Missing key.*stages\.1\.blocks\.0\.gamma'):
        build_segmenter('convnext_nano', pretrained_backbone=tmp_path / 'missing.safetensors', decoder_channels=16)


def test_upstream_checkpoint_feeds_the_encoder(tmp_path, fixtures_dir, fixture_config):
    upstream = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    torch.save({'state_dict': upstream}, tmp_path / 'upstream.pth')
    arch = {k: v for k, v in fixture_config.items() if k != 'num_classes'}
    model = build_segmenter('conv2former_n', num_classes=2, pretrained_backbone=tmp_path / 'upstream.pth',
                            decoder_channels=16, **arch)
    body = backbone_of(model)
    torch.testing.assert_close(body.stem[0].weight, upstream['downsample_layers.0.0.weight'])
    torch.testing.assert_close(body.stages_2.blocks[1].attn.dwconv.weight, upstream['stages.2.1.attn.att.2.weight'])


# ---------------------------------------------------------------------------------------------------------------
# training


def test_a_few_adamw_steps_lower_the_loss():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64) * 0.1
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    for i, (y, x) in enumerate([(8, 12), (30, 20)]):
        images[i, :, y:y + 24, x:x + 24] += 2.0  # a bright square of class 1 on class-0 background
        masks[i, y:y + 24, x:x + 24] = 1
    masks[:, :, :2] = 255  # ignored border
    model = build_segmenter('conv2former_n', num_classes=2, decoder_channels=32, **TINY_N).train()
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------------
# predict_segmentation


class _Stub(nn.Module):
    """A k x k conv (k=1: each pixel's logits depend on that pixel only) that records its input sizes and mode."""

    def __init__(self, num_classes: int = 3, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, kernel_size, padding=kernel_size // 2)
        self.calls = []

    def forward(self, x):
        self.calls.append((tuple(x.shape[-2:]), self.training))
        return self.conv(x)


def test_whole_mode_pads_runs_and_softmaxes():
    stub = _Stub()
    x = torch.randn(2, 3, 40, 50)
    probs = predict_segmentation(stub, x, 3)
    assert stub.calls == [((64, 64), False)]  # padded right/bottom to multiples of 32
    torch.testing.assert_close(probs, stub.conv(x).softmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 40, 50))


def test_sliding_windows_hand_computed():
    # rows: ceil((100-64)/32)+1 = 3 windows, the last moved back to end at 100; cols: ceil(6/32)+1 = 2
    assert sliding_windows(100, 70, 64, 32) == [
        (0, 64, 0, 64), (0, 64, 6, 70), (32, 96, 0, 64), (32, 96, 6, 70), (36, 100, 0, 64), (36, 100, 6, 70)]
    assert sliding_windows(96, 64, (64, 64), (32, 40)) == [(0, 64, 0, 64), (32, 96, 0, 64)]
    assert sliding_windows(20, 30, 64, 32) == [(0, 20, 0, 30)]  # smaller than the crop: one cut window


def test_slide_averages_windows_to_the_whole_image_result():
    stub = _Stub()
    x = torch.randn(1, 3, 70, 90)
    whole = predict_segmentation(stub, x, 3)
    stub.calls.clear()
    slide = predict_segmentation(stub, x, 3, mode='slide', crop_size=(32, 48), stride=(16, 24))
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    windows = sliding_windows(70, 90, (32, 48), (16, 24))
    assert len(windows) == 4 * 3 and len(stub.calls) == len(windows)
    assert {shape for shape, _ in stub.calls} == {(32, 64)}  # 48 wide windows padded to 64


def test_slide_with_a_crop_covering_the_image_equals_whole():
    model = build_segmenter('conv2former_n', num_classes=4, decoder_channels=16, **TINY_N)
    x = torch.randn(1, 3, 70, 90)
    whole = predict_segmentation(model, x, 4)
    slide = predict_segmentation(model, x, 4, mode='slide', crop_size=128, stride=96)
    assert whole.shape == (1, 4, 70, 90)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_flip_averages_the_plain_and_mirrored_passes(mode):
    stub = _Stub(kernel_size=3)  # not mirror-symmetric
    x = torch.randn(2, 3, 48, 60)
    kw = dict(mode=mode, crop_size=32, stride=16)
    plain = predict_segmentation(stub, x, 3, **kw)
    mirrored = predict_segmentation(stub, x.flip(-1), 3, **kw).flip(-1)
    both = predict_segmentation(stub, x, 3, flip=True, **kw)
    torch.testing.assert_close(both, (plain + mirrored) / 2)
    assert not torch.allclose(both, plain, atol=1e-3)


def test_scales_resize_and_average_back_at_the_input_size():
    stub = _Stub(kernel_size=3)
    x = torch.randn(1, 3, 40, 50)
    half = predict_segmentation(stub, x, 3, scales=(0.5,))
    bigger = predict_segmentation(stub, x, 3, scales=(1.5,))
    stub.calls.clear()
    both = predict_segmentation(stub, x, 3, scales=(0.5, 1.5))
    assert [shape for shape, _ in stub.calls] == [(32, 32), (64, 96)]  # 20x25 and 60x75, padded
    assert half.shape == bigger.shape == both.shape == (1, 3, 40, 50)
    torch.testing.assert_close(both, (half + bigger) / 2)
    assert not torch.allclose(half, predict_segmentation(stub, x, 3), atol=1e-3)


def test_train_eval_state_is_restored():
    stub = _Stub().train()
    predict_segmentation(stub, torch.randn(1, 3, 32, 32), 3, mode='slide', crop_size=16, stride=8, flip=True)
    assert stub.training and stub.calls and not any(training for _, training in stub.calls)
    stub.eval()
    predict_segmentation(stub, torch.randn(1, 3, 32, 32), 3)
    assert not stub.training


@pytest.mark.parametrize('kwargs,match', [
    (dict(mode='tiles'), "mode must be one of"),
    (dict(mode='slide', crop_size=(32, 32), stride=(16, 40)), 'must not exceed crop_size'),
    (dict(scales=(1.0, 0.0)), 'positive numbers'),
    (dict(scales=()), 'positive numbers'),
    (dict(crop_size=(32, -1)), 'crop_size must be'),
    (dict(size_divisor=0), 'size_divisor'),
    (dict(num_classes=4), r'the model returns \(1, 3, 32, 32\), expected logits \(N, 4, H, W\)'),
])
def test_bad_prediction_arguments(kwargs, match):
    kwargs = dict(dict(num_classes=3), **kwargs)
    with pytest.raises(ValueError, match=match):
        predict_segmentation(_Stub(), torch.randn(1, 3, 32, 32), **kwargs)
    with pytest.raises(ValueError, match=r'images must be a tensor \[N, C, H, W\], got \(3, 32, 32\)'):
        predict_segmentation(_Stub(), torch.randn(3, 32, 32), 3)
