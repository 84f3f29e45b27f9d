"""The fused convolutional modulation (conv2former.ops.conv_modulation) against plain PyTorch, on CPU under the Triton
interpreter. Shapes are tiny: the interpreter runs every program in Python."""
import os

os.environ['TRITON_INTERPRET'] = '1'

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from conv2former.ops import FUSED_WEIGHTINGS, conv_modulation, convmod, dwconv, launch  # noqa: E402

CONFIGS = list(itertools.product((True, False), ('mul', 'sum'), ('none', 'sigmoid')))  # (act, fusion, weighting)


def reference(a, v, weight, bias, act=True, fusion='mul', weighting='none'):
    x = F.gelu(a) if act else a
    att = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=a.shape[1])
    if weighting == 'sigmoid':
        att = att.sigmoid()
    return att * v if fusion == 'mul' else att + v


def make_inputs(batch, channels, height, width, k, dtype=torch.float32, channels_last=False, bias=True):
    """Random (a, v, weight, bias); weight scaled by 1/k so the modulation stays O(1) for every k."""
    a, v = torch.randn(2, batch, channels, height, width, dtype=dtype)
    if channels_last:
        a, v = a.to(memory_format=torch.channels_last), v.to(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, k, k, dtype=dtype) / k
    return a, v, weight, torch.randn(channels, dtype=dtype) if bias else None


def run_with_grads(fn, inputs, grad_out, requires=(True, True, True, True), **config):
    """fn's output and the gradients of (a, v, weight, bias) on fresh leaves (None where not required)."""
    leaves = [None if t is None else t.detach().requires_grad_(r) for t, r in zip(inputs, requires)]
    out = fn(*leaves, **config)
    out.backward(grad_out)
    return out, [None if t is None else t.grad for t in leaves]


def assert_matches_reference(inputs, requires=(True, True, True, True), atol=1e-5, **config):
    grad_out = torch.randn(inputs[0].shape, dtype=inputs[0].dtype)
    out, grads = run_with_grads(conv_modulation, inputs, grad_out, requires, **config)
    ref, ref_grads = run_with_grads(reference, inputs, grad_out, requires, **config)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    assert out.stride() == ref.stride(), 'output memory format differs from the reference'
    for name, grad, ref_grad in zip(('a', 'v', 'weight', 'bias'), grads, ref_grads):
        if ref_grad is None:
            assert grad is None, f'grad_{name} should be None'
        else:
            torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=atol, msg=lambda m: f'grad_{name}: {m}')


def _config_id(config):
    act, fusion, weighting = config
    return f"{'gelu' if act else 'noact'}-{fusion}-{weighting}"


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('config', CONFIGS, ids=_config_id)
def test_every_config_float32(config, channels_last):
    act, fusion, weighting = config
    assert_matches_reference(make_inputs(2, 5, 5, 7, 3, channels_last=channels_last), act=act, fusion=fusion,
                             weighting=weighting)


# (batch, channels, height, width, k, channels_last, bias, config)
CASES = [
    (1, 20, 9, 7, 7, False, True, (True, 'mul', 'none')),  # 2 channel blocks of 16, the last one partial; 2 h tiles
    (1, 40, 3, 9, 3, True, True, (True, 'mul', 'sigmoid')),  # 2 channel blocks of 32; 2 w tiles
    (2, 3, 5, 7, 11, False, False, (True, 'mul', 'none')),  # kernel larger than the map, no bias
    (1, 3, 5, 7, 11, True, False, (False, 'sum', 'sigmoid')),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[0]}x{c[1]}x{c[2]}x{c[3]}-k{c[4]}-'
                                                       f"{'nhwc' if c[5] else 'nchw'}{'' if c[6] else '-nobias'}")
def test_shapes_float32(case):
    batch, channels, height, width, k, channels_last, bias, (act, fusion, weighting) = case
    assert_matches_reference(make_inputs(batch, channels, height, width, k, channels_last=channels_last, bias=bias),
                             act=act, fusion=fusion, weighting=weighting)


def test_cases_cover_partial_channel_blocks():
    for channels_last in (False, True):
        (_, channels, height, width, *_), = [c for c in CASES[:2] if c[5] == channels_last]
        block_c = launch.tile_config(channels, height, width, channels_last)[0]
        assert channels > block_c and channels % block_c, (channels_last, block_c)


def test_mixed_memory_formats():
    """a NCHW and v channels_last (kernels address by strides); the output follows a."""
    a, v, weight, bias = make_inputs(1, 4, 5, 6, 3)
    assert_matches_reference((a, v.to(memory_format=torch.channels_last), weight, bias), act=True, fusion='mul',
                             weighting='sigmoid')


@pytest.mark.parametrize('requires', [(True, False, False, False), (False, True, False, False),
                                      (False, False, True, True), (False, True, True, False)],
                         ids=['a', 'v', 'weight-bias', 'v-weight'])
@pytest.mark.parametrize('config', [(True, 'mul', 'none'), (True, 'sum', 'sigmoid')], ids=_config_id)
def test_partial_requires_grad(requires, config):
    act, fusion, weighting = config
    assert_matches_reference(make_inputs(1, 3, 5, 4, 3), requires, act=act, fusion=fusion, weighting=weighting)


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_low_precision_against_float32(dtype, tol, channels_last):
    """Inputs in dtype, GELU and sums in float32: compared with the float32 reference on the same (rounded) inputs."""
    inputs = make_inputs(1, 5, 5, 9, 5, dtype=dtype, channels_last=channels_last)
    grad_out = torch.randn(inputs[0].shape, dtype=dtype)
    config = dict(act=True, fusion='mul', weighting='sigmoid')
    out, grads = run_with_grads(conv_modulation, inputs, grad_out, **config)
    ref, ref_grads = run_with_grads(reference, [t.float() for t in inputs], grad_out.float(), **config)
    for name, actual, expected in zip(('out', 'grad_a', 'grad_v', 'grad_weight', 'grad_bias'), [out, *grads],
                                      [ref, *ref_grads]):
        assert actual.dtype == dtype, name
        err = ((actual.float() - expected).abs().max() / expected.abs().max()).item()
        assert err < tol, f'{name}: max error {err:.2e} (relative to the largest value) over {tol}'


def test_autocast_casts_inputs():
    inputs = make_inputs(1, 3, 5, 6, 3)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, grads = run_with_grads(conv_modulation, inputs, grad_out)
    ref, ref_grads = run_with_grads(reference, [t.bfloat16().float() for t in inputs], grad_out.float())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    for actual, expected in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(actual.float(), expected, atol=3e-2, rtol=3e-2)


def test_gradcheck_float64():
    """float64 inputs accumulate in float64 (numpy in the interpreter); fast mode keeps interpreter time down."""
    a, v, weight, bias = (t.requires_grad_() for t in make_inputs(1, 3, 4, 5, 3, dtype=torch.float64,
                                                                   channels_last=True))
    assert torch.autograd.gradcheck(lambda *t: conv_modulation(*t, act=True, fusion='mul', weighting='sigmoid'),
                                    (a, v, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_empty_batch():
    assert_matches_reference(make_inputs(0, 3, 5, 6, 3), act=True, fusion='mul', weighting='sigmoid')


def test_weight_grad_splits():
    """The GPU splits the weight-gradient reduction over spatial tiles; the interpreter uses one split by default."""
    a, _, weight, _ = make_inputs(2, 6, 10, 9, 3, channels_last=True)
    grad_pre = torch.randn_like(a)
    grad_w, grad_b = dwconv.launch_weight_grad(grad_pre, a, 3, act=True, splits=4)  # convmod's weight gradient
    leaves = [t.detach().requires_grad_() for t in (weight, torch.zeros(6))]
    F.conv2d(F.gelu(a), *leaves, padding=1, groups=6).backward(grad_pre)
    torch.testing.assert_close(grad_w, leaves[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b, leaves[1].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'nobias'])
def test_saves_only_inputs(bias):
    """Autograd keeps a, v, weight and bias, nothing of A's size besides a and v (A and GELU(a) are recomputed)."""
    a, v, weight, b = (None if t is None else t.requires_grad_() for t in make_inputs(1, 3, 5, 4, 3, bias=bias))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = conv_modulation(a, v, weight, b, act=True, fusion='mul', weighting='sigmoid')
    expected = [a, v, weight] + ([b] if bias else [])
    assert len(saved) == len(expected), [tuple(t.shape) for t in saved]
    assert all(s is e or s.data_ptr() == e.data_ptr() for s, e in zip(saved, expected))
    assert sum(t.shape == out.shape for t in saved) == 2
    out.sum().backward()


@pytest.mark.parametrize('channels_last,config', [(False, (True, 'mul', 'sigmoid')), (True, (False, 'sum', 'none'))],
                         ids=['nchw-gelu-mul-sigmoid', 'nhwc-noact-sum-none'])
def test_torch_compile_fullgraph_matches_eager(channels_last, config):
    act, fusion, weighting = config

    def loss(a, v, weight, bias):
        return conv_modulation(a, v, weight, bias, act=act, fusion=fusion, weighting=weighting).sin().sum()

    inputs = make_inputs(1, 4, 6, 5, 5, channels_last=channels_last)
    backend = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    results = []
    for fn in (loss, compiled):
        leaves = [t.detach().requires_grad_() for t in inputs]
        value = fn(*leaves)
        value.backward()
        results.append([value] + [t.grad for t in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-6)
    assert backend.frame_count == 1 and 'conv2former.conv_modulation' in backend.graphs[0].code


@pytest.mark.parametrize('op,args', [
    (torch.ops.conv2former.conv_modulation.default,
     lambda: [t.requires_grad_() for t in make_inputs(1, 3, 5, 4, 3)] + [True, 'mul', 'sigmoid']),
    (torch.ops.conv2former.conv_modulation.default,
     lambda: list(make_inputs(1, 3, 5, 4, 3, channels_last=True, bias=False)) + [False, 'sum', 'none']),
    (torch.ops.conv2former.conv_modulation_grad_pre.default,
     lambda: [torch.randn(1, 3, 5, 4), *make_inputs(1, 3, 5, 4, 3), True, 'mul', 'sigmoid', True, True]),
    (torch.ops.conv2former.conv_modulation_grad_input.default,
     lambda: [torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4), torch.randn(3, 1, 3, 3), True]),
    (torch.ops.conv2former.conv_modulation_grad_weight.default,
     lambda: [torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4), 3, True]),
], ids=['forward', 'forward-nhwc-nobias', 'grad_pre', 'grad_input', 'grad_weight'])
def test_opcheck(op, args):
    """Schema, fake implementation incl. strides, autograd registration and AOT dispatch of each custom op."""
    torch.library.opcheck(op, args())


@pytest.mark.filterwarnings('ignore:TRITON_DEFAULT_FP_FUSION is unset')
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_kernels_compile_for_hopper(monkeypatch, channels_last):
    """Every kernel lowers to sm_90 machine code (no GPU needed): catches code only the interpreter accepts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    monkeypatch.delenv('TRITON_INTERPRET')
    kernels = convmod.KERNELS.jitted(False)
    block_c, block_h, block_w = launch.tile_config(72, 56, 56, channels_last)
    blocks = dict(K=7, ACT=True, ACC_DTYPE=convmod.tl.float32, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w)
    flags = dict(SIGMOID=True, MUL=True, HAS_BIAS=True, STORE_OUT=True)
    variants = [(kernels.modulate, dict(GRAD=False, RECOMPUTE=True, STORE_DV=False, **flags, **blocks)),
                (kernels.modulate, dict(GRAD=True, RECOMPUTE=True, STORE_DV=True, **flags, **blocks)),
                (kernels.modulate, dict(GRAD=True, RECOMPUTE=False, STORE_DV=False, **{**flags, 'SIGMOID': False},
                                        **blocks)),  # mul/none without dv: no conv, A never defined
                (kernels.input_grad, dict(blocks))]  # the weight gradient is dwconv's kernel (ACT=True variant)
    for kernel, constexprs in variants:
        unit = [n for n in kernel.arg_names if n.startswith('s') and n[-1] == ('c' if channels_last else 'w')]
        constexprs.update({name: 1 for name in unit})
        signature = {name: 'constexpr' if name in constexprs else
                     ('*fp32' if 'part' in name else '*bf16') if name.endswith('_ptr') else 'i32'
                     for name in kernel.arg_names}
        compiled = triton_compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0


def test_fused_weightings():
    assert FUSED_WEIGHTINGS == ('none', 'sigmoid')


@pytest.mark.parametrize('weighting', ['l1', 'minmax', 'softmax'])
def test_unsupported_weighting(weighting):
    with pytest.raises(ValueError, match=rf"fuses the weightings \('none', 'sigmoid'\) only, got '{weighting}'"):
        conv_modulation(*make_inputs(1, 3, 5, 5, 3), weighting=weighting)


def _bad(**changes):
    a, v, weight, bias = make_inputs(1, 4, 6, 6, 3)
    args = dict(a=a, v=v, weight=weight, bias=bias, act=True, fusion='mul', weighting='none')
    args.update(changes)
    return args


@pytest.mark.parametrize('args,match', [
    (_bad(fusion='concat'), r"fusion must be one of \('mul', 'sum'\), got 'concat'"),
    (_bad(act='gelu'), "act must be a bool .*got 'gelu'"),
    (_bad(a=torch.randn(4, 6, 6), v=torch.randn(4, 6, 6)), r'4-D input a \(B, C, H, W\), got a 3-D tensor of shape \(4, 6, 6\)'),
    (_bad(v=torch.randn(1, 4, 6, 5)), r'a and v of the same shape, got \(1, 4, 6, 6\) and \(1, 4, 6, 5\)'),
    (_bad(a=torch.zeros(1, 4, 6, 6, dtype=torch.int32)), 'supports dtypes float32, .*got torch.int32'),
    (_bad(v=torch.randn(1, 4, 6, 6, dtype=torch.float16)), r'v of dtype torch.float32 \(that of the input a\), got .*float16'),
    (_bad(weight=torch.randn(4, 1, 3, 3, dtype=torch.bfloat16)), 'weight of dtype torch.float32 .*bfloat16'),
    (_bad(bias=torch.randn(4, dtype=torch.float64)), 'bias of dtype torch.float32 .*float64'),
    (_bad(v=torch.randn(1, 4, 6, 6, device='meta')), r'v on the device of the input a \(cpu\), got meta'),
    (_bad(weight=torch.randn(5, 1, 3, 3)), r'weight of shape \(C, 1, k, k\) = \(4, 1, k, k\) .*got \(5, 1, 3, 3\)'),
    (_bad(weight=torch.randn(4, 1, 3, 5)), r'= \(4, 1, k, k\) .*got \(4, 1, 3, 5\)'),
    (_bad(weight=torch.randn(4, 1, 4, 4)), r'odd kernel size in \[3, 31\], got 4'),
    (_bad(weight=torch.randn(4, 1, 1, 1)), r'odd kernel size in \[3, 31\], got 1'),
    (_bad(weight=torch.randn(4, 1, 33, 33)), r'odd kernel size in \[3, 31\], got 33'),
    (_bad(bias=torch.randn(3)), r'bias of shape \(4,\), got \(3,\)'),
], ids=['fusion', 'act', '3d', 'shape-mismatch', 'int-dtype', 'v-dtype', 'weight-dtype', 'bias-dtype', 'v-device',
        'weight-channels', 'weight-not-square', 'even-k', 'k1', 'k33', 'bias-shape'])
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        conv_modulation(**args)
