"""bench/input_check_robustness.py on the test score model: every alteration measured, the
figures follow from what the model does to the altered images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from synthetic import MID
from test_input_check_runtime import add_score_output, gray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import input_check_robustness as rob  # noqa: E402


def test_every_alteration_is_measured_from_what_the_model_does(tmp_path, tiny_model_path, capsys):
    # the test model scores brightness: mid-gray films (128) pass; a 10 % black border darkens the
    # mean to about 89, which it calls unfamiliar; a flip changes no level
    model = add_score_output(tiny_model_path, tmp_path / "qc.onnx")
    root = tmp_path / "data"
    (root / MID / "images").mkdir(parents=True)
    items = []
    for i in range(4):
        gray(root / MID / "images" / f"{i}.png", 126 + i, w=96, h=96)
        items.append({"path": f"{MID}/images/{i}.png", "label": MID, "split": "test", "source": "s"})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"format": "cxr-split/2", "classes": [MID], "items": items,
                                 "sources": [{"name": "s", "root": str(root)}]}))
    out = tmp_path / "rob.json"
    assert rob.main(["--split", str(split), "--model", str(model), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert list(rows) == list(rob.ALTERATIONS) and all(r["n"] == 4 for r in rows.values())
    orig, border = rows["original"], rows["black border 10 %"]
    assert orig["flagged"] == 0.0 and orig["accuracy"] == orig["accuracy_shown"] == 1.0
    assert border["flagged"] == 1.0 and border["not_chest_xray"] == 0.0  # unfamiliar, not refused outright
    assert border["accuracy_shown"] is None  # every row withheld: nothing shown to be right or wrong
    assert rows["flipped left-right"] == orig
    printed = capsys.readouterr().out
    assert "| black border 10 % | 100.0 % | 0.0 % |" in printed and "4 test images" in printed
