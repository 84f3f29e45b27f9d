"""The Python API: ``conv2former.train(task=..., **options)`` runs what ``conv2former train`` (and ``detect train``,
``segment train``) runs, with options named as the flags (``batch_size`` for ``-b/--batch-size``)."""
from __future__ import annotations

from typing import Any

from .engine.options import resolve
from .engine.runtime import find_run
from .tasks import get_task


def build_options(task: str, options: dict, source: str = 'conv2former.train'):
    """The task's validated options from explicit values: defaults < recipe < YAML config < ``options``; with
    ``resume``, the run's saved options (only safe ones may change)."""
    task_cls, options_cls = get_task(task)
    saved = None
    if options.get('resume'):
        run_dir, saved = find_run(options['resume'])
        if saved is None:
            raise ValueError(f'--resume {options["resume"]}: {run_dir} has no config.yaml, so its settings are unknown')
    return resolve(options_cls, options, task_cls.recipes, source, saved=saved)


def train(task: str = 'classification', **options: Any) -> dict:
    """Train (or resume) a model; returns the final metrics (``val_top1`` / ``bbox_AP`` / ``mIoU`` ...) and
    ``run_dir``.

    >>> import conv2former
    >>> result = conv2former.train(task='classification', model='conv2former_n', epochs=1, img_size=32,
    ...                            model_kwargs={'depths': [1, 1, 1, 1]}, output='runs', experiment='api-demo')
    >>> result['val_top1'], result['run_dir']
    """
    from .engine.loop import fit
    task_cls, _ = get_task(task)
    return fit(task_cls(build_options(task, options)))
