"""The Triton depthwise conv (conv2former.ops) against F.conv2d, on CPU under the Triton interpreter.

Shapes are tiny because the interpreter runs every program in Python. The kernels are jitted on first use, so setting
TRITON_INTERPRET here works even when another test module imported conv2former.ops earlier in the process.
"""
import os

os.environ['TRITON_INTERPRET'] = '1'

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import conv2former.ops as ops  # noqa: E402
from conv2former.ops import depthwise_conv2d, dwconv, dwconv2d, kernel_backend, launch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRITON_OP = 'conv2former_depthwise_conv2d'  # in the grad_fn name of the custom op's outputs


def reference(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def make_inputs(batch, channels, height, width, k, dtype=torch.float32, channels_last=False, bias=True):
    """Random (x, weight, bias); weight scaled by 1/k so outputs stay O(1) for every k."""
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, k, k, dtype=dtype) / k
    return x, weight, torch.randn(channels, dtype=dtype) if bias else None


def run_with_grads(fn, x, weight, bias, grad_out):
    """fn's output and the gradients of (x, weight, bias) for ``grad_out``, on fresh leaves sharing their strides."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [None if t is None else t.grad for t in leaves]


def assert_matches_reference(x, weight, bias):
    """Output (values and strides) and all gradients equal F.conv2d's in float32."""
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    out, grads = run_with_grads(depthwise_conv2d, x, weight, bias, grad_out)
    ref, ref_grads = run_with_grads(reference, x, weight, bias, grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.stride() == ref.stride(), 'output memory format differs from F.conv2d'
    for name, grad, ref_grad in zip(('x', 'weight', 'bias'), grads, ref_grads):
        if ref_grad is None:
            assert grad is None, f'grad_{name} should be None'
        else:
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5, msg=lambda m: f'grad_{name}: {m}')


# (batch, channels, height, width, k, channels_last, bias)
CASES = [
    (2, 6, 10, 9, 3, False, True),  # H, W not multiples of the tile
    (2, 6, 10, 9, 3, True, True),
    (1, 5, 7, 10, 5, False, False),  # batch 1, no bias
    (1, 5, 7, 10, 5, True, False),
    (2, 3, 9, 6, 7, False, True),
    (2, 3, 9, 6, 7, True, True),
    (1, 4, 5, 7, 11, False, True),  # kernel larger than the map
    (1, 4, 5, 7, 11, True, True),
    (2, 12, 10, 10, 3, False, True),  # two channel blocks, the last one partial
    (1, 40, 3, 3, 3, True, True),
    (1, 2, 4, 3, 31, True, True),  # the largest kernel
]


def _case_id(case):
    batch, channels, height, width, k, channels_last, bias = case
    return f"{batch}x{channels}x{height}x{width}-k{k}-{'nhwc' if channels_last else 'nchw'}{'' if bias else '-nobias'}"


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_forward_and_gradients_float32(case):
    batch, channels, height, width, k, channels_last, bias = case
    assert_matches_reference(*make_inputs(batch, channels, height, width, k, channels_last=channels_last, bias=bias))


def test_empty_batch():
    """No kernel launch for an empty batch; the weight and bias gradients are zeros."""
    assert_matches_reference(*make_inputs(0, 3, 5, 6, 3))


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_cases_cover_tile_edges(channels_last):
    """CASES exercise partial and multiple tiles in every dimension, for the tile sizes the launcher picks."""
    seen = set()
    for _, channels, height, width, _, cl, _ in CASES:
        if cl != channels_last:
            continue
        block_c, block_h, block_w = launch.tile_config(channels, height, width, channels_last)
        for name, size, block in (('c', channels, block_c), ('h', height, block_h), ('w', width, block_w)):
            if size % block:
                seen.add(f'{name} partial')
            if size > block:
                seen.add(f'{name} multiple')
    assert seen >= {'c partial', 'c multiple', 'h partial', 'h multiple', 'w partial'}, seen


@pytest.mark.parametrize('splits', [1, 4, 7])  # 6 spatial tiles: one program, uneven shares, idle programs
def test_weight_grad_splits(splits):
    x, weight, _ = make_inputs(2, 6, 10, 9, 3, channels_last=True)
    grad_out = torch.randn_like(x)
    assert launch.tile_config(6, 10, 9, True)[1:] == (4, 8)  # 3 x 2 tiles
    grad_w, grad_b = dwconv.launch_weight_grad(grad_out, x, 3, splits=splits)
    _, (_, ref_w, ref_b) = run_with_grads(reference, x, weight, torch.zeros(6), grad_out)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b, ref_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_low_precision_against_float32(dtype, tol, channels_last):
    """Inputs in dtype, accumulation in float32: only the final rounding to dtype separates us from fp32 math."""
    x, weight, bias = make_inputs(2, 5, 6, 9, 3, dtype=dtype, channels_last=channels_last)
    grad_out = torch.randn(x.shape, dtype=dtype)
    out, grads = run_with_grads(depthwise_conv2d, x, weight, bias, grad_out)
    ref, ref_grads = run_with_grads(reference, x.float(), weight.float(), bias.float(), grad_out.float())
    for name, actual, expected in zip(('out', 'grad_x', 'grad_weight', 'grad_bias'), [out, *grads], [ref, *ref_grads]):
        assert actual.dtype == dtype, name
        err = ((actual.float() - expected).abs().max() / expected.abs().max()).item()
        assert err < tol, f'{name}: max error {err:.2e} (relative to the largest value) over {tol}'


def test_autocast_casts_like_conv2d():
    x, weight, bias = make_inputs(2, 3, 5, 6, 3)
    grad_out = torch.randn(x.shape, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, grads = run_with_grads(depthwise_conv2d, x, weight, bias, grad_out)
        ref, ref_grads = run_with_grads(reference, x, weight, bias, grad_out)
    assert out.dtype == ref.dtype == torch.bfloat16
    for actual, expected in zip([out, *grads], [ref, *ref_grads]):
        assert actual.dtype == expected.dtype  # gradients come back in the inputs' float32
        torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('channels_last,k', [(False, 3), (True, 5)], ids=['nchw-k3', 'nhwc-k5'])
def test_gradcheck_float64(channels_last, k):
    """The interpreter runs float64 (numpy) and float64 inputs accumulate in float64, so gradcheck applies (fast mode:
    random projections of the Jacobians, to keep interpreter time down)."""
    x, weight, bias = make_inputs(2, 3, 4, 5, k, dtype=torch.float64, channels_last=channels_last)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(depthwise_conv2d, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_non_contiguous_inputs():
    base = torch.randn(2, 10, 12, 11)
    sliced = base[:, ::2, 1:-1, 2:]  # every stride odd-sized, no layout contiguous
    transposed = torch.randn(2, 5, 9, 8).transpose(2, 3)
    cl_view = torch.randn(2, 12, 9, 8).to(memory_format=torch.channels_last)[:, 3:8, :, 1:]
    weight = torch.randn(5, 1, 5, 5).transpose(2, 3) / 5  # non-contiguous weight
    bias = torch.randn(10)[::2]
    for x in (sliced, transposed, cl_view):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        assert_matches_reference(x, weight, bias)


def test_output_keeps_channels_last_for_channels_last_views():
    x = torch.randn(1, 8, 6, 7).to(memory_format=torch.channels_last)[:, 1:6]
    out = depthwise_conv2d(x, *make_inputs(1, 5, 6, 7, 3)[1:])
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize('op,args', [
    (torch.ops.conv2former.depthwise_conv2d.default, lambda: [t.requires_grad_() for t in make_inputs(2, 3, 5, 4, 3)]),
    (torch.ops.conv2former.depthwise_conv2d.default, lambda: list(make_inputs(1, 3, 5, 4, 5, channels_last=True,
                                                                                bias=False))),
    (torch.ops.conv2former.depthwise_conv2d_input_grad.default, lambda: [torch.randn(2, 3, 5, 4),
                                                                         torch.randn(3, 1, 3, 3)]),
    (torch.ops.conv2former.depthwise_conv2d_weight_grad.default, lambda: [torch.randn(2, 3, 5, 4),
                                                                          torch.randn(2, 3, 5, 4), 3]),
], ids=['forward', 'forward-nhwc-nobias', 'input_grad', 'weight_grad'])
def test_opcheck(op, args):
    """Schema, fake (meta) implementation incl. strides, autograd registration and AOT dispatch of each custom op."""
    torch.library.opcheck(op, args())


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_torch_compile_fullgraph_matches_eager(channels_last):
    def loss(x, weight, bias):
        return depthwise_conv2d(x, weight, bias).sin().sum()

    x, weight, bias = make_inputs(2, 4, 6, 5, 5, channels_last=channels_last)
    backend = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    results = []
    for fn in (loss, compiled):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        value = fn(*leaves)
        value.backward()
        results.append([value] + [t.grad for t in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-6)
    assert backend.frame_count == 1 and 'conv2former.depthwise_conv2d' in backend.graphs[0].code


def test_torch_compile_traces_dispatcher(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, 'triton')
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    backend = CompileCounterWithBackend('aot_eager')
    out = torch.compile(dwconv2d, fullgraph=True, backend=backend)(x, weight, bias)
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert 'conv2former.depthwise_conv2d' in backend.graphs[0].code


def _grad_fn_name(x, weight, bias):
    out = dwconv2d(x.requires_grad_(), weight, bias)
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-5, rtol=1e-5)
    return type(out.grad_fn).__name__


def test_dispatch_default_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    assert kernel_backend(x) == 'torch'
    assert _grad_fn_name(x, weight, bias) == 'ConvolutionBackward0'


@pytest.mark.parametrize('value,backend', [('torch', 'torch'), ('triton', 'triton'), (' Triton ', 'triton')])
def test_dispatch_forced(monkeypatch, value, backend):
    monkeypatch.setenv(ops.KERNELS_ENV, value)
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    assert kernel_backend(x) == backend
    assert (TRITON_OP in _grad_fn_name(x, weight, bias)) == (backend == 'triton')


def test_dispatch_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, 'cuda')
    with pytest.raises(ValueError, match="CONV2FORMER_KERNELS must be one of torch, triton .*got 'cuda'"):
        kernel_backend(torch.zeros(1, 1, 3, 3))


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, 'triton')
    monkeypatch.delenv('TRITON_INTERPRET')
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    with pytest.raises(RuntimeError, match='CONV2FORMER_KERNELS=triton for a tensor on cpu .*TRITON_INTERPRET=1'):
        kernel_backend(x)
    with pytest.raises(RuntimeError, match='runs on CUDA tensors, got a tensor on cpu.*set TRITON_INTERPRET=1'):
        depthwise_conv2d(x, weight, bias)


def test_without_triton(monkeypatch):
    monkeypatch.setattr(ops, 'triton_available', lambda: False)
    monkeypatch.setattr(launch, 'triton', None)  # where the launchers look
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert kernel_backend(x) == 'torch'
    monkeypatch.setenv(ops.KERNELS_ENV, 'triton')
    with pytest.raises(RuntimeError, match='CONV2FORMER_KERNELS=triton but triton is not installed'):
        kernel_backend(x)
    with pytest.raises(RuntimeError, match='needs triton, which is not installed'):
        depthwise_conv2d(x, weight, bias)


def _run_python(code: str, env_drop: tuple = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_without_triton_falls_back_to_torch():
    result = _run_python('''
        import sys
        sys.modules['triton'] = None  # makes `import triton` raise ImportError
        import torch, torch.nn.functional as F
        from conv2former.ops import dwconv2d, kernel_backend
        x, w = torch.randn(1, 3, 5, 6), torch.randn(3, 1, 3, 3)
        assert kernel_backend(x) == 'torch'
        torch.testing.assert_close(dwconv2d(x, w), F.conv2d(x, w, padding=1, groups=3))
        print('ok')
    ''', env_drop=(ops.KERNELS_ENV,))
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


def test_interpreter_enabled_after_import():
    """TRITON_INTERPRET set after ``import conv2former.ops`` still takes effect (the kernels are jitted lazily)."""
    result = _run_python('''
        import os
        import torch, torch.nn.functional as F
        from conv2former.ops import depthwise_conv2d
        x, w = torch.randn(1, 3, 5, 6), torch.randn(3, 1, 3, 3)
        try:
            depthwise_conv2d(x, w)
            raise SystemExit('expected a RuntimeError without TRITON_INTERPRET')
        except RuntimeError as e:
            assert 'TRITON_INTERPRET=1' in str(e), e
        os.environ['TRITON_INTERPRET'] = '1'
        torch.testing.assert_close(depthwise_conv2d(x, w), F.conv2d(x, w, padding=1, groups=3))
        print('ok')
    ''', env_drop=('TRITON_INTERPRET',))
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


@pytest.mark.filterwarnings('ignore:TRITON_DEFAULT_FP_FUSION is unset')
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
def test_kernels_compile_for_hopper(monkeypatch, channels_last):
    """The GPU path lowers to sm_90 machine code (Triton's bundled ptxas; no GPU needed): catches code that only the
    interpreter accepts. Strides equal to 1 are specialised as Triton does at launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    monkeypatch.delenv('TRITON_INTERPRET')
    kernels = dwconv.KERNELS.jitted(False)
    block_c, block_h, block_w = launch.tile_config(72, 56, 56, channels_last)
    unit_strides = ('sxc', 'syc', 'sdc') if channels_last else ('sxw', 'syw', 'sdw')
    blocks = dict(K=7, ACC_DTYPE=dwconv.tl.float32, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w)
    for kernel, constexprs, pointers in (
            (kernels.forward, dict(FLIP=True, HAS_BIAS=True, **blocks), dict(x_ptr='*bf16', w_ptr='*bf16',
                                                                             b_ptr='*bf16', y_ptr='*bf16')),
            *((kernels.weight_grad, dict(ACT=act, **blocks), dict(x_ptr='*bf16', dy_ptr='*bf16',
                                                                 dw_part_ptr='*fp32', db_part_ptr='*fp32'))
              for act in (False, True))):  # ACT: the fused modulation's GELU-on-load variant
        constexprs.update({name: 1 for name in unit_strides if name in kernel.arg_names})
        signature = {name: 'constexpr' if name in constexprs else pointers.get(name, 'i32')
                     for name in kernel.arg_names}
        compiled = triton_compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
        assert '.target sm_90' in compiled.asm['ptx'] and len(compiled.asm['cubin']) > 0


@pytest.mark.parametrize('x,weight,bias,match', [
    (torch.randn(3, 8, 8), torch.randn(3, 1, 3, 3), None,
     r'4-D input \(B, C, H, W\), got a 3-D tensor of shape \(3, 8, 8\)'),
    (torch.zeros(1, 4, 8, 8, dtype=torch.int32), torch.zeros(4, 1, 3, 3, dtype=torch.int32), None,
     'supports dtypes float32, float16, bfloat16, float64, got torch.int32'),
    (torch.randn(1, 4, 8, 8), torch.randn(5, 1, 3, 3), None,
     r'weight of shape \(C, 1, k, k\) = \(4, 1, k, k\) .*4 channels, got \(5, 1, 3, 3\)'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3), None, r'= \(4, 1, k, k\) .*got \(4, 2, 3, 3\)'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 5), None, r'= \(4, 1, k, k\) .*got \(4, 1, 3, 5\)'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 9), None, r'= \(4, 1, k, k\) .*got \(4, 9\)'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4), None, r'odd kernel size in \[3, 31\], got 4'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 1, 1), None, r'odd kernel size in \[3, 31\], got 1'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 33, 33), None, r'odd kernel size in \[3, 31\], got 33'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(5), r'bias of shape \(4,\), got \(5,\)'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3, dtype=torch.float64), None,
     'weight of dtype torch.float32 .*got torch.float64'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4, dtype=torch.float16),
     'bias of dtype torch.float32 .*got torch.float16'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3, device='meta'), None,
     r'weight on the device of the input \(cpu\), got meta'),
    (torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4, device='meta'),
     r'bias on the device of the input \(cpu\), got meta'),
], ids=['3d-input', 'int-dtype', 'weight-channels', 'weight-not-depthwise', 'weight-not-square', 'weight-2d',
        'even-k', 'k1', 'k33', 'bias-shape', 'weight-dtype', 'bias-dtype', 'weight-device', 'bias-device'])
def test_validation_errors(x, weight, bias, match):
    with pytest.raises(ValueError, match=match):
        depthwise_conv2d(x, weight, bias)


def test_benchmark_without_cuda_exits_2(monkeypatch, capsys):
    from benchmarks import bench_dwconv as bench
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert bench.main([]) == 2
    assert 'needs a CUDA GPU' in capsys.readouterr().err


def test_benchmark_traffic_model():
    from benchmarks import bench_dwconv as bench
    acts, params, channels = 2 * 3 * 4 * 5, 3 * 7 * 7, 3
    assert bench.traffic(2, 3, 4, 5, 7, 2, 'fwd') == (2 * (2 * acts + params + channels), acts * 49)
    assert bench.traffic(2, 3, 4, 5, 7, 2, 'fwd+bwd') == (2 * (6 * acts + 3 * params + 2 * channels), 3 * acts * 49)
    assert bench.roofline_ms(3e9, 1) == pytest.approx(1.0)
    assert bench.roofline_ms(1, 33.5e9) == pytest.approx(1.0)


def test_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'benchmarks.bench_dwconv', '--smoke', '--out', str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (json_path,) = tmp_path.glob('bench_dwconv_bf16_smoke_*.json')
    assert json_path.with_suffix('.md').read_text().startswith('# Depthwise conv: Triton vs F.conv2d')
    report = json.loads(json_path.read_text())
    env = report['environment']
    assert env['smoke'] and '--smoke' in env['command'] and env['torch'] == torch.__version__ and env['date']
    assert report['failures'] == []
    rows = report['rows']
    assert {(r['impl'], r['layout'], r['mode']) for r in rows} == {
        (impl, layout, mode) for impl in ('triton', 'F.conv2d') for layout in ('NCHW', 'NHWC')
        for mode in ('fwd', 'fwd+bwd')}
    for row in rows:
        assert row['ms'] > 0 and row['ratio'] == pytest.approx(row['ms'] / row['roofline_ms'])
        assert (row['max_rel_err'] is None) == (row['impl'] != 'triton')
        assert row['max_rel_err'] is None or row['max_rel_err'] < report['rel_err_limit']


def test_a_hand_passed_tile_that_would_spill_is_warned_about(recwarn):
    """64x8x16 at 1-4 warps: 64-256 elements per thread, 182-255 registers / spills on sm_90 (benchmarks/results/aot);
    the heuristic's tiles and gpu_check's candidates hold at most 16 and pass silently."""
    x = torch.randn(2, 72, 56, 56).to(memory_format=torch.channels_last)
    for tile in ((32, 4, 8, 4), (64, 4, 4, 4), (32, 8, 8, 8), (4, 8, 64, 8), None):
        launch.resolve_tile(x, tile)
    assert not [w for w in recwarn if 'per thread' in str(w.message)]
    with pytest.warns(UserWarning, match=r'64x8x16 at 1 warps holds 256 accumulator elements per thread'):
        launch.resolve_tile(x, (64, 8, 16, 1))
