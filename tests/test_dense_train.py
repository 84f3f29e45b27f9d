"""``conv2former detect|segment train|eval|predict`` end to end on tiny synthetic data, resume, layer decay, errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conv2former.cli import main
from conv2former.tasks.detection import build_detector
from conv2former.engine.optim import BackboneLayers, create_optimizer

TINY = ['--backbone', 'conv2former_n', '--backbone-kwargs', 'depths=[1,1,1,1]', '--backbone-kwargs',
        'dims=[16,16,32,32]', '-j', '0', '--no-progress', '--warmup-iters', '1', '--seed', '3']


def _square_image(rng, size, box, colour):
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = colour
    return image


@pytest.fixture(scope='module')
def coco_data(tmp_path_factory) -> Path:
    """6 images of 64 px with one bright square each (class 'red' or 'green'), COCO json with polygon masks."""
    root = tmp_path_factory.mktemp('coco')
    (root / 'images' / 'train').mkdir(parents=True)
    (root / 'annotations').mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        x0, y0 = int(rng.integers(4, 30)), int(rng.integers(4, 30))
        box = (x0, y0, x0 + 26, y0 + 26)
        category = 1 + i % 2
        colour = (230, 30, 30) if category == 1 else (30, 230, 30)
        Image.fromarray(_square_image(rng, 64, box, colour)).save(root / 'images' / 'train' / f'{i}.jpg', quality=95)
        images.append(dict(id=i + 1, file_name=f'{i}.jpg', width=64, height=64))
        poly = [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
        annotations.append(dict(id=i + 1, image_id=i + 1, category_id=category, bbox=[x0, y0, 26, 26], area=676,
                                iscrowd=0, segmentation=[poly]))
    categories = [dict(id=1, name='red'), dict(id=2, name='green')]
    (root / 'annotations' / 'instances_train.json').write_text(
        json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return root


def _camvid_like(root: Path, counts=(('train', 4), ('val', 2)), bad_value=None) -> Path:
    """A CamVid-layout tree: 64 px images, label 1 inside a bright square, 0 elsewhere, 11 (void) on one row."""
    rng = np.random.default_rng(1)
    for split, n in counts:
        (root / split).mkdir(parents=True)
        (root / f'{split}annot').mkdir()
        for i in range(n):
            x0, y0 = int(rng.integers(4, 30)), int(rng.integers(4, 30))
            Image.fromarray(_square_image(rng, 64, (x0, y0, x0 + 28, y0 + 28), (240, 240, 40))).save(
                root / split / f'{split}{i}.jpg', quality=95)
            label = np.zeros((64, 64), np.uint8)
            label[y0:y0 + 28, x0:x0 + 28] = 1
            label[0] = 11
            if bad_value is not None:
                label[5, 5] = bad_value
            Image.fromarray(label, mode='L').save(root / f'{split}annot' / f'{split}{i}.png')
    return root


def test_detect_train_eval_predict(tmp_path, coco_data, capsys):
    out = tmp_path / 'runs'
    rc = main(['detect', 'train', '--data', str(coco_data), '--train-split', 'train', '--val-split', 'train',
               '--model', 'maskrcnn', '--min-size', '64', '--max-size', '64', '--epochs', '2', '-b', '2',
               '--layer-decay', '0.9', '--overlays', '1', '--output', str(out), '--experiment', 'det', *TINY])
    assert rc == 0
    run = out / 'det'
    for name in ('report.md', 'results.json', 'metrics.jsonl', 'best/model.safetensors', 'last/config.json',
                 'plots/loss.png', 'plots/metrics.png', 'plots/lr.png'):
        assert (run / name).is_file(), name
    history = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert len(history) == 2 and all(isinstance(h['bbox_AP'], float) and isinstance(h['segm_AP'], float)
                                     for h in history)
    config = json.loads((run / 'last' / 'config.json').read_text())
    assert config['task'] == 'detect' and config['class_names'] == ['__background__', 'red', 'green']
    assert len(list((run / 'overlays').glob('*.png'))) == 1
    assert '![' in (run / 'report.md').read_text() and 'box AP' in (run / 'report.md').read_text()

    assert main(['detect', 'eval', '--checkpoint', str(run), '--split', 'train', '-j', '0', '--overlays', '2']) == 2
    assert '--allow-train-overlap' in capsys.readouterr().err  # the run trained on that split
    assert main(['detect', 'eval', '--checkpoint', str(run), '--split', 'train', '--allow-train-overlap',
                 '-j', '0', '--overlays', '2']) == 0  # --data: the run's
    result = json.loads((run / 'eval_results.json').read_text())
    assert result['bbox_AP'] == history[-1]['bbox_AP'] and result['images'] == 6  # same weights, same data
    assert len(list((run / 'eval_overlays').glob('*.png'))) == 2

    capsys.readouterr()
    image = coco_data / 'images' / 'train' / '0.jpg'
    assert main(['detect', 'predict', str(image), '--checkpoint', str(run), '--output-dir', str(tmp_path / 'p'),
                 '--score-threshold', '0', '--json']) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert predictions[0]['image'] == str(image) and Path(predictions[0]['overlay']).is_file()
    assert all(d['label'] in ('red', 'green') and len(d['box']) == 4 for d in predictions[0]['detections'])


def test_segment_train_resumes_mid_epoch_exactly(tmp_path):
    data = _camvid_like(tmp_path / 'camvid')
    args = ['segment', 'train', '--data', str(data), '--crop-size', '64', '--epochs', '2', '-b', '2',
            '--decoder-channels', '32', '--checkpoint-steps', '1', '--checkpoint-hist', '10', '--overlays', '1',
            '--lr', '1e-3', '--output', str(tmp_path / 'runs'), '--experiment', 'seg', *TINY]
    assert main(args) == 0
    run = tmp_path / 'runs' / 'seg'
    uninterrupted = load_file(str(run / 'last' / 'model.safetensors'))
    results = json.loads((run / 'results.json').read_text())
    assert 0 <= results['mIoU'] <= 100 and set(results['per_class_iou']) >= {'Sky', 'Building'}
    checkpoints = sorted((run / 'checkpoints').iterdir())
    assert [c.name for c in checkpoints] == ['epoch-0001-step-00000001', 'epoch-0001-step-00000002',
                                             'epoch-0002-step-00000003', 'epoch-0002-step-00000004']
    for later in checkpoints[1:]:  # as if killed after the first optimizer step
        shutil.rmtree(later)
    (run / 'last' / 'model.safetensors').unlink()
    assert main(['segment', 'train', '--resume', str(run)]) == 0  # the run's settings are restored
    resumed = load_file(str(run / 'last' / 'model.safetensors'))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    assert main(['segment', 'eval', '--checkpoint', str(run), '--data', str(data), '--eval-mode', 'slide',
                 '--crop-size', '32', '--eval-flip', '--eval-scales', '0.75', '1', '-j', '0']) == 0
    result = json.loads((run / 'eval_results.json').read_text())
    assert result['inference'] == dict(mode='slide', crop_size=[32, 32], stride=[21, 21], scales=[0.75, 1.0],
                                       flip=True)
    assert 0 <= result['mIoU'] <= 100
    # without --data (or any inference flag) the run's config.yaml supplies the data; an explicit --data agrees
    assert main(['segment', 'eval', '--checkpoint', str(run), '-j', '0']) == 0
    from_record = json.loads((run / 'eval_results.json').read_text())
    assert from_record['data'] == str(data)
    assert main(['segment', 'eval', '--checkpoint', str(run), '--data', str(data), '-j', '0']) == 0
    explicit = json.loads((run / 'eval_results.json').read_text())
    assert explicit['mIoU'] == pytest.approx(from_record['mIoU']) and explicit['inference'] == from_record['inference']
    image = data / 'val' / 'val0.jpg'
    assert main(['segment', 'predict', str(image), '--checkpoint', str(run), '--output-dir',
                 str(tmp_path / 'p')]) == 0
    labels = np.array(Image.open(tmp_path / 'p' / 'val0_labels.png'))
    assert labels.shape == (64, 64) and labels.max() < 11


def test_layer_decay_groups_scale_the_backbone_by_depth():
    model = build_detector('fasterrcnn', 'conv2former_n', num_classes=2, depths=(1, 1, 2, 1), dims=(16, 16, 32, 32))
    groups = create_optimizer(model, 'adamw', 1e-4, 0.05, 0.5,
                              BackboneLayers(model, model.backbone.body, 'conv2former_n')).param_groups
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert len(scale) == sum(1 for p in model.parameters())  # every parameter exactly once
    named = dict(model.named_parameters())
    # 6 backbone layers (stem + 5 blocks; a downsample belongs to its stage's first block), heads get 1
    assert scale[id(named['backbone.body.stem.0.weight'])] == 0.5 ** 6
    assert scale[id(named['backbone.body.stages_0.blocks.0.attn.v_proj.weight'])] == 0.5 ** 5
    assert scale[id(named['backbone.body.stages_1.downsample.1.weight'])] == 0.5 ** 4
    assert scale[id(named['backbone.body.stages_1.blocks.0.attn.v_proj.weight'])] == 0.5 ** 4
    assert scale[id(named['backbone.body.stages_2.blocks.1.attn.v_proj.weight'])] == 0.5 ** 2
    assert scale[id(named['backbone.body.stages_3.blocks.0.mlp.fc2.weight'])] == 0.5
    assert scale[id(named['backbone.fpn.inner_blocks.0.0.weight'])] == 1.0
    assert scale[id(named['roi_heads.box_predictor.cls_score.weight'])] == 1.0
    assert decay[id(named['backbone.body.stages_3.blocks.0.mlp.fc2.bias'])] == 0.0
    assert decay[id(named['backbone.body.stages_3.blocks.0.mlp.fc2.weight'])] == 0.05
    no_decay = create_optimizer(model, 'adamw', 1e-4, 0.05, None).param_groups
    assert [g['weight_decay'] for g in no_decay] == [0.0, 0.05] and not any('lr_scale' in g for g in no_decay)
    assert sum(len(g['params']) for g in no_decay) == len(scale)


@pytest.mark.parametrize('case, message', [
    ('isotropic', 'hierarchical'),
    ('no-data', 'needs --data'),
    ('bad-label', 'label values'),
    ('bad-recipe', 'invalid choice'),
    ('bad-kwarg', "takes no keyword 'depthz'; did you mean 'depths'?"),
])
def test_bad_input_gives_a_clear_error(tmp_path, coco_data, capsys, case, message):
    common = ['--output', str(tmp_path / 'runs'), '--epochs', '1', '-b', '2', '--overlays', '0', *TINY]
    if case == 'isotropic':
        argv = ['detect', 'train', '--data', str(coco_data), '--train-split', 'train', '--val-split', 'train',
                *common[:-len(TINY)], '--backbone', 'conv2former_is', '--backbone-kwargs', 'depth=2']
    elif case == 'no-data':
        argv = ['segment', 'train', *common]
    elif case == 'bad-label':
        data = _camvid_like(tmp_path / 'bad', bad_value=40)
        argv = ['segment', 'train', '--data', str(data), '--crop-size', '64', '--decoder-channels', '32', *common]
    elif case == 'bad-kwarg':
        argv = ['detect', 'train', '--data', str(coco_data), '--train-split', 'train', '--val-split', 'train',
                *common, '--backbone-kwargs', 'depthz=2']
    else:
        argv = ['segment', 'train', '--recipe', 'maskrcnn-1x', '--data', str(coco_data), *common]
    if case == 'bad-recipe':
        with pytest.raises(SystemExit):
            main(argv)
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if case == 'bad-label':
        assert 'trainannot/train' in err and '40' in err
