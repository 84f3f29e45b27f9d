"""The Python API and the typed options: conv2former.train(...), validation with clear errors, recipes and YAML in
their place, resume restoring the run's settings, lazily imported extras."""
import sys

import pytest
import yaml

import conv2former
from conv2former.api import build_options
from conv2former.cli import main
from conv2former.tasks import get_task

TINY = dict(model='conv2former_n', model_kwargs={'depths': [1, 1, 1, 1], 'dims': [16, 16, 32, 32]}, img_size=32,
            workers=0, progress=False)


def test_train_on_the_bundled_data_as_documented(tmp_path):
    result = conv2former.train(task='classification', epochs=1, batch_size=128, output=tmp_path, experiment='api',
                               **TINY)
    run = tmp_path / 'api'
    assert result['run_dir'] == str(run) and 10 < result['val_top1'] <= 100 and result['best_top1'] >= 10
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['img_size'] == 32 and saved['model_kwargs']['depths'] == [1, 1, 1, 1] and saved['batch_size'] == 128
    # resuming restores every setting; more epochs are allowed, anything else that differs is refused
    resumed = conv2former.train(resume=run, epochs=2)
    assert resumed['epoch'] == 2 and len((run / 'metrics.jsonl').read_text().splitlines()) == 2
    assert yaml.safe_load((run / 'config.yaml').read_text())['epochs'] == 2
    with pytest.raises(ValueError, match=r"--img-size 64 differs from the run being resumed \(32\)"):
        conv2former.train(resume=run, epochs=3, img_size=64)
    with pytest.raises(ValueError, match='epochs only upwards'):
        conv2former.train(resume=run, epochs=1)


def test_options_are_validated_with_the_flags_rules():
    with pytest.raises(ValueError, match=r"unknown option 'batchsize'; did you mean 'batch_size'"):
        build_options('classification', dict(batchsize=4))
    with pytest.raises(ValueError, match=r'--batch-size: expected an integer >= 1, got 0'):
        build_options('classification', dict(batch_size=0))
    with pytest.raises(ValueError, match=r"--amp: invalid choice 'fp8'"):
        build_options('classification', dict(amp='fp8'))
    with pytest.raises(ValueError, match="unknown recipe 'imagenet'"):
        build_options('classification', dict(recipe='imagenet'))
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_options('depth', {})
    opts = build_options('segmentation', dict(data='x', crop_size=64, backbone_kwargs='kernel_size=7'))
    assert opts.crop_size == (64, 64) and opts.eval_stride == (42, 42) and opts.backbone_kwargs == {'kernel_size': 7}


def test_recipe_inside_a_yaml_config_applies_at_its_place(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('recipe: small\nweight-decay: 0.01\n')
    opts = build_options('classification', dict(config=config, epochs=3))
    # defaults < recipe (blr 1e-2, drop path 0.05) < YAML (weight decay) < explicit (epochs)
    assert (opts.recipe, opts.blr, opts.drop_path, opts.weight_decay, opts.epochs) == ('small', 1e-2, 0.05, 0.01, 3)
    det = build_options('detection', dict(data='x', recipe='maskrcnn-3x', lr=5e-5))
    assert (det.epochs, det.decay_milestones, det.lr, det.drop_path) == (36, (27, 33), 5e-5, 0.4)


def test_the_cli_and_the_api_build_the_same_options(tmp_path):
    from conv2former.cli import build_parser
    from conv2former.slurm import train_options
    argv = ['train', '--recipe', 'small', '--model-kwargs', 'kernel_size=7', '--model-kwargs', 'depths=[1,1,1,1]',
            '-b', '8', '--no-progress', '--scale', '0.5', '1']
    from_cli = build_options('classification', train_options(build_parser().parse_args(argv))[0])
    from_api = build_options('classification', dict(recipe='small', model_kwargs=dict(kernel_size=7, depths=[1, 1, 1, 1]),
                                                    batch_size=8, progress=False, scale=(0.5, 1)))
    assert from_cli == from_api
    # timm's train.py form: several key=value pairs after one --model-kwargs
    timm_form = train_options(build_parser().parse_args(['train', '--model-kwargs', 'kernel_size=7', 'depths=[1,1,1,1]',
                                                         '-b', '8']))[0]
    assert build_options('classification', timm_form
                         ).model_kwargs == dict(kernel_size=7, depths=[1, 1, 1, 1])


def test_a_missing_extra_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'pycocotools', None)  # as if not installed: importing it fails
    with pytest.raises(ModuleNotFoundError, match=r'pip install "conv2former\[detection\]"'):
        get_task('detection')
    assert main(['detect', 'eval', '--checkpoint', 'x', '--data', 'y']) == 2
    assert 'conv2former[detection]' in capsys.readouterr().err
    assert main(['detect', 'train', '--data', 'y']) == 2  # the parser itself needs no extra
