#!/bin/sh
# The worked example of docs/site.md: a leave-one-source-out model (runs/loso, docs/loso.md) at the
# site it never saw, covid-radiography-lung-opacity: scan, validate, adapt, validate again.
set -e
cd "$(dirname "$0")/.."
D=../shared/data/covid-radiography-lung-opacity
W=runs/adapt/ex
rm -rf $W && mkdir -p $W
M=runs/loso/covid-radiography-lung-opacity/model.onnx
# the left-out model with its shift reference (validation films of its own training sources)
cxr-infer shift-reference $M --split runs/loso/covid-radiography-lung-opacity/split.json --out $W/loso.onnx
# two halves of the site's films, by class, seeded (symlinks)
python - <<'PY'
import os, random
from pathlib import Path
D=Path("../shared/data/covid-radiography-lung-opacity"); W=Path("runs/adapt/ex")
for c in ("Normal","Lung_Opacity"):
    films=sorted((D/c/"images").iterdir()); random.Random(0).shuffle(films)
    for half,part in (("fit",films[::2]),("test",films[1::2])):
        (W/half/c).mkdir(parents=True, exist_ok=True)
        for p in part: (W/half/c/p.name).symlink_to(p.resolve())
PY
echo "== 1 scan the site's films"; cxr-infer scan $W/test -o $W/scan.csv --model $W/loso.onnx --report $W/scan.json 2>&1 | grep -E "triage|shift|input check"
echo "== 2 validate the model as shipped"; cxr-infer validate $W/test --model $W/loso.onnx --report $W/validate-before.json 2>&1 | tail -25
echo "== 3 adapt on the other half"; cxr-infer adapt $W/fit --model $W/loso.onnx --out $W/site.onnx --report $W/adapt.json 2>&1
echo "== 4 validate the site model"; cxr-infer validate $W/test --model $W/site.onnx --report $W/validate-after.json --markdown $W/validate-after.md 2>&1 | tail -25
echo "== 5 scan again"; cxr-infer scan $W/test -o $W/scan2.csv --model $W/site.onnx 2>&1 | grep -E "triage|shift|input check"
echo "== 6 the not-chest-xray folder through the site model"; cxr-infer scan ../shared/data/not-chest-xray -o $W/notcxr.csv --model $W/site.onnx 2>&1 | grep -E "input check|scan finished"
cxr-infer scan ../shared/data/not-chest-xray -o $W/notcxr0.csv --model $W/loso.onnx 2>&1 | grep -E "input check|scan finished"
