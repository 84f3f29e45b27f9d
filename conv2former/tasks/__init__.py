"""The tasks the engine trains: classification, detection (and instance segmentation), semantic segmentation. Each
sub-package holds its datasets, model builder, metrics, recipes, engine task and command-line sub-commands.

Detection needs the ``detection`` extra (pycocotools) and segmentation the ``segmentation`` extra
(segmentation-models-pytorch); both are imported only when used.
"""
from __future__ import annotations

import importlib

# task name -> (module, task class, options class, pip extra or None)
TASKS = {
    'classification': ('conv2former.tasks.classification.task', 'ClassificationTask', 'ClassificationOptions', None),
    'detection': ('conv2former.tasks.detection.task', 'DetectionTask', 'DetectionOptions', 'detection'),
    'segmentation': ('conv2former.tasks.segmentation.task', 'SegmentationTask', 'SegmentationOptions',
                     'segmentation'),
}
_PACKAGES = {'detection': 'pycocotools', 'segmentation': 'segmentation_models_pytorch'}


def require_extra(extra: str) -> None:
    """Raise a clear error naming the pip command when the packages of ``extra`` are missing."""
    try:
        importlib.import_module(_PACKAGES[extra])
    except ImportError as e:
        raise ModuleNotFoundError(f'{extra} needs {e.name or _PACKAGES[extra]}, which is not installed: '
                                  f'pip install "conv2former[{extra}]"') from None


def get_task(name: str) -> tuple[type, type]:
    """(task class, options class) of a task name."""
    if name not in TASKS:
        raise ValueError(f'unknown task {name!r}; expected one of {", ".join(TASKS)}')
    module, task_cls, options_cls, extra = TASKS[name]
    if extra:
        require_extra(extra)
    module = importlib.import_module(module)
    return getattr(module, task_cls), getattr(module, options_cls)
