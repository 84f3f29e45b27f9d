"""The lean backward of the Conv2Former block (conv2former/models/lean.py): same outputs bit for bit, same gradients
up to float rounding, and training activation memory at or below the ConvNeXt of the same size."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import conv2former  # noqa: F401  (registers the models)
from conv2former.models import lean
from conv2former.models.layers import Conv2FormerBlock

from benchmarks import bench_memory

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 16, 32, 32), num_classes=5)
OPTIONS = [
    dict(),
    dict(drop_path_rate=0.3),
    dict(fusion='sum', weighting='sigmoid', attn_act=False),
    dict(weighting='l1', mlp_dwconv=False),
    dict(weighting='minmax', ls_init_value=None),
    dict(stem='patch', head='norm', kernel_size=7),
]


def _pair(name='conv2former_n', **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).train()
    with torch.no_grad():  # layer scale 1e-6 would hide the branches in the gradients
        for n, p in model.named_parameters():
            if n.endswith('gamma'):
                p.uniform_(0.5, 1.5)
    plain = copy.deepcopy(model)
    plain.set_lean_backward(False)
    return model, plain


def _step(model, x, seed=0):
    torch.manual_seed(seed)  # the same drop-path draws for both models
    x = x.clone().requires_grad_()
    out = model(x)
    (out.float() ** 2).mean().backward()
    return out.detach(), x.grad


def _assert_grads_close(model, plain, rtol=1e-4, atol=1e-6):
    """Each gradient within ``rtol`` of plain autograd's, plus ``atol`` times the largest gradient of its tensor or,
    for gradients that are zero up to rounding (the conv bias before 'minmax' weighting), of the model."""
    scale = max(q.grad.abs().max().item() for q in plain.parameters() if q.grad is not None)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            own = q.grad.abs().max().item()
            bound = atol * own if own > 1e-4 * scale else 1e-4 * scale  # else: zero up to rounding
            err = (p.grad - q.grad).abs() - rtol * q.grad.abs()
            assert err.max().item() <= bound, f'{name}: max |diff| {(p.grad - q.grad).abs().max().item():.3g}, ' \
                                             f'largest gradient {own:.3g}'


@pytest.mark.parametrize('options', OPTIONS, ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()) or 'default')
def test_outputs_identical_and_gradients_match_plain_autograd(options):
    model, plain = _pair(**TINY, **options)
    x = torch.randn(2, 3, 64, 64)
    out, dx = _step(model, x)
    ref, dx_ref = _step(plain, x)
    assert torch.equal(out, ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-6 * dx_ref.abs().max().item())
    _assert_grads_close(model, plain)


def test_isotropic_and_channels_last():
    model, plain = _pair('conv2former_is', depth=2, num_classes=5)
    model, plain = model.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    out, _ = _step(model, x)
    ref, _ = _step(plain, x)
    assert torch.equal(out, ref)
    _assert_grads_close(model, plain)


def _saved_floats(fn, x, params) -> int:
    """Elements of the distinct non-parameter storages autograd saves during ``fn(x)``."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def test_lean_block_saves_nine_floats_per_channel_and_pixel():
    """The block input, a, A, V, the mid-block sum (C each) and fc1's output (4C); plain autograd keeps 27 and more."""
    block = Conv2FormerBlock(16, kernel_size=7).train()
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    assert block._use_lean(x)
    names = [type(fn).__name__ for fn, _ in block(x).grad_fn.next_functions if fn is not None]
    assert '_MlpBranchBackward' in names, names
    with torch.no_grad():
        assert not block._use_lean(x)
    per_channel_pixel = x.numel()
    lean_floats = _saved_floats(block, x, block.parameters())
    assert lean_floats == 9 * per_channel_pixel
    block.lean = False
    assert not block._use_lean(x)
    assert _saved_floats(block, x, block.parameters()) >= 27 * per_channel_pixel


def test_state_dict_unchanged():
    model, plain = _pair(**TINY)
    assert list(model.state_dict()) == list(plain.state_dict())
    block = Conv2FormerBlock(8)
    assert [k for k, _ in block.named_buffers()] == []
    assert block.lean is True


@pytest.mark.parametrize('kernel_size', [3, 7])  # 7: the CPU depthwise weight gradient as a grouped conv
def test_gradcheck_float64(kernel_size):
    torch.manual_seed(0)
    block = Conv2FormerBlock(2, kernel_size=kernel_size, ls_init_value=0.7).double().train()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    assert block._use_lean(x)
    # gradcheck perturbs the parameters in place, so the block sees every perturbation
    assert torch.autograd.gradcheck(lambda x, *_: block(x), (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                     fast_mode=True)


def test_frozen_parameters_and_input_without_grad():
    model, plain = _pair(**TINY)
    for m in (model, plain):
        m.stem.requires_grad_(False)
        m.stages[1].blocks[0].attn.requires_grad_(False)
        m.stages[2].blocks[0].norm2.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    for m in (model, plain):
        (m(x) ** 2).mean().backward()
    _assert_grads_close(model, plain)


def test_double_backward_and_functional_call():
    model, plain = _pair(**TINY)
    x = torch.randn(2, 3, 64, 64)

    def gradient_penalty(m):
        xx = x.clone().requires_grad_()
        g, = torch.autograd.grad(m(xx).square().sum(), xx, create_graph=True)
        g.square().sum().backward()

    gradient_penalty(model)
    gradient_penalty(plain)
    _assert_grads_close(model, plain)

    grads = []
    for m in (model, plain):  # parameters swapped for forward, the module's own ones back in place for backward
        params = {n: (p.detach() * 1.1).requires_grad_() for n, p in m.named_parameters()}
        torch.func.functional_call(m, params, (x,)).square().sum().backward()
        grads.append([p.grad for p in params.values()])
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


def test_bf16_autocast_on_cpu():
    model, plain = _pair(**TINY)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, _ = _step(model, x)
        ref, _ = _step(plain, x)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
    _assert_grads_close(model, plain, rtol=5e-2, atol=5e-2)


def test_checkpointing_still_works():
    model, plain = _pair(**TINY)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    out, _ = _step(model, x)
    ref, _ = _step(plain, x)
    torch.testing.assert_close(out, ref)
    _assert_grads_close(model, plain)


def test_lean_supported_rejects_unknown_parts():
    block = Conv2FormerBlock(8)
    assert lean.lean_supported(block)
    block.mlp.act = torch.nn.PReLU()
    assert not lean.lean_supported(block)


@pytest.mark.parametrize('pair', ['n', 't', pytest.param('s', marks=pytest.mark.slow),
                                  pytest.param('b', marks=pytest.mark.slow)])
def test_saved_memory_at_or_below_convnext(pair):
    """What autograd saves per image at 224x224 (float32, parameters excluded): at or below the ConvNeXt's."""
    ours, peer = bench_memory.PAIRS[pair]
    cpu = torch.device('cpu')
    mib = {name: bench_memory.saved_mib_per_image(timm.create_model(name).train(), 224, cpu) for name in (ours, peer)}
    assert mib[ours] <= mib[peer], mib


def test_resident_memory_at_or_below_convnext():
    """What the process really holds after one train-mode forward (fresh processes, batch 4, 224x224). The script
    runs as a file, from the repository root, as ../shared/docs/gpu-pending.md's item 4 runs it."""
    script = Path('benchmarks') / 'bench_memory.py'
    rss = {}
    for name in ('conv2former_n', 'convnext_nano'):
        proc = subprocess.run([sys.executable, str(script), '--rss-child', name], capture_output=True, text=True,
                              timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        rss[name] = json.loads(proc.stdout.strip().splitlines()[-1])['rss_mib_per_image']
    assert rss['conv2former_n'] <= rss['convnext_nano'], rss
