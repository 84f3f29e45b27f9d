"""Checkpoints: safetensors and upstream round-trips, timm's head/in_chans adaptation, clear refusals."""
import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import conv2former

TINY = dict(depths=(1, 1, 1, 1))


def _create_from_file(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_safetensors_round_trip(tmp_path):
    model = timm.create_model('conv2former_n', **TINY).eval()
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    loaded = _create_from_file('conv2former_n', path, **TINY)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize('suffix', ['.pth', '.pth.tar'])
@pytest.mark.parametrize('wrap', ['plain', 'timm_train', 'ddp', 'ema'])
def test_upstream_checkpoint_loads_through_create_model(tmp_path, fixtures_dir, fixture_config, suffix, wrap):
    upstream = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    if wrap == 'plain':
        ckpt = upstream
    elif wrap == 'timm_train':  # what upstream's timm-based train.py saves
        ckpt = {'epoch': 299, 'arch': 'conv2former_t', 'state_dict': upstream,
                'args': argparse.Namespace(model='conv2former_t', lr=1e-3), 'metric': 83.2}
    elif wrap == 'ddp':
        ckpt = {'model': {f'module.{k}': v for k, v in upstream.items()}}
    else:  # EMA weights are preferred, as timm does
        ckpt = {'state_dict': {k: torch.zeros_like(v) for k, v in upstream.items()}, 'state_dict_ema': upstream}
    path = tmp_path / f'upstream{suffix}'
    torch.save(ckpt, path)
    # the overlay's num_classes says the file has a 10-class head (timm re-initialises a head whose size differs)
    model = timm.create_model('conv2former_n', pretrained=True, **fixture_config,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() <= 1e-4


def test_filter_accepts_wrappers_directly(fixtures_dir, fixture_config):
    upstream = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    model = conv2former.Conv2Former(**fixture_config)
    plain = conv2former.checkpoint_filter_fn(upstream, model)
    for wrapped in ({'model': upstream}, {'state_dict': upstream},
                    {'state_dict_ema': {f'module.{k}': v for k, v in upstream.items()}}):
        out = conv2former.checkpoint_filter_fn(wrapped, model)
        assert out.keys() == plain.keys()
    ours = conv2former.checkpoint_filter_fn(model.state_dict(), model)  # our own layout passes through
    assert ours.keys() == model.state_dict().keys()


def test_num_classes_and_in_chans_are_adapted(tmp_path):
    model = timm.create_model('conv2former_n', num_classes=10, **TINY)
    path = tmp_path / 'm.safetensors'
    save_file(model.state_dict(), str(path))
    # the pretrained cfg says 1000 classes; timm drops a classifier whose size differs and re-initialises it
    five = _create_from_file('conv2former_n', path, num_classes=5, in_chans=1, **TINY)
    assert five.head.fc.out_features == 5
    torch.testing.assert_close(five.stem[0].weight, model.stem[0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(five.stages[2].blocks[0].attn.dwconv.weight,
                               model.stages[2].blocks[0].attn.dwconv.weight)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    other = timm.create_model('conv2former_n', kernel_size=7, **TINY)
    path = tmp_path / 'k7.safetensors'
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError) as err:
        _create_from_file('conv2former_n', path, kernel_size=11, **TINY)
    msg = str(err.value)
    assert 'does not match conv2former_n' in msg
    assert 'stages.0.blocks.0.attn.dwconv.weight: checkpoint (64, 1, 7, 7) vs model (64, 1, 11, 11)' in msg
    deeper = timm.create_model('conv2former_n', **TINY)
    with pytest.raises(ValueError, match=r'missing from the checkpoint: stages\.0\.blocks\.1\.'):
        conv2former.checkpoint_filter_fn(other.state_dict(), timm.create_model('conv2former_n', kernel_size=7,
                                                                               depths=(2, 1, 1, 1)))
    with pytest.raises(ValueError, match='unexpected in the checkpoint: extra.weight'):
        conv2former.checkpoint_filter_fn(dict(deeper.state_dict(), **{'extra.weight': torch.ones(1)}), deeper)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'stem.0.weight': torch.zeros(1)}, 'payload': _Exploit(marker)}, path)
    with pytest.raises(ValueError, match='refused to load'):
        _create_from_file('conv2former_n', path, **TINY)
    with pytest.raises(ValueError, match='refused to load'):
        conv2former.load_state_dict_file(path)
    assert not marker.exists()


def test_pretrained_without_a_file_says_how_to_give_one():
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model('conv2former_t', pretrained=True, device='meta')


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        conv2former.load_state_dict_file(tmp_path / 'nope.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match='garbage.pth'):
        conv2former.load_state_dict_file(garbage)
    tensor_only = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(ValueError, match='expected a dict of tensors'):
        conv2former.load_state_dict_file(tensor_only)
    with pytest.raises(ValueError, match='holds no tensors'):
        conv2former.unwrap_state_dict({'epoch': 3, 'arch': 'x'})


def test_local_dir_round_trip(tmp_path):
    """timm's local-dir format (config.json + model.safetensors) loads through create_model."""
    from timm.models._hub import save_for_hf
    model = timm.create_model('conv2former_n', num_classes=4, **TINY).eval()
    save_for_hf(model, tmp_path, model_args=dict(TINY, num_classes=4), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_timm_baseline_folder_with_a_cfg_overlay_keyword_loads(tmp_path):
    """The CPU ablations' ConvNeXt baseline is built with pretrained_cfg_overlay=dict(crop_pct=...) among its model
    keywords: the folder keeps only architecture keywords, and folders written before that still load."""
    import json
    from conv2former.fileio import CONFIG_NAME, load_classifier_folder, write_manifest, write_model_folder
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], pretrained_cfg_overlay=dict(crop_pct=0.875))
    model = timm.create_model('convnext_nano', num_classes=3, **kwargs).eval()
    folder = write_model_folder(model, tmp_path / 'm', dict(kwargs, num_classes=3), label_names=['a', 'b', 'c'])
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert 'pretrained_cfg_overlay' not in cfg['model_args'] and cfg['model_args']['dims'] == [8, 8, 16, 16]
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert torch.equal(load_classifier_folder(folder).eval()(x), expected)
    cfg['model_args']['pretrained_cfg_overlay'] = dict(crop_pct=0.875)  # as written before the filter
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    write_manifest(folder)  # an intact folder of that older kind
    old = load_classifier_folder(folder).eval()
    assert torch.equal(old(x), expected) and old.pretrained_cfg['crop_pct'] == 0.875
