"""--slurm: bad flags refused before anything is submitted, the sbatch script carries the request, and through
submitit's LocalExecutor (real subprocesses) a submitted run equals a local one, a job sent SLURM's time-limit signal
is requeued and resumes exactly, and a submitted sweep writes its aggregate."""
import csv
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conv2former.cli import main
from conv2former.engine.state import list_checkpoints

pytest.importorskip('submitit', reason='the cluster extra (conv2former[cluster]) is part of the test environment')
from conv2former.slurm import JOBS_FILE, LOG_FOLDER, SlurmRequest, pop_request, submit_run, submit_sweep, wait_for  # noqa: E402

TINY = ['--model', 'conv2former_n', '--model-kwargs', 'depths=[1,1,1,1]', '--model-kwargs', 'dims=[8,8,16,16]',
        '--img-size', '32', '-j', '0', '--no-progress', '--recipe', 'small', '--warmup-epochs', '0', '-b', '8']


@pytest.fixture(scope='module')
def toy(tmp_path_factory, toy_images) -> Path:
    return toy_images(tmp_path_factory.mktemp('toy'), n_train=16, n_val=4)


def _starts(run_dir: Path) -> list:
    lines = (run_dir / LOG_FOLDER / JOBS_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e['event'] == 'start']


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / 'last' / 'model.safetensors')


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('flags, message', [
    (['--slurm', 'gpu partition'], 'expected a SLURM partition name'),
    (['--slurm', 'local', '--nodes', '2'], '--slurm local runs on this one machine: --nodes 2'),
    (['--slurm', 'gpu', '--mem', '64 GB'], "--mem '64 GB': expected SLURM's memory syntax"),
    (['--nodes', '2'], '--nodes only applies to a submitted job: add --slurm PARTITION'),
    (['--slurm', 'gpu', '--slurm-extra', 'Bad Key=1'], 'expected an sbatch option name'),
])
def test_bad_flags_are_one_line_errors_before_anything_is_submitted(tmp_path, toy, capsys, flags, message):
    rc = main(['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'x', *TINY, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'x').exists()  # nothing submitted: no run folder, no job files


def test_no_slurm_here_is_a_one_line_error(tmp_path, toy, capsys):
    rc = main(['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'x', *TINY, '--slurm', 'gpu'])
    err = capsys.readouterr().err
    assert rc == 2 and 'not a SLURM login node' in err and '--slurm local' in err


def test_nodes_zero_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(['train', '--slurm', 'gpu', '--nodes', '0'])
    assert e.value.code == 2 and '--nodes' in capsys.readouterr().err


def test_missing_submitit_names_the_extra(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'submitit', None)  # import submitit now raises ModuleNotFoundError
    rc = main(['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'x', *TINY, '--slurm', 'gpu'])
    assert rc == 2 and 'pip install "conv2former[cluster]"' in capsys.readouterr().err


def test_the_sbatch_script_carries_the_request(tmp_path, toy, capsys, monkeypatch):
    """A stand-in ``sbatch`` on PATH records the script submitit writes and answers with a job id."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    sbatch = bin_dir / 'sbatch'
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / 'srun').write_text('#!/bin/sh\nexit 1\n')  # submitit checks that srun exists
    for tool in (sbatch, bin_dir / 'srun'):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    argv = ['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'big', *TINY,
            '--slurm', 'gpu,gpu-long', '--nodes', '4', '--gpus-per-node', '8', '--cpus-per-task', '12', '--mem', '0',
            '--timeout', '600', '--account', 'vision', '--qos', 'high', '--constraint', 'h100',
            '--slurm-extra', 'exclude=node7']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'submitted job 4242' in out and str(tmp_path / 'big') in out
    script = (tmp_path / 'script.sh').read_text()
    for line in ('--partition=gpu,gpu-long', '--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8',
                 '--cpus-per-task=12', '--mem=0', '--time=600', '--account=vision', '--qos=high',
                 '--constraint=h100', '--exclude=node7', '--signal=USR2@90'):
        assert f'#SBATCH {line}\n' in script, line
    record = json.loads((tmp_path / 'big' / LOG_FOLDER / JOBS_FILE).read_text())
    assert record['event'] == 'submitted' and record['job_id'] == '4242' and record['gpus_per_node'] == 8


def test_resume_of_another_model_is_refused_before_submitting(tmp_path, toy, capsys):
    argv = ['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'r', '--epochs', '1', *TINY]
    assert main(argv) == 0
    capsys.readouterr()
    rc = main(['train', '--resume', str(tmp_path / 'r'), '--model', 'convnext_nano', '--slurm', 'local'])
    assert rc == 2 and 'convnext_nano' in capsys.readouterr().err
    assert not (tmp_path / 'r' / LOG_FOLDER).exists()


def test_a_local_job_equals_a_local_run_and_a_signalled_job_resumes_exactly(tmp_path, toy):
    """One reference run in this process; the same run as a submitted job; and again, sent SLURM's time-limit /
    preemption signal (USR2, what SLURM sends ``signal_delay_s`` before --timeout) after its first checkpoint: it
    checkpoints, submitit requeues it, and the requeued job resumes to the same weights."""
    epochs = 8
    options = dict(data=str(toy), output=str(tmp_path), epochs=epochs, model='conv2former_n', img_size=32, workers=0,
                   progress=False, recipe='small', warmup_epochs=0, batch_size=8,
                   model_kwargs=dict(depths=[1, 1, 1, 1], dims=[8, 8, 16, 16]))
    plain = submit_run('classification', dict(options, experiment='job'), SlurmRequest('local'))
    signalled = submit_run('classification', dict(options, experiment='signalled'), SlurmRequest('local'))
    run = tmp_path / 'signalled'
    deadline = time.time() + 600
    while not list_checkpoints(run):  # signal right after the first epoch, well before the last one (a signal
        # that comes during the last epoch's evaluation lets the run finish: nothing left to requeue)
        assert not signalled['job'].done() and time.time() < deadline, 'the job ended before its first checkpoint'
        time.sleep(0.05)
    os.kill(_starts(run)[0]['pid'], signal.SIGUSR2)
    assert main(['train', '--data', str(toy), '--output', str(tmp_path), '--experiment', 'ref', '--epochs',
                 str(epochs), *TINY]) == 0
    results = wait_for([plain['job'], signalled['job']])
    reference = _weights(tmp_path / 'ref')
    assert _same(_weights(tmp_path / 'job'), reference)
    assert results[0]['val_top1'] == json.loads((tmp_path / 'ref' / 'results.json').read_text())['top1']
    assert len(_starts(run)) == 2, 'the signalled job was not requeued'
    log = (run / 'log.txt').read_text()
    assert 'SIGUSR2 received' in log and 'resumed from' in log
    assert _same(_weights(run), reference)  # bit-identical to the uninterrupted run
    rows = list(csv.DictReader(open(run / 'metrics.csv')))
    assert [int(r['epoch']) for r in rows] == list(range(1, epochs + 1))  # every epoch once


def test_a_submitted_sweep_writes_its_aggregate_when_the_last_job_ends(tmp_path, toy, capsys):
    from conv2former.cli import build_parser
    from conv2former.sweep.cli import _sweep_from_args
    argv = ['sweep', '--grid', 'kernel_size=3,5', '--seeds', '0', '--epochs', '1', '--data', str(toy),
            '--output', str(tmp_path), '--experiment', 's', *TINY]
    args = build_parser().parse_args(argv)
    assert pop_request(args) is None  # the cluster flags leave the sweep's options
    sweep, folder = _sweep_from_args(args)
    submitted = submit_sweep(sweep, folder, SlurmRequest('local'))
    assert submitted['todo'] == 2
    wait_for(submitted['jobs'])
    rows = list(csv.DictReader(open(folder / 'sweep.csv')))
    assert [r['kernel_size'] for r in rows] == ['3', '5'] and all(r['final_top1'] for r in rows)
    assert main([*argv, '--slurm', 'local']) == 0  # everything finished: nothing submitted again
    assert 'nothing submitted' in capsys.readouterr().out


@pytest.mark.parametrize('command', [['detect', 'train'], ['segment', 'train']])
def test_dense_training_takes_the_same_cluster_flags(tmp_path, capsys, command):
    rc = main([*command, '--output', str(tmp_path), '--slurm', 'local', '--nodes', '3'])
    assert rc == 2 and '--slurm local runs on this one machine: --nodes 3' in capsys.readouterr().err
    rc = main([*command, '--output', str(tmp_path), '--qos', 'high'])
    assert rc == 2 and '--qos only applies to a submitted job' in capsys.readouterr().err



def test_the_submitting_command_hands_no_output_stream_to_a_local_job(tmp_path, toy):
    """``train --slurm local | tee ...`` ends with the command, not with the job: the job controller, which outlives
    the command, must not hold the command's stdout / stderr (it gets /dev/null; the job writes its log files)."""
    import select
    import subprocess
    run = tmp_path / 'long'
    command = [sys.executable, '-m', 'conv2former', 'train', '--data', str(toy), '--output', str(tmp_path),
               '--experiment', 'long', '--epochs', '400', *TINY, '--slurm', 'local']
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.wait(timeout=120) == 0
        out, deadline = b'', time.time() + 30  # the job runs for minutes: EOF within 30 s is the command's own
        while time.time() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        else:
            pytest.fail('the output pipe stayed open after the command ended: the local job holds it')
        assert b'submitted job' in out and not (run / 'results.json').exists()
    finally:
        deadline = time.time() + 120
        while not ((run / LOG_FOLDER / JOBS_FILE).is_file() and _starts(run)) and time.time() < deadline:
            time.sleep(0.1)
        for start in _starts(run) if (run / LOG_FOLDER / JOBS_FILE).is_file() else []:
            try:
                os.kill(start['pid'], signal.SIGKILL)
            except ProcessLookupError:
                pass
