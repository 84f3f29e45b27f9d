"""Conv2Former for PyTorch and timm: ``import conv2former`` registers every model with timm.

>>> import conv2former, timm
>>> model = timm.create_model('conv2former_t', num_classes=10)
"""
from .models import (
    MODEL_CONFIGS,
    MODEL_NAMES,
    Conv2Former,
    Conv2FormerIsotropic,
    checkpoint_filter_fn,
    load_state_dict_file,
    unwrap_state_dict,
)

__version__ = '0.1.0'


def train(task: str = 'classification', **options):
    """Train a model: ``conv2former.train(task='classification' | 'detection' | 'segmentation', **options)``, options
    named as the command-line flags; returns the final metrics and ``run_dir`` (see ``conv2former.api.train``)."""
    from .api import train as _train
    return _train(task, **options)


__all__ = [
    'Conv2Former',
    'Conv2FormerIsotropic',
    'checkpoint_filter_fn',
    'load_state_dict_file',
    'unwrap_state_dict',
    'MODEL_NAMES',
    'train',
]
