#!/usr/bin/env bash
# One 15-minute GPU window: time one 20-epoch Conv2Former-N run on Imagenette-128 (target <= 60 s), then the paper's
# Fig. 4b (mul vs sum) and Fig. 4a (kernel size) presets with 3 seeds. Every sweep skips finished runs and resumes
# interrupted ones, so re-running this script in a later window continues where the last one stopped.
#   bash experiments/sweeps/gpu-window.sh [DATA] [OUTPUT]
#   SMOKE=1 bash experiments/sweeps/gpu-window.sh TINY_IMAGEFOLDER /tmp/smoke   (CPU dry run of every command)
# No extra wheels are needed (the tensor path is plain PyTorch).
set -euo pipefail
DATA=${1:-/work/shared/datasets/imagenette2-128.tar.gz}
OUT=${2:-runs/gpu-window}
GPU="--amp bf16 --channels-last -j 4 --no-progress"
BENCH="--device cuda --workers 4 --rounds 3"
if [ -n "${SMOKE:-}" ]; then  # SMOKE=1: every command once on the CPU, tiny model, 1 epoch, 1 seed, 32 px
    GPU="--device cpu -j 0 --no-progress --epochs 1 --img-size 32 -b 16 --seeds 0 --model-kwargs depths=[1,1,1,1] \
dims=[8,8,16,16]"
    BENCH="--device cpu --workers 1 --rounds 1 --batches 2 -b 16 --img-size 32"
fi
# the tensor path's augmentation on the GPU (paper augmentation: crop, flip, RandAugment, erasing) vs PIL with 4 workers
python benchmarks/bench_data_path.py --data "$DATA" $BENCH --train-steps 0 --paper-augment \
    --out "$OUT/data-path-gpu" | grep -E '^round|ratio'
python -m conv2former sweep --config experiments/sweeps/fusion.yaml --grid fusion=mul --seeds 0 --data "$DATA" \
    --output "$OUT" --experiment timing-one-run $GPU
python -m conv2former sweep --config experiments/sweeps/fusion.yaml --data "$DATA" --output "$OUT" --parallel 2 $GPU
python -m conv2former sweep --config experiments/sweeps/kernel-size.yaml --data "$DATA" --output "$OUT" --parallel 2 $GPU
python - "$OUT" <<'PY'
import csv, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob('*/sweep.csv')):
    rows = list(csv.DictReader(open(f)))
    walls = [float(r['wall_seconds']) for r in rows if r['wall_seconds']]
    print(f'{f.parent.name}: {len(walls)}/{len(rows)} runs, wall s per run: min {min(walls):.0f} max {max(walls):.0f}')
PY
