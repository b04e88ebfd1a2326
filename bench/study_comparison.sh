#!/usr/bin/env bash
# Reproduce the study's four architectures (+ one newer small one) on ONE shared split with the
# same short budget each, at the study's settings: Adam (AdamW with no weight decay) at a constant
# 1e-4, batch 32, inverse-frequency class weights, its augmentation only (flip, +-10 deg, 90-110 %
# zoom), no label smoothing, from scratch (ImageNet weights cannot be fetched here), 3 epochs at
# 128 px. The project's own recipe is measured beside it by its own runs (docs/models.md).
# Usage: bench/study_comparison.sh SPLIT_JSON OUT_DIR [THREADS] [ARCH...]
set -euo pipefail
SPLIT=${1:?split.json}; OUT=${2:?out dir}; THREADS=${3:-2}; shift 3 || true
ARCHS=${*:-mobilenet_v3_small baseline_cnn squeezenet1_0 mobilenet_v2 resnet18}
mkdir -p "$OUT"
for ARCH in $ARCHS; do
  if [ -f "$OUT/$ARCH/test_report.json" ]; then echo "skip $ARCH (done)"; continue; fi
  RESUME=(); [ -f "$OUT/$ARCH/last.pt" ] && RESUME=(--resume)
  cxr-train --split "$SPLIT" --arch "$ARCH" --image-size 128 --epochs 3 --lr 1e-4 --weight-decay 0 \
    --warmup-epochs 0 --min-lr-ratio 1 --label-smoothing 0 --balance class --no-robust-augment \
    --patience 0 --threads "$THREADS" --no-shift-eval --out "$OUT/$ARCH" "${RESUME[@]}" \
    --dataset-name study-4class 2>&1 | tee -a "$OUT/$ARCH.log"
done
python "$(dirname "$0")/compare_runs.py" "$OUT"/*/
