"""The lean backward on the Triton paths (CPU, Triton interpreter): the fused modulation keeps its promise of never
storing A (the block saves 8 floats per channel and pixel, 9 with A on the other paths), and the gradients of every
path match plain autograd on the PyTorch path."""
import os

os.environ['TRITON_INTERPRET'] = '1'  # before the kernels are first built (they are built lazily)

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conv2former.models.layers import Conv2FormerBlock  # noqa: E402
from test_memory import _saved_floats  # noqa: E402


@pytest.mark.parametrize('kernels,floats', [('torch', 9), ('triton', 9), ('fused', 8)])
def test_saved_floats_and_gradients_per_path(kernels, floats):
    torch.manual_seed(0)
    reference = Conv2FormerBlock(4, kernel_size=5, ls_init_value=0.5, kernels='torch').train()
    reference.lean = False
    block = Conv2FormerBlock(4, kernel_size=5, ls_init_value=0.5, kernels=kernels).train()
    block.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    assert block._use_lean(x)
    assert _saved_floats(block, x, block.parameters()) == floats * x.numel()

    grads = []
    for model in (block, reference):
        x.grad = None
        out = model(x)
        (out ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-12)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-6)


def test_fused_path_keeps_recomputing_through_the_fused_op():
    torch.manual_seed(0)
    block = Conv2FormerBlock(4, kernel_size=3, kernels='fused', weighting='sigmoid', fusion='sum').train()
    plain = copy.deepcopy(block)
    plain.lean = False
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    for model in (block, plain):
        model(x).sum().backward()
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
