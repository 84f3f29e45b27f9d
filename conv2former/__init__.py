"""Conv2Former for PyTorch and timm: ``import conv2former`` registers every model with timm.

>>> import conv2former, timm
>>> model = timm.create_model('conv2former_t', num_classes=10)
"""
from .models import (
    MODEL_CONFIGS,
    Conv2Former,
    Conv2FormerIsotropic,
    checkpoint_filter_fn,
    load_state_dict_file,
    unwrap_state_dict,
)

__version__ = '0.1.0'

MODEL_NAMES = tuple(list(MODEL_CONFIGS) + ['conv2former_is', 'conv2former_ib'])

__all__ = [
    'Conv2Former',
    'Conv2FormerIsotropic',
    'checkpoint_filter_fn',
    'load_state_dict_file',
    'unwrap_state_dict',
    'MODEL_NAMES',
]
