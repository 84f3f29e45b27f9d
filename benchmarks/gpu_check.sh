#!/usr/bin/env bash
# Issue 14's one GPU command: python -m benchmarks.gpu_check within 8 minutes, results and log under $OUT/gpu_check.
#
#   pip install -q --no-deps -e . && bash benchmarks/gpu_check.sh      # on the device machine, repository root
#   bash benchmarks/gpu_check.sh --smoke                                # CPU, Triton interpreter (no $OUT needed)
#
# gpu_check keeps its own budget (--budget 450 s over its sections; the AOT numbers of the timed launches, from
# benchmarks/results/aot/aot.json or compiled in the background, wait at most 20 s more and only within it);
# `timeout` is the backstop that makes the 8 minutes hard. summary.json / summary.md are rewritten after every
# step, so a stopped run keeps what it measured; the AOT rows are also in aot-sm90.json, rewritten as they come.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${OUT:-$ROOT/benchmarks/results}/gpu_check
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)  # absolute: the module runs from the repository root
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1
timeout -k 10 470 "${PYTHON:-python3}" -m benchmarks.gpu_check --out "$DEST" "$@" 2>&1 | tee "$DEST/log.txt"
status=${PIPESTATUS[0]}
[[ $status == 124 ]] && echo "gpu_check.sh: stopped by the 470 s backstop; see $DEST/summary.md" | tee -a "$DEST/log.txt"
exit "$status"
