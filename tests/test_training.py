"""The training toolkit end to end: train → validate → predict, exact resume after SIGKILL, DDP, failures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import kill_at_checkpoint
from conv2former.cli import build_parser, main
from conv2former.api import build_options
from conv2former.engine.state import find_resume_checkpoint, list_checkpoints, save_checkpoint

TINY_MODEL = ['--model', 'conv2former_n', '--model-kwargs', 'depths=[1,1,1,1]', '--model-kwargs',
              'dims=[16,32,64,128]', '--img-size', '32', '-j', '0', '--no-progress']
ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory, toy_images) -> Path:
    """A tiny learnable ImageFolder: dark vs bright noisy squares, 2 classes x 24 train / 8 val images."""
    return toy_images(tmp_path_factory.mktemp('toy'), 24, 8)


def _train_args(data, out, name, *extra):
    return ['train', '--data', str(data), '--output', str(out), '--experiment', name, *TINY_MODEL, *extra]


def _run_cli(argv, timeout=300):
    result = subprocess.run([sys.executable, '-m', 'conv2former', *argv], env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / 'last' / 'model.safetensors'))


def test_train_validate_predict_on_the_bundled_dataset(tmp_path, capsys):
    """Real data (bundled Fashion-MNIST subset): one epoch of a tiny model learns far above chance (10%)."""
    assert main(['train', '--recipe', 'small', '--epochs', '1', '-b', '64', '--output', str(tmp_path),
                 '--experiment', 'fm', *TINY_MODEL]) == 0
    run = tmp_path / 'fm'
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert metrics[-1]['val_top1'] > 40
    for name in ('report.md', 'metrics.csv', 'config.yaml', 'confusion_matrix.png', 'plots/loss.png',
                 'plots/accuracy.png', 'plots/lr.png', 'best/model.safetensors', 'last/config.json'):
        assert (run / name).is_file(), name
    assert main(['validate', '--checkpoint', str(run), '--img-size', '32', '-j', '0']) == 0
    results = json.loads((run / 'validate_results.json').read_text())
    assert results['top1'] == pytest.approx(metrics[-1]['val_top1'], abs=0.01)
    assert set(results['per_class_accuracy']) >= {'trouser', 'bag', 'ankle_boot'}
    capsys.readouterr()
    from conv2former.data import resolve_data_dir
    image = next((resolve_data_dir(None) / 'val' / 'trouser').iterdir())
    assert main(['predict', str(image), '--checkpoint', str(run), '--json', '--topk', '3']) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions[0]['top']) == 3
    assert predictions[0]['top'][0]['label'] in json.loads((run / 'best' / 'config.json').read_text())['label_names']


def test_resume_after_sigkill_gives_identical_weights(tmp_path, toy_data):
    """N steps straight == killed mid-epoch (SIGKILL) + ``--resume RUN`` alone, bit for bit on CPU (non-default
    model, size, batch, mixup + drop path on), and the resumed epoch's train loss covers the whole epoch."""
    common = ['--epochs', '3', '-b', '4', '--checkpoint-steps', '2', '--mixup', '0.2', '--drop-path', '0.1',
              '--warmup-epochs', '1', '--lr', '1e-3']
    # every run in its own process with the same thread count: float reductions then happen in the same order
    _run_cli(_train_args(toy_data, tmp_path, 'straight', *common))
    run = tmp_path / 'killed'
    kill_at_checkpoint(_train_args(toy_data, tmp_path, 'killed', *common), run, 'epoch-0001-step-00000004', ENV)
    resumed_from = find_resume_checkpoint(run)
    _run_cli(['train', '--resume', str(run)])  # the run's own settings are restored: no flags repeated
    straight, resumed = _weights(tmp_path / 'straight'), _weights(run)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), f'diverged after resuming {resumed_from}'
    losses = [[json.loads(line)['train_loss'] for line in (folder / 'metrics.jsonl').read_text().splitlines()]
              for folder in (tmp_path / 'straight', run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)


def test_resuming_with_more_epochs_follows_the_longer_schedule(tmp_path, toy_data):
    """``--resume RUN --epochs 4`` after 2 epochs: from then on the learning rate is the 4-epoch cosine's (the
    2-epoch schedule would hold the minimum lr), as in timm's train.py."""
    common = ['-b', '8', '--warmup-epochs', '0', '--lr', '1e-3', '--min-lr', '1e-5', '--drop-path', '0']
    assert main(_train_args(toy_data, tmp_path, 'four', '--epochs', '4', *common)) == 0
    assert main(_train_args(toy_data, tmp_path, 'two', '--epochs', '2', *common)) == 0
    assert main(['train', '--resume', str(tmp_path / 'two'), '--epochs', '4']) == 0
    four, two = ({row['step']: row['lr'] for row in map(json.loads, (tmp_path / name / 'lr_schedule.jsonl')
                                                          .read_text().splitlines())} for name in ('four', 'two'))
    later = [step for step in four if step > 2 * 48 // 8]  # 2 classes x 24 images, batch 8
    assert later and [two[s] for s in later] == pytest.approx([four[s] for s in later])
    assert two[later[0]] > 2e-4  # mid-cosine, not the minimum


def one_and_two_processes(train_args, data, tmp_path, common):
    """Train ``data`` in 1 process x batch 8 ('one') and under torchrun as 2 gloo ranks x batch 4 ('two'); the
    weights must agree. Returns torchrun's result and the two runs' results.json."""
    _run_cli(train_args(data, tmp_path, 'one', '-b', '8', *common))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
           'conv2former', *train_args(data, tmp_path, 'two', '-b', '4', *common)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _weights(tmp_path / 'one'), _weights(tmp_path / 'two')
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    return result, [json.loads((tmp_path / name / 'results.json').read_text()) for name in ('one', 'two')]


def test_two_process_torchrun_matches_one_process(tmp_path, toy_data):
    """gloo DDP with 2 ranks x batch 4 == 1 process x batch 8 (no BatchNorm: patch stem; no drop path); an odd
    number of validation images is evaluated once each (no DistributedSampler padding)."""
    import shutil
    data = shutil.copytree(toy_data, tmp_path / 'data')
    shutil.copy(next((data / 'val' / 'dark').iterdir()), data / 'val' / 'dark' / 'extra.png')  # 17 val images
    toy_data = data
    common = ['--epochs', '1', '--drop-path', '0', '--lr', '1e-3', '--warmup-epochs', '0', '--model-kwargs',
              'stem=patch', '--smoothing', '0']
    result, evals = one_and_two_processes(_train_args, toy_data, tmp_path, common)
    history = [json.loads(line) for line in (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()]
    assert history[-1]['step'] == 48 // 8  # steps count global batches
    assert result.stdout.count('final: top-1') == 1, result.stdout  # rank 0 reports; rank 1 holds no best epoch
    assert evals[0]['num_samples'] == evals[1]['num_samples'] == 17
    assert evals[1]['top1'] == pytest.approx(evals[0]['top1']) and evals[1]['loss'] == pytest.approx(evals[0]['loss'])


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, toy_data, monkeypatch, capsys):
    from conv2former.tasks.classification import task as loop
    real = loop.LabelSmoothingCrossEntropy
    calls = {'n': 0}

    class Exploding(real):
        def forward(self, x, target):
            calls['n'] += 1
            loss = super().forward(x, target)
            return loss * float('nan') if calls['n'] > 15 else loss

    monkeypatch.setattr(loop, 'LabelSmoothingCrossEntropy', Exploding)
    rc = main(_train_args(toy_data, tmp_path, 'nan', '--epochs', '3', '-b', '4', '--lr', '1e-3'))
    err = capsys.readouterr().err
    assert rc == 3
    assert 'loss became nan at epoch 2' in err and 'last good checkpoint' in err
    kept = list_checkpoints(tmp_path / 'nan')
    assert [p.name for p in kept] == ['epoch-0001-step-00000012'] and f'{kept[-1]}' in err
    assert load_file(str(kept[-1] / 'model.safetensors'))  # intact and readable


def test_a_crash_while_writing_never_corrupts_the_last_checkpoint(tmp_path, monkeypatch):
    import timm
    from conv2former.engine import state as ckpt
    from conv2former.fileio import write_model_folder
    model = timm.create_model('conv2former_n', depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), num_classes=2)

    def write(folder):
        write_model_folder(model, folder, {}, label_names=['a', 'b'])

    good = save_checkpoint(tmp_path, 'epoch-0001-step-00000010', write, dict(step=10))

    def crash(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(ckpt.torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(tmp_path, 'epoch-0002-step-00000020', write, dict(step=20))
    monkeypatch.undo()
    assert find_resume_checkpoint(tmp_path) == good
    assert torch.load(good / 'train_state.pt', weights_only=True)['step'] == 10
    for i in range(3, 7):  # retention: only the newest 3 complete checkpoints stay
        save_checkpoint(tmp_path, f'epoch-000{i}-step-000000{i}0', write, dict(step=i), keep=3)
    assert [p.name[:10] for p in list_checkpoints(tmp_path)] == ['epoch-0004', 'epoch-0005', 'epoch-0006']


def _parse(*argv):
    from conv2former.slurm import train_options
    return build_options('classification', train_options(build_parser().parse_args(['train', *argv]))[0])


def test_config_resolution_precedence(tmp_path):
    args = _parse('--recipe', 'in1k', '--model', 'conv2former_b')
    assert (args.opt, args.weight_decay, args.epochs, args.aa, args.mixup, args.cutmix) == \
        ('adamw', 0.05, 300, 'rand-m9-mstd0.5-inc1', 0.8, 1.0)
    assert (args.smoothing, args.reprob, args.drop_path) == (0.1, 0.25, 0.5)  # per-model drop path for B
    args.batch_size, args.grad_accum_steps = 128, 2
    assert args.resolve_lr(world_size=4) == pytest.approx(1e-3 * 128 * 2 * 4 / 1024)  # the paper's scaling rule
    config = tmp_path / 'c.yaml'
    config.write_text('epochs: 7\nweight-decay: 0.01\n')
    args = _parse('--recipe', 'in1k', '--config', str(config), '--epochs', '3')
    assert (args.epochs, args.weight_decay) == (3, 0.01)  # flag > YAML > recipe
    assert _parse('--lr', '0.5').lr == 0.5 and _parse('--lr', '0.5').resolve_lr(8) == 0.5
    ft = _parse('--recipe', 'finetune')
    assert (ft.layer_decay, ft.epochs, ft.model_ema) == (0.8, 30, True)
    config.write_text('epoch: 7\n')
    with pytest.raises(ValueError, match=r"unknown option 'epoch'; did you mean 'epochs'"):
        _parse('--config', str(config))


@pytest.mark.parametrize('argv,message', [
    (['--recipe', 'imagenet'], "invalid choice: 'imagenet'"),
    (['-b', '0'], 'expected an integer >= 1, got 0'),
    (['--reprob', '2'], r'expected a probability in \[0, 1\], got 2'),
    (['--amp', 'fp8'], "invalid choice: 'fp8'"),
])
def test_invalid_flags_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(['train', *argv])
    assert __import__('re').search(message, capsys.readouterr().err)


def test_bad_inputs_give_clear_errors(tmp_path, toy_data, capsys):
    def run(*argv):
        rc = main(['train', '--output', str(tmp_path), *TINY_MODEL, '--epochs', '1', '-b', '4', *argv])
        return rc, capsys.readouterr().err

    rc, err = run('--data', str(tmp_path / 'nowhere'))
    assert rc == 2 and 'nowhere' in err
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'val').mkdir()
    rc, err = run('--data', str(empty))
    assert rc == 2 and 'train' in err
    rc, err = run('--data', str(toy_data), '--model', 'resnet_nope')
    assert rc == 2 and "unknown model 'resnet_nope'" in err and 'conv2former_t' in err
    mismatch = tmp_path / 'mismatch'
    for split, cls in (('train', 'cat'), ('train', 'dog'), ('val', 'cat'), ('val', 'bird')):
        (mismatch / split / cls).mkdir(parents=True)
        Image.new('RGB', (32, 32)).save(mismatch / split / cls / 'x.png')
    rc, err = run('--data', str(mismatch))
    assert rc == 2 and 'bird' in err and 'dog' in err
    rc, err = run('--data', str(toy_data), '--sync-bn')
    assert rc == 2 and '--sync-bn needs CUDA' in err


def test_pretrained_and_resume_checks(tmp_path, toy_data, capsys):
    assert main(_train_args(toy_data, tmp_path, 'base', '--epochs', '1', '-b', '8')) == 0
    base = tmp_path / 'base'
    # fine-tune from our own model folder
    assert main(_train_args(toy_data, tmp_path, 'ft', '--epochs', '1', '-b', '8', '--pretrained', str(base / 'last'))) == 0
    capsys.readouterr()
    # weights of another configuration: the mismatching keys are listed
    rc = main(_train_args(toy_data, tmp_path, 'bad', '--epochs', '1', '-b', '8', '--pretrained', str(base / 'last'),
                          '--model-kwargs', 'kernel_size=11'))
    err = capsys.readouterr().err
    assert rc == 2 and 'dwconv.weight: checkpoint (16, 1, 7, 7) vs model (16, 1, 11, 11)' in err
    # a malicious pickle is refused and nothing runs
    marker = tmp_path / 'pwned'

    class Exploit:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': Exploit()}, evil)
    rc = main(_train_args(toy_data, tmp_path, 'evil', '--epochs', '1', '-b', '8', '--pretrained', str(evil)))
    assert rc == 2 and 'refused to load' in capsys.readouterr().err and not marker.exists()
    # a new run never writes into a folder holding another run's checkpoints
    rc = main(_train_args(toy_data, tmp_path, 'base', '--epochs', '1', '-b', '8'))
    assert rc == 2 and f'--resume {base}' in capsys.readouterr().err
    # resuming with another model is refused, naming both
    rc = main(_train_args(toy_data, tmp_path, 'base', '--epochs', '2', '-b', '8', '--resume', str(base),
                          '--model', 'conv2former_t'))
    err = capsys.readouterr().err
    assert rc == 2 and "--model 'conv2former_t' differs from the run being resumed ('conv2former_n')" in err


def test_corrupt_images_are_skipped_and_counted_or_fail_with_strict(tmp_path, toy_data, capsys):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(toy_data, data)
    (data / 'train' / 'dark' / 'zero.png').write_bytes(b'')
    (data / 'train' / 'dark' / 'broken.png').write_bytes((data / 'train' / 'dark' / '0.png').read_bytes()[:60])
    assert main(_train_args(data, tmp_path, 'skip', '--epochs', '1', '-b', '8')) == 0
    log = (tmp_path / 'skip' / 'log.txt').read_text()
    assert 'zero.png' in log and 'skipped 1 file(s)' in log and 'broken.png' in log
    rc = main(_train_args(data, tmp_path, 'strict', '--epochs', '1', '-b', '8', '--strict'))
    assert rc == 2 and 'zero.png' in capsys.readouterr().err


def test_grad_accumulation_matches_the_full_batch(tmp_path, toy_data):
    """-b 4 x 2 accumulation steps == -b 8: same samples per optimizer step, same averaged gradient."""
    common = ['--epochs', '1', '--drop-path', '0', '--lr', '1e-3', '--warmup-epochs', '0', '--model-kwargs',
              'stem=patch', '--smoothing', '0']
    assert main(_train_args(toy_data, tmp_path, 'full', '-b', '8', *common)) == 0
    assert main(_train_args(toy_data, tmp_path, 'accum', '-b', '4', '--grad-accum-steps', '2', *common)) == 0
    full, accum = _weights(tmp_path / 'full'), _weights(tmp_path / 'accum')
    for k in full:
        torch.testing.assert_close(accum[k], full[k], rtol=1e-4, atol=1e-5, msg=k)


def test_amp_channels_last_compile_ema_and_grad_checkpointing_run(tmp_path, toy_data):
    assert main(_train_args(toy_data, tmp_path, 'fast', '--epochs', '1', '-b', '8', '--amp', 'bf16',
                            '--channels-last', '--compile', 'aot_eager', '--model-ema', '--grad-checkpointing',
                            '--clip-grad', '1.0', '--layer-decay', '0.8')) == 0
    run = tmp_path / 'fast'
    row = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    assert row['ema_top1'] is not None and np.isfinite(row['train_loss'])
    assert (run / 'last' / 'model_ema.safetensors').is_file()
    assert main(['validate', '--checkpoint', str(run), '--use-ema', '--data', str(toy_data), '-j', '0',
                 '--results-file', str(tmp_path / 'ema.csv')]) == 0
    assert (tmp_path / 'ema.csv').read_text().startswith('model,top1')


def test_cuda_out_of_memory_names_the_batch_size(tmp_path, toy_data, monkeypatch, capsys):
    from conv2former.tasks.classification import task as loop

    class OutOfMemory(loop.LabelSmoothingCrossEntropy):
        def forward(self, x, target):
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    monkeypatch.setattr(loop, 'LabelSmoothingCrossEntropy', OutOfMemory)
    assert main(_train_args(toy_data, tmp_path, 'oom', '--epochs', '1', '-b', '8')) == 3
    err = capsys.readouterr().err
    assert 'out of memory at batch size 8 per process' in err and '-b 4 --grad-accum-steps 2' in err


def test_convert_and_export_commands(tmp_path, fixtures_dir, fixture_config, capsys):
    upstream = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    src = tmp_path / 'upstream.pth.tar'
    torch.save({'state_dict': upstream}, src)
    out = tmp_path / 'converted'
    kwargs = [a for k, v in fixture_config.items() if k != 'num_classes'
              for a in ('--model-kwargs', f'{k}={json.dumps(v)}')]
    assert main(['convert', str(src), '--model', 'conv2former_n', '--output', str(out), *kwargs]) == 0
    import timm
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    with torch.no_grad():
        assert (model(io['input']) - io['logits']).abs().max() <= 1e-4
    assert main(['export', '--checkpoint', str(out), '--output', str(tmp_path / 'exported'), '--img-size', '64']) == 0
    assert (tmp_path / 'exported' / 'model.onnx').is_file() and (tmp_path / 'exported' / 'model.pt2').is_file()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format idx file (what torchvision's FashionMNIST reads from <root>/FashionMNIST/raw)."""
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_timm_torchvision_source(tmp_path, capsys):
    """--data torch/fashion_mnist goes through timm.data.create_dataset (torchvision's reader), offline."""
    raw = tmp_path / 'fm' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 40), ('t10k', 20)):
        labels = np.arange(n) % 2
        images = np.clip(labels[:, None, None] * 150 + 50 + rng.normal(0, 20, (n, 28, 28)), 0, 255)
        _write_idx(raw / f'{prefix}-images-idx3-ubyte', images)
        _write_idx(raw / f'{prefix}-labels-idx1-ubyte', labels)
    def train(root, name):
        return main(['train', '--data', 'torch/fashion_mnist', '--data-dir', str(root), '--output', str(tmp_path),
                     '--experiment', name, *TINY_MODEL, '--epochs', '1', '-b', '8'])

    assert train(tmp_path / 'fm', 'tv') == 0
    config = json.loads((tmp_path / 'tv' / 'last' / 'config.json').read_text())
    assert config['label_names'][:2] == ['T-shirt/top', 'Trouser'] and len(config['label_names']) == 10
    assert main(['validate', '--checkpoint', str(tmp_path / 'tv'), '--data', 'torch/fashion_mnist', '--data-dir',
                 str(tmp_path / 'fm'), '-j', '0']) == 0
    assert '(20 images, 0 skipped)' in capsys.readouterr().out
    assert train(tmp_path / 'nothing', 'missing') == 2
    err = capsys.readouterr().err
    assert 'torch/fashion_mnist (train split) not found under' in err and '--dataset-download' in err
