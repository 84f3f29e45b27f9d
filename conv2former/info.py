"""Model facts: parameters, MACs and feature pyramid, computed on the ``meta`` device (no memory, no time)."""
from dataclasses import dataclass, field
from typing import List, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from .models import MODEL_NAMES


@dataclass
class ModelInfo:
    name: str
    params: int
    macs: int
    img_size: int
    features: List[Tuple[int, int]] = field(default_factory=list)  # (reduction, channels) per feature level

    def as_dict(self) -> dict:
        return dict(name=self.name, params=self.params, macs=self.macs, img_size=self.img_size,
                    features=[dict(reduction=r, num_chs=c) for r, c in self.features])


def count_macs(model: torch.nn.Module, img_size: int = 224, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass (``torch.utils.flop_counter`` FLOPs / 2)."""
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, img_size, img_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def model_info(name: str, img_size: int = 224, **kwargs) -> ModelInfo:
    """Facts of a registered model, built on ``meta`` so even Conv2Former-L costs nothing."""
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name!r}; registered Conv2Former models: {", ".join(MODEL_NAMES)}')
    model = timm.create_model(name, device='meta', **kwargs).eval()
    features = [(f['reduction'], f['num_chs']) for f in model.feature_info]
    return ModelInfo(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        macs=count_macs(model, img_size, model.in_chans),
        img_size=img_size,
        features=sorted(set(features)),
    )
