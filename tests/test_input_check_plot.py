"""bench/input_check_plot.py on the test score model: groups, verdicts, thresholds and the PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_input_check_runtime import THRESHOLDS, add_score_output, gray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import input_check_plot  # noqa: E402


def test_plot_rows_per_kind_with_verdicts_and_thresholds(tmp_path, tiny_model_path):
    model = add_score_output(tiny_model_path, tmp_path / "qc.onnx")
    nx = tmp_path / "notx"
    for kind, means in (("bright", (238, 240)), ("mid", (128, 130))):
        (nx / kind).mkdir(parents=True)
        for i, m in enumerate(means):
            gray(nx / kind / f"{i}.png", m)
    Image.new("RGB", (64, 64), (200, 20, 20)).save(nx / "mid" / "red.png")  # stopped by the pixel checks
    (nx / "mid" / "notes.txt").write_text("not an image")
    out, js = tmp_path / "plot.png", tmp_path / "scores.json"
    assert input_check_plot.main(["--model", str(model), "--not-xray", str(nx), "--out", str(out), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["thresholds"] == pytest.approx(THRESHOLDS)
    bright, mid = data["groups"]["not X-ray: bright"], data["groups"]["not X-ray: mid"]
    assert [r["qc"] for r in bright] == ["not_chest_xray", "not_chest_xray"] and not any(r["early"] for r in bright)
    assert len(mid) == 3 and sorted(r["qc"] for r in mid) == ["not_chest_xray", "ok", "ok"]
    assert [r["early"] for r in mid if r["qc"] == "not_chest_xray"] == [True]  # the red one: pixels, not score
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800


def test_plot_refuses_a_model_without_the_check(tmp_path, tiny_model_path):
    (tmp_path / "k").mkdir()
    gray(tmp_path / "k" / "a.png", 128)
    with pytest.raises(SystemExit, match="no input check"):
        input_check_plot.main(["--model", str(tiny_model_path), "--not-xray", str(tmp_path), "--out", str(tmp_path / "p.png")])
