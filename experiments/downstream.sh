#!/usr/bin/env bash
# The paper's workflow in miniature (issues 5, 15), for one GPU: pre-train a backbone on Imagenette, fine-tune Mask
# R-CNN on Penn-Fudan (50 images held out) and UperNet on CamVid (val split), for Conv2Former-N and ConvNeXt-nano
# (15.0M vs 15.6M parameters) trained the same way; then collect the numbers into one table.
#
#   bash experiments/downstream.sh DATA_DIR [OUT_DIR]   # DATA_DIR: the archives of experiments/shrink_datasets.py
#   SMOKE=1 bash experiments/downstream.sh DATA_DIR OUT # CPU, tiny models and sizes, one step each (the tests)
#
# Time budget (issue 15): the defaults are sized for <= 6.5 min on one H100/H200 with the shrunk data (Imagenette at
# 64 px, CamVid at 240x180). Every stage runs under `timeout` (STAGE_S_PRETRAIN/DETECT/SEGMENT seconds, 65/70/55:
# 2 x 190 s = 380 s) so the whole cannot overrun; a stage that is cut leaves no results.json and its dependants are
# skipped. Each stage's wall time and exit status go to OUT_DIR/stage_times.tsv, to rescale EPOCHS_* after the first
# GPU call. Epochs, iterations and sizes are estimates from ../shared/docs/performance-baseline.md, not measurements.
# A stage resumes if re-run with the same OUT_DIR (fixed run folder names); a finished one is skipped.
set -uo pipefail
DATA=${1:?usage: downstream.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/downstream}
SMOKE=${SMOKE:-0}
IMAGENETTE=${IMAGENETTE:-$(ls "$DATA"/imagenette2-*.tar.gz 2>/dev/null | head -1)}
IMG_SIZE=${IMG_SIZE:-$(basename "$IMAGENETTE" .tar.gz | sed 's/imagenette2-//')}
BACKBONES=${BACKBONES:-"conv2former_n convnext_nano"}
PYTHON=${PYTHON:-python3}
if [[ $SMOKE == 1 ]]; then
  EPOCHS_PRETRAIN=${EPOCHS_PRETRAIN:-1} EPOCHS_DETECT=${EPOCHS_DETECT:-1} ITERS_SEGMENT=${ITERS_SEGMENT:-1}
  STAGE_S_PRETRAIN=${STAGE_S_PRETRAIN:-300} STAGE_S_DETECT=${STAGE_S_DETECT:-300} STAGE_S_SEGMENT=${STAGE_S_SEGMENT:-300}
  COMMON=(--device cpu -j 0 --no-progress) KW=("depths=[1,1,1,1]") PRE_B=8 DET=(--min-size 64 --max-size 96 -b 2 --holdout 2)
  SEG=(--crop-size 64 64 --base-size 72 -b 2 --warmup-iters 0) AMP=() CL=()
else
  EPOCHS_PRETRAIN=${EPOCHS_PRETRAIN:-15} EPOCHS_DETECT=${EPOCHS_DETECT:-12} ITERS_SEGMENT=${ITERS_SEGMENT:-600}
  STAGE_S_PRETRAIN=${STAGE_S_PRETRAIN:-65} STAGE_S_DETECT=${STAGE_S_DETECT:-70} STAGE_S_SEGMENT=${STAGE_S_SEGMENT:-55}
  COMMON=(-j 8 --no-progress) KW=() PRE_B=256
  DET=(--min-size 320 352 384 416 448 480 512 --max-size 800 -b 4 --holdout 50 --warmup-iters 50)
  SEG=(--crop-size 160 224 --base-size 180 -b 16 --warmup-iters 50) AMP=(--amp bf16) CL=(--channels-last)
fi
mkdir -p "$OUT"
TIMES="$OUT/stage_times.tsv"
[[ -f $TIMES ]] || printf 'stage\tseconds\tstatus\tlimit_s\n' >"$TIMES"

run() {  # run NAME LIMIT_S COMMAND...: skip when NAME finished, resume when it has checkpoints; time it
  local name=$1 limit=$2; shift 2
  if [[ -f "$OUT/$name/results.json" ]]; then echo "== $name: done"; return 0; fi
  local args=(--output "$OUT" --experiment "$name")
  [[ -d "$OUT/$name/checkpoints" ]] && args=(--resume "$OUT/$name")
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS status=0
  timeout -k 10 "$limit" "$@" "${args[@]}" || status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" $((SECONDS - start)) "$status" "$limit" | tee -a "$TIMES"
  return "$status"
}

for B in $BACKBONES; do
  kw=(); for k in "${KW[@]}"; do kw+=(--model-kwargs "$k"); done
  run "$B-imagenette" "$STAGE_S_PRETRAIN" "$PYTHON" -m conv2former train --model "$B" "${kw[@]}" \
    --data "$IMAGENETTE" --img-size "$IMG_SIZE" --recipe small --epochs "$EPOCHS_PRETRAIN" -b "$PRE_B" --blr 4e-3 \
    "${AMP[@]}" "${CL[@]}" "${COMMON[@]}"
  if [[ ! -e "$OUT/$B-imagenette/best" ]]; then
    printf '%s\t0\tskipped: no pre-trained backbone\t0\n' "$B-downstream" | tee -a "$TIMES"; continue
  fi
  bkw=(); for k in "${KW[@]}"; do bkw+=(--backbone-kwargs "$k"); done
  run "$B-pennfudan-maskrcnn" "$STAGE_S_DETECT" "$PYTHON" -m conv2former detect train --recipe maskrcnn-1x \
    --backbone "$B" "${bkw[@]}" --pretrained-backbone "$OUT/$B-imagenette/best" --data "$DATA/pennfudan.tar.gz" \
    --epochs "$EPOCHS_DETECT" --decay-milestones $((EPOCHS_DETECT * 2 / 3 + 1)) $((EPOCHS_DETECT * 11 / 12 + 1)) \
    --lr 2e-4 "${DET[@]}" "${AMP[@]}" "${COMMON[@]}"
  run "$B-camvid-upernet" "$STAGE_S_SEGMENT" "$PYTHON" -m conv2former segment train --recipe upernet-160k \
    --backbone "$B" "${bkw[@]}" --pretrained-backbone "$OUT/$B-imagenette/best" --data "$DATA/camvid.tar.gz" \
    --iters "$ITERS_SEGMENT" "${SEG[@]}" "${AMP[@]}" "${COMMON[@]}"
done
"$PYTHON" "$(dirname "$0")/collect_downstream.py" "$OUT" $BACKBONES
