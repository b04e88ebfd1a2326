"""The folder-level shift check: the test itself, its reference in the model file (written by
cxr-infer shift-reference and by cxr-export), and where a scan shows it (stderr, --report, the
Python API, the review page)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime import Classifier
from cxr.runtime.site import shift
from cxr.runtime.cli import cli
from cxr.runtime.engine import ScanStats
from cxr.runtime.model_edit import ModelEditError, graph_digest, require_onnx
from cxr.runtime.session import ModelLoadError, load_model
from synthetic import shaded
from test_input_check_runtime import add_score_output


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ref_of(**by_source) -> shift.ShiftReference:
    """A reference from {source: {class: scores}}."""
    scores, sources, labels = [], [], []
    for src, by_class in by_source.items():
        for c, v in by_class.items():
            scores += list(v)
            sources += [src] * len(v)
            labels += [c] * len(v)
    doc = shift.build_reference(scores, sources, labels, fitted_on="test", precision="fp32")
    return shift.ShiftReference.from_metadata({shift.METADATA_KEY: json.loads(json.dumps(doc))})


# ----------------------------------------------------------------------------- the test


def test_mann_whitney_matches_counting_pairs():
    rng = np.random.default_rng(0)
    x, ref = rng.normal(0.3, 1, 40), np.r_[rng.normal(0, 1, 60), [0.5, 0.5]]
    x[:3] = 0.5  # ties count a half
    auc, z, p = shift.mann_whitney_greater(x, ref)
    pairs = (x[:, None] > ref[None]).mean() + 0.5 * (x[:, None] == ref[None]).mean()
    assert auc == pytest.approx(pairs)
    assert z > 0 and 0 < p < 0.5
    assert shift.mann_whitney_greater(ref, x)[2] > 0.5  # one-sided: lower scores are no shift


def test_false_alarm_rate_of_same_distribution_is_at_most_alpha():
    rng = np.random.default_rng(1)
    ref = ref_of(a={"Normal": rng.normal(0, 1, 400), "COVID": rng.normal(1, 1, 200)})
    alarms = [shift.check(ref, np.r_[rng.normal(0, 1, 70), rng.normal(1, 1, 30)], ["Normal"] * 70 + ["COVID"] * 30).detected
              for _ in range(400)]
    assert np.mean(alarms) <= 0.025  # alpha 0.01, and 400 draws


def test_case_mix_is_not_a_shift_but_a_shifted_folder_is():
    """Abnormal films score higher; a folder of only those, from the same distribution, is no
    shift (the test is stratified by the predicted class). The same folder moved up by half an sd is."""
    rng = np.random.default_rng(2)
    ref = ref_of(a={"Normal": rng.normal(0, 1, 600), "COVID": rng.normal(2, 1, 300)})
    covid = rng.normal(2, 1, 100)
    pooled = np.concatenate(list(ref.sources["a"].values()))
    assert shift.mann_whitney_greater(covid, pooled)[2] < 1e-6  # unstratified, it would alarm
    same = shift.check(ref, covid, ["COVID"] * 100)
    assert not same.detected and same.p_value > 0.01
    moved = shift.check(ref, covid + 0.6, ["COVID"] * 100)
    assert moved.detected and moved.p_value < 0.01 and moved.statistic > 0.6
    assert shift.MESSAGE_SHIFTED in moved.message()
    d = moved.to_dict()
    assert d["detected"] is True and d["n"] == 100 and d["p_value"] < 0.01 and "statistic" in d


def test_a_folder_like_one_source_is_not_shifted():
    """Intersection-union: unlike the pooled films, but like one training source -> no alarm."""
    rng = np.random.default_rng(3)
    ref = ref_of(adults={"Normal": rng.normal(0, 1, 800)}, children={"Normal": rng.normal(1.5, 1, 150)})
    kids = rng.normal(1.5, 1, 100)
    r = shift.check(ref, kids, ["Normal"] * 100)
    assert r.per_reference[shift.POOLED]["p_value"] < 1e-6
    assert not r.detected and r.closest == "children"
    assert shift.check(ref, kids + 1.5, ["Normal"] * 100).detected


def test_below_the_minimum_and_without_a_reference_nothing_is_detected():
    rng = np.random.default_rng(4)
    ref = ref_of(a={"Normal": rng.normal(0, 1, 100)})
    few = shift.check(ref, rng.normal(5, 1, shift.MIN_FILMS - 1), ["Normal"] * (shift.MIN_FILMS - 1))
    assert not few.detected and f"at least {shift.MIN_FILMS}" in few.reason and few.p_value is None
    assert "not run" in few.message()
    none = shift.check(None, rng.normal(5, 1, 100), ["Normal"] * 100)
    assert not none.detected and not none.available and "shift-reference" in none.reason


def test_reference_is_rejected_when_garbled():
    with pytest.raises(ValueError, match="cxr.shift_reference"):
        shift.ShiftReference.from_metadata({shift.METADATA_KEY: {"format": "cxr-shift/1", "sources": {"a": 3}}})
    with pytest.raises(ValueError, match="at least"):
        shift.build_reference([0.1] * 3, ["a"] * 3, ["N"] * 3, fitted_on="x", precision="fp32")


# ----------------------------------------------------------------------------- a model and folders


def _films(folder: Path, levels, prefix="f") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, level in enumerate(levels):
        Image.fromarray(shaded(48, 48, float(level))).save(folder / f"{prefix}{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def site(tiny_model_path, tmp_path_factory):
    """The tiny model with a qc_score (10 x |normalised brightness|: grey 128 scores 0, 145 about
    2.7, below the unfamiliar threshold 5), a split whose validation films are grey 118-138, and
    the model with its shift reference added by the CLI."""
    base = tmp_path_factory.mktemp("shift")
    qc = add_score_output(tiny_model_path, base / "qc.onnx")
    rng = np.random.default_rng(0)
    data = base / "data"
    _films(data / "Normal", rng.uniform(118, 138, 80), "v")
    items = [{"path": f"Normal/v{i:03d}.png", "label": "Normal", "split": "val", "source": "here"} for i in range(80)]
    split = base / "split.json"
    split.write_text(json.dumps({"format": "cxr-split/2", "seed": 0, "classes": ["Normal"], "items": items,
                                 "sources": [{"name": "here", "root": str(data)}]}))
    out = base / "qc.ref.onnx"
    res = run("shift-reference", qc, "--split", split, "--out", out)
    assert res.exit_code == 0, res.output
    return {"base": base, "qc": qc, "model": out, "res": res, "rng": rng}


def test_shift_reference_adds_metadata_and_nothing_else(site):
    assert "cxr.shift_reference from 80 films (here 80)" in site["res"].output
    before, after = onnx.load(str(site["qc"])), onnx.load(str(site["model"]))
    assert graph_digest(before) == graph_digest(after)
    props = {p.key: p.value for p in after.metadata_props}
    old = {p.key: p.value for p in before.metadata_props}
    assert set(props) - set(old) == {"cxr.shift_reference"} and all(props[k] == v for k, v in old.items())
    ref = load_model(site["model"]).shift_reference
    assert set(ref.sources["here"]) == {"Normal"} and len(ref.sources["here"]["Normal"]) == 80


def test_scan_says_when_a_folder_is_shifted(site, tmp_path):
    rng = site["rng"]
    alike = _films(tmp_path / "alike", rng.uniform(118, 138, 40))
    moved = _films(tmp_path / "moved", rng.uniform(140, 150, 40))  # every film still qc ok
    r = run("scan", alike, "--model", site["model"], "--report", tmp_path / "a.json")
    assert "shift check: no shift found (40 films" in r.output
    assert json.loads((tmp_path / "a.json").read_text())["shift"]["detected"] is False
    r = run("scan", moved, "--model", site["model"], "--report", tmp_path / "m.json", "--html", tmp_path / "m.html")
    assert r.exit_code == 0 and "input check: 40 ok" in r.output
    assert "these films are unlike the training films: validate before use" in r.output
    s = json.loads((tmp_path / "m.json").read_text())["shift"]
    assert s["detected"] is True and s["n"] == 40 and s["p_value"] < 0.01 and s["statistic"] > 0.9
    page = (tmp_path / "m.html").read_text()
    data = json.loads(page.split('id="cxr-data">')[1].split("</script>")[0])
    assert data["summary"]["shift"]["detected"] is True and 'id="shift" class="banner"' in page
    assert {k: data["summary"][k] for k in ("withheld", "refer", "routine")} == {"withheld": 0, "refer": 0, "routine": 0}
    few = _films(tmp_path / "few", rng.uniform(140, 150, 10))
    r = run("scan", few, "--model", site["model"], "--report", tmp_path / "f.json")
    s = json.loads((tmp_path / "f.json").read_text())["shift"]
    assert s["detected"] is False and "at least 30" in s["reason"] and "shift check: not run" in r.output


def test_python_api_has_the_shift_on_the_scan_stats(site, tmp_path):
    moved = _films(tmp_path / "moved", site["rng"].uniform(140, 150, 40))
    clf = Classifier.load(site["model"], batch_size=8)
    stats = ScanStats()
    assert len(list(clf.scan(moved, stats=stats))) == 40
    assert stats.shift.detected and stats.shift.n == 40
    stats = ScanStats()
    list(Classifier.load(site["qc"]).scan(moved, stats=stats))  # no reference in this file: says so
    assert not stats.shift.detected and "no shift reference" in stats.shift.reason


def test_a_cluster_scan_checks_the_shift_as_a_local_scan_also_after_resume(site, tmp_path):
    """``scan --scheduler``: the same shift object as a local scan, and a resumed scan tests every
    film (the earlier run's shards carry their scores in the ledger), not only the last run's."""
    pytest.importorskip("distributed", reason="the cluster scan needs pip install '.[cluster]'")
    import subprocess

    moved = _films(tmp_path / "moved", site["rng"].uniform(140, 150, 40))
    run("scan", moved, "--model", site["model"], "--report", tmp_path / "local.json")
    local = json.loads((tmp_path / "local.json").read_text())["shift"]
    out = tmp_path / "c.csv"
    args = [sys.executable, "-m", "cxr.runtime.cli", "scan", str(moved), "--model", str(site["model"]), "-o", str(out),
            "--scheduler", "local:1", "--shard-size", "15", "--report", str(tmp_path / "c.json")]
    r = subprocess.run(args, capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode()
    assert b"these films are unlike the training films: validate before use" in r.stderr
    assert json.loads((tmp_path / "c.json").read_text())["shift"] == local
    ledger = Path(str(out) + ".shards.jsonl")
    lines = ledger.read_text().splitlines()
    assert len(lines) == 4  # the header and three shards
    ledger.write_text("\n".join(lines[:2]) + "\n")  # only shard 0 done: as if killed after it
    r = subprocess.run(args + ["--resume"], capture_output=True, timeout=240)
    assert r.returncode == 0 and b"resumed: 1 shards (15 files)" in r.stderr, r.stderr.decode()
    assert json.loads((tmp_path / "c.json").read_text())["shift"] == local  # n 40, not the 25 of this run


def test_review_page_counts_withheld_refer_and_routine_as_the_summary(site, tmp_path):
    """Not "flagged" (withheld + referred, counted twice): the three numbers the CLI prints."""
    rng = site["rng"]
    folder = _films(tmp_path / "mix", list(rng.uniform(118, 138, 5)) + [200, 210, 40])  # 3 unfamiliar/not-cxr
    r = run("scan", folder, "--model", site["model"], "--html", tmp_path / "p.html", "--report", tmp_path / "p.json")
    rep = json.loads((tmp_path / "p.json").read_text())["summary"]
    page = (tmp_path / "p.html").read_text()
    s = json.loads(page.split('id="cxr-data">')[1].split("</script>")[0])["summary"]
    assert s["withheld"] == rep["withheld"] == 3 and "flagged" not in s
    assert s["refer"] == rep["triage"]["counts"].get("refer", 0) and s["routine"] == rep["triage"]["counts"].get("routine", 0)
    assert 'kvRow(counts, "withheld (input check)"' in page and r.exit_code == 0  # withheld rows exit 0 without --strict


def test_garbled_reference_refuses_the_model(site, tmp_path):
    m = onnx.load(str(site["model"]))
    for p in m.metadata_props:
        if p.key == "cxr.shift_reference":
            p.value = json.dumps({"format": "cxr-shift/1", "sources": []})
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match="cxr.shift_reference"):
        load_model(tmp_path / "bad.onnx")


def test_writing_a_model_without_onnx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModelEditError, match=r"cxr-infer\[site\]"):
        require_onnx("cxr-infer shift-reference")
