"""Nothing assumes three classes: a five-class model (Normal neither first nor in the middle) scans,
triages every class but Normal as abnormal, prints its per-class referral, and benches a folder
holding a class it has no name for as abnormal films."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.export import operating_points as opm
from cxr.runtime import Classifier
from cxr.runtime.cli import cli
from synthetic import shaded
from tiny_model import build_tiny_model

FIVE = ("Atelectasis", "COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
# the tiny model's class i peaks at normalised brightness -2 + i: these grey levels sit on each peak
LEVEL = {"Atelectasis": 14, "COVID": 64, "Lung_Opacity": 128, "Normal": 191, "Viral Pneumonia": 250}


@pytest.fixture(scope="module")
def five_class_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("five")
    plain = build_tiny_model(d / "plain.onnx", classes=FIVE)
    clf = Classifier.load(plain)
    rng = np.random.default_rng(1)
    probs, y, src = [], [], []
    for i, c in enumerate(FIVE):
        for v in np.clip(rng.normal(LEVEL[c], 10, 30), 0, 255).astype(np.uint8):
            probs.append([clf.classify(shaded(32, 32, int(v), 2)).probabilities[k] for k in FIVE])
            y.append(i)
            src.append("site-a" if len(y) % 3 else "site-b")
    op = opm.build(np.array(probs), np.array(y), list(FIVE), src, target=0.98)
    return build_tiny_model(d / "five.onnx", classes=FIVE, extra={"operating_points": op}), op


def test_operating_points_cover_every_abnormal_class(five_class_model):
    _, op = five_class_model
    assert op["normal_class"] == "Normal" and set(op["by_class"]) == set(FIVE) - {"Normal"}
    assert op["default"]["rule"] == "every source"
    for s in ("site-a", "site-b"):
        assert op["by_source"][s]["default"][0] >= 0.98


def test_scan_triages_every_class_but_normal_as_abnormal(five_class_model, tmp_path):
    path, op = five_class_model
    for c, v in LEVEL.items():
        Image.fromarray(shaded(40, 40, v)).save(tmp_path / f"{c}.png")
    res = CliRunner().invoke(cli, ["scan", str(tmp_path), "--model", str(path), "--format", "csv", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(io.StringIO(res.stdout))}
    assert len(rows) == len(FIVE)
    for c in FIVE:
        r = rows[f"{c}.png"]
        assert r["prediction"] == c, r
        assert r["triage"] == ("routine" if c == "Normal" else "refer"), r
        assert set(k for k in r if k.startswith("p_")) == {f"p_{k}" for k in FIVE}


def test_info_prints_each_abnormal_class_at_the_default(five_class_model):
    path, op = five_class_model
    res = CliRunner().invoke(cli, ["info", "--model", str(path)])
    assert res.exit_code == 0, res.output
    for c in ("Atelectasis", "COVID", "Lung_Opacity", "Viral Pneumonia"):
        n = op["by_class"][c]["n"]
        assert f"class {c} ({n} films) at the default: referred" in res.output
    assert "in every source" in res.output


def test_bench_counts_a_class_without_a_name_as_abnormal(five_class_model, tmp_path):
    path, _ = five_class_model
    root = tmp_path / "site"
    for c, v in {"Normal": 191, "Effusion": 100, "COVID": 64}.items():
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(shaded(40, 40, v + j)).save(root / c / f"{j}.png")
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(root), "--model", str(path), "--json", str(out), "--runs", "2",
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    t = json.loads(out.read_text())["models"][0]["triage"]
    assert t["realised"]["n_abnormal"] == 6 and t["realised"]["n_normal"] == 3
    assert set(t["realised_by_class"]) == {"COVID", "Effusion"}
    assert t["realised_by_class"]["Effusion"]["n_abnormal"] == 3
    # grey 100 sits between COVID and Lung_Opacity: far from Normal, so every Effusion film is referred
    assert t["realised_by_class"]["Effusion"]["sensitivity"] == 1.0
    assert "class Effusion: referred 100.0% of 3" in res.output
