"""Conv2Former model family; importing this package registers every model with timm."""
from .checkpoint import load_state_dict_file, unwrap_state_dict
from .conv2former import MODEL_CONFIGS, Conv2Former, checkpoint_filter_fn
from .isotropic import Conv2FormerIsotropic

MODEL_NAMES = tuple(list(MODEL_CONFIGS) + ['conv2former_is', 'conv2former_ib'])  # every registered Conv2Former

__all__ = [
    'MODEL_CONFIGS', 'MODEL_NAMES', 'Conv2Former', 'Conv2FormerIsotropic', 'checkpoint_filter_fn', 'load_state_dict_file',
    'unwrap_state_dict',
]
