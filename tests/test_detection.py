"""Detectors on Conv2Former backbones: every hierarchical variant builds, trains (falling loss) and predicts."""
import pytest
import timm
import torch

from conftest import HIERARCHICAL, tiny_kwargs
from conv2former.tasks.detection import Conv2FormerFPN, build_detector

SMALL = dict(min_size=64, max_size=96)


def _toy_batch(n=2, size=80, with_masks=True):
    """Images with one bright box each, and its target (box, label 1, mask)."""
    images, targets = [], []
    for i in range(n):
        img = torch.rand(3, size, size) * 0.2
        x0, y0 = 10 + 8 * i, 14 + 4 * i
        img[:, y0:y0 + 30, x0:x0 + 36] += 0.7
        target = dict(boxes=torch.tensor([[x0, y0, x0 + 36, y0 + 30]], dtype=torch.float32),
                      labels=torch.tensor([1]))
        if with_masks:
            mask = torch.zeros(1, size, size, dtype=torch.uint8)
            mask[0, y0:y0 + 30, x0:x0 + 36] = 1
            target['masks'] = mask
        images.append(img)
        targets.append(target)
    return images, targets


@pytest.mark.parametrize('name', HIERARCHICAL)
def test_fpn_on_every_hierarchical_variant(name):
    fpn = Conv2FormerFPN(name, out_channels=32, **tiny_kwargs(name)).eval()
    feats = fpn(torch.randn(1, 3, 128, 96))
    assert list(feats) == ['0', '1', '2', '3', 'pool']
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2)]
    assert all(f.shape[1] == 32 for f in feats.values())
    p37 = Conv2FormerFPN(name, out_channels=16, levels='p3-p7', **tiny_kwargs(name)).eval()
    assert list(p37(torch.randn(1, 3, 128, 128))) == ['0', '1', '2', 'p6', 'p7']


@pytest.mark.parametrize('detector', ['fasterrcnn', 'maskrcnn', 'retinanet', 'fcos'])
def test_detectors_train_with_falling_loss_and_predict(detector):
    torch.manual_seed(0)
    model = build_detector(detector, 'conv2former_n', num_classes=2, fpn_channels=32, **SMALL,
                           depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    images, targets = _toy_batch(with_masks=detector == 'maskrcnn')
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {'boxes', 'scores', 'labels'} <= set(out[0])
    if detector == 'maskrcnn':
        assert 'masks' in out[0]


def test_backbone_weights_come_from_a_classification_checkpoint(tmp_path):
    from safetensors.torch import save_file
    cls = timm.create_model('conv2former_n', num_classes=10, **tiny_kwargs('conv2former_n'))
    save_file(cls.state_dict(), str(tmp_path / 'cls.safetensors'))
    fpn = Conv2FormerFPN('conv2former_n', pretrained=tmp_path / 'cls.safetensors', **tiny_kwargs('conv2former_n'))
    torch.testing.assert_close(fpn.body.stages_2.blocks[0].attn.dwconv.weight,
                               cls.stages[2].blocks[0].attn.dwconv.weight)


@pytest.mark.parametrize('kwargs,match', [
    (dict(detector='yolo'), "detector must be one of"),
    (dict(detector='maskrcnn', backbone='conv2former_is'), 'not an isotropic one'),
    (dict(detector='maskrcnn', backbone='resnet_nope'), "unknown backbone 'resnet_nope'"),
])
def test_bad_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_detector(**kwargs)
