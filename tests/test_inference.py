"""Inference helpers: model folders, loading, upstream conversion, prediction on real image files, export."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import conv2former  # noqa: F401  (registers the models)
from conv2former.fileio import write_model_folder
from conv2former.tasks.classification.inference import (convert_upstream, export_onnx, export_torch,
                                                         format_predictions, load_model, predict)

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), head_hidden_size=64)
LABELS = ['cat', 'dog', 'bird']
FIXTURE_ARGS = dict(dims=[16, 32, 48, 64], depths=[1, 1, 2, 1], kernel_size=7)


def _tiny(seed=0, num_classes=3):
    torch.manual_seed(seed)
    overlay = dict(input_size=(3, 64, 64))
    return timm.create_model('conv2former_n', num_classes=num_classes, pretrained_cfg_overlay=overlay, **TINY).eval()


def _perturbed(model):
    return {k: v + 0.05 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _same(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 64)


@pytest.fixture(scope='module')
def upstream_fixture(fixtures_dir):
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    return load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors')), io['input'].float(), io['logits'].float()


# ---------------------------------------------------------------------------------------------------------------
# model folders and loading


def test_model_folder_round_trip(tmp_path, x):
    model = _tiny()
    out = write_model_folder(model, tmp_path / 'm', model_args=dict(TINY), label_names=LABELS)
    assert out == tmp_path / 'm'
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'manifest.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'conv2former_n' and cfg['label_names'] == LABELS
    assert cfg['model_args']['depths'] == [1, 1, 1, 1] and cfg['model_args']['num_classes'] == 3

    loaded, names, data_config = load_model(out)
    assert not loaded.training and names == LABELS
    assert data_config['input_size'] == (3, 64, 64)
    _same(loaded, model, x)
    via_timm = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    _same(via_timm, model, x)

    # replacing an existing folder leaves no temporary folders and drops files of the old one
    write_model_folder(_tiny(seed=1), out, model_args=dict(TINY), ema_state_dict=_perturbed(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']
    assert (out / 'model_ema.safetensors').is_file()
    assert load_model(out)[1] is None  # no label names this time
    with pytest.raises(ValueError, match='label_names'):
        write_model_folder(model, tmp_path / 'bad', model_args={}, label_names=['only-one'])
    assert not (tmp_path / 'bad').exists()


def test_run_folder_best_last_and_ema(tmp_path, x):
    best, last = _tiny(seed=0), _tiny(seed=1)
    ema = _perturbed(best)
    run = tmp_path / 'run'
    write_model_folder(best, run / 'best', model_args=dict(TINY), label_names=LABELS, ema_state_dict=ema)
    write_model_folder(last, run / 'last', model_args=dict(TINY), label_names=LABELS)
    (run / 'metrics.csv').write_text('epoch,top1\n0,1.0\n')

    _same(load_model(run)[0], best, x)
    ema_model, names, _ = load_model(run, use_ema=True)
    reference = _tiny()
    reference.load_state_dict(ema)
    _same(ema_model, reference, x)
    assert names == LABELS

    with pytest.raises(FileNotFoundError, match='model_ema.safetensors'):
        load_model(run / 'last', use_ema=True)
    (run / 'best' / 'config.json').unlink()
    _same(load_model(run)[0], last, x)  # best/ incomplete → last/


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load_model(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r'empty.*config\.json'):
        load_model(tmp_path / 'empty')

    folder = write_model_folder(_tiny(), tmp_path / 'm', model_args=dict(TINY))
    (folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        load_model(folder)

    weights = tmp_path / 'w.safetensors'
    save_file(_tiny().state_dict(), str(weights))
    with pytest.raises(ValueError, match='model name'):
        load_model(weights)
    with pytest.raises(ValueError, match='conv2former_t') as e:
        load_model(weights, model_name='resnet50')
    assert 'resnet50' in str(e.value)


def test_load_weights_file_with_model_name(tmp_path, x):
    model = _tiny()
    weights = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(weights))
    loaded, names, data_config = load_model(weights, 'conv2former_n', **TINY)
    assert loaded.num_classes == 3 and names is None  # classes read from the file's classifier
    _same(loaded, model, x)
    assert load_model(weights, 'conv2former_n', pretrained_cfg_overlay=dict(input_size=(3, 96, 96)),
                      **TINY)[2]['input_size'] == (3, 96, 96)

    # a training checkpoint: use_ema picks the EMA entry, otherwise the plain weights
    ema = _perturbed(model)
    ckpt = tmp_path / 'train.pth.tar'
    torch.save({'epoch': 3, 'state_dict': model.state_dict(), 'state_dict_ema': ema}, ckpt)
    _same(load_model(ckpt, 'conv2former_n', **TINY)[0], model, x)
    reference = _tiny()
    reference.load_state_dict(ema)
    _same(load_model(ckpt, 'conv2former_n', use_ema=True, **TINY)[0], reference, x)
    with pytest.raises(ValueError, match='EMA'):
        load_model(weights, 'conv2former_n', use_ema=True, **TINY)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'payload': _Evil(marker)}, path)
    with pytest.raises(ValueError, match='refused'):
        load_model(path, 'conv2former_n', **TINY)
    with pytest.raises(ValueError, match='refused'):
        convert_upstream(path, tmp_path / 'out', 'conv2former_n', **TINY)
    assert not marker.exists() and not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------------------
# upstream conversion


@pytest.mark.parametrize('layout', ['wrapped.pth.tar', 'plain.pth'])
def test_convert_upstream_reproduces_reference_logits(tmp_path, upstream_fixture, layout):
    state_dict, inputs, logits = upstream_fixture
    src = tmp_path / layout
    torch.save({'epoch': 1, 'state_dict': state_dict} if layout.startswith('wrapped') else state_dict, src)
    labels = [f'class{i}' for i in range(10)]
    out = convert_upstream(src, tmp_path / 'converted', 'conv2former_n', label_names=labels, **FIXTURE_ARGS)

    model, names, _ = load_model(out)
    assert names == labels and model.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), logits, rtol=0, atol=1e-4)
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['model_args']['kernel_size'] == 7 and cfg['model_args']['dims'] == [16, 32, 48, 64]
    via_timm = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_timm(inputs), logits, rtol=0, atol=1e-4)


def test_convert_upstream_mismatch_raises(tmp_path, upstream_fixture):
    src = tmp_path / 'up.pth'
    torch.save(upstream_fixture[0], src)
    with pytest.raises(ValueError, match=r'attn\.dwconv\.weight'):
        convert_upstream(src, tmp_path / 'out', 'conv2former_n', **dict(FIXTURE_ARGS, kernel_size=11))
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match='unknown model'):
        convert_upstream(src, tmp_path / 'out', 'conv2former_x', **FIXTURE_ARGS)


# ---------------------------------------------------------------------------------------------------------------
# prediction


def _write_images(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    images = {
        'rgb.png': Image.fromarray(rgb),
        'rgb.jpg': Image.fromarray(rgb),
        'gray.png': Image.fromarray(rgb[..., 0]),
        'palette.png': Image.fromarray(rgb).convert('P'),
        'rgba.png': Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        'cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
        'gray16.png': Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)),
    }
    paths = []
    for name, img in images.items():
        img.save(folder / name)
        paths.append(folder / name)
    with Image.open(folder / 'gray16.png') as img:
        assert img.mode in ('I;16', 'I')  # a real 16-bit file
    return paths


def test_predict_on_image_files(tmp_path):
    folder = write_model_folder(_tiny(), tmp_path / 'm', model_args=dict(TINY), label_names=LABELS)
    model, names, data_config = load_model(folder)
    paths = _write_images(tmp_path)

    results = predict(model, paths, data_config, class_names=names, topk=2, batch_size=3)
    assert [r['image'] for r in results] == [str(p) for p in paths]
    for r in results:
        probs = [t['prob'] for t in r['top']]
        assert len(r['top']) == 2 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        assert all(t['label'] == LABELS[t['index']] for t in r['top'])

    # topk above the number of classes gives every class; probabilities then sum to 1; no names → indices
    full = predict(model, paths[:1], data_config, topk=10)[0]['top']
    assert sorted(t['index'] for t in full) == [0, 1, 2]
    assert abs(sum(t['prob'] for t in full) - 1) < 1e-5
    assert all(t['label'] == str(t['index']) for t in full)
    # same image, same prediction, whatever the batch
    alone = predict(model, paths[:1], data_config, class_names=names, topk=2)[0]['top']
    assert [t['index'] for t in alone] == [t['index'] for t in results[0]['top']]
    assert [t['prob'] for t in alone] == pytest.approx([t['prob'] for t in results[0]['top']], abs=1e-5)

    table = format_predictions(results)
    assert table.splitlines()[0].split() == ['image', 'rank', 'label', 'index', 'prob']
    first = table.splitlines()[2].split()
    assert first == [str(paths[0]), '1', results[0]['top'][0]['label'], str(results[0]['top'][0]['index']),
                     f"{results[0]['top'][0]['prob']:.4f}"]
    assert len(table.splitlines()) == 2 + 2 * len(paths)

    with pytest.raises(ValueError, match='missing.png'):
        predict(model, [paths[0], tmp_path / 'missing.png'], data_config)
    (tmp_path / 'corrupt.jpg').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='corrupt.jpg'):
        predict(model, [tmp_path / 'corrupt.jpg'], data_config)


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_onnx_matches_onnxruntime(tmp_path, caplog):
    ort = pytest.importorskip('onnxruntime')
    model = _tiny()
    with caplog.at_level('INFO', logger='conv2former.tasks.classification.inference'):
        path = export_onnx(model, tmp_path / 'model.onnx', img_size=64)
    assert path.is_file() and 'dynamo ONNX exporter' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']  # weights inside, no external data
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 64, 64)  # a batch size other than the example's
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)


def test_export_torch_program_matches(tmp_path):
    model = _tiny()
    path = export_torch(model, tmp_path / 'model.pt2', img_size=64)
    program = torch.export.load(str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)


def test_export_onnx_falls_back_to_torchscript(tmp_path, monkeypatch, caplog):
    pytest.importorskip('onnxruntime')
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError('simulated dynamo failure')
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, 'export', dynamo_fails)
    with caplog.at_level('INFO', logger='conv2former.tasks.classification.inference'), \
            pytest.warns(UserWarning, match='simulated dynamo failure.*TorchScript'):
        path = export_onnx(_tiny(), tmp_path / 'model.onnx', img_size=64)  # includes the onnxruntime check
    assert path.is_file() and 'torchscript' in caplog.text
