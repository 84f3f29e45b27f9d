"""Benchmarks and GPU checks of Conv2Former, run from the repository root as modules.

    python -m benchmarks.gpu_check        # issue 14's one budgeted GPU run (bash benchmarks/gpu_check.sh wraps it)
    python -m benchmarks.bench_dwconv     # the Triton depthwise conv vs cuDNN, k = 3..31
    python -m benchmarks.bench_model      # whole models vs their ConvNeXt peers
    python -m benchmarks.bench_memory     # training memory vs ConvNeXt (CPU or CUDA)
    python -m benchmarks.bench_resolution # backbone time and memory up to 1792 px
    python -m benchmarks.bench_data_path  # the data loaders' throughput
    python -m benchmarks.kernel_aot       # every Triton kernel compiled for sm_90 / sm_80 without a GPU

The entry modules also run as files (``python benchmarks/bench_memory.py ...``, the form older notes and scripts
use): ``as_script`` then runs them as the package's modules. Shared helpers: ``common`` (devices, models, timing,
reports), ``budget`` (gpu_check's time budget).
"""
