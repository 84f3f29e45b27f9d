"""`conv2former analyze`: ERF maths on known receptive fields, area ratios, the four commands end to end, bad input."""
import json
from statistics import NormalDist

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from conv2former.analysis.common import StageOutput
from conv2former.analysis.erf import area_ratios, centre_gradient
from conv2former.cli import main

TINY = ['--model', 'conv2former_n', '--model-kwargs', 'dims=[8,16,16,16]', '--model-kwargs', 'depths=[1,1,1,1]',
        '--model-kwargs', 'num_classes=3', '--no-progress']


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Three small RGB images on disk."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = folder / f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------------------ known receptive fields
class DepthwiseNet(nn.Module):
    """One depthwise k x k conv: its receptive field is exactly k x k."""

    def __init__(self, k: int, ones: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, k, padding=k // 2, groups=3)
        if ones:
            nn.init.ones_(self.conv.weight)
            nn.init.constant_(self.conv.bias, 1e3)  # every output positive: the ReLU passes everything
        self.feature_info = [dict(num_chs=3, reduction=1, module='conv')]

    def forward(self, x):
        return self.conv(x)


def _support(erf: np.ndarray) -> tuple[int, int]:
    """Height and width of the bounding box of the non-zero pixels."""
    ys, xs = np.nonzero(erf)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize('k', [3, 7, 11])
def test_depthwise_erf_is_its_kernel(k):
    net = DepthwiseNet(k).eval()
    erf = centre_gradient(StageOutput(net, 'conv'), torch.randn(4, 3, 31, 31)).numpy()
    assert erf.shape == (31, 31)
    h, w = _support(erf)
    assert h <= k and w <= k
    assert erf[:15 - k // 2].sum() == 0 and erf[15 + k // 2 + 1:].sum() == 0  # nothing outside the centred k x k
    ratios, sides = area_ratios(erf)
    assert sides['0.99'] <= k


def test_depthwise_erf_grows_with_kernel():
    sides = []
    for k in (3, 7, 11):
        erf = centre_gradient(StageOutput(DepthwiseNet(k, ones=True).eval(), 'conv'), torch.randn(2, 3, 31, 31))
        assert torch.count_nonzero(erf) == k * k  # uniform over exactly the kernel
        sides.append(area_ratios(erf.numpy())[1]['0.99'])
    assert sides == [3, 7, 11]


def _conv2former_stage0_rf(k: int) -> int:
    """Theoretical receptive field of stage 0 of a one-block Conv2Former (conv3 stem, kernel k, MLP dwconv 3)."""
    rf, jump = 1, 1
    for kernel, stride in [(3, 2), (3, 1), (2, 2), (k, 1), (3, 1)]:  # stem convs, modulation dwconv, MLP dwconv
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


def erf_map_tensor(model, x):
    """ERF of stage 0 for a batch of input tensors."""
    return centre_gradient(StageOutput(model, model.feature_info[0]['module']), x).numpy()


def test_conv2former_erf_inside_theoretical_field_and_grows_with_kernel():
    extents = {}
    for k in (3, 7):
        model = timm.create_model('conv2former_n', dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], kernel_size=k,
                                  ls_init_value=None, num_classes=0).eval()
        erf = erf_map_tensor(model, torch.randn(2, 3, 96, 96))
        extents[k] = max(_support(erf))
        assert extents[k] <= _conv2former_stage0_rf(k)
    # the k=7 model reaches pixels that no k=3 model can
    assert _conv2former_stage0_rf(3) < extents[7]


# ------------------------------------------------------------------------------------------------------ area ratios
def test_area_ratio_delta():
    m = np.zeros((65, 65))
    m[32, 32] = 1.0
    ratios, sides = area_ratios(m)
    assert all(s == 1 for s in sides.values())
    assert all(r == pytest.approx(1 / 65 ** 2) for r in ratios.values())
    m = np.zeros((65, 65))
    m[32 + 5, 32] = 1.0  # off-centre by 5 pixels: the square must reach it
    assert set(area_ratios(m)[1].values()) == {11}


def test_area_ratio_uniform():
    n = 101
    ratios, sides = area_ratios(np.ones((n, n)))
    for t in ('0.2', '0.3', '0.5', '0.99'):
        side = next(s for s in range(1, n + 1, 2) if s * s >= float(t) * n * n)
        assert sides[t] == side
        assert ratios[t] == pytest.approx(side * side / n ** 2)
        assert float(t) <= ratios[t] < float(t) + 4 * n / n ** 2


def test_area_ratio_gaussian():
    n, sigma = 201, 8.0
    y, x = np.mgrid[:n, :n] - n // 2
    ratios, sides = area_ratios(np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)))
    for t in (0.2, 0.3, 0.5, 0.99):
        # a centred square of half-width a holds erf(a / (sigma sqrt 2))^2 of an isotropic Gaussian
        a = sigma * NormalDist().inv_cdf((1 + t ** 0.5) / 2)
        assert abs(sides[str(t)] - 2 * a) <= 2
        assert ratios[str(t)] == pytest.approx(sides[str(t)] ** 2 / n ** 2)


def test_area_ratio_bad_maps():
    with pytest.raises(ValueError, match='all zeros'):
        area_ratios(np.zeros((5, 5)))
    with pytest.raises(ValueError, match='non-negative'):
        area_ratios(-np.ones((5, 5)))
    with pytest.raises(ValueError, match='2-D'):
        area_ratios(np.ones(5))


# ------------------------------------------------------------------------------------------------ commands end to end
def test_erf_and_compare_commands(tmp_path, images):
    runs = []
    for k in (3, 7):
        out = tmp_path / f'k{k}'
        rc = main(['analyze', 'erf', *images[:2], *TINY, '--model-kwargs', f'kernel_size={k}', '--img-size', '64',
                   '--stage', '1', '--output', str(out)])
        assert rc == 0
        result = json.loads((out / 'erf.json').read_text())
        assert result['model'] == 'conv2former_n' and result['img_size'] == 64 and result['num_images'] == 2
        assert result['stage'] == 1 and result['checkpoint'] is None
        ratios = [result['area_ratio'][t] for t in ('0.2', '0.3', '0.5', '0.99')]
        assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] <= 1
        assert np.load(out / 'erf.npy').shape == (64, 64)
        assert (out / 'erf.png').stat().st_size > 0
        runs.append(str(out))
    rc = main(['analyze', 'erf-compare', *runs, '--labels', 'k3', 'k7', '--output', str(tmp_path / 'cmp')])
    assert rc == 0
    table = (tmp_path / 'cmp' / 'erf_compare.md').read_text()
    assert '| k3 | conv2former_n | 1 | 64 | 2 |' in table and '| k7 |' in table
    assert (tmp_path / 'cmp' / 'erf_compare.png').stat().st_size > 0


def test_erf_command_timm_model_on_bundled_data(tmp_path):
    rc = main(['analyze', 'erf', '--model', 'convnext_atto', '--model-kwargs', 'num_classes=3', '--img-size', '64',
               '--num-images', '2', '--no-progress', '--output', str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / 'erf.json').read_text())
    assert result['model'] == 'convnext_atto' and result['stage'] == 3 and result['data'] == 'bundled'


def test_erf_command_reads_a_model_folder(tmp_path, images):
    from conv2former.fileio import write_model_folder
    kwargs = dict(dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_classes=2)
    model = timm.create_model('conv2former_n', **kwargs)
    folder = write_model_folder(model, tmp_path / 'model', model_args=kwargs, label_names=['cat', 'dog'])
    rc = main(['analyze', 'erf', images[0], '--checkpoint', str(folder), '--img-size', '32', '--no-progress',
               '--output', str(tmp_path / 'erf')])
    assert rc == 0
    assert json.loads((tmp_path / 'erf' / 'erf.json').read_text())['checkpoint'] == str(folder)


def test_maps_command(tmp_path, images):
    rc = main(['analyze', 'maps', *images[:2], *TINY, '--img-size', '64', '--blocks', '0.0', '3', '--top-channels',
               '2', '--output', str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / 'maps.json').read_text())
    assert result['blocks'] == ['stages.0.blocks.0', 'stages.3.blocks.0']
    assert len(result['images']) == 2
    first = result['images'][0]['blocks']
    assert first[0]['shape'] == [8, 16, 16] and first[1]['shape'] == [16, 2, 2]
    strengths = [c['mean_abs'] for c in first[0]['top_channels']]
    assert len(strengths) == 2 and strengths == sorted(strengths, reverse=True)
    assert (tmp_path / 'maps.png').stat().st_size > 0


def test_cam_command(tmp_path, images):
    pytest.importorskip('pytorch_grad_cam')
    rc = main(['analyze', 'cam', *images, *TINY, '--img-size', '64', '--methods', 'gradcam', 'gradcam++',
               'eigencam', '--target-class', '1', '--output', str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / 'cam.json').read_text())
    assert result['stage'] == 3 and len(result['images']) == 3
    for entry in result['images']:
        assert entry['target']['index'] == 1
        assert set(entry['cams']) == {'gradcam', 'gradcam++', 'eigencam'}
        for stats in entry['cams'].values():
            assert all(0 <= v <= 1 for v in stats['peak_yx']) and 0 <= stats['area_above_half'] <= 1
    assert (tmp_path / 'cam.png').stat().st_size > 0


# ----------------------------------------------------------------------------------------------------- bad input
def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'conv2former: error:' in err and message in err, err


def test_bad_inputs(tmp_path, images, capsys):
    out = ['--output', str(tmp_path / 'out')]
    iso = ['--model', 'conv2former_is', '--model-kwargs', 'depth=2', '--model-kwargs', 'dim=16', '--no-progress']
    _fails(capsys, ['analyze', 'erf', images[0], *iso, '--stage', '0', '--img-size', '32', *out], 'non-hierarchical')
    _fails(capsys, ['analyze', 'cam', images[0], *iso, '--stage', '1', *out], 'non-hierarchical')
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image at all')
    _fails(capsys, ['analyze', 'erf', str(bad), *TINY, '--img-size', '32', *out], 'cannot read image')
    _fails(capsys, ['analyze', 'maps', str(tmp_path / 'missing.png'), *TINY, *out], 'does not exist')
    _fails(capsys, ['analyze', 'erf', images[0], *TINY, '--stage', '4', '--img-size', '32', *out], 'out of range')
    _fails(capsys, ['analyze', 'erf', images[0], *TINY, '--img-size', '16', *out], 'below the smallest input')
    _fails(capsys, ['analyze', 'maps', images[0], '--model', 'convnext_atto', '--no-progress', *out],
           'no convolutional modulation')
    _fails(capsys, ['analyze', 'maps', images[0], *TINY, '--blocks', '1.5', *out], 'out of range')
    _fails(capsys, ['analyze', 'cam', images[0], *TINY, '--target-class', '7', *out], 'out of range')
    _fails(capsys, ['analyze', 'erf-compare', str(tmp_path), *out], 'erf.json')
    _fails(capsys, ['analyze', 'erf', images[0], '--img-size', '32', *out], '--model')


def test_select_images_spreads_over_classes():
    from conv2former.analysis.common import select_images
    paths = select_images(None, None, 'val', 10)  # the bundled dataset: 10 classes
    assert len(paths) == 10 and len({p.parent.name for p in paths}) == 10


def test_block_selection_hierarchical_and_isotropic():
    from conv2former.analysis.maps import modulation_blocks, select_blocks
    model = timm.create_model('conv2former_n', dims=[8, 16, 16, 16], depths=[1, 2, 1, 1], num_classes=0)
    blocks = modulation_blocks(model)
    assert [b.name for b in select_blocks(blocks, None)] == [
        'stages.0.blocks.0', 'stages.1.blocks.1', 'stages.2.blocks.0', 'stages.3.blocks.0']
    assert [b.tag for b in select_blocks(blocks, ['1.0', '-1', '1'])] == ['1.0', '3.0', '1.1']
    iso = timm.create_model('conv2former_is', depth=3, dim=16, num_classes=0)
    assert [b.name for b in select_blocks(modulation_blocks(iso), None)] == ['blocks.2']
    with pytest.raises(ValueError, match='STAGE.BLOCK'):
        select_blocks(blocks, ['a.b'])


def test_cam_command_reads_a_timm_model_folder(tmp_path, images):
    """A run/model folder of another timm model (e.g. ConvNeXt trained by `conv2former train`) loads too."""
    pytest.importorskip('pytorch_grad_cam')
    from conv2former.fileio import write_model_folder
    kwargs = dict(num_classes=2)
    model = timm.create_model('convnext_atto', **kwargs)
    write_model_folder(model, tmp_path / 'run' / 'best', model_args=kwargs, label_names=['cat', 'dog'])
    rc = main(['analyze', 'cam', images[0], '--checkpoint', str(tmp_path / 'run'), '--img-size', '32',
               '--target-class', 'dog', '--no-progress', '--output', str(tmp_path / 'cam')])
    assert rc == 0
    entry = json.loads((tmp_path / 'cam' / 'cam.json').read_text())['images'][0]
    assert entry['target'] == dict(index=1, label='dog') and entry['predicted']['label'] in ('cat', 'dog')


def test_cam_without_grad_cam_names_the_extra(monkeypatch, images, tmp_path, capsys):
    import sys
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)  # makes `import pytorch_grad_cam` fail
    _fails(capsys, ['analyze', 'cam', images[0], *TINY, '--output', str(tmp_path)], 'conv2former[analysis]')
