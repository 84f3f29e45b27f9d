"""Faults a user meets (issue 26): no silent wrong result, no traceback, nothing lost. Symlink loops, damaged
checkpoint files, two writers in one run folder, read-only / full disks, NaN in validation, a dropped head, one
``--model-kwargs`` grammar, fixed-size exports that say so, and the smaller ones; plus a fault-injection test that
kills a training at random moments while it writes checkpoints."""
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_toy_images
from conv2former.cli import main
from conv2former.data import FileLister
from conv2former.engine.runlock import RunLock
from conv2former.engine.state import list_checkpoints
from conv2former.fileio import folder_problems, remove_partial_writes
from conv2former.tasks.classification.data import ImageFolderDataset
from conv2former.tasks.classification.task import ClassificationTask

TINY = ['--model', 'conv2former_n', '--model-kwargs', 'depths=[1,1,1,1]', 'dims=[16,32,64,128]', '--img-size', '32',
        '-j', '0', '--no-progress']
ENV = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return write_toy_images(tmp_path_factory.mktemp('faults') / 'data', 8, 4)


@pytest.fixture(scope='module')
def run(data) -> Path:
    """A finished 2-epoch run with a checkpoint every step (4 per epoch)."""
    out = data.parent / 'runs'
    assert main(['train', '--data', str(data), *TINY, '-b', '4', '--epochs', '2', '--checkpoint-steps', '1',
                 '--checkpoint-hist', '10', '--output', str(out), '--experiment', 'done']) == 0
    return out / 'done'


def _train(data, out, name, *extra) -> int:
    return main(['train', '--data', str(data), *TINY, '-b', '4', '--output', str(out), '--experiment', name, *extra])


def _truncate(path: Path) -> None:
    with path.open('r+b') as f:
        f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------------------- 1. symbolic links
def test_symlink_loops_and_second_paths_are_listed_once_and_counted(data, tmp_path):
    root = tmp_path / 'train'
    shutil.copytree(data / 'train', root)
    (root / 'dark' / 'loop').symlink_to('..')                         # the case: a loop to the parent
    (root / 'dark' / 'brights').symlink_to('../bright')               # another class's folder
    (root / 'dark' / 'outside').symlink_to(tmp_path)                  # outside the dataset
    (root / 'bright' / 'again.png').symlink_to('0.png')               # a second path to one file
    (root / 'bright' / 'more').mkdir()
    (root / 'bright' / 'more' / 'extra.png').symlink_to(data / 'val' / 'bright' / '0.png')  # a file link: kept
    ds = ImageFolderDataset(root)
    assert len(ds) == 8 + 8 + 1
    assert all(label == (0 if '/bright/' in path else 1) for path, label in ds.samples)  # no image in a wrong class
    reasons = dict(ds.skipped)
    assert ds.num_skipped == 4 and len(reasons) == 4
    assert 'parent folder' in reasons[str(root / 'dark' / 'loop')]
    assert 'already listed' in reasons[str(root / 'dark' / 'brights')]
    assert 'outside the dataset' in reasons[str(root / 'dark' / 'outside')]
    assert 'listed once' in reasons[str(root / 'bright' / 'again.png')]
    with pytest.raises(ValueError, match='left out without --strict'):
        ImageFolderDataset(root, strict=True)
    lister = FileLister(root)  # segmentation and prediction folders list through the same walker
    assert len(lister.list(root)) == 17 and len(lister.skipped) == 4


def test_a_training_on_a_looping_folder_logs_and_counts_the_links(data, tmp_path, capsys):
    looped = tmp_path / 'data'
    shutil.copytree(data, looped)
    (looped / 'train' / 'dark' / 'loop').symlink_to('..')
    assert _train(looped, tmp_path, 'loop', '--epochs', '1') == 0
    log = (tmp_path / 'loop' / 'log.txt').read_text()
    assert 'symbolic link to a parent folder' in log and '16 train / 8 val images' in log
    assert json.loads((tmp_path / 'loop' / 'results.json').read_text())['skipped']['train'] == 1
    assert _train(looped, tmp_path, 'loop-strict', '--epochs', '1', '--strict') == 2
    assert 'symbolic link to a parent folder' in capsys.readouterr().err
    assert not (tmp_path / 'loop-strict').exists()


# ------------------------------------------------------------------------------------------- 2. damaged files
def test_every_model_folder_and_checkpoint_records_its_files(run):
    for folder in [run / 'best', run / 'last', *list_checkpoints(run)]:
        manifest = json.loads((folder / 'manifest.json').read_text())['files']
        assert {'config.json', 'model.safetensors'} <= set(manifest) and folder_problems(folder) == []
    assert 'train_state.pt' in json.loads((list_checkpoints(run)[-1] / 'manifest.json').read_text())['files']


def test_resume_passes_over_a_damaged_checkpoint_and_says_what_it_costs(run, tmp_path, caplog):
    copy = tmp_path / 'copy'
    shutil.copytree(run, copy)
    newest, previous = list_checkpoints(copy)[-1], list_checkpoints(copy)[-2]
    _truncate(newest / 'train_state.pt')
    (previous / 'model.safetensors').write_bytes(b'\0' * (previous / 'model.safetensors').stat().st_size)
    with caplog.at_level('INFO', logger='conv2former.train'):
        assert main(['train', '--resume', str(copy), '--epochs', '3']) == 0
    text = caplog.text
    assert f'{newest / "train_state.pt"} is truncated or corrupt' in text
    assert 'its sha256 differs' in text and 'repeats 2 optimizer step(s)' in text
    assert f'resumed from {list_checkpoints(run)[-3]}'.replace(str(run), str(copy)) in text
    assert json.loads((copy / 'metrics.jsonl').read_text().splitlines()[-1])['epoch'] == 3


@pytest.mark.parametrize('command', ['validate', 'predict'])
def test_validate_and_predict_refuse_damaged_weights_and_name_the_intact_ones(run, tmp_path, capsys, command):
    copy = tmp_path / 'copy'
    shutil.copytree(run, copy)
    _truncate(copy / 'best' / 'model.safetensors')
    image = str(run.parent.parent / 'data' / 'val' / 'dark' / '0.png')
    args = ['--checkpoint', str(copy), '--no-progress'] + ([image] if command == 'predict' else [])
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert f'{copy / "best" / "model.safetensors"} is truncated or corrupt' in err and str(copy / 'last') in err


def test_folders_and_files_without_a_manifest_are_checked_by_structure(run, tmp_path, capsys):
    legacy = tmp_path / 'legacy'
    shutil.copytree(run / 'best', legacy)
    (legacy / 'manifest.json').unlink()
    _truncate(legacy / 'model.safetensors')
    assert main(['validate', '--checkpoint', str(legacy), '--no-progress']) == 2
    assert 'is truncated or corrupt' in capsys.readouterr().err
    weights = tmp_path / 'w.safetensors'
    shutil.copy(run / 'last' / 'model.safetensors', weights)
    _truncate(weights)
    assert main(['validate', '--checkpoint', str(weights), '--model', 'conv2former_n', '--no-progress']) == 2
    assert f'{weights} is truncated or corrupt' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 3. one writer
def test_a_second_writer_is_refused_and_the_lock_dies_with_its_process(run, data, tmp_path, capsys):
    held = RunLock()
    held.acquire(run)
    try:
        assert main(['train', '--resume', str(run), '--epochs', '3']) == 2
        err = capsys.readouterr().err
        assert f'{run} is in use by another run (pid {os.getpid()}' in err
        assert _train(data, run.parent, run.name, '--epochs', '1') == 2  # a new run into the same folder
        assert 'is in use by another run' in capsys.readouterr().err
    finally:
        held.release()
    script = ('import os, signal, sys\nfrom conv2former.engine.runlock import RunLock\nRunLock().acquire(sys.argv[1])\n'
              'os.kill(os.getpid(), signal.SIGKILL)')
    assert subprocess.run([sys.executable, '-c', script, str(tmp_path)]).returncode == -9
    RunLock().acquire(tmp_path)  # the kernel dropped the dead holder's lock: no stale lock


def test_leftovers_of_interrupted_writes_are_cleaned_up_when_the_run_starts_again(run, tmp_path):
    copy = tmp_path / 'copy'
    shutil.copytree(run, copy)
    (copy / 'checkpoints' / '.epoch-0003-step-00000009.tmp-77-ab12').mkdir()
    (copy / '.metrics.csv.77.ab12.tmp').write_text('half')
    os.replace(copy / 'best', copy / '.best.old-77-ab12')  # killed between the two renames of a swap
    RunLock().acquire(copy)
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith('.')) == ['.lock']
    assert not [p for p in (copy / 'checkpoints').iterdir() if p.name.startswith('.')]
    assert folder_problems(copy / 'best') == [] and remove_partial_writes(copy) == []


# ------------------------------------------------------------------------------------------- 4. disk faults
def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (bash) as root of a new user + mount namespace, or skip where the machine does not allow it."""
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o size=1m tmpfs {tmp_path}'],
                           capture_output=True) if shutil.which('unshare') else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f'cannot mount in a user namespace here (unshare -rm): {probe.stderr.decode() if probe else ""}')
    return subprocess.run(['unshare', '-rm', 'bash', '-c', script], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path)


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_leaves_no_partial_folder(data, tmp_path):
    full = tmp_path / 'full'
    full.mkdir()
    train = shlex.join([sys.executable, '-m', 'conv2former', 'train', '--data', str(data), *TINY, '-b', '4',
                        '--epochs', '2', '--checkpoint-steps', '1', '--output', str(full), '--experiment', 'r'])
    # 2 MB weights + 4 MB training state per checkpoint: the second or third checkpoint does not fit in 14 MB
    check = ('from conv2former.engine.state import list_checkpoints as ls; from conv2former.fileio import '
             'folder_problems as fp; import sys; c = ls(sys.argv[1]); print("intact", len(c), '
             'all(fp(x) == [] for x in c), c[-1])')
    done = _in_namespace(f'mount -t tmpfs -o size=14m tmpfs {full} && {{ {train}; echo "rc=$?"; }} && '
                         f'ls -a {full}/r {full}/r/checkpoints && {sys.executable} -c {shlex.quote(check)} {full}/r',
                         tmp_path)
    err = done.stderr.strip().splitlines()
    assert 'rc=4' in done.stdout, done.stdout + done.stderr
    assert err[-1].startswith('conv2former: error: cannot write ') and 'No space left on device' in err[-1]
    assert 'Traceback' not in done.stderr and '--resume' in err[-1]
    assert '.tmp' not in done.stdout  # the partial checkpoint folder was removed
    intact = next(line for line in done.stdout.splitlines() if line.startswith('intact')).split()
    assert int(intact[1]) >= 1 and intact[2] == 'True'
    assert f'the last good checkpoint, {intact[3]}, is intact' in err[-1]


def test_a_read_only_output_is_one_line_for_a_new_run_a_resume_and_validate(run, data, tmp_path):
    ro = tmp_path / 'ro'
    shutil.copytree(run, ro / 'done')
    cli = f'{sys.executable} -m conv2former'
    script = (f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && '
              f'{cli} train --resume {ro / "done"} --epochs 3; echo "rc=$?"; '
              f'{cli} train --data {data} --output {ro} --experiment new -b 4 --img-size 32 --no-progress; '
              f'echo "rc=$?"; {cli} validate --checkpoint {ro / "done"} --no-progress; echo "rc=$?"')
    done = _in_namespace(script, tmp_path)
    assert done.stdout.count('rc=4') == 3, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith('conv2former: error:')]
    assert len(errors) == 3 and all('Read-only file system' in line for line in errors)
    assert f'{list_checkpoints(ro / "done")[-1]}, is intact' in errors[0]
    assert 'no checkpoint was written yet' in errors[1] and '--results-file' in errors[2]
    assert 'Traceback' not in done.stderr and not (ro / 'new').exists()


# ------------------------------------------------------------------------------------------- 5. NaN in validation
@pytest.mark.parametrize('fault', ['val_loss', 'weights'])
def test_non_finite_validation_or_weights_stop_the_run_and_are_never_best(data, tmp_path, monkeypatch, capsys,
                                                                          fault):
    real = ClassificationTask.evaluate
    calls = []

    def evaluate(self, model, *args, **kwargs):
        metrics = real(self, model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            if fault == 'val_loss':
                metrics['val_loss'] = float('nan')
            else:
                with torch.no_grad():
                    next(model.parameters()).fill_(float('inf'))
        return metrics

    monkeypatch.setattr(ClassificationTask, 'evaluate', evaluate)
    assert _train(data, tmp_path, 'nan', '--epochs', '3') == 3
    err = capsys.readouterr().err
    assert ('val_loss nan' if fault == 'val_loss' else 'the weights hold NaN or inf') in err
    assert 'at the end of epoch 2' in err and f'last good checkpoint: {list_checkpoints(tmp_path / "nan")[-1]}' in err
    assert [p.name for p in list_checkpoints(tmp_path / 'nan')] == ['epoch-0001-step-00000004']
    assert len((tmp_path / 'nan' / 'metrics.csv').read_text().splitlines()) == 2  # header + epoch 1
    best = load_file(str(tmp_path / 'nan' / 'best' / 'model.safetensors'))
    assert all(torch.isfinite(v).all() for v in best.values())


# ------------------------------------------------------------------------------------------- 6. dropped heads
def test_evaluating_with_another_head_is_refused_and_fine_tuning_says_it_re_initialises(run, tmp_path, capsys):
    assert main(['validate', '--checkpoint', str(run), '--model-kwargs', 'num_classes=3', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'holds a 2-class classifier' in err and 'conv2former train --pretrained' in err
    three = write_toy_images(tmp_path / 'three', 4, 2, classes=(('a', 40), ('b', 120), ('c', 210)))
    assert _train(three, tmp_path, 'ft', '--epochs', '1', '--pretrained', str(run)) == 0
    assert 'head re-initialised: 2 -> 3 classes' in (tmp_path / 'ft' / 'log.txt').read_text()


# ------------------------------------------------------------------------------------------- 7. one flag grammar
def test_model_kwargs_take_several_pairs_in_every_command(run, capsys):
    image = run.parent.parent / 'data' / 'val' / 'dark' / '0.png'
    weights = run / 'last' / 'model.safetensors'
    tmp = run.parent / 'bare.safetensors'
    shutil.copy(weights, tmp)  # no config.json beside it: the architecture comes from the flags
    assert main(['predict', str(image), '--checkpoint', str(tmp), '--model', 'conv2former_n', '--img-size', '32',
                 '--model-kwargs', 'depths=[1,1,1,1]', 'dims=[16,32,64,128]', '--json']) == 0
    assert json.loads(capsys.readouterr().out)[0]['top'][0]['label'] in ('0', '1')
    with pytest.raises(SystemExit):
        main(['predict', '--checkpoint', str(run), '--model-kwargs', 'kernel_size=7', str(image)])
    assert 'put other arguments before it' in capsys.readouterr().err
    assert main(['predict', '--checkpoint', str(run), str(image), 'dims=[16,32]']) == 1
    assert 'did you mean --model-kwargs dims=[16,32]?' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 8. export sizes
def test_export_below_the_dynamic_minimum_says_it_is_fixed_and_above_it_is_dynamic(run, tmp_path):
    assert main(['export', '--checkpoint', str(run), '--output', str(tmp_path / 'e32'), '--format', 'torch']) == 0
    record = json.loads((tmp_path / 'e32' / 'config.json').read_text())
    assert record['pt2_input'] == ['batch', 3, 32, 32] and 'input fixed at 32x32' in record['pt2_fixed_size_reason']
    assert '--img-size 64' in record['pt2_fixed_size_reason']
    assert main(['export', '--checkpoint', str(run), '--output', str(tmp_path / 'e64'), '--format', 'torch',
                 '--img-size', '64']) == 0
    record = json.loads((tmp_path / 'e64' / 'config.json').read_text())
    assert record['pt2_input'] == ['batch', 3, 'height', 'width'] and 'pt2_fixed_size_reason' not in record
    program = torch.export.load(str(tmp_path / 'e64' / 'model.pt2')).module()
    assert program(torch.randn(1, 3, 64, 96)).shape == (1, 2)


# ------------------------------------------------------------------------------------------- 9. smaller ones
def test_bad_step_counts_are_refused_and_a_warm_up_longer_than_the_run_is_a_warning(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(data, tmp_path, 'neg', '--checkpoint-steps', '-1')
    assert 'expected an integer >= 0, got -1' in capsys.readouterr().err
    assert _train(data, tmp_path, 'warm', '--epochs', '1', '--warmup-epochs', '5') == 0
    assert '--warmup-epochs 5 covers the whole run' in (tmp_path / 'warm' / 'log.txt').read_text()


def test_predict_goes_on_past_an_unreadable_image_and_fails_at_the_end(run, tmp_path, capsys):
    images = sorted((run.parent.parent / 'data' / 'val' / 'dark').iterdir())[:2]
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    url = 'https://example.com/cat.jpg'
    assert main(['predict', '--checkpoint', str(run), '--json', str(images[0]), str(broken), url,
                 str(images[1])]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [('top' in r) for r in results] == [True, False, False, True]
    assert str(broken) in results[1]['error'] and results[2]['image'] == url and url in captured.err
    assert '2 of 4 images could not be classified' in captured.err


def test_logs_and_warnings_say_what_happened(run, tmp_path, capsys, caplog, monkeypatch):
    import conv2former.engine.loop as loop

    def stop(*args):  # the set-up is what this test reads: stop before the first epoch
        raise loop.Interrupted('stopped by the test')

    monkeypatch.setattr(loop, 'train_one_epoch', stop)
    assert main(['train', *TINY, '-b', '64', '--output', str(tmp_path), '--experiment', 'b']) == 130
    monkeypatch.undo()
    assert 'on the bundled dataset (Fashion-MNIST subset)' in (tmp_path / 'b' / 'log.txt').read_text()
    bare = tmp_path / 'w.safetensors'
    shutil.copy(run / 'last' / 'model.safetensors', bare)
    args = ['validate', '--checkpoint', str(bare), '--model', 'conv2former_n', '--data', str(run.parent.parent /
            'data'), '--model-kwargs', 'depths=[1,1,1,1]', 'dims=[16,32,64,128]', '--no-progress']
    with caplog.at_level('WARNING'):
        assert main([*args, '--img-size', '32']) == 0
    assert 'preprocessing uses the' not in caplog.text
    with caplog.at_level('WARNING'):
        assert main(args) == 0
    assert 'preprocessing uses the conv2former_n defaults' in caplog.text


def test_a_failed_strict_start_leaves_no_folder(data, tmp_path, capsys):
    broken = tmp_path / 'data'
    shutil.copytree(data, broken)
    (broken / 'train' / 'dark' / 'zz.png').write_bytes(b'garbage')
    assert _train(broken, tmp_path, 'strict', '--epochs', '1', '--strict') == 2
    err = capsys.readouterr().err
    assert 'unreadable image (--strict' in err and 'zz.png' in err and 'Traceback' not in err
    assert not (tmp_path / 'strict').exists()


# ------------------------------------------------------------------------------------------- fault injection
_KILLER = r'''
import os, signal, sys
import conv2former.fileio as fileio
from conv2former.cli import main
kill_at, seen = int(os.environ['KILL_AT']), [0]

def due():
    seen[0] += 1
    return seen[0] == kill_at

real_write, real_replace = fileio.write_bytes, os.replace

def write_bytes(path, data):
    if due():  # die half-way through the file
        with open(path, 'wb') as f:
            f.write(bytes(data)[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, data)

def replace(src, dst):
    if due():  # die just before a rename
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

fileio.write_bytes, os.replace = write_bytes, replace
sys.exit(main(sys.argv[1:]))
'''


def test_killed_at_random_moments_while_checkpointing_the_run_still_ends_bit_identical(data, tmp_path):
    """SIGKILL at 10 random write moments (half-written files, between renames), seeded; each restart must resume
    from an intact checkpoint, and the final weights equal an uninterrupted run's bit for bit."""
    args = ['train', '--data', str(data), *TINY, '-b', '4', '--epochs', '3', '--checkpoint-steps', '1',
            '--output', str(tmp_path)]
    script = tmp_path / 'killer.py'
    script.write_text(_KILLER)

    def launch(kill_at: int, *extra) -> int:
        env = dict(ENV, KILL_AT=str(kill_at))
        return subprocess.run([sys.executable, str(script), *extra], env=env, capture_output=True).returncode

    assert launch(0, *args, '--experiment', 'straight') == 0
    rng, run = random.Random(26), tmp_path / 'killed'
    # the first checkpoint is complete after 6 counted writes (config.yaml, then weights, 2 renames, state, rename)
    assert launch(rng.randint(7, 14), *args, '--experiment', 'killed') == -9
    kills = 1
    while kills < 10:
        assert list_checkpoints(run) and all(folder_problems(c) == [] for c in list_checkpoints(run))
        rc = launch(rng.randint(2, 9), 'train', '--resume', str(run))
        assert rc in (-9, 0)
        if rc == 0:
            break
        kills += 1
    assert kills == 10, f'the run finished after {kills} kills'
    assert launch(0, 'train', '--resume', str(run)) == 0
    straight, killed = (load_file(str(tmp_path / name / 'last' / 'model.safetensors')) for name in ('straight',
                                                                                                  'killed'))
    assert straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)
    assert [p.name for p in run.rglob('.*')] == ['.lock']  # every leftover of a kill was cleaned up
    rows = [[json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
            for name in ('straight', 'killed')]
    assert [(r['epoch'], r['step']) for r in rows[0]] == [(r['epoch'], r['step']) for r in rows[1]]
    assert [r['val_top1'] for r in rows[0]] == [r['val_top1'] for r in rows[1]]
    assert [r['train_loss'] for r in rows[0]] == pytest.approx([r['train_loss'] for r in rows[1]], rel=1e-9)


def test_a_damaged_task_folder_is_refused_by_name(tmp_path):
    from conv2former.fileio import DamagedFileError, read_task_folder, write_task_folder
    folder = write_task_folder(torch.nn.Linear(64, 64), tmp_path / 'run' / 'best', dict(task='detection'))
    assert read_task_folder(folder)[0] == dict(task='detection')
    _truncate(folder / 'model.safetensors')
    with pytest.raises(DamagedFileError, match='best/model.safetensors is truncated or corrupt .* bytes'):
        read_task_folder(tmp_path / 'run')
