"""Issue 13: the run is the source of truth. Skipped images, the run's record in validate / predict, weights files
with their config.json, model keywords, one-class data, epoch numbering, report order."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_toy_images as _toy
from conv2former.cli import main

TINY = ['--model', 'conv2former_n', '--model-kwargs', 'depths=[1,1,1,1]', '--model-kwargs', 'dims=[16,32,64,128]',
        '--img-size', '32', '--no-progress']
TINY_KWARGS = ['--model-kwargs', 'depths=[1,1,1,1]', '--model-kwargs', 'dims=[16,32,64,128]']


def _break(path: Path) -> None:
    """An unreadable file with an image name (a truncated PNG)."""
    path.write_bytes(next(path.parent.glob('0.png')).read_bytes()[:60])


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (mid-epoch checkpoints every step) on data with one unreadable train and val image,
    loaded by DataLoader workers."""
    tmp = tmp_path_factory.mktemp('run')
    data = _toy(tmp / 'data')
    _break(data / 'train' / 'dark' / 'broken.png')
    _break(data / 'val' / 'bright' / 'broken.png')
    assert main(['train', '--data', str(data), '--output', str(tmp), '--experiment', 'r', *TINY, '-j', '2',
                 '--epochs', '2', '-b', '8', '--checkpoint-steps', '1', '--checkpoint-hist', '10']) == 0
    return tmp / 'r'


def test_skipped_images_leave_every_metric_and_are_counted_once_everywhere(run, tmp_path, capsys):
    data = run.parent / 'data'
    results = json.loads((run / 'results.json').read_text())
    assert results['skipped'] == dict(train=1, val=1, total=2) and results['skipped_images'] == 2
    assert results['num_samples'] == 12  # 12 readable val images; the unreadable one is in no denominator
    assert 'skipped 2 file(s) in all (1 train, 1 val)' in (run / 'log.txt').read_text()
    assert '| skipped_images | 2 |' in (run / 'report.md').read_text()
    capsys.readouterr()
    assert main(['validate', '--checkpoint', str(run), '-j', '2', '--no-progress']) == 0
    broken = capsys.readouterr().out
    clean = tmp_path / 'clean'
    shutil.copytree(data, clean)
    (clean / 'val' / 'bright' / 'broken.png').unlink()
    assert main(['validate', '--checkpoint', str(run), '--data', str(clean), '-j', '0', '--no-progress']) == 0
    out = capsys.readouterr().out
    assert '(12 images, 1 skipped)' in broken and '(12 images, 0 skipped)' in out
    assert broken.split('(')[0] == out.split('(')[0]  # same top-1, top-5 and loss as without the unreadable file


def test_validate_takes_data_split_and_preprocessing_from_the_run(run, capsys):
    assert main(['validate', '--checkpoint', str(run), '-j', '0', '--no-progress']) == 0
    saved = json.loads((run / 'validate_results.json').read_text())
    assert saved['img_size'] == 32 and saved['split'] == str((run.parent / 'data' / 'val').resolve())
    assert main(['validate', '--checkpoint', str(run), '--split', 'train', '-j', '0']) == 2
    err = capsys.readouterr().err
    assert 'the training split of' in err and '--allow-train-overlap' in err
    assert main(['validate', '--checkpoint', str(run), '--split', 'train', '--allow-train-overlap', '-j', '0',
                 '--no-progress']) == 0


def test_a_weights_file_uses_the_config_beside_it_or_warns(run, tmp_path, capsys, caplog):
    weights = run / 'best' / 'model.safetensors'
    assert main(['validate', '--checkpoint', str(weights), '-j', '0', '--no-progress']) == 0
    beside = json.loads((run / 'best' / 'validate_results.json').read_text())  # next to the file, as --help says
    assert beside['img_size'] == 32
    alone = tmp_path / 'w.safetensors'
    shutil.copy(weights, alone)
    data = str(run.parent / 'data')
    assert main(['validate', '--checkpoint', str(alone), '--model', 'conv2former_n', *TINY_KWARGS, '--data', data,
                 '--img-size', '32', '-j', '0', '--no-progress']) == 0
    assert 'has no config.json beside it' not in caplog.text  # --img-size given: no warning about 224 px defaults
    assert json.loads((tmp_path / 'validate_results.json').read_text())['top1'] == beside['top1']
    assert main(['validate', '--checkpoint', str(alone), '--model', 'conv2former_n', *TINY_KWARGS, '--data', data,
                 '-j', '0', '--no-progress']) == 0
    assert 'has no config.json beside it' in caplog.text
    capsys.readouterr()
    image = str(run.parent / 'data' / 'val' / 'dark' / '1.png')
    assert main(['predict', image, '--checkpoint', str(run), '--img-size', '48', '--no-progress', '--json']) == 0
    assert json.loads(capsys.readouterr().out)[0]['top'][0]['label'] in ('dark', 'bright')


def test_unknown_model_keyword_is_one_line_with_the_closest_match(tmp_path, capsys):
    data = _toy(tmp_path / 'data', 4, 2)
    rc = main(['train', '--data', str(data), '--output', str(tmp_path), *TINY, '--model-kwargs', 'kernal_size=7'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "'kernal_size'" in err and "did you mean 'kernel_size'" in err and 'valid: ' in err


def test_a_one_class_dataset_is_refused_naming_the_folder(tmp_path, capsys):
    data = _toy(tmp_path / 'data', 4, 2, classes=(('only', 100),))
    assert main(['train', '--data', str(data), '--output', str(tmp_path), *TINY, '-b', '2']) == 2
    err = capsys.readouterr().err
    assert str(data / 'train') in err and 'at least 2 class' in err


def test_one_epoch_numbering_in_logs_metrics_and_checkpoint_names(run):
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert 'epoch 1: {"epoch": 1,' in (run / 'log.txt').read_text()
    names = sorted(p.name for p in (run / 'checkpoints').iterdir())
    # 25 train files at -b 8: 3 steps per epoch, a checkpoint after each (two mid-epoch, one at the end)
    assert names[0].startswith('epoch-0001-') and names[-1].startswith('epoch-0002-')
    assert all(n.split('-')[1] in ('0001', '0002') for n in names)


def test_report_puts_results_first_and_configuration_last(run):
    report = (run / 'report.md').read_text()
    assert report.index('## Final metrics') < report.index('## Per-epoch metrics') < report.index('## Configuration')


def test_fp16_on_cpu_warns_that_it_is_slow(tmp_path, caplog):
    data = _toy(tmp_path / 'data', 4, 2)
    assert main(['train', '--data', str(data), '--output', str(tmp_path), *TINY, '-j', '0', '-b', '4',
                 '--epochs', '1', '--amp', 'fp16']) == 0
    assert 'fp16 on CPU is emulated and several times slower' in caplog.text


def test_a_failed_start_or_resume_leaves_no_folder_and_keeps_the_runs_files(run, tmp_path, capsys):
    data = run.parent / 'data'
    rc = main(['train', '--data', str(data), '--output', str(tmp_path), '--experiment', 'bad', *TINY, '-b', '64'])
    assert rc == 2 and 'no full step' in capsys.readouterr().err and not (tmp_path / 'bad').exists()
    moved = tmp_path / 'moved'
    shutil.copytree(run, moved)
    config = moved / 'config.yaml'
    config.write_text(config.read_text().replace(f'data: {data}', f'data: {tmp_path / "gone"}'))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in moved.iterdir()
              if p.is_file() and p.name != '.lock'}
    assert main(['train', '--resume', str(moved), '--epochs', '3']) == 2  # its data is gone
    assert 'does not exist' in capsys.readouterr().err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in moved.iterdir()
            if p.is_file() and p.name != '.lock'} == before  # the lock file records who last held the folder


def _metrics(run_dir: Path) -> list:
    keep = ('epoch', 'step', 'lr', 'train_loss', 'val_loss', 'val_top1')
    rows = map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())
    return [{k: row[k] for k in keep} for row in rows]


def test_ctrl_c_checkpoints_the_step_logs_how_to_resume_and_the_resumed_run_is_identical(tmp_path, capsys,
                                                                                          monkeypatch):
    from safetensors.torch import load_file
    from conv2former.engine.state import list_checkpoints
    from conv2former.tasks.classification.task import ClassificationTask
    data = _toy(tmp_path / 'data', 8, 2)

    def args(name):
        return ['train', '--data', str(data), '--output', str(tmp_path), '--experiment', name, *TINY, '-j', '0',
                '-b', '4', '--epochs', '2']
    assert main(args('full')) == 0
    calls, original = [], ClassificationTask.loss

    def loss_then_ctrl_c(self, model, batch, device):  # Ctrl-C arrives during the 3rd step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model, batch, device)
    monkeypatch.setattr(ClassificationTask, 'loss', loss_then_ctrl_c)
    capsys.readouterr()
    assert main(args('cut')) == 130
    monkeypatch.undo()
    cut = tmp_path / 'cut'
    err = capsys.readouterr().err
    assert 'Traceback' not in err and f'resume with: conv2former train --resume {cut}' in err
    assert 'interrupted at epoch 1 step 3; resume with' in (cut / 'log.txt').read_text()
    assert [p.name for p in list_checkpoints(cut)] == ['epoch-0001-step-00000003']
    assert main(['train', '--resume', str(cut)]) == 0
    full, resumed = (load_file(str(tmp_path / n / 'last' / 'model.safetensors')) for n in ('full', 'cut'))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _metrics(cut) == _metrics(tmp_path / 'full')  # epoch 1's train loss covers the whole epoch


def test_a_second_ctrl_c_aborts_at_once_and_data_workers_leave_the_decision_to_the_main_process():
    code = ('import os, signal, time\nfrom conv2former.engine.runtime import StopRequest\nwith StopRequest() as s:\n'
            '    pid = os.fork()\n'  # a forked data-loader worker gets the terminal's Ctrl-C too
            '    if pid == 0:\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(0.2)\n'
            '        os._exit(3 if s.signal is None else 4)\n'
            '    assert os.waitpid(pid, 0)[1] >> 8 == 3 and s.signal is None\n'
            '    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.2)\n    assert s.signal == signal.SIGINT\n'
            '    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(60)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and 'SIGINT again: aborting now' in result.stderr
    assert 'Traceback' not in result.stderr


def test_export_records_class_names_and_preprocessing_and_takes_other_sizes(run, tmp_path, capsys):
    import onnx
    import onnxruntime as ort
    out = tmp_path / 'exported'
    assert main(['export', '--checkpoint', str(run), '--output', str(out), '--format', 'onnx']) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['class_names'] == ['bright', 'dark'] and config['input_size'] == [3, 32, 32]
    assert config['interpolation'] and len(config['mean']) == len(config['std']) == 3
    assert config['onnx_input'] == ['batch', 3, 'height', 'width']
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out / 'model.onnx')).metadata_props}
    assert props['class_names'] == config['class_names'] and props['mean'] == config['mean']
    session = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    logits = session.run(None, {'input': np.random.rand(1, 3, 96, 128).astype(np.float32)})[0]
    assert logits.shape == (1, 2)
    assert main(['export', '--checkpoint', str(run), '--output', str(run / 'best')]) == 2
    assert 'is a model folder' in capsys.readouterr().err


def test_detect_eval_takes_the_runs_holdout_and_refuses_training_images(tmp_path, capsys):
    pytest.importorskip('pycocotools')
    from test_dense_datasets import write_pennfudan
    data = write_pennfudan(tmp_path / 'PennFudanPed', n=6, size=(64, 48))
    run = tmp_path / 'det'
    assert main(['detect', 'train', '--data', str(data), '--holdout', '2', '--model', 'fasterrcnn', '--min-size',
                 '48', '--max-size', '64', '--epochs', '1', '-b', '2', '--overlays', '0', '--output', str(tmp_path),
                 '--experiment', 'det', '--backbone', 'conv2former_n', '--backbone-kwargs', 'depths=[1,1,1,1]',
                 '--backbone-kwargs', 'dims=[16,16,32,32]', '-j', '0', '--no-progress', '--warmup-iters', '1']) == 0
    assert re.search(r'\(best bbox_AP: (–|\d+\.\d\d)\)', capsys.readouterr().out)  # formatted, not 0.2795410075542997
    assert main(['detect', 'eval', '--checkpoint', str(run), '-j', '0', '--overlays', '0']) == 0
    result = json.loads((run / 'eval_results.json').read_text())
    assert result['holdout'] == 2 and result['images'] == 2 and result['data'] == str(data)
    capsys.readouterr()
    assert main(['detect', 'eval', '--checkpoint', str(run), '--holdout', '4', '-j', '0', '--overlays', '0']) == 2
    assert '2 of the images to evaluate were used to train this run' in capsys.readouterr().err
    assert main(['detect', 'eval', '--checkpoint', str(run), '--holdout', '4', '--allow-train-overlap', '-j', '0',
                 '--overlays', '0']) == 0


def test_pretrained_backbone_logs_what_it_loaded(tmp_path, caplog):
    pytest.importorskip('pycocotools')
    import timm
    from safetensors.torch import save_file
    from conv2former.tasks.detection.options import DetectionOptions
    from conv2former.tasks.detection.task import DetectionTask
    kwargs = dict(depths=[1, 1, 1, 1], dims=[16, 16, 32, 32])
    weights = tmp_path / 'c.safetensors'
    save_file(timm.create_model('conv2former_n', num_classes=10, **kwargs).state_dict(), str(weights))
    options = DetectionOptions(data=str(tmp_path), backbone='conv2former_n', backbone_kwargs=kwargs,
                               pretrained_backbone=weights, model='fasterrcnn')
    options.finalize()
    with caplog.at_level('INFO', logger='conv2former'):
        DetectionTask(options).build_model(['__background__', 'person'], resuming=False)
    assert f'from {weights} (a classifier with 10 classes' in caplog.text
    assert 'backbone conv2former_n: loaded ' in caplog.text and 'left out' in caplog.text
