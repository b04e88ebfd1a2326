"""``cxr-infer bench``: metrics that match what the models predict, agreement, unknown labels,
the shipped-pair default, and exit codes. Tiny brightness models (tiny_model.py), synthetic
folders; the timings are only checked for being present, never for their values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cxr.models
from cxr.runtime import Classifier
from cxr.runtime.benchmarks.benchmark import map_labels, select_items
from cxr.runtime.cli import cli
from cxr.runtime.dataset import LabelledImage, discover_labelled
from cxr.runtime.preprocess import Preprocessing
from tiny_model import CLASSES, build_tiny_model

FAST = ["--runs", "3", "--batch-size", "4", "--workers", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _short_timings(monkeypatch):
    # the real minimum timing window (seconds per model) is for benchmarks, not for tests
    import cxr.runtime.benchmarks.benchmark as bm

    monkeypatch.setattr(bm, "MIN_TIMED_S", 0.0)

# Grey levels per folder class. The tiny model's boundaries sit at 64 and 191 (mean 0.5); the
# shifted model's (mean 0.4) at 38 and 166, so levels between them make the two disagree.
LEVELS = {
    "COVID": [10, 30, 50, 100],
    "Normal": [80, 128, 170, 200],
    "Viral Pneumonia": [180, 220, 250],
    "Lung_Opacity": [60, 128, 240],  # a class the 3-class models do not know
}


def invoke(*args):
    return CliRunner().invoke(cli, ["bench", *[str(a) for a in args]], catch_exceptions=False)


def write_folder(root: Path, corrupt: bool) -> Path:
    for cls, levels in LEVELS.items():
        # database layout for two classes, plain class folders for the others
        d = root / cls / "images" if cls in ("COVID", "Lung_Opacity") else root / cls
        d.mkdir(parents=True)
        for i, v in enumerate(levels):
            Image.new("L", (48, 40), v).save(d / f"{cls[:3]}-{i}.png")
    (root / "COVID" / "masks").mkdir()
    Image.new("L", (8, 8), 255).save(root / "COVID" / "masks" / "m.png")  # ignored
    if corrupt:
        (root / "Normal" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    a = build_tiny_model(tmp / "a.onnx")
    b = build_tiny_model(tmp / "b.int8.onnx", precision="int8", pp=Preprocessing(size=32, mean=0.4, std=0.25))
    four = build_tiny_model(tmp / "four.onnx", classes=("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"))
    data = write_folder(tmp / "data", corrupt=True)
    clean = write_folder(tmp / "clean", corrupt=False)
    return tmp, a, b, four, data, clean


def predictions(model_path, folder):
    """What the model says for each labelled file, computed independently of the benchmark."""
    clf = Classifier.load(model_path, threads=1)
    _, items = discover_labelled(folder)
    out = []
    for it in items:
        try:
            out.append((it.label, clf.classify(it.path).label))
        except Exception:
            out.append((it.label, None))
    return out


def expected_metrics(preds, known):
    scored = [(t, p) for t, p in preds if p is not None and t in known]
    acc = sum(t == p for t, p in scored) / len(scored)
    sens = {}
    for c in known:
        rows = [p for t, p in scored if t == c]
        sens[c] = sum(p == c for p in rows) / len(rows) if rows else None
    return acc, len(scored), sens


def test_two_models_metrics_agreement_unknown_labels(setup):
    tmp, a, b, _, data, _ = setup
    out = tmp / "bench.json"
    res = invoke(data, "--model", a, "--model", b, "--json", out, *FAST)
    assert res.exit_code == 1, res.output  # one unreadable file: reported, and the status says so
    r = json.loads(out.read_text())
    assert r["format"] == "cxr-bench/1"
    assert r["images"] == sum(map(len, LEVELS.values())) + 1
    assert r["folder_classes"] == sorted(LEVELS)

    pa, pb = predictions(a, data), predictions(b, data)
    assert pa != pb  # the fixture is meant to make them disagree somewhere
    for row, preds in zip(r["models"], (pa, pb)):
        acc, n, sens = expected_metrics(preds, CLASSES)
        assert row["accuracy"] == pytest.approx(acc)
        assert row["evaluated"] == n
        for c in CLASSES:
            assert row["per_class"][c]["sensitivity"] == pytest.approx(sens[c])
        assert row["errors"] == 1 and row["errors_by_class"] == {"Normal": 1}
        assert "zz-broken.png" in row["error_examples"][0]["path"]
        # unknown labels: counted with what the model said, not dropped and not scored
        unk = row["unknown_labels"]["Lung_Opacity"]
        assert unk["count"] == len(LEVELS["Lung_Opacity"])
        assert unk["predicted"] == dict(Counter(p for t, p in preds if t == "Lung_Opacity"))
        assert row["label_mapping"]["Lung_Opacity"] is None
        assert "Lung_Opacity" in row["unknown_labels_note"]
        cm = np.array(row["confusion_matrix"])
        assert cm.sum() == n
        assert row["confusion_by_folder_class"]["Normal"]["(error)"] == 1
        # timings present and sane
        assert row["latency_batch1_ms"]["n"] == 3 and row["latency_batch1_ms"]["p50"] > 0
        assert row["latency_batch1_ms"]["p90"] >= row["latency_batch1_ms"]["p50"]
        assert row["inference_throughput"]["batch_size"] == 4
        assert row["inference_throughput"]["images_per_s"] > 0
        assert row["scan"]["images_per_s"] > 0 and row["scan_pct_of_limit"] > 0
        dec = row["decode_throughput"]
        assert dec["images_per_s"] > 0 and dec["images"] == r["images"]  # small folder: every file
        assert row["pipeline_limit"]["shared_cores"] is True  # CPU provider
        lim = row["pipeline_limit"]["images_per_s"]
        assert 0 < lim <= min(dec["images_per_s"], row["inference_throughput"]["images_per_s"])
        assert dec["cores_busy"] > 0 and row["inference_throughput"]["cores_busy"] > 0
        assert row["scan_pct_of_limit"] == pytest.approx(100 * row["scan"]["images_per_s"] / lim)
        assert row["size_bytes"] == Path(row["model"]).stat().st_size

    assert r["models"][0]["agreement"] is None
    both = [(x, y) for (_, x), (_, y) in zip(pa, pb) if x is not None and y is not None]
    ag = r["models"][1]["agreement"]
    assert ag["compared"] == len(both)
    assert ag["top1_agreement"] == pytest.approx(sum(x == y for x, y in both) / len(both))
    assert r["models"][1]["precision"] == "int8"

    table = res.stdout
    for text in ("Lung_Opacity", "a.onnx", "b.int8.onnx", "ONNX int8", "ref", "How close to the limit",
                 f"{100 * r['models'][0]['accuracy']:.1f}", f"{100 * ag['top1_agreement']:.2f}",
                 "Sens Viral Pneumonia", "confusion matrix"):
        assert text in table, text


def test_model_that_knows_every_class_and_clean_folder_exits_0(setup):
    tmp, _, _, four, _, clean = setup
    out = tmp / "four.json"
    res = invoke(clean, "--model", four, "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["models"][0]
    assert row["unknown_labels"] == {} and row["errors"] == 0
    acc, n, _ = expected_metrics(predictions(four, clean), set(LEVELS))
    assert row["evaluated"] == n == sum(map(len, LEVELS.values()))
    assert row["accuracy"] == pytest.approx(acc)


def test_no_known_class_reports_instead_of_crashing(setup, tmp_path):
    tmp, a, *_ = setup
    d = tmp_path / "Cardiomegaly"
    d.mkdir()
    Image.new("L", (20, 20), 128).save(d / "x.png")
    out = tmp_path / "r.json"
    res = invoke(tmp_path, "--model", a, "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["models"][0]
    assert row["accuracy"] is None and row["unknown_labels"]["Cardiomegaly"]["count"] == 1
    assert "accuracy is undefined" in res.stdout


def test_limit_keeps_every_class(setup):
    tmp, a, _, _, data, _ = setup
    out = tmp / "limit.json"
    invoke(data, "--model", a, "--limit", "4", "--json", out, *FAST)
    r = json.loads(out.read_text())
    assert r["images"] == 4 and r["images_per_class"] == {c: 1 for c in sorted(LEVELS)}


def test_default_compares_shipped_fp32_then_int8(setup, tmp_path, monkeypatch):
    tmp, a, b, _, _, clean = setup
    ship = tmp_path / "models"
    ship.mkdir()
    (ship / "m.onnx").write_bytes(a.read_bytes())
    (ship / "m.int8.onnx").write_bytes(b.read_bytes())
    (ship / "manifest.json").write_text(json.dumps(
        {"default_precision": "int8", "models": {"int8": "m.int8.onnx", "fp32": "m.onnx"}}))
    monkeypatch.setattr(cxr.models, "MODELS_DIR", ship)
    out = tmp_path / "r.json"
    res = invoke(clean, "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["models"]
    assert [r["name"] for r in rows] == ["m.onnx", "m.int8.onnx"]
    assert rows[1]["agreement"]["reference"] == "m.onnx"


def test_bad_input_exit_codes(setup, tmp_path, monkeypatch):
    tmp, a, _, _, _, clean = setup
    monkeypatch.setattr(cxr.models, "MODELS_DIR", tmp_path / "nothing-shipped")
    res = invoke(clean, *FAST)
    assert res.exit_code == 2 and "no shipped model" in res.output and "--model" in res.output

    res = invoke(tmp_path / "missing", "--model", a)
    assert res.exit_code == 2 and "is not a folder" in res.output
    (tmp_path / "empty").mkdir()
    res = invoke(tmp_path / "empty", "--model", a)
    assert res.exit_code == 2 and "no labelled images" in res.output

    res = invoke(clean, "--model", tmp_path / "nope.onnx")
    assert res.exit_code == 2 and "not found" in res.output
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    res = invoke(clean, "--model", a, "--model", junk, *FAST)
    assert res.exit_code == 2 and "junk.onnx" in res.output
    no_meta = build_tiny_model(tmp_path / "plain.onnx", metadata=False)
    res = invoke(clean, "--model", no_meta, *FAST)
    assert res.exit_code == 2 and "not a cxr model" in res.output

    res = invoke(clean, "--model", a, "--json", tmp_path / "no" / "dir" / "r.json")
    assert res.exit_code == 2 and "cannot write" in res.output
    assert invoke(clean, "--model", a, "--batch-size", "0").exit_code == 2
    assert invoke(clean, "--model", a, "--device", "tpu").exit_code == 2


def test_select_items_round_robin_and_label_mapping():
    items = [LabelledImage(Path(f"{c}{i}"), c) for c in "ABC" for i in range(5 if c == "A" else 2)]
    picked = select_items(items, 5)
    assert Counter(it.label for it in picked) == {"A": 2, "B": 2, "C": 1}
    assert picked == sorted(picked, key=items.index)
    assert select_items(items, None) == items
    mapping, notes = map_labels(["Viral_Pneumonia", "covid", "Lung_Opacity"], list(CLASSES))
    assert mapping == {"Viral_Pneumonia": 2, "covid": 0, "Lung_Opacity": None}
    assert len(notes) == 2 and "Viral_Pneumonia" in notes[0]


def test_bench_module_never_imports_torch():
    code = ("import sys, cxr.runtime.benchmarks.benchmark, cxr.runtime.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


def test_split_manifest_benches_only_the_test_subset(setup, tmp_path):
    tmp, a, _, _, _, clean = setup
    _, items = discover_labelled(clean)
    rel = [(os.path.relpath(it.path, clean), it.label) for it in items]
    manifest = {"format": "cxr-split/1", "root": "/elsewhere", "seed": 0, "classes": sorted(LEVELS),
                "items": [{"path": p, "label": lab, "split": "test" if i % 2 else "train"}
                          for i, (p, lab) in enumerate(rel)]}
    split = tmp_path / "split.json"
    split.write_text(json.dumps(manifest))
    out = tmp_path / "r.json"
    res = invoke(clean, "--model", a, "--split", split, "--json", out, *FAST)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    want = [(p, lab) for i, (p, lab) in enumerate(rel) if i % 2]
    assert r["images"] == len(want) and r["split"]["subset"] == "test"
    assert r["images_per_class"] == dict(Counter(lab for _, lab in want))
    assert "test split of" in res.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = invoke(clean, "--model", a, "--split", bad)
    assert res.exit_code == 2 and "not a cxr-train split manifest" in res.output
    res = invoke(clean, "--model", a, "--split", split, "--subset", "val")
    assert res.exit_code == 2 and "no 'val' items" in res.output


def test_pipeline_limit_accounts_for_shared_cores_and_the_slower_stage():
    from cxr.runtime.benchmarks.benchmark import pipeline_limit

    dec = {"images_per_s": 1000.0, "cores_busy": 2.0}
    # inference saturating both cores: 2 ms + 8 ms of core time per image on 2 cores -> 200 img/s
    assert pipeline_limit(dec, {"images_per_s": 250.0, "cores_busy": 2.0}, True, cpus=2) == pytest.approx(200.0)
    # inference keeping one core busy leaves the other for decoding: bounded by inference itself
    assert pipeline_limit(dec, {"images_per_s": 250.0, "cores_busy": 1.0}, True, cpus=2) == pytest.approx(250.0)
    # on a GPU the slower stage bounds it
    assert pipeline_limit(dec, {"images_per_s": 250.0, "cores_busy": 2.0}, False) == 250.0
    assert pipeline_limit(None, {"images_per_s": 250.0}, True) is None
