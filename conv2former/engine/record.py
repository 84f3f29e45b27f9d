"""A run's record for the commands that use its model: ``config.yaml`` (what ran: data, split, hold-out, seed,
image size, ...) found from a run folder, a model folder inside it (``best/``, ``last/``, ``checkpoints/<name>/``)
or a weights file in one; and the refusal to evaluate on the run's own training images."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml

_logger = logging.getLogger('conv2former')


def _is_run_folder(folder: Path) -> bool:
    return (folder / 'config.yaml').is_file() and any((folder / d).is_dir() for d in ('checkpoints', 'best', 'last'))


def run_record(path) -> tuple[Optional[Path], dict]:
    """(run folder, its ``config.yaml`` as a dict) for ``path`` inside a run; (None, {}) for a model outside any
    run (a converted or downloaded one)."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    for folder in (start, start.parent, start.parent.parent):
        if _is_run_folder(folder):
            record = yaml.safe_load((folder / 'config.yaml').read_text()) or {}
            if not isinstance(record, dict):
                raise ValueError(f'{folder / "config.yaml"} is not a mapping of option names to values')
            return folder, record
    return None, {}


def from_record(given, record: dict, key: str, run_dir: Optional[Path]):
    """``given`` when set, else the run's ``key`` (logged, so the user sees which value the run supplied); a run that
    recorded None (its default, e.g. the bundled dataset) supplies nothing."""
    if given is not None or record.get(key) is None:
        return given
    _logger.info('%s: %s (from %s)', key, record[key], run_dir / 'config.yaml')
    return record[key]


def refuse_train_overlap(overlap: int, what: str, allow: bool) -> None:
    """Refuse to score ``overlap`` training images of the run (``what`` says which and why) unless ``allow``; then
    warn loudly instead."""
    if not overlap:
        return
    message = f'{what}: {overlap} of the images to evaluate were used to train this run, so its numbers overstate ' \
              f'how the model does on new images'
    if not allow:
        raise ValueError(f'{message}; choose a held-out split, or pass --allow-train-overlap to score them anyway')
    _logger.warning('--allow-train-overlap: %s', message)
