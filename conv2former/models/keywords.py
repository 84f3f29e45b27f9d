"""Model constructor keywords: ``--model-kwargs`` / ``--backbone-kwargs`` are checked against the model class before
it is built, so a typo gives one line (the keyword, the closest valid one, all valid ones) instead of a traceback."""
from __future__ import annotations

import difflib
import inspect

import timm
import torch

# keywords timm's model builder consumes itself (besides the model class's own)
_BUILDER_KEYWORDS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'features_only', 'out_indices', 'feature_cls',
                     'feature_cfg', 'pretrained_strict', 'checkpoint_path', 'cache_dir')
_NOT_USER_KEYWORDS = ('self', 'device', 'dtype')


def model_keywords(model_name: str) -> list[str] | None:
    """Sorted constructor keywords of ``model_name``'s class, or None when it takes any (``**kwargs``)."""
    with torch.device('meta'):
        cls = type(timm.create_model(model_name, pretrained=False))
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.name not in _NOT_USER_KEYWORDS)


def check_model_kwargs(model_name: str, kwargs: dict, flag: str = '--model-kwargs') -> None:
    """Raise a one-line ValueError naming a keyword ``model_name`` does not take, its closest match and the valid
    ones."""
    if not kwargs:
        return
    valid = model_keywords(model_name)
    if valid is None:
        return
    for key in kwargs:
        if key not in valid and key not in _BUILDER_KEYWORDS:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f'; did you mean {close[0]!r}?' if close else ''
            raise ValueError(f'{flag}: {model_name} takes no keyword {key!r}{hint} (valid: {", ".join(valid)})')
