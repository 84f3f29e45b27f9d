#!/usr/bin/env bash
# Issue 15's one GPU command: the downstream miniature (experiments/downstream.sh, <= 6.5 min) and the resolution
# benchmark (benchmarks/bench_resolution.py, <= 1.5 min), results under $OUT (downstream/, resolution/, log.txt).
#
# Prepare on CPU (once, here):   python experiments/shrink_datasets.py          # -> data/downstream/*.tar.gz (29 MiB)
#                                bash experiments/gpu_run.sh --fetch-wheels     # -> data/downstream/wheels (pip download)
# Device (repository root; carry data/downstream):
#   pip install -q --no-deps -e . && bash experiments/gpu_run.sh
# CPU smoke (the tests): SMOKE=1 OUT=DIR DATA=DIR bash experiments/gpu_run.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/data/downstream}
PYTHON=${PYTHON:-python3}
WHEELS=("pycocotools==2.0.11" "segmentation-models-pytorch==0.6.0")  # missing on the device image (KINDS.md)
if [[ ${1:-} == --fetch-wheels ]]; then
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DATA/wheels" "${WHEELS[@]}"
fi
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
if compgen -G "$DATA/wheels/*.whl" >/dev/null && ! "$PYTHON" -c 'import pycocotools, segmentation_models_pytorch' 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$DATA"/wheels/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$SECONDS
SMOKE=${SMOKE:-0} PYTHON=$PYTHON timeout -k 10 "${DOWNSTREAM_S:-400}" bash "$ROOT/experiments/downstream.sh" "$DATA" "$OUT/downstream"
echo "downstream: status $? after $((SECONDS - start)) s"
start=$SECONDS
if [[ ${SMOKE:-0} == 1 ]]; then res=(--smoke); else res=(--iters 3 --windows 2 --warmup 1); fi
timeout -k 10 "${RESOLUTION_S:-90}" "$PYTHON" "$ROOT/benchmarks/bench_resolution.py" --out "$OUT/resolution" "${res[@]}"
echo "resolution: status $? after $((SECONDS - start)) s"
