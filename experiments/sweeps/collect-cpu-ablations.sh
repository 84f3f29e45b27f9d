#!/usr/bin/env bash
# Copy the records (never weights) of the CPU ablations (issue 23) from the sweep folder into the repository:
#   bash experiments/sweeps/collect-cpu-ablations.sh [COMPARISON] [SWEEP_DIR] [DEST]
# Every finished run (results.json present) of SWEEP_DIR (default runs/ablations-cpu) gets its config.yaml,
# metrics.csv, results.json and sweep_run.json (wall seconds summed over invocations) copied to DEST/runs/<run>/
# (DEST default experiments/results/ablations-cpu). With COMPARISON (fusion, weighting, kernel, convnext,
# fusion-5seeds), the sweep's current aggregate (sweep.json, sweep.csv, sweep.md and the PNGs sweep.md links) goes to
# DEST/COMPARISON/: all comparisons share one sweep folder (so the shared baseline runs once) and each invocation
# rewrites its aggregate, so run this right after the invocation of COMPARISON finished.
set -euo pipefail
COMPARISON=${1:-}
SRC=${2:-runs/ablations-cpu}
DEST=${3:-experiments/results/ablations-cpu}
[ -d "$SRC" ] || { echo "no sweep folder $SRC" >&2; exit 1; }
mkdir -p "$DEST/runs"
copied=0
for run in "$SRC"/*/; do
    run=${run%/}
    [ -f "$run/results.json" ] || continue
    name=$(basename "$run")
    mkdir -p "$DEST/runs/$name"
    for f in config.yaml metrics.csv results.json sweep_run.json; do
        [ -f "$run/$f" ] && cp "$run/$f" "$DEST/runs/$name/$f"
    done
    copied=$((copied + 1))
done
echo "copied the records of $copied finished runs to $DEST/runs"
if [ -n "$COMPARISON" ]; then
    mkdir -p "$DEST/$COMPARISON"
    rm -f "$DEST/$COMPARISON"/*.png
    for f in sweep.json sweep.csv sweep.md; do
        [ -f "$SRC/$f" ] && cp "$SRC/$f" "$DEST/$COMPARISON/$f"
    done
    # only the plots of this aggregate's axes with more than one value (older invocations' plots of other axes stay
    # in SRC; a one-valued axis, e.g. weighting=none in the fusion sweep, gives a one-bar plot)
    python3 - "$SRC" "$DEST/$COMPARISON" <<'PY'
import json, shutil, sys
from pathlib import Path
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
for axis in json.loads((src / 'sweep.json').read_text())['axes']:
    for png in (src / f"top1_vs_{axis['key']}.png", src / f"top1_by_{axis['key']}.png"):
        if png.is_file() and (len(axis['values']) > 1 or len(json.loads((src / 'sweep.json').read_text())['axes']) == 1):
            shutil.copy(png, dest / png.name)
PY
    echo "copied the $COMPARISON aggregate to $DEST/$COMPARISON"
fi
