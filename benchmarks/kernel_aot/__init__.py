"""Ahead-of-time compilation report of the Triton kernels (issue 25): registers, spills, shared memory, occupancy.

``python -m benchmarks.kernel_aot --arch 90 [--arch 80] [--quick] --out DIR`` compiles, without a GPU and without
``TRITON_INTERPRET``, every kernel the launchers of ``conv2former.ops.dwconv`` and ``conv2former.ops.convmod`` launch
for the Conv2Former family's real shapes, and writes ``DIR/aot.json`` (one record per distinct compilation) and
``DIR/aot.md`` (a table per kernel with the occupancy the numbers allow, the spills, and the bandwidth lower bound of
the C2F-T stage-1 depthwise conv beside cuDNN's measured time).

How a configuration becomes a compilation, exactly as a real launch on the GPU would:

1. The real launchers (dwconv's ``launch_forward`` and ``launch_weight_grad``, convmod's ``launch_modulate`` and
   ``launch_input_grad``) run on ``meta`` tensors with the model's shapes, strides and dtypes inside
   ``conv2former.ops.launch.recording_launches``, which hands them recording stand-ins of their jitted kernels, so
   the constexprs (FLIP, HAS_BIAS, ACT, ..., K, BLOCK_*, num_warps), the tile heuristic's choice and every argument
   value are the launchers' own; its ``sm_count`` answers the target GPU's SM count, so the weight gradient's
   SPLITS is the one an H100 (132 SMs) / A100 (108) gets.
2. Each recorded ``kernel[grid](*args, **kwargs)`` goes through triton's own argument binder
   (``runtime.jit.create_function_from_signature`` for the target's backend) and ``JITFunction._pack_args``: the
   specialisation of ints (``== 1`` becomes a constant, ``% 16 == 0`` a divisibility hint) and pointers (16-byte
   alignment; a meta tensor's address is 0, i.e. aligned, as the CUDA caching allocator's blocks are) is triton's,
   not a hand-written signature.
3. Identical compilations (same kernel, constexprs, specialisation, options and arch: triton's launch cache key;
   plus the kernel's source hash and the triton version) are compiled once:
   ``triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))``, which ends with the
   wheel's ptxas; its ``-v`` log (registers, spill stores/loads, stack) is captured, and the dynamic shared memory is
   triton's ``metadata.shared``.

Occupancy per SM (both sm_80 and sm_90, as cuda_occupancy.h computes it): 65,536 32-bit registers in 4
sub-partitions, allocated per warp in units of 256 (a thread's count rounded up to a multiple of 8); at most 64
resident warps and 32 blocks; shared memory 228 KB per SM and 227 KB per block on sm_90, 164 KB / 163 KB on sm_80,
in 128-byte units plus 1 KB reserved per block.

``--quick``: the C2F-T stage-1 shape (batch 128, 72 channels, 56x56, k=11) at the heuristic's tile, the kernel
variants of the upstream block's forward and backward plus the heaviest ones, the three dtypes, channels_last (and
NCHW with ``--layouts``), both archs: ~54 compilations. Without it: all models, stages, batches 1 and 128, odd k in
3..31, both layouts, every launcher variant (narrow it with ``--models``, ``--batches``, ``--kernel-sizes``,
``--variants``, ...; ``--dry-run`` counts the distinct compilations without compiling; ``--append`` adds to an
existing report, dropping its records of an older kernel source).

Modules: ``family`` (shapes, targets, selections), ``launches`` (launcher variants, recording, triton's binder,
enumeration), ``compiling`` (triton.compile + ptxas log, occupancy), ``report`` (bandwidth bound, aot.md), ``cli``
(this command), ``timed`` (the numbers of explicit configurations, for benchmarks/gpu_check).
"""
from .compiling import compile_all, compile_job, make_record, occupancy, parse_ptxas_log, ptxas_path
from .family import (ARCHS, BATCHES, DTYPES, KERNEL_SIZES, LAYOUTS, MAPS, MODELS, QUICK_VARIANTS, REFERENCE, Case,
                     Selection, full_selection, make_tensors, quick_selection)
from .launches import KERNEL_FLAGS, bind, enumerate_jobs, record_launches, select_variants, specialise, variants
from .report import LOW_OCCUPANCY, bandwidth_bounds, render_markdown

__all__ = ['ARCHS', 'MODELS', 'MAPS', 'BATCHES', 'KERNEL_SIZES', 'DTYPES', 'LAYOUTS', 'REFERENCE', 'QUICK_VARIANTS',
           'KERNEL_FLAGS', 'LOW_OCCUPANCY', 'Case', 'Selection', 'quick_selection', 'full_selection', 'make_tensors',
           'variants', 'select_variants', 'record_launches', 'bind', 'specialise', 'enumerate_jobs', 'compile_job',
           'compile_all', 'make_record', 'occupancy', 'parse_ptxas_log', 'ptxas_path', 'bandwidth_bounds',
           'render_markdown']
