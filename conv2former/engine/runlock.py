"""One writer per run folder: an OS file lock (``<run>/.lock``) held for the whole run by rank 0.

The lock is ``fcntl.flock`` on an open file: the kernel releases it when the process ends, however it ends, so a
SIGKILLed run never leaves a stale lock behind. The file keeps the holder's pid, host and start time, which a
refused second writer names. Once the lock is held, leftovers of writes a crash interrupted are cleaned up
(``fileio.remove_partial_writes``): nobody else can be writing there.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..fileio import remove_partial_writes

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl; runs are then not guarded
    fcntl = None

LOCK_NAME = '.lock'
_logger = logging.getLogger('conv2former.train')


class RunFolderBusy(ValueError):
    """Another live process is writing this run folder."""


class RunLock:
    """The lock of one run folder; ``acquire`` raises ``RunFolderBusy`` naming the holder, ``release`` (or the
    process ending) lets go."""

    def __init__(self):
        self.run_dir: Optional[Path] = None
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        if self.held:
            if self.run_dir != run_dir:
                raise RuntimeError(f'lock of {self.run_dir} held while locking {run_dir}')
            return
        if fcntl is None:
            return
        path = run_dir / LOCK_NAME
        f = open(path, 'a+', encoding='utf-8')
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise RunFolderBusy(f'{run_dir} is in use by another run ({_describe(holder)}); wait for it to end, '
                                f'or stop it (Ctrl-C checkpoints it), or choose another --experiment') from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                started=datetime.now().isoformat(timespec='seconds'))))
        f.flush()
        self._file, self.run_dir = f, run_dir
        cleaned = remove_partial_writes(run_dir) + remove_partial_writes(run_dir / 'checkpoints')
        if cleaned:
            _logger.warning('cleaned up %d leftover(s) of interrupted writes: %s', len(cleaned),
                            ', '.join(p.name for p in cleaned))

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f'pid {info["pid"]} on {info["host"]}, started {info["started"]}'
    except (ValueError, KeyError, TypeError):
        return 'holder unknown'
