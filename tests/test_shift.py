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
from cxr.runtime.model_edit import ModelEditError, require_onnx
from cxr.runtime.session import ModelLoadError, load_model
from synthetic import shaded
from test_input_check_runtime import add_score_output


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def stats_of(x, labels) -> shift.ShiftStats:
    st = shift.ShiftStats()
    for v, c in zip(np.atleast_2d(x), labels):
        st.add(v, c)
    return st


def ref_of(**by_source) -> shift.ShiftReference:
    """A reference from {source: {class: feature rows}}."""
    rows, sources, labels = [], [], []
    for src, by_class in by_source.items():
        for c, v in by_class.items():
            rows += list(v)
            sources += [src] * len(v)
            labels += [c] * len(v)
    doc = shift.build_reference(np.array(rows), sources, labels, fitted_on="test", precision="fp32")
    return shift.ShiftReference.from_metadata({shift.METADATA_KEY: json.loads(json.dumps(doc))})


D = 6
CLASS_AXIS = np.eye(D)[0] * 3.0  # abnormal films sit 3 sd along the first axis


def films(rng, n, centre=0.0, cls_shift=False, moved=None):
    x = rng.normal(0, 1, (n, D)) + centre
    if cls_shift:
        x = x + CLASS_AXIS
    if moved is not None:
        x = x + moved
    return x


# ----------------------------------------------------------------------------- the test


def test_chi2_survival_matches_known_quantiles():
    for t, k, p in [(3.841459, 1, 0.05), (6.634897, 1, 0.01), (9.210340, 2, 0.01), (18.307038, 10, 0.05),
                    (45.641683, 26, 0.01), (1.0, 3, 0.801252)]:
        assert shift.chi2_sf(t, k) == pytest.approx(p, rel=1e-5)
    assert shift.chi2_sf(0.0, 5) == 1.0 and shift.chi2_sf(5000.0, 26) < 1e-300 + 1e-200


def test_false_alarm_rate_of_same_distribution_is_at_most_alpha():
    rng = np.random.default_rng(1)
    ref = ref_of(a={"Normal": films(rng, 400), "COVID": films(rng, 200, cls_shift=True)})
    alarms = [shift.check(ref, stats_of(np.r_[films(rng, 70), films(rng, 30, cls_shift=True)],
                                        ["Normal"] * 70 + ["COVID"] * 30)).detected for _ in range(400)]
    assert np.mean(alarms) <= 0.03  # alpha 0.01, and 400 draws


def test_case_mix_is_not_a_shift_but_a_shifted_folder_is():
    """A folder of only abnormal films, from the same distribution, is no shift (the mean is compared
    with the predicted classes' own); the same folder moved by 0.6 sd off the class axis is."""
    rng = np.random.default_rng(2)
    ref = ref_of(a={"Normal": films(rng, 600), "COVID": films(rng, 300, cls_shift=True)})
    covid = films(rng, 100, cls_shift=True)
    same = shift.check(ref, stats_of(covid, ["COVID"] * 100))
    assert not same.detected and same.p_value > 0.01
    # misclassified films of such a ward (abnormal films the model called Normal) are no shift either
    ward = shift.check(ref, stats_of(np.r_[covid, films(rng, 15, cls_shift=True)], ["COVID"] * 100 + ["Normal"] * 15))
    assert not ward.detected
    moved = shift.check(ref, stats_of(covid + 0.6 * np.eye(D)[3], ["COVID"] * 100))
    assert moved.detected and moved.p_value < 0.01 and moved.statistic > moved.dof
    assert moved.dof == D - 1  # the class axis is projected off
    assert shift.MESSAGE_SHIFTED in moved.message()
    d = moved.to_dict()
    assert d["detected"] is True and d["n"] == 100 and d["p_value"] < 0.01 and d["dof"] == D - 1


def test_a_folder_like_one_source_or_a_mix_of_sources_is_not_shifted():
    """Intersection-union: unlike the pooled films, but like one training source -> no alarm; the
    pooled reference accepts any mix of the sources; farther than every source -> alarm."""
    rng = np.random.default_rng(3)
    kid = np.r_[0.0, 1.5, 0.0, 0.0, 0.0, 0.0]
    ref = ref_of(adults={"Normal": films(rng, 800)}, children={"Normal": films(rng, 150, centre=kid)})
    kids = films(rng, 100, centre=kid)
    r = shift.check(ref, stats_of(kids, ["Normal"] * 100))
    assert r.per_reference["adults"]["p_value"] < 1e-6
    assert not r.detected and r.closest == "children"
    half = shift.check(ref, stats_of(np.r_[films(rng, 50), films(rng, 50, centre=kid)], ["Normal"] * 100))
    assert not half.detected and half.closest == shift.POOLED
    assert shift.check(ref, stats_of(kids + 1.0 * np.eye(D)[4], ["Normal"] * 100)).detected


def test_the_alarm_is_decided_on_the_unrounded_p_value(monkeypatch):
    """The report shows p to 3 digits; 0.009996 shows as 0.01 but is below alpha 0.01: an alarm."""
    rng = np.random.default_rng(5)
    ref = ref_of(a={"Normal": films(rng, 300)})
    real = shift._test
    monkeypatch.setattr(shift, "_test", lambda *a, **k: (lambda r: (r[0], r[1], r[2], 0.009996))(real(*a, **k)))
    r = shift.check(ref, stats_of(films(rng, 100), ["Normal"] * 100))
    assert r.p_value == 0.01 and r.detected


def test_below_the_minimum_and_without_a_reference_nothing_is_detected():
    rng = np.random.default_rng(4)
    ref = ref_of(a={"Normal": films(rng, 100)})
    k = shift.MIN_FILMS - 1
    few = shift.check(ref, stats_of(films(rng, k, centre=5.0), ["Normal"] * k))
    assert not few.detected and f"at least {shift.MIN_FILMS}" in few.reason and few.p_value is None
    assert "not run" in few.message()
    none = shift.check(None, stats_of(films(rng, 100, centre=5.0), ["Normal"] * 100))
    assert not none.detected and not none.available and "shift-reference" in none.reason


def test_stats_add_up_exactly_across_shards_and_json():
    rng = np.random.default_rng(5)
    x, labels = films(rng, 90), ["Normal"] * 60 + ["COVID"] * 30
    whole = stats_of(x, labels)
    parts = shift.ShiftStats()
    for i in range(0, 90, 25):
        parts.merge(shift.ShiftStats.from_json(json.loads(json.dumps(stats_of(x[i:i + 25], labels[i:i + 25]).to_json()))))
    assert parts.count == whole.count
    for c in whole.sums:
        np.testing.assert_allclose(parts.sums[c], whole.sums[c], rtol=1e-12)


def test_reference_is_rejected_when_garbled():
    with pytest.raises(ValueError, match="cxr-shift/1.*re-add"):
        shift.ShiftReference.from_metadata({shift.METADATA_KEY: {"format": "cxr-shift/1", "sources": {"a": 3}}})
    with pytest.raises(ValueError, match="cxr.shift_reference"):
        shift.ShiftReference.from_metadata({shift.METADATA_KEY: {"format": shift.FORMAT, "dim": 2, "sources": {}}})
    with pytest.raises(ValueError, match="at least"):
        shift.build_reference(np.zeros((3, 2)), ["a"] * 3, ["N"] * 3, fitted_on="x", precision="fp32")


# ----------------------------------------------------------------------------- a model and folders


def add_projection(path: Path) -> Path:
    """Give the tiny qc model what the input check's graph has and the shift check reads: a MatMul
    by a ``qc.comp0`` matrix (here of the mean brightness, a 1 x 1 identity; nothing consumes it)."""
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    m.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "qc.comp0"))
    m.graph.node.append(helper.make_node("MatMul", ["m", "qc.comp0"], ["qc_proj0"]))
    onnx.save(m, str(path))
    return path


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
    qc = add_projection(add_score_output(tiny_model_path, base / "qc.onnx"))
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


def test_shift_reference_adds_an_output_and_metadata_and_nothing_else(site):
    out = site["res"].output
    assert "cxr.shift_reference from 80 films (here 80)" in out and "every other output bit-identical" in out
    before, after = onnx.load(str(site["qc"])), onnx.load(str(site["model"]))
    assert [n.SerializeToString() for n in after.graph.node[:len(before.graph.node)]] == \
        [n.SerializeToString() for n in before.graph.node]  # the old nodes, in order, then only the new ones
    assert {n.op_type for n in after.graph.node[len(before.graph.node):]} == {"Slice", "Concat"}
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output] + [shift.OUTPUT]
    props = {p.key: p.value for p in after.metadata_props}
    old = {p.key: p.value for p in before.metadata_props}
    assert set(props) - set(old) == {"cxr.shift_reference"} and all(props[k] == v for k, v in old.items())
    ref = load_model(site["model"]).shift_reference
    assert set(ref.sources["here"]) == {"Normal"} and ref.sources["here"]["Normal"].n == 80 and ref.dim == 1
    again = tmp = site["base"] / "again.onnx"  # adding it twice replaces the first, not a second output
    assert run("shift-reference", site["model"], "--split", site["base"] / "split.json", "--out", tmp).exit_code == 0
    assert [o.name for o in onnx.load(str(again)).graph.output].count(shift.OUTPUT) == 1


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
    assert s["detected"] is True and s["n"] == 40 and s["p_value"] < 0.01 and s["statistic"] > 6.63 and s["dof"] == 1
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
            p.value = json.dumps({"format": shift.FORMAT, "dim": 1, "sources": []})
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match="cxr.shift_reference"):
        load_model(tmp_path / "bad.onnx")


def test_writing_a_model_without_onnx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModelEditError, match=r"cxr-infer\[site\]"):
        require_onnx("cxr-infer shift-reference")


def test_a_model_with_an_older_reference_still_scans_and_says_why_the_check_does_not_run(site, tmp_path):
    m = onnx.load(str(site["model"]))
    for p in m.metadata_props:
        if p.key == "cxr.shift_reference":
            p.value = json.dumps({"format": "cxr-shift/1", "sources": {"here": {"n": 3}}})
    onnx.save(m, str(tmp_path / "old.onnx"))
    model = load_model(tmp_path / "old.onnx")
    assert model.shift_reference is None and any("cxr-shift/1" in n and "shift-reference" in n for n in model.notes)
    folder = _films(tmp_path / "f", site["rng"].uniform(118, 138, 31))
    r = run("scan", folder, "--model", tmp_path / "old.onnx", "--report", tmp_path / "r.json")
    assert r.exit_code == 0 and "shift check: not run" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["shift"]["detected"] is False
