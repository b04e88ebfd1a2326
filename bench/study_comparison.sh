#!/usr/bin/env bash
# Reproduce the study's four architectures (+ one newer small one) on ONE shared split with
# the same budget each: 3 epochs at 128 px, batch 32, from scratch, our recipe (AdamW 1e-3,
# warm-up + cosine, class weights from the training split, flip/rotate/zoom + robustness aug).
# Usage: bench/study_comparison.sh DATA_DIR SPLIT_JSON OUT_DIR [THREADS]
set -euo pipefail
DATA=${1:?data dir}; SPLIT=${2:?split.json}; OUT=${3:?out dir}; THREADS=${4:-2}
mkdir -p "$OUT"
for ARCH in baseline_cnn squeezenet1_0 mobilenet_v3_small mobilenet_v2 resnet18; do
  if [ -f "$OUT/$ARCH/test_report.json" ]; then echo "skip $ARCH (done)"; continue; fi
  cxr-train --data "$DATA" --split "$SPLIT" --arch "$ARCH" --image-size 128 --epochs 3 \
    --warmup-epochs 0.3 --patience 0 --threads "$THREADS" --out "$OUT/$ARCH" \
    --dataset-name covid-radiography-3class 2>&1 | tee "$OUT/$ARCH.log"
done
python "$(dirname "$0")/compare_runs.py" "$OUT"/*/
