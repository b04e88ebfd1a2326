"""Several sources in one run: the split, the loss weights, and every metric by source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime.dataset import item_path, read_split_manifest
from cxr.runtime.metrics import format_per_source, per_source_report

torch = pytest.importorskip("torch", reason="training needs torch (pip install '.[train]')")

from cxr.train.augment import AugmentConfig, _erase_cues  # noqa: E402
from cxr.train.cli import main as train_main  # noqa: E402
from cxr.train.engine import group_weight_vector  # noqa: E402
from cxr.train.split import make_split, missing_combinations, save_manifest  # noqa: E402


def _folder(root: Path, counts: dict[str, int], seed: int, bright: dict[str, int]) -> Path:
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        (root / c / "images").mkdir(parents=True)
        for i in range(n):
            img = rng.normal(bright[c], 12, (32, 32)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / "images" / f"{c}-{i}.png")
    return root


LEVELS = {"A": 60, "B": 130, "C": 200}
# the tiny test model (tests/tiny_model.py) answers by brightness: dark, mid, bright
MODEL_LEVELS = {"COVID": 20, "Normal": 128, "Viral Pneumonia": 235}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """An adult-like source with three classes and a second source holding only class B (the
    layout of the shared data: one folder adds normals of another population)."""
    base = tmp_path_factory.mktemp("sources")
    main = _folder(base / "hospital-1", {"A": 30, "B": 30, "C": 20}, 0, LEVELS)
    extra = _folder(base / "hospital-2", {"B": 24}, 1, LEVELS)
    return main, extra


def test_split_is_stratified_by_source_and_class_and_classes_are_the_union(sources, tmp_path):
    main, extra = sources
    m = make_split([main, extra], seed=0)
    assert m["format"] == "cxr-split/2"
    assert [s["name"] for s in m["sources"]] == ["hospital-1", "hospital-2"]
    assert m["classes"] == ["A", "B", "C"]
    for src, cls, n in (("hospital-1", "A", 30), ("hospital-1", "C", 20), ("hospital-2", "B", 24)):
        per = {s: sum(1 for r in m["items"] if (r["source"], r["label"], r["split"]) == (src, cls, s))
               for s in ("train", "val", "test")}
        assert sum(per.values()) == n and min(per.values()) >= 3, (src, cls, per)
    # every path resolves under its own source's root
    assert all(item_path(m, r).is_file() for r in m["items"])
    assert missing_combinations(m) == [{"source": "hospital-2", "class": "A"}, {"source": "hospital-2", "class": "C"}]


def test_adding_a_source_never_moves_another_sources_images(sources, tmp_path):
    main, extra = sources
    alone = make_split(main, seed=5)
    both = make_split([main, extra], seed=5)
    pick = lambda m: {(r["path"], r["split"]) for r in m["items"] if r["source"] == "hospital-1"}  # noqa: E731
    assert pick(alone) == pick(both)
    assert make_split([main, extra], seed=6)["items"] != both["items"]


def test_format_1_manifests_still_read_as_one_source(sources, tmp_path):
    main, _ = sources
    new = make_split(main, seed=0)
    old = {"format": "cxr-split/1", "root": str(main), "seed": 0, "fractions": new["fractions"],
           "classes": new["classes"], "items": [{k: r[k] for k in ("path", "label", "split")} for r in new["items"]]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    doc = read_split_manifest(tmp_path / "old.json")
    assert doc["sources"] == [{"name": "hospital-1", "root": str(main)}]
    assert {r["source"] for r in doc["items"]} == {"hospital-1"}
    assert [item_path(doc, r) for r in doc["items"]] == [main / r["path"] for r in old["items"]]
    (tmp_path / "bad.json").write_text(json.dumps({**new, "items": [{**new["items"][0], "source": "nowhere"}]}))
    with pytest.raises(ValueError, match="names no listed source"):
        read_split_manifest(tmp_path / "bad.json")


def test_group_weights_give_every_source_class_group_the_same_total():
    groups = np.array(["h1/A"] * 30 + ["h1/B"] * 60 + ["h2/B"] * 10)
    w = group_weight_vector(groups).numpy()
    totals = {g: w[groups == g].sum() for g in np.unique(groups)}
    assert np.allclose(list(totals.values()), len(groups) / 3)
    assert w.mean() == pytest.approx(1.0)


def test_per_source_report_and_its_table():
    y_true = [0, 0, 1, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 1, 2]
    src = ["h1", "h1", "h1", "h2", "h2", "h2", "h1"]
    rep = per_source_report(y_true, y_pred, src, ["A", "B", "C"])
    assert list(rep) == ["h1", "h2"]
    assert rep["h1"]["n"] == 4 and rep["h1"]["accuracy"] == pytest.approx(0.75)
    assert rep["h1"]["per_class"]["A"] == {"n": 2, "sensitivity": 0.5}
    assert rep["h2"]["per_class"] == {"B": {"n": 3, "sensitivity": pytest.approx(2 / 3)}}
    text = format_per_source(rep, ["A", "B", "C"])
    h2 = next(line for line in text.splitlines() if line.startswith("h2"))
    assert "0.667 (3)" in h2 and h2.split()[-1] == "-"  # class C absent from h2: '-' not 0


def test_cue_erasing_leaves_the_centre_alone_and_changes_the_margins():
    x = torch.rand(64, 1, 64, 64)
    y = _erase_cues(x.clone(), AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(y[..., 20:44, 20:44], x[..., 20:44, 20:44])
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean() > 0.8


def test_training_on_two_sources_reports_by_source(sources, tmp_path):
    main, extra = sources
    out = tmp_path / "run"
    res = CliRunner().invoke(train_main, [
        "--data", str(main), "--data", str(extra), "--arch", "baseline_cnn", "--image-size", "32", "--epochs", "3",
        "--batch-size", "16", "--lr", "3e-3", "--threads", "1", "--patience", "0", "--no-shift-eval",
        "--select", "mean_group_sensitivity", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "test_report.json").read_text())
    assert set(report["by_source"]) == {"hospital-1", "hospital-2"}
    assert set(report["by_source"]["hospital-2"]["per_class"]) == {"B"}
    assert sum(r["n"] for r in report["by_source"].values()) == report["n"]
    assert report["missing_combinations"] == [{"source": "hospital-2", "class": "A"},
                                              {"source": "hospital-2", "class": "C"}]
    hist = json.loads((out / "metrics.json").read_text())
    assert set(hist[-1]["val"]["group_sensitivity"]) == {"hospital-1/A", "hospital-1/B", "hospital-1/C", "hospital-2/B"}
    assert "mean_group_sensitivity" in hist[-1]["val"]["selection"]
    assert "(source, class) weights" in res.output and "hospital-2/B" in res.output
    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert [s["name"] for s in ck["training_data"]["sources"]] == ["hospital-1", "hospital-2"]
    assert ck["training_data"]["source_class_counts"]["hospital-2"]["train"]["A"] == 0
    # --test-only on the moved data: one --data per source, matched by name
    res = CliRunner().invoke(train_main, ["--out", str(out), "--test-only", "--data", str(extra), "--data", str(main),
                                          "--no-shift-eval", "--threads", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "hospital-2" in res.output


def test_bench_takes_several_folders_each_a_source(sources, tiny_model_path, tmp_path):
    """The tiny test model classifies by brightness; its folders have 3 classes named like its own."""
    from cxr.runtime.benchmarks.benchmark import format_summary, run_bench

    a = _folder(tmp_path / "site-a", {c: 6 for c in MODEL_LEVELS}, 0, MODEL_LEVELS)
    b = _folder(tmp_path / "site-b", {list(MODEL_LEVELS)[0]: 5}, 1, MODEL_LEVELS)
    result = run_bench([a, b], [tiny_model_path], runs=3, workers=1, threads=1)
    row = result["models"][0]
    assert result["sources"] == ["site-a", "site-b"]
    assert row["by_source"]["site-a"]["n"] == 6 * len(MODEL_LEVELS)
    assert row["by_source"]["site-b"]["n"] == 5
    assert "by source" in format_summary(result) and "site-b" in format_summary(result)


def test_bench_split_follows_the_manifest_sources(sources, tiny_model_path, tmp_path):
    from cxr.runtime.benchmarks.benchmark import run_bench

    a = _folder(tmp_path / "site-a", {c: 10 for c in MODEL_LEVELS}, 0, MODEL_LEVELS)
    b = _folder(tmp_path / "site-b", {list(MODEL_LEVELS)[0]: 10}, 1, MODEL_LEVELS)
    m = make_split([a, b], seed=0)
    save_manifest(m, tmp_path / "split.json")
    result = run_bench([], [tiny_model_path], split=tmp_path / "split.json", runs=3, workers=1, threads=1)
    row = result["models"][0]
    n_test = {s: sum(1 for r in m["items"] if r["split"] == "test" and r["source"] == s) for s in ("site-a", "site-b")}
    assert {s: v["n"] for s, v in row["by_source"].items()} == n_test
