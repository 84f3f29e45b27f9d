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
    """Sorted constructor keywords of ``model_name``'s class, or None when it takes any. A constructor's
    ``**kwargs`` is taken as passed on to the base class's constructor, whose keywords count too (the Conv2Former
    families take their shared keywords that way), down to one without ``**kwargs``; one that reaches
    ``nn.Module``'s takes any. Positional-only parameters are the base's own business, not keywords."""
    with torch.device('meta'):
        cls = type(timm.create_model(model_name, pretrained=False))
    names = set()
    for klass in cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names.update(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.KEYWORD_ONLY))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return sorted(names - set(_NOT_USER_KEYWORDS))
    return None


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
