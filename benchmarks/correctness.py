"""benchmarks/gpu_check's correctness checks: the Triton ops against float64 references, tile by tile, and whole
models per kernel path against kernels='torch'.

Tolerances: ``REL_ERR_LIMIT`` (norm-wise, per dtype) for the ops; for a model, ``MODEL_NOISE_FACTOR`` times
kernels='torch''s own rounding error at that precision plus ``MODEL_FLOOR``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import bench_dwconv
from .bench_dwconv import check, check_against, conv_torch, rel_err
from .common import bf16, build, free_memory, images, randomize_for_check

__all__ = ['DTYPES', 'REL_ERR_LIMIT', 'conv_inputs', 'modulation_torch', 'check_case', 'check_tile', 'check_model']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
REL_ERR_LIMIT = {'fp32': 1e-5, 'bf16': 1e-2}  # norm-wise, against a float64 reference
MODEL_NOISE_FACTOR = 4  # a kernel path may differ from kernels='torch' by this many times torch's own rounding error
MODEL_FLOOR = {'fp32': 1e-5, 'bf16': 1e-3}


def conv_inputs(case: dict, batch: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(x in the case's layout, weight, bias) of a gpu_check case (C, H, W, k, layout)."""
    return bench_dwconv.conv_inputs(batch, case['C'], case['H'], case['W'], case['k'], dtype, device, case['layout'])


def modulation_torch(a, v, weight, bias):
    """The unfused path of the modulation: GELU, the depthwise conv (F.conv2d), the product with v."""
    return conv_torch(F.gelu(a), weight, bias) * v


def check_case(case: dict, dtype: str, batch: int, device: torch.device) -> dict:
    """Relative errors of the Triton conv and the fused modulation (output and every gradient) vs float64."""
    from conv2former.ops import conv_modulation, depthwise_conv2d

    x, weight, bias = conv_inputs(case, batch, DTYPES[dtype], device)
    conv = check(depthwise_conv2d, x, weight, bias, ref_dtype=torch.float64)
    v = torch.randn_like(x)
    fused = check_against(conv_modulation, modulation_torch, (x, v, weight, bias),
                          ('out', 'grad_a', 'grad_v', 'grad_weight', 'grad_bias'), ref_dtype=torch.float64)
    limit = REL_ERR_LIMIT[dtype]
    return dict(conv=conv, fused=fused, conv_ok=max(conv.values()) <= limit, fused_ok=max(fused.values()) <= limit)


def check_tile(case: dict, tile, device: torch.device) -> float:
    """Largest relative error (bf16, batch 2, vs float64) of the forward, input-gradient and weight-gradient launchers
    with ``tile``."""
    from conv2former.ops import dwconv

    x, weight, bias = conv_inputs(case, 2, torch.bfloat16, device)
    dy = torch.randn_like(x)
    ref = [t.double() for t in (x, weight, bias, dy)]
    grad_w, grad_b = dwconv.launch_weight_grad(dy, x, case['k'], tile=tile)
    pairs = [(dwconv.launch_forward(x, weight, bias, flip=False, tile=tile), conv_torch(*ref[:3])),
             (dwconv.launch_forward(dy, weight, None, flip=True, tile=tile),
              conv_torch(ref[3], ref[1].flip(-1, -2), None)),
             (grad_w, torch.nn.grad.conv2d_weight(ref[0], ref[1].shape, ref[3], padding=case['k'] // 2,
                                                  groups=case['C'])),
             (grad_b, ref[3].sum((0, 2, 3)))]
    return max(rel_err(out, expected) for out, expected in pairs)


def model_outputs(name: str, kwargs: dict, state: dict, x: torch.Tensor, target: torch.Tensor,
                           dtype: str, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients (loss = sum(logits * target)) of ``name`` with ``state`` in ``dtype``: fp64,
    fp32, or bf16 autocast over fp32 weights."""
    model = build(name, kwargs, device).eval()
    model.load_state_dict(state)
    if dtype == 'fp64':
        model.double()
    context = bf16(device) if dtype == 'bf16' else contextlib.nullcontext()
    with context:
        logits = model(x.double() if dtype == 'fp64' else x).double()
    (logits * target).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def compare(logits, grads, ref_logits, ref_grads) -> dict[str, float]:
    """Relative errors: logits, all gradients as one vector, and the worst single parameter's gradient."""
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    return dict(logits=rel_err(logits, ref_logits), grads=rel_err(flat, ref_flat),
                worst_param=max(rel_err(g, ref_grads[n]) for n, g in grads.items()))


def check_model(name: str, base: dict, paths: tuple[str, ...], batch: int, size: int,
                device: torch.device) -> dict:
    """Each kernel path vs kernels='torch' on the same random (variance-preserving) weights and images, in fp32 and in
    bf16 autocast. The reference is kernels='torch' one precision up (fp64, fp32); a path passes when its error is at
    most MODEL_NOISE_FACTOR x torch's own error at that precision, plus a small floor."""
    reference = build(name, base | dict(kernels='torch'), device).eval()
    randomize_for_check(reference)
    state, num_classes = reference.state_dict(), reference.num_classes
    del reference
    x = images(batch, size, device)
    target = torch.randn(batch, num_classes, device=device, dtype=torch.float64)
    torch_path = base | dict(kernels='torch')
    results = {}
    for dtype, ref_dtype in (('fp32', 'fp64'), ('bf16', 'fp32')):
        ref = model_outputs(name, torch_path, state, x, target, ref_dtype, device)
        noise = compare(*model_outputs(name, torch_path, state, x, target, dtype, device), *ref)
        for path in paths:
            errors = compare(*model_outputs(name, base | dict(kernels=path), state, x, target, dtype, device), *ref)
            tolerance = {key: MODEL_NOISE_FACTOR * noise[key] + MODEL_FLOOR[dtype] for key in errors}
            results[f'{path} {dtype}'] = dict(errors=errors, torch_noise=noise, tolerance=tolerance,
                                              ok=all(errors[key] <= tolerance[key] for key in errors))
        free_memory(device)
    return results
