#!/usr/bin/env bash
# Issue 14's one GPU command: benchmarks/gpu_check.py within 8 minutes, results and log under $OUT/gpu_check.
#
#   pip install -q --no-deps -e . && bash benchmarks/gpu_check.sh      # on the device machine, repository root
#   bash benchmarks/gpu_check.sh --smoke                                # CPU, Triton interpreter (no $OUT needed)
#
# gpu_check.py keeps its own budget (--budget 450 s over its sections); `timeout` is the backstop that makes the
# 8 minutes hard. summary.json / summary.md are rewritten after every step, so a stopped run keeps what it measured.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${OUT:-$HERE/results}/gpu_check
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
timeout -k 10 470 "${PYTHON:-python3}" "$HERE/gpu_check.py" --out "$DEST" "$@" 2>&1 | tee "$DEST/log.txt"
status=${PIPESTATUS[0]}
[[ $status == 124 ]] && echo "gpu_check.sh: stopped by the 470 s backstop; see $DEST/summary.md" | tee -a "$DEST/log.txt"
exit "$status"
