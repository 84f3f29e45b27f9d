#!/usr/bin/env bash
# ERFs of the CPU ablations' trained seed-0 models (issue 23): Conv2Former k3 / k7 / k21 and the ConvNeXt-nano
# baseline, stages 0, 1 and 3 (0-based), 50 Imagenette val images at 224 px, then erf-compare's area-ratio table.
# Needs the weights, which stay in runs/ (not committed): run from the repository root after cpu-ablations.sh.
# K7 defaults to the sweep's own run; the 2026-12-04 figures used a re-run of that point (runs/erf-weights, same
# config.yaml and final top-1 48.64 %), because the first run's folder had not survived into that session.
set -euo pipefail
D=${DATA:-/work/shared/datasets/imagenette2-128.tar.gz}
R=${SWEEP_DIR:-runs/ablations-cpu}
OUT=${OUT:-runs/erf}
declare -A CK=([k3]=$R/fusion-mul_weighting-none_kernel_size-3_seed-0
               [k7]=${K7:-$R/fusion-mul_weighting-none_kernel_size-7_seed-0}
               [k21]=$R/fusion-mul_weighting-none_kernel_size-21_seed-0
               [convnext]=$R/model-convnextnano_seed-0)
for stage in 0 1 3; do
    for m in k3 k7 k21 convnext; do
        .venv/bin/conv2former analyze erf --checkpoint "${CK[$m]}" --data "$D" --split val --num-images 50 \
            --img-size 224 --stage $stage --no-progress --output "$OUT/stage$stage/$m"
    done
    .venv/bin/conv2former analyze erf-compare "$OUT"/stage$stage/{k3,k7,k21,convnext} \
        --labels "C2F k3" "C2F k7" "C2F k21" "ConvNeXt k7" --output "$OUT/stage$stage/compare"
done
