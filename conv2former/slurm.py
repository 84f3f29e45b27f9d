"""Launching runs on SLURM through submitit (``--slurm PARTITION``), or through submitit's ``LocalExecutor``
(``--slurm local``: real subprocesses on this machine, no cluster).

A submitted job trains one run folder that is fixed at submission. It starts the run, or resumes it when the folder
already holds a checkpoint (a requeued or restarted job), so the job is the same function however often it runs.
SLURM's time-limit signal (USR2, ``signal_delay_s`` before the limit) stops training like SIGTERM does (a checkpoint
at the end of the current step), then submitit's own handler requeues the job, which resumes that checkpoint: an
exact continuation, as ``--resume RUN`` is. Each process of a job is one DDP rank (submitit's
``TorchDistributedEnvironment`` exports MASTER_ADDR / RANK / WORLD_SIZE / LOCAL_RANK, as ``torchrun`` would); one
process per GPU. The run folder's ``slurm/`` holds submitit's logs and ``jobs.jsonl``, one line per submission and
per start of a job on a node."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from .engine.options import keyword, non_negative_int, positive_int

_logger = logging.getLogger('conv2former.slurm')
LOCAL = 'local'
LOG_FOLDER = 'slurm'
JOBS_FILE = 'jobs.jsonl'
DEFAULT_TIMEOUT_MIN = 72 * 60  # the reference codebases' default: 72 hours
MAX_REQUEUES = 30  # time-limit requeues per job before submitit gives up (ConvNeXt's run_with_submitit uses 30)
_PARTITION = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*(,[A-Za-z0-9][A-Za-z0-9_.-]*)*$')
_MEMORY = re.compile(r'^[0-9]+[KMGT]?$')
FLAGS = ('slurm', 'nodes', 'gpus_per_node', 'cpus_per_task', 'mem', 'timeout', 'account', 'qos', 'constraint',
         'slurm_extra', 'max_parallel')


def positive_minutes(value) -> float:
    minutes = float(value)
    if not minutes > 0 or math.isinf(minutes):
        raise argparse.ArgumentTypeError(f'expected a positive number of minutes, got {value!r}')
    return minutes


def add_slurm_arguments(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The ``--slurm`` flags (submitit is imported only when ``--slurm`` is given)."""
    g = parser.add_argument_group(
        'cluster (submitit)', 'submit the run as a SLURM job and return at once; requeued on preemption and time '
                              'limits, resuming the same run folder (needs: pip install "conv2former[cluster]")')
    g.add_argument('--slurm', metavar='PARTITION',
                   help=f"SLURM partition(s), comma-separated; '{LOCAL}': submitit's LocalExecutor on this machine")
    g.add_argument('--nodes', type=positive_int, help='nodes (default 1)')
    g.add_argument('--gpus-per-node', type=non_negative_int,
                   help='GPUs per node, one process (DDP rank) each (default 1 on SLURM, 0 locally)')
    g.add_argument('--cpus-per-task', type=positive_int, help='CPU cores per process (default 10 on SLURM)')
    g.add_argument('--mem', help="memory per node, SLURM syntax: '0' (all), '64G', '500M'")
    g.add_argument('--timeout', type=positive_minutes, metavar='MINUTES',
                   help=f'time limit per job in minutes (default {DEFAULT_TIMEOUT_MIN}); the job checkpoints and is '
                        'requeued before it')
    g.add_argument('--account', help='SLURM account')
    g.add_argument('--qos', help='SLURM quality of service')
    g.add_argument('--constraint', help='SLURM node constraint (features)')
    g.add_argument('--slurm-extra', type=keyword, action='append', metavar='KEY=VALUE',
                   help='any other sbatch option, repeatable (e.g. --slurm-extra exclude=node7)')
    if sweep:
        g.add_argument('--max-parallel', type=positive_int,
                       help='jobs of the array running at once (SLURM; default: no limit)')


@dataclasses.dataclass(frozen=True)
class SlurmRequest:
    """Where and with what a job runs; ``partition == 'local'`` is submitit's LocalExecutor."""
    partition: str
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT_MIN
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    extra: tuple = ()
    max_parallel: Optional[int] = None

    @property
    def local(self) -> bool:
        return self.partition == LOCAL

    @property
    def gpus(self) -> int:
        return self.gpus_per_node if self.gpus_per_node is not None else (0 if self.local else 1)

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus)

    def check(self) -> 'SlurmRequest':
        if not _PARTITION.match(self.partition):
            raise ValueError(f'--slurm {self.partition!r}: expected a SLURM partition name (letters, digits, '
                             f"'_', '.', '-'; several separated by commas) or '{LOCAL}'")
        if self.mem is not None and not _MEMORY.match(self.mem):
            raise ValueError(f"--mem {self.mem!r}: expected SLURM's memory syntax: a number with an optional unit "
                             "K, M, G or T ('0' for all of a node's memory), e.g. 64G")
        if self.local:
            unsupported = [f'--{k}' for k in ('account', 'qos', 'constraint', 'mem') if getattr(self, k)]
            if self.nodes > 1:
                unsupported.insert(0, f'--nodes {self.nodes}')
            if self.extra:
                unsupported.append('--slurm-extra')
            if unsupported:
                raise ValueError(f'--slurm local runs on this one machine: {", ".join(unsupported)} needs a SLURM '
                                 'partition')
        for key, _ in self.extra:
            if not re.match(r'^[a-z][a-z0-9_-]*$', key):
                raise ValueError(f'--slurm-extra {key}=...: expected an sbatch option name such as exclude or '
                                 'mail_type')
        return self


def pop_request(args: argparse.Namespace) -> Optional[SlurmRequest]:
    """Remove the cluster flags from ``args``; the checked request when ``--slurm`` was given, else None (and a
    one-line error when another cluster flag was given without it)."""
    values = {k: vars(args).pop(k) for k in FLAGS if k in vars(args)}
    given = [k for k, v in values.items() if v is not None and k != 'slurm']
    if values.get('slurm') is None:
        if given:
            raise ValueError(f'--{given[0].replace("_", "-")} only applies to a submitted job: add --slurm PARTITION '
                             f"(or --slurm {LOCAL})")
        return None
    extra = tuple(item for mapping in values.pop('slurm_extra', None) or [] for item in mapping.items())
    fields = {k: v for k, v in values.items() if v is not None and k != 'slurm'}
    return SlurmRequest(partition=values['slurm'], extra=extra, **fields).check()


def train_options(args: argparse.Namespace) -> tuple[dict, Optional[SlurmRequest]]:
    """(options, cluster request) of a parsed ``train`` command of any task: the options given on the command line
    (flags not given stay out: defaults, recipe and YAML fill them) and the checked ``--slurm`` request, or None."""
    request = pop_request(args)
    return {k: v for k, v in vars(args).items() if k not in ('func', 'command', 'action')}, request


def _submitit():
    try:
        import submitit
    except ModuleNotFoundError:
        raise ModuleNotFoundError('--slurm needs submitit, which is not installed: pip install "conv2former[cluster]"'
                                  ) from None
    return submitit


def make_executor(request: SlurmRequest, folder: Path, name: str, array: bool = False):
    """A submitit executor for ``request`` writing its logs to ``folder`` (``%j``: one set per job)."""
    submitit = _submitit()
    timeout = request.timeout
    if request.local:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=timeout, gpus_per_node=request.gpus,
                                   tasks_per_node=request.tasks_per_node, signal_delay_s=_signal_delay(timeout))
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
    except RuntimeError as e:  # submitit looks for srun
        raise ValueError(f'--slurm {request.partition}: this machine is not a SLURM login node ({e}); '
                         f'--slurm {LOCAL} runs the job through submitit here') from None
    parameters = dict(partition=request.partition, nodes=request.nodes, ntasks_per_node=request.tasks_per_node,
                      time=math.ceil(timeout), signal_delay_s=_signal_delay(timeout), job_name=name,
                      additional_parameters=dict(request.extra))
    if request.gpus:
        parameters['gpus_per_node'] = request.gpus
    parameters['cpus_per_task'] = request.cpus_per_task or 10
    for key in ('mem', 'account', 'qos', 'constraint'):
        if getattr(request, key) is not None:
            parameters[key] = getattr(request, key)
    if array and request.max_parallel:
        parameters['array_parallelism'] = request.max_parallel
    executor.update_parameters(**parameters)
    return executor


def _signal_delay(timeout_min: float) -> int:
    """Seconds between the time-limit signal and the limit: 90 s (submitit's default), less for short limits."""
    return int(max(1, min(90, timeout_min * 60 * 0.2)))


@contextlib.contextmanager
def detached_stdio(enabled: bool = True):
    """While submitit's LocalExecutor starts a job controller: the controller outlives this command and would keep
    its stdin / stdout / stderr, so a pipe such as ``conv2former train ... --slurm local | tee submit.log`` would not
    end before the job does. It gets /dev/null instead (the job writes its own log files)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in zip((0, 1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


def record_job(folder: Path, **fields) -> None:
    """Append one line to ``folder/jobs.jsonl`` (the run folder's record of its SLURM jobs)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(fields, time=datetime.now().isoformat(timespec='seconds')))
    with open(folder / JOBS_FILE, 'a') as f:
        f.write(line + '\n')


class TrainJob:
    """What a submitted job runs: train ``run_dir`` (task and options fixed at submission), or resume it when it
    holds a checkpoint. ``checkpoint`` is submitit's requeue hook: it returns this same job (which resumes)."""

    def __init__(self, task: str, options: dict, run_dir: Path, sweep_dir: Optional[Path] = None):
        self.task, self.options, self.run_dir, self.sweep_dir = task, options, Path(run_dir), sweep_dir

    def __call__(self) -> dict:
        submitit = _submitit()
        environment = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if environment.global_rank == 0:
            record_job(self.run_dir / LOG_FOLDER, event='start', job_id=environment.job_id,
                       host=socket.gethostname(), pid=os.getpid(), tasks=environment.num_tasks)
        requeue = _TimeLimit()
        from .engine.runtime import Interrupted
        try:
            with requeue:
                return self._train()
        except Interrupted:
            if requeue.signalled:
                requeue.hand_over()  # submitit checkpoints this job (``checkpoint``), requeues it and exits
            raise

    def _train(self) -> dict:
        from .engine.state import list_checkpoints
        from .sweep.runner import finish_if_complete, train_one
        state = 'resume' if list_checkpoints(self.run_dir) else 'new'
        if state == 'resume' and (self.run_dir / 'results.json').is_file():
            state = 'done'  # finished before this (re)start
        result = {} if state == 'done' else train_one(self.task, self.options, str(self.run_dir), state,
                                                      record=self.sweep_dir is not None)
        if self.sweep_dir is not None and int(os.environ.get('RANK', 0)) == 0:
            finish_if_complete(self.sweep_dir)
        return result

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


class _TimeLimit:
    """While active: SLURM's time-limit / preemption signal (USR2) stops training the way SIGTERM does (a
    checkpoint at the end of the step) and is remembered, so that submitit's handler can requeue afterwards. Outside
    training (before the loop installed its handler) the signal goes straight to submitit's handler."""

    SIGNAL = signal.SIGUSR2

    def __init__(self):
        self.signalled = False
        self._submitit_handler = None

    def __enter__(self) -> '_TimeLimit':
        self._submitit_handler = signal.getsignal(self.SIGNAL)
        signal.signal(self.SIGNAL, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.SIGNAL, self._submitit_handler)

    def _handle(self, signum: int, frame) -> None:
        from .engine.runtime import StopRequest
        stop = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(stop, '__self__', None), StopRequest):
            self.signalled = True
            stop(signum, frame)
        elif callable(self._submitit_handler):
            self._submitit_handler(signum, frame)

    def hand_over(self) -> None:
        if callable(self._submitit_handler):
            self._submitit_handler(self.SIGNAL, None)


def submit_run(task: str, options: dict, request: SlurmRequest) -> dict:
    """Validate ``options`` as the run would, fix the run folder, submit one job; returns what to print."""
    from .api import build_options
    resolved = build_options(task, options)  # every bad option fails here, before anything is submitted
    if options.get('resume'):
        from .engine.runtime import find_run
        run_dir, _ = find_run(options['resume'])
        job_options = {k: v for k, v in options.items() if k != 'resume'}
    else:
        default = f'{resolved.model}-{datetime.now():%Y%m%d-%H%M%S}'
        run_dir = Path(resolved.output) / (resolved.experiment or default)
        from .engine.state import list_checkpoints
        if list_checkpoints(run_dir):
            raise ValueError(f'{run_dir} already holds a run: continue it with --resume {run_dir} --slurm '
                             f'{request.partition}, or choose another --experiment / --output')
        job_options = dict(options, experiment=run_dir.name, output=str(run_dir.parent))
    job_options.setdefault('progress', False)  # a job's log is a file: epoch lines, no bars
    logs = run_dir / LOG_FOLDER
    executor = make_executor(request, logs, name=run_dir.name)
    with detached_stdio(request.local):
        job = executor.submit(TrainJob(task, job_options, run_dir))
    record_job(logs, event='submitted', job_id=job.job_id, partition=request.partition, nodes=request.nodes,
               gpus_per_node=request.gpus)
    return dict(job=job, job_id=job.job_id, run_dir=run_dir, logs=logs)


def submit_sweep(sweep, sweep_dir: Path, request: SlurmRequest) -> dict:
    """One job per unfinished (grid point, seed), as one job array; finished runs are skipped, interrupted ones
    resume. The job that finishes the last run writes the sweep's aggregate."""
    from .sweep.runner import plan_sweep
    todo, runs, _ = plan_sweep(sweep, sweep_dir)
    if not todo:
        return dict(jobs=[], runs=len(runs), todo=0, logs=None)
    logs = Path(sweep_dir) / LOG_FOLDER
    executor = make_executor(request, logs, name=Path(sweep_dir).name, array=True)
    with detached_stdio(request.local), executor.batch():
        jobs = [executor.submit(TrainJob(sweep.task, dict(r.options, progress=False), r.run_dir(), sweep_dir))
                for r in todo]
    for run, job in zip(todo, jobs):
        record_job(run.run_dir() / LOG_FOLDER, event='submitted', job_id=job.job_id, partition=request.partition,
                   nodes=request.nodes, gpus_per_node=request.gpus)
    return dict(jobs=jobs, runs=len(runs), todo=len(todo), logs=logs)


def wait_for(jobs, poll_s: float = 1.0) -> list:
    """The results of submitted jobs, waiting for each (tests and scripts; the CLI returns at once)."""
    results = []
    for job in jobs:
        while not job.done():
            time.sleep(poll_s)
        results.append(job.result())
    return results


def print_submitted(submitted: dict) -> int:
    """What ``train --slurm`` prints: the job id, the run folder and where the job's logs go."""
    job_id = submitted['job_id']
    print(f'submitted job {job_id}: run folder {submitted["run_dir"]}, logs {submitted["logs"]}/{job_id}_*_log.out '
          f'(and .err); the run folder\'s {LOG_FOLDER}/{JOBS_FILE} lists its jobs')
    return 0


def print_submitted_sweep(submitted: dict, sweep_dir: Path) -> int:
    """What ``sweep --slurm`` prints: the array's job id, how many runs it holds, and where the aggregate goes."""
    if not submitted['todo']:
        print(f'all {submitted["runs"]} runs of {sweep_dir} are finished: nothing submitted '
              f'(conv2former sweep --report {sweep_dir} re-aggregates)')
        return 0
    array_id = submitted['jobs'][0].job_id.split('_')[0]
    print(f'submitted job array {array_id}: {submitted["todo"]} of {submitted["runs"]} runs, logs '
          f'{submitted["logs"]}; the last job to finish writes {sweep_dir}/sweep.csv (or: conv2former sweep --report '
          f'{sweep_dir})')
    return 0
