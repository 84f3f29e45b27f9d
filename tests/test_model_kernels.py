"""The model on the Triton depthwise-conv path (CPU, Triton interpreter) equals the PyTorch path."""
import os

os.environ['TRITON_INTERPRET'] = '1'  # before the kernels are first built (they are built lazily)

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import conv2former  # noqa: E402
from conv2former.models.layers import DepthwiseConv2d  # noqa: E402


def test_fixture_logits_on_the_triton_path(fixtures_dir, fixture_config):
    """Upstream weights give upstream outputs on the Triton path too (the PyTorch path: test_upstream_exactness)."""
    state_dict = load_file(str(fixtures_dir / 'tiny_k7_state_dict.safetensors'))
    io = load_file(str(fixtures_dir / 'tiny_k7_io.safetensors'))
    model = conv2former.Conv2Former(**fixture_config, kernels='triton').eval()
    model.load_state_dict(conv2former.checkpoint_filter_fn(state_dict, model))
    with torch.no_grad():
        logits = model(io['input'])
    assert (logits - io['logits']).abs().max() <= 1e-4


@pytest.mark.parametrize('kernels,options', [
    ('triton', {}), ('fused', {}), ('fused', dict(fusion='sum', weighting='sigmoid', attn_act=False)),
    ('fused', dict(weighting='minmax')),  # not fusable: runs the Triton conv, unfused
])
def test_training_step_gradients_match(kernels, options):
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), kernel_size=5, ls_init_value=1.0, num_classes=3, **options)
    ref = timm.create_model('conv2former_n', kernels='torch', **kw)
    fast = timm.create_model('conv2former_n', kernels=kernels, **kw)
    fast.load_state_dict(ref.state_dict())
    assert fast.stages[0].blocks[0].attn.fused == (kernels == 'fused' and options.get('weighting') != 'minmax')
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    for m in (ref, fast):
        m(x).logsumexp(dim=1).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_automatic_choice_is_pytorch_until_a_gpu_run_validates_triton():
    from conv2former.ops import AUTO_TRITON_ON_CUDA, kernel_backend
    assert AUTO_TRITON_ON_CUDA is False
    assert kernel_backend(torch.empty(1, device='meta')) == 'torch'


def test_env_var_and_keyword(monkeypatch):
    conv = DepthwiseConv2d(4, 3)
    x = torch.randn(1, 4, 5, 5)
    monkeypatch.setenv('CONV2FORMER_KERNELS', 'triton')
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1, groups=4))
    monkeypatch.setenv('CONV2FORMER_KERNELS', 'cuda')
    with pytest.raises(ValueError, match="CONV2FORMER_KERNELS must be one of torch, triton"):
        conv(x)
    monkeypatch.delenv('CONV2FORMER_KERNELS')
    with pytest.raises(ValueError, match="kernels must be one of"):
        DepthwiseConv2d(4, 3, kernels='cudnn')
    assert DepthwiseConv2d(4, 3).state_dict().keys() == torch.nn.Conv2d(4, 4, 3, groups=4).state_dict().keys()
