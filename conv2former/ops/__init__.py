"""Custom kernels with a PyTorch fallback.

``dwconv2d(x, weight, bias)`` is the depthwise "same" convolution used by Conv2Former; ``kernel_backend(x)`` says
whether it runs the Triton kernel (``depthwise_conv2d``) or ``F.conv2d``. Set ``CONV2FORMER_KERNELS=torch`` or
``=triton`` to force a backend; the default is Triton for CUDA tensors when triton is importable, PyTorch otherwise.
"""
import os
from typing import Literal, Optional

import torch.nn.functional as F
from torch import Tensor

from .dwconv import depthwise_conv2d, interpreter_enabled, triton_available
from .convmod import FUSED_WEIGHTINGS, conv_modulation

__all__ = ['depthwise_conv2d', 'dwconv2d', 'kernel_backend', 'KERNELS_ENV', 'conv_modulation', 'FUSED_WEIGHTINGS']

KERNELS_ENV = 'CONV2FORMER_KERNELS'
# The Triton kernels have been verified under the interpreter only: until a GPU run of
# benchmarks/bench_dwconv.py confirms them correct and faster than cuDNN, the automatic choice stays PyTorch.
AUTO_TRITON_ON_CUDA = False
_BACKENDS = ('torch', 'triton')


def kernel_backend(x: Tensor, forced: Optional[str] = None) -> Literal['triton', 'torch']:
    """The backend ``dwconv2d`` uses for ``x``: ``forced`` if given (a model's ``kernels`` keyword), else
    ``$CONV2FORMER_KERNELS`` if set, else PyTorch (Triton on CUDA once ``AUTO_TRITON_ON_CUDA`` is switched on).

    Raises:
        ValueError: the variable holds something other than ``torch``/``triton``.
        RuntimeError: Triton is forced but not installed, or forced for a non-CUDA tensor without
            ``TRITON_INTERPRET=1``.
    """
    source = 'kernels' if forced else KERNELS_ENV
    forced = (forced or os.environ.get(KERNELS_ENV, '')).strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f'{source} must be one of {", ".join(_BACKENDS)} (or unset), got {forced!r}')
    if forced == 'torch':
        return 'torch'
    if forced == 'triton':
        if not triton_available():
            raise RuntimeError(f'{source}=triton but triton is not installed')
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(f'{source}=triton for a tensor on {x.device} needs the Triton interpreter: '
                               'set TRITON_INTERPRET=1 (or use a CUDA tensor)')
        return 'triton'
    return 'triton' if AUTO_TRITON_ON_CUDA and x.is_cuda and triton_available() else 'torch'


def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Depthwise conv with "same" padding: ``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` on either backend
    (``backend`` forces one, see ``kernel_backend``)."""
    if kernel_backend(x, backend) == 'triton':
        return depthwise_conv2d(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
