#!/usr/bin/env bash
# The pre-registered CPU ablations of issue 23 (experiments/results/ablations-cpu/README.md), one sweep after another
# into ONE sweep folder (runs/ablations-cpu), in this order: fusion mul/sum, weighting, kernel size, ConvNeXt, then
# (if the decision rule says so) seeds 3 and 4 of mul and sum. Each comparison is run seed by seed (--seeds 0, then
# 0 1, then 0 1 2: every invocation skips the finished runs), so records can be collected every ~2-12 runs; after
# every invocation the run records (never weights) are copied into experiments/results/ablations-cpu/ by
# collect-cpu-ablations.sh. Nothing is committed from here. Safe to kill and re-start: finished runs are skipped,
# an interrupted one resumes from its last epoch checkpoint.
#
# The code, presets and scripts are those of the checkout this script lies in (it puts that checkout first on
# PYTHONPATH); outputs go to the current directory. To keep a shared working tree's later edits out of the runs,
# run it from a snapshot of the pre-registration commit, from the repository root:
#   C=runs/ablations-cpu-code; mkdir -p $C && git archive COMMIT | tar -x -C $C && echo COMMIT > $C/COMMIT
#   nohup nice -n 19 bash $C/experiments/sweeps/cpu-ablations.sh > runs/ablations-cpu.log 2>&1 &
# Dry run of the whole sequence on a toy ImageFolder (not the pre-registered settings: EXTRA overrides them):
#   DATA=TOY OUT=/tmp/o REC=/tmp/rec EXTRA="--epochs 1 --eval-every 1 --img-size 32 -b 8 --model-kwargs \
#   depths=[1,1,1,1] dims=[8,8,16,16]" bash experiments/sweeps/cpu-ablations.sh
set -euo pipefail
DATA=${DATA:-/work/shared/datasets/imagenette2-128.tar.gz}
OUT=${OUT:-runs}
REC=${REC:-experiments/results/ablations-cpu}
BIN=${BIN:-.venv/bin}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # this checkout's experiments/sweeps
CODE=$(cd "$HERE/../.." && pwd)
export PYTHONPATH="$CODE${PYTHONPATH:+:$PYTHONPATH}"
EXTRA=${EXTRA:-}  # extra sweep flags: for the dry run only
SWEEP_DIR="$OUT/ablations-cpu"

collect() { bash "$HERE/collect-cpu-ablations.sh" "${1:-}" "$SWEEP_DIR" "$REC"; }

sweep() {  # sweep PRESET SEEDS...
    local preset=$1
    shift
    echo "=== $(date -Is) cpu-$preset.yaml, seeds $*"
    "$BIN/conv2former" sweep --config "$HERE/cpu-$preset.yaml" --data "$DATA" --output "$OUT" \
        $EXTRA --seeds "$@"
}

comparison() {  # comparison PRESET: seed 0, then seeds 0-1, then 0-2; records after each, the aggregate at the end
    local preset=$1
    sweep "$preset" 0 && collect
    sweep "$preset" 0 1 && collect
    sweep "$preset" 0 1 2 && collect "$preset"
}

echo "=== $(date -Is) start (host $(hostname), $(nproc) cores, torch threads default); code: $CODE" \
    "(commit $(cat "$CODE/COMMIT" 2>/dev/null || git -C "$CODE" rev-parse HEAD 2>/dev/null || echo unknown))"
"$BIN/python" -P -c 'import conv2former, torch, timm; print("conv2former from", conv2former.__file__, "| torch",
torch.__version__, "| timm", timm.__version__, "| threads", torch.get_num_threads())'

comparison fusion
comparison weighting
comparison kernel
comparison convnext
decision=$("$BIN/python" "$HERE/cpu-ablations-stats.py" "$REC" --extra-seeds)
echo "=== $(date -Is) extra seeds 3, 4 for mul and sum: $decision"
echo "$decision" > "$REC/fusion/extra-seeds-decision.txt"
if [ "$decision" = yes ]; then
    sweep fusion 0 1 2 3 && collect
    sweep fusion 0 1 2 3 4 && collect fusion-5seeds
fi
"$BIN/python" "$HERE/cpu-ablations-stats.py" "$REC" --out "$REC/stats.md"
echo "=== $(date -Is) all done"
