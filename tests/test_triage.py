"""Calibration maths, operating points and refer/routine triage in the runtime (no torch).

The export side's numpy modules (temperature, operating points) are tested on synthetic
numbers with known answers; the runtime on the tiny brightness model (tiny_model.py) carrying
an operating-point table built by those same modules.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.export import operating_points as opm
from cxr.export import temperature
from cxr.runtime import Classifier, TriageUnavailable
from cxr.runtime import triage
from cxr.runtime.cli import cli
from cxr.runtime.engine import Prediction, ScanResult
from cxr.runtime.metrics import expected_calibration_error
from synthetic import shaded
from tiny_model import CLASSES, build_tiny_model

onnx = pytest.importorskip("onnx", reason="building the test model needs onnx")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------ calibration maths

@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T): the NLL minimum is at T (up to sampling noise)."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (20000, 3))
    p = temperature.softmax(z, true_t)
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(1)
    t = temperature.fit_temperature(z, y)
    assert abs(t - true_t) / true_t < 0.05, t
    assert temperature.nll(z, y, t) <= temperature.nll(z, y, 1.0)
    cal = temperature.calibrate(z, y, ["a"] * len(y), "synthetic")
    assert cal.ece_after < cal.ece_before and cal.nll_after < cal.nll_before


def test_temperature_never_moves_the_top1_class():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 4, (5000, 4))
    for t in (0.05, 0.3, 1.0, 7.0, 20.0):
        assert np.array_equal(temperature.softmax(z, t).argmax(1), z.argmax(1))


def test_ece_on_known_cases():
    # every image at confidence 0.8, 70 % right: ECE = |0.7 - 0.8| = 0.1
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert temperature.ece(y, probs) == pytest.approx(0.1)
    # two bins of equal weight: 0.95 all right (gap 0.05); 0.55 half right (gap 0.05) -> 0.05
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert temperature.ece(y, probs) == pytest.approx(0.05)
    # the diagram's bins add up to the same ECE
    rng = np.random.default_rng(3)
    probs = temperature.softmax(rng.normal(0, 2, (500, 3)))
    y = rng.integers(0, 3, 500)
    b = temperature.reliability_bins(y, probs)
    c = np.array(b["count"])
    gap = np.nan_to_num(np.abs(np.array(b["accuracy"]) - np.array(b["confidence"])))
    assert len(c) == 15 and c.sum() == 500
    assert (c / 500 * gap).sum() == pytest.approx(expected_calibration_error(y, probs, 15))


# ------------------------------------------------------------------------------ operating points

def _val_set(n=400, seed=0, sources=("site-a", "site-b")):
    """Validation probabilities over CLASSES: Normal films mostly confident, abnormal spread."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p_normal = np.where(y == 1, rng.beta(8, 2, n), rng.beta(1.5, 6, n))
    rest = 1 - p_normal
    share = rng.random(n)
    probs = np.stack([rest * share, p_normal, rest * (1 - share)], axis=1)
    src = [sources[i % len(sources)] for i in range(n)]
    return probs, y, src


def test_default_threshold_is_the_highest_keeping_the_target_sensitivity_in_every_source():
    probs, y, src = _val_set()
    op = opm.build(probs, y, list(CLASSES), src, target=0.98)
    score, abnormal = 1 - probs[:, 1], y != 1
    srcs = np.array(src)
    t = op["default"]["threshold"]
    sens = lambda th, sel=slice(None): (score[sel][abnormal[sel]] >= th).mean()  # noqa: E731
    assert op["default"]["rule"] == "every source"
    for s in ("site-a", "site-b"):
        assert sens(t, srcs == s) >= 0.98, s
    assert sens(t) >= 0.98
    # t is the abnormal score of the source that needs the lowest point, rounded down to 6
    # decimals: just above that score, that source loses its 98 %
    tight = min(op["default"]["source_thresholds"], key=op["default"]["source_thresholds"].get)
    sel = srcs == tight
    kth = score[sel & abnormal & (score >= t)].min()
    assert kth - 1e-6 <= t <= kth
    assert sens(np.nextafter(kth, 1.0), sel) < 0.98
    # the pooled point alone would be higher here: one site would fall below 98 %
    assert op["default"]["pooled_threshold"] >= t
    assert op["default"]["sensitivity"] == pytest.approx(sens(t), abs=1e-5)
    assert op["normal_class"] == "Normal" and op["n_abnormal"] == int(abnormal.sum())
    # each abnormal class's share referred at the default, from the same scores
    for i, c in enumerate(CLASSES):
        if c != "Normal":
            assert op["by_class"][c]["default"] == pytest.approx((score[y == i] >= t).mean(), abs=1e-5)


def test_asked_sensitivity_is_held_in_every_source():
    probs, y, src = _val_set(seed=3)
    op = opm.build(probs, y, list(CLASSES), src, target=0.98)
    info = _info(op)
    score, abnormal, srcs = 1 - probs[:, 1], y != 1, np.array(src)
    for asked in (0.9, 0.95, 0.99):
        pol = triage.policy_for(info, asked)
        for s in ("site-a", "site-b"):
            sel = (srcs == s) & abnormal
            assert (score[sel] >= pol.threshold).mean() >= asked, (asked, s)
        # and it is the highest such threshold among the table's rows
        higher = [r[0] for r in op["table"] if r[0] > pol.threshold]
        for th in higher:
            assert min((score[(srcs == s) & abnormal] >= th).mean() for s in ("site-a", "site-b")) < asked \
                or (score[abnormal] >= th).mean() < asked


def test_table_rates_match_brute_force_overall_and_per_source():
    probs, y, src = _val_set()
    op = opm.build(probs, y, list(CLASSES), src)
    score, abnormal = 1 - probs[:, 1], y != 1
    ts = [r[0] for r in op["table"]]
    assert ts == sorted(ts, reverse=True) and ts[-1] == 0.0 and op["table"][-1][1] == 1.0
    for (t, se, sp, ref) in op["table"][::7]:
        flag = score >= t
        assert se == pytest.approx(flag[abnormal].mean(), abs=1e-5)
        assert sp == pytest.approx(1 - flag[~abnormal].mean(), abs=1e-5)
        assert ref == pytest.approx(flag.mean(), abs=1e-5)
    srcs = np.array(src)
    for s in ("site-a", "site-b"):
        rows = op["by_source"][s]["rows"]
        sel = srcs == s
        i = len(ts) // 2
        flag = score[sel] >= ts[i]
        assert rows[i][0] == pytest.approx(flag[abnormal[sel]].mean(), abs=1e-5)
        assert rows[i][1] == pytest.approx(1 - flag[~abnormal[sel]].mean(), abs=1e-5)
    # one-vs-rest per class: COVID's sensitivity at its lowest threshold is 1
    assert set(op["per_class"]) == set(CLASSES) and op["per_class"]["COVID"]["table"][-1][1] == 1.0


def test_operating_points_stay_compact():
    probs, y, src = _val_set(n=3000, sources=("a-long-source-name", "b", "c", "d"))
    size = len(json.dumps(opm.build(probs, y, list(CLASSES), src), sort_keys=True))
    assert size < 100_000, size


def test_no_normal_class_means_no_triage_and_says_so():
    probs, y, _ = _val_set()
    op = opm.build(probs, y, ["bright", "dark", "stripes"])
    assert op["available"] is False and "Normal" in op["reason"] and "table" not in op
    info = _info(op, classes=["bright", "dark", "stripes"])
    policy, why = triage.default_policy(info)
    assert policy is None and "no class named Normal" in why
    assert triage.find_normal_class(["covid", "NORMAL ", "x"]) == "NORMAL "


def _info(op, classes=CLASSES):
    from cxr.runtime.metadata import ModelInfo
    from cxr.runtime.preprocess import Preprocessing

    return ModelInfo(classes=list(classes), preprocess=Preprocessing(size=32),
                     extra={"operating_points": op})


def test_pick_threshold_rule_and_its_errors():
    table = [[0.9, 0.50, 0.99, 0.2], [0.5, 0.90, 0.95, 0.4], [0.3, 0.99, 0.80, 0.6], [0.2, 0.99, 0.7, 0.7]]
    assert triage.pick_threshold(table, 0.9)[0] == 0.5
    assert triage.pick_threshold(table, 0.95)[0] == 0.3  # highest of the two rows reaching 0.99
    assert triage.pick_threshold(table, 0.5)[0] == 0.9
    with pytest.raises(TriageUnavailable, match="not attainable.*99.0%"):
        triage.pick_threshold(table, 0.995)
    info = _info({"format": triage.FORMAT, "available": True, "normal_class": "Normal", "table": table,
                  "default": {"threshold": 0.5, "sensitivity": 0.9, "specificity": 0.95, "referred": 0.4}})
    assert triage.policy_for(info).threshold == 0.5
    p = triage.policy_for(info, 0.95)
    assert (p.threshold, p.sensitivity, p.asked) == (0.3, 0.99, 0.95)
    with pytest.raises(TriageUnavailable, match=r"fraction in \(0, 1\]"):
        triage.policy_for(info, 99)
    no_table = _info({})
    no_table.extra.clear()
    with pytest.raises(TriageUnavailable, match="no operating-point table"):
        triage.policy_for(no_table, 0.9)


# ------------------------------------------------------------------------------ the decision on results

def _policy(threshold=0.5):
    return triage.TriagePolicy(threshold, "Normal", 1, 0.98, 0.9, 0.3)


def test_flagged_input_is_always_refer():
    probs = {"COVID": 0.0005, "Normal": 0.999, "Viral Pneumonia": 0.0005}
    for qc, expected in (("ok", "routine"), ("unchecked", "routine"), ("unfamiliar", "refer"),
                         ("not_chest_xray", "refer"), ("not_frontal", "refer"), ("a verdict from later", "refer")):
        r = triage.apply(ScanResult("a.png", prediction=Prediction("Normal", 0.999, probs, qc=qc)), _policy())
        assert r.triage == r.prediction.triage == expected, qc
        assert r.qc == qc  # the check's own field survives
    # a model without operating points still refers a flagged film (a human must look)
    odd = ScanResult("a.png", prediction=Prediction("Normal", 0.999, probs, qc="unfamiliar"))
    assert triage.apply(odd, None).triage == "refer"
    fine = ScanResult("a.png", prediction=Prediction("Normal", 0.999, probs, qc="ok"))
    assert triage.apply(fine, None).triage is None


def test_error_rows_have_no_triage_and_the_threshold_is_inclusive():
    err = ScanResult("bad.png", error="empty file")
    assert triage.apply(err, _policy()).triage is None
    at = Prediction("COVID", 0.5, {"COVID": 0.5, "Normal": 0.5, "Viral Pneumonia": 0.0})
    assert triage.apply(ScanResult("x", prediction=at), _policy(0.5)).triage == "refer"
    assert triage.apply(ScanResult("x", prediction=at), _policy(0.5000001)).triage == "routine"


# ------------------------------------------------------------------------------ runtime end to end

LEVELS = {"COVID": [10, 30, 50], "Normal": [110, 128, 150, 170], "Viral Pneumonia": [220, 250]}


@pytest.fixture(scope="module")
def triage_model(tmp_path_factory):
    """The tiny model with an operating-point table measured on its own outputs for labelled
    grey levels (the way cxr-export measures it on the validation split)."""
    d = tmp_path_factory.mktemp("triage")
    plain = build_tiny_model(d / "plain.onnx")
    clf = Classifier.load(plain)
    rng = np.random.default_rng(0)
    levels = {"COVID": (0, 70), "Normal": (60, 190), "Viral Pneumonia": (180, 256)}
    probs, y, src = [], [], []
    for i, (c, (lo, hi)) in enumerate(levels.items()):
        for v in rng.integers(lo, hi, 40):
            probs.append(list(clf.classify(np.full((32, 32), v, np.uint8)).probabilities.values()))
            y.append(i)
            src.append("site-a" if v % 2 else "site-b")
    op = opm.build(np.array(probs), np.array(y), list(CLASSES), src)
    cal = {"method": "temperature", "temperature": 1.0, "fitted_on": "validation split", "n": len(y),
           "ece_before": 0.1, "ece_after": 0.02, "bins": {"count": 15}}
    return build_tiny_model(d / "triage.onnx", extra={"operating_points": op, "calibration": cal}), op


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    root = tmp_path_factory.mktemp("films")
    for c, levels in LEVELS.items():
        for v in levels:
            Image.fromarray(shaded(40, 36, v, 4)).save(root / f"{c[:3]}-{v:03d}.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _rows(fmt: str, text: str) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    if fmt == "json":
        return json.loads(text)
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["triage", "path"]
    out = []
    for line in lines[1:]:  # read from the right: "Viral Pneumonia" has a space, these paths do not
        cells = line.split()
        if cells[0] == "ERROR":
            out.append({"path": cells[1], "status": "error", "triage": None})
        else:
            out.append({"path": cells[-1], "status": "ok", "triage": cells[-2], "p_Normal": float(cells[-6])})
    return out


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "table"])
def test_every_output_format_carries_triage(triage_model, films, fmt):
    path, op = triage_model
    t = op["default"]["threshold"]
    res = run("scan", films, "--model", path, "--format", fmt, "--workers", "1")
    assert res.exit_code == 1, res.output  # broken.png is an error row
    rows = _rows(fmt, res.stdout)
    assert len(rows) == sum(map(len, LEVELS.values())) + 1
    seen = set()
    for r in rows:
        if r["status"] == "error":
            assert r["triage"] in (None, "", "-")
            continue
        p_normal = float(r["p_Normal"])
        # the table rounds to 3 decimals, so only judge it away from the threshold
        if fmt != "table" or abs(1 - p_normal - t) > 2e-3:
            assert r["triage"] == ("refer" if 1 - p_normal >= t else "routine"), r
        seen.add(r["triage"])
    assert seen == {"refer", "routine"}
    for name in ("COV-010", "COV-030", "Vir-250"):
        assert next(r for r in rows if name in r["path"])["triage"] == "refer"
    assert next(r for r in rows if "Nor-128" in r["path"])["triage"] == "routine"


def test_summary_line_says_what_the_point_means(triage_model, films, tmp_path):
    path, op = triage_model
    report = tmp_path / "lat.json"
    res = run("scan", films, "--model", path, "--format", "csv", "--report", report)
    rows = [r for r in csv.DictReader(io.StringIO(res.stdout)) if r["status"] == "ok"]
    refer = sum(r["triage"] == "refer" for r in rows)
    d = op["default"]
    line = next(x for x in res.stderr.splitlines() if x.startswith("triage:"))
    assert f"({refer}/{len(rows)})" in line
    assert f"caught {100 * d['sensitivity']:.1f} % of abnormal films at {100 * d['specificity']:.1f} % specificity" in line
    summary = json.loads(report.read_text())["summary"]["triage"]
    assert summary["counts"]["refer"] == refer and summary["point"]["threshold"] == d["threshold"]


def test_sensitivity_picks_a_point_from_the_table(triage_model, films):
    path, op = triage_model
    res = run("scan", films, "--model", path, "--format", "jsonl", "--sensitivity", "1")
    rows = [json.loads(x) for x in res.stdout.splitlines() if '"ok"' in x]
    t1 = triage.pick_threshold(op["table"], 1.0)[0]
    assert t1 <= op["default"]["threshold"]
    for r in rows:
        assert r["triage"] == ("refer" if 1 - r["p_Normal"] >= t1 else "routine")
    assert "chosen for sensitivity >= 1" in res.stderr


def test_sensitivity_error_paths(triage_model, films, tiny_model_path):
    path, _ = triage_model
    res = run("scan", films, "--model", path, "--sensitivity", "98")
    assert res.exit_code == 2 and "fraction in (0, 1]" in res.stderr
    res = run("scan", films, "--model", tiny_model_path, "--sensitivity", "0.99")
    assert res.exit_code == 2 and "no operating-point table" in res.stderr and not res.stdout
    with pytest.raises(TriageUnavailable, match="no operating-point table"):
        Classifier.load(tiny_model_path, sensitivity=0.9)


def test_unattainable_sensitivity_is_an_error(tmp_path, films):
    op = {"format": triage.FORMAT, "available": True, "normal_class": "Normal",
          "table": [[0.9, 0.6, 0.99, 0.1], [0.5, 0.93, 0.9, 0.4]],
          "default": {"threshold": 0.5, "sensitivity": 0.93, "specificity": 0.9, "referred": 0.4}}
    path = build_tiny_model(tmp_path / "short.onnx", extra={"operating_points": op})
    res = run("scan", films, "--model", path, "--sensitivity", "0.95")
    assert res.exit_code == 2 and "not attainable" in res.stderr and "93.0%" in res.stderr


def test_old_model_without_metadata_still_scans(tiny_model_path, films):
    res = run("scan", films, "--model", tiny_model_path, "--format", "csv")
    assert res.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows and all(r["triage"] == "" for r in rows)
    assert "triage: unavailable (the model has no operating-point table" in res.stderr
    clf = Classifier.load(tiny_model_path)
    assert clf.triage_policy is None and "operating-point table" in clf.triage_note
    assert clf.classify(shaded(32, 32, 20, 4)).triage is None


def test_model_without_normal_class_scans_and_says_why(tmp_path, films):
    classes = ["dark", "mid", "bright"]
    probs, y, _ = _val_set()
    path = build_tiny_model(tmp_path / "nonormal.onnx", classes=classes,
                            extra={"operating_points": opm.build(probs, y, classes)})
    res = run("scan", films, "--model", path, "--format", "csv")
    assert res.exit_code == 1 and "no class named Normal" in res.stderr
    assert all(r["triage"] == "" for r in csv.DictReader(io.StringIO(res.stdout)))
    res = run("info", path)
    assert res.exit_code == 0 and "triage         unavailable: no class named Normal" in res.stdout


def test_api_results_carry_triage(triage_model, films):
    path, op = triage_model
    clf = Classifier.load(path)
    assert clf.triage_policy.threshold == op["default"]["threshold"]
    assert clf.classify(shaded(32, 32, 15, 4)).triage == "refer"
    assert clf.classify(shaded(32, 32, 128, 4)).triage == "routine"
    results = list(clf.scan(films))
    assert [r.triage for r in results if not r.ok] == [None]
    assert {r.triage for r in results if r.ok} == {"refer", "routine"}
    strict = Classifier.load(path, sensitivity=1.0)
    assert strict.triage_policy.threshold <= clf.triage_policy.threshold


def test_info_prints_the_operating_points(triage_model):
    path, op = triage_model
    res = run("info", path)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "triage         refer when 1 - P(Normal) >= threshold" in out and "<- default" in out
    table_lines = [x for x in out.splitlines() if x.startswith("  ") and "%" in x and "source" not in x]
    assert 3 <= len(table_lines) <= 13
    assert "calibration    temperature 1.0" in out and "source site-a" in out
    assert '"table"' not in out  # the full table is not dumped into other_metadata
    d = json.loads(run("info", path, "--json").stdout)
    assert d["operating_points"]["default"] == op["default"] and d["triage"].startswith("refer when")


def test_bench_reports_realised_sensitivity_next_to_validation(triage_model, tmp_path, monkeypatch):
    import cxr.runtime.benchmarks.benchmark as bm

    monkeypatch.setattr(bm, "MIN_TIMED_S", 0.0)
    path, op = triage_model
    root = tmp_path / "labelled"
    for c, levels in {**LEVELS, "Lung_Opacity": [40, 128]}.items():
        (root / c).mkdir(parents=True)
        for v in levels:
            Image.fromarray(shaded(40, 36, v, 4)).save(root / c / f"{v}.png")
    other = tmp_path / "other-site" / "Normal"  # a second source: normal films only
    other.mkdir(parents=True)
    for v in (90, 128, 165):
        Image.fromarray(shaded(40, 36, v, 4)).save(other / f"{v}.png")
    out = tmp_path / "bench.json"
    res = run("bench", root, other.parent, "--model", path, "--json", out, "--runs", "3", "--batch-size", "4",
              "--threads", "1")
    assert res.exit_code == 0, res.output
    t = json.loads(out.read_text())["models"][0]["triage"]
    by_src = t["realised_by_source"]
    assert by_src["other-site"]["n"] == 3 and by_src["other-site"]["sensitivity"] is None
    assert by_src["labelled"]["n"] + 3 == t["realised"]["n"] and "source other-site: sensitivity -" in res.stdout
    clf = Classifier.load(path)
    truth, decisions = [], []
    for c, levels in {**LEVELS, "Lung_Opacity": [40, 128]}.items():
        for v in levels:
            truth.append(c != "Normal")  # a class the model does not know is still abnormal
            decisions.append(clf.classify(root / c / f"{v}.png").triage)
    for v in (90, 128, 165):
        truth.append(False)
        decisions.append(clf.classify(other / f"{v}.png").triage)
    expected = triage.realised(truth, decisions)
    assert t["realised"] == pytest.approx(expected)
    assert t["realised"]["n_abnormal"] == 7 and t["validation"]["sensitivity"] == op["default"]["sensitivity"]
    assert "triage (refer when P(not Normal) >=" in res.stdout and "on validation" in res.stdout
