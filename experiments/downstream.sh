#!/usr/bin/env bash
# The paper's workflow in miniature (issue 5), for one GPU: pre-train a backbone on Imagenette, fine-tune Mask R-CNN
# on Penn-Fudan (50 images held out) and UperNet on CamVid (val split), for Conv2Former-N and ConvNeXt-nano
# (15.0M vs 15.6M parameters) trained the same way; then collect the numbers into one table.
#
#   bash experiments/downstream.sh DATASETS_DIR [OUT_DIR]      # DATASETS_DIR holds the three .tar.gz archives
#
# Each step is one command and resumes if re-run with the same OUT_DIR (the run folders are fixed names).
# Budget on an H100 (estimate, unmeasured): ~25 min per backbone. Set EPOCHS_* to shrink it.
set -euo pipefail
DATA=${1:?usage: downstream.sh DATASETS_DIR [OUT_DIR]}
OUT=${2:-runs/downstream}
EPOCHS_PRETRAIN=${EPOCHS_PRETRAIN:-40}
EPOCHS_DETECT=${EPOCHS_DETECT:-24}
ITERS_SEGMENT=${ITERS_SEGMENT:-4000}
BACKBONES=${BACKBONES:-"conv2former_n convnext_nano"}

run() {  # run NAME COMMAND...: skip when NAME finished, resume when it has checkpoints
  local name=$1; shift
  if [[ -f "$OUT/$name/results.json" ]]; then echo "== $name: done"; return; fi
  if [[ -d "$OUT/$name/checkpoints" ]]; then "$@" --resume "$OUT/$name"; else "$@" --output "$OUT" --experiment "$name"; fi
}

for B in $BACKBONES; do
  run "$B-imagenette" conv2former train --model "$B" --data "$DATA/imagenette2-128.tar.gz" --img-size 128 \
    --recipe small --epochs "$EPOCHS_PRETRAIN" -b 128 --blr 4e-3 --amp bf16 --channels-last -j 8 --no-progress
  run "$B-pennfudan-maskrcnn" conv2former detect train --recipe maskrcnn-1x --backbone "$B" \
    --pretrained-backbone "$OUT/$B-imagenette/best" --data "$DATA/pennfudan.tar.gz" --epochs "$EPOCHS_DETECT" \
    --decay-milestones $((EPOCHS_DETECT * 2 / 3)) $((EPOCHS_DETECT * 11 / 12)) --min-size 320 352 384 416 448 480 512 \
    --max-size 800 -b 4 --lr 2e-4 --warmup-iters 100 --amp bf16 -j 8 --no-progress
  run "$B-camvid-upernet" conv2former segment train --recipe upernet-160k --backbone "$B" \
    --pretrained-backbone "$OUT/$B-imagenette/best" --data "$DATA/camvid.tar.gz" --iters "$ITERS_SEGMENT" \
    --crop-size 352 480 --base-size 360 --warmup-iters 200 -b 8 --amp bf16 -j 8 --no-progress
done
python "$(dirname "$0")/collect_downstream.py" "$OUT" $BACKBONES
