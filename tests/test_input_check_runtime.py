"""The runtime's input check: DICOM-header and pixel checks, the model's qc_score against the
thresholds in its metadata, what each output format shows, exit status, and bench --not-xray."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cxr.runtime import Classifier
from cxr.runtime.cli import EXIT_NOT_CHEST_XRAY, cli
from cxr.runtime.inputcheck import (ImageFacts, ScoreCheck, colour_spread, header_verdict, pixel_verdict)
from cxr.runtime.metrics import auroc
from cxr.runtime.session import ModelLoadError, load_model
from synthetic import BRIGHT, MID, shaded, write_dicom
from tiny_model import build_tiny_model

THRESHOLDS = {"unfamiliar": 5.0, "not_chest_xray": 12.0}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def add_score_output(src: Path, dest: Path, thresholds: dict | None = THRESHOLDS, scale: float = 10.0) -> Path:
    """The tiny brightness model plus ``qc_score = scale * |mean normalised brightness|``: mid-grey
    (128) scores ~0 (ok), gray level ~85 or ~170 about 6.7 (unfamiliar), near black or white
    about 17 (not_chest_xray). ``thresholds=None`` leaves the cxr.input_check metadata out."""
    m = onnx.load(str(src))
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.array([scale], np.float32), "qc_scale"),
                          numpy_helper.from_array(np.array([-1], np.int64), "qc_shape")])
    g.node.extend([helper.make_node("Abs", ["m"], ["qc_abs"]),
                   helper.make_node("Mul", ["qc_abs", "qc_scale"], ["qc_scaled"]),
                   helper.make_node("Reshape", ["qc_scaled", "qc_shape"], ["qc_score"])])
    g.output.append(helper.make_tensor_value_info("qc_score", TensorProto.FLOAT, ["N"]))
    if thresholds is not None:
        onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                        "cxr.input_check": json.dumps({"output": "qc_score", "thresholds": thresholds})})
    onnx.checker.check_model(m)
    onnx.save(m, str(dest))
    return dest


@pytest.fixture(scope="module")
def qc_model(tiny_model_path, tmp_path_factory):
    return add_score_output(tiny_model_path, tmp_path_factory.mktemp("qc") / "qc.onnx")


def gray(path: Path, mean: float, w: int = 64, h: int = 64) -> Path:
    Image.fromarray(shaded(w, h, mean)).save(path)
    return path


def parse_csv(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


# ----------------------------------------------------------------------------- pixel checks

def test_pixel_checks_blank_noise_colour_aspect():
    rng = np.random.default_rng(0)
    facts = ImageFacts(64, 64)
    assert pixel_verdict(facts, np.full((32, 32), 128, np.uint8)).detail.startswith("blank")
    assert pixel_verdict(facts, np.full((32, 32), 128, np.uint8) + (np.arange(32) % 2).astype(np.uint8)[None]).qc \
        == "not_chest_xray"  # +-0.5 levels: still near-constant
    noise = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    assert "noise" in pixel_verdict(facts, noise).detail
    smooth = shaded(32, 32, 128)
    assert pixel_verdict(facts, smooth) is None
    assert "colour" in pixel_verdict(ImageFacts(64, 64, colour_spread=40.0), smooth).detail
    assert pixel_verdict(ImageFacts(64, 64, colour_spread=3.0), smooth) is None
    assert "aspect ratio 4.0:1" in pixel_verdict(ImageFacts(400, 100), smooth).detail
    assert "aspect ratio 4.0:1" in pixel_verdict(ImageFacts(100, 400), smooth).detail
    assert pixel_verdict(ImageFacts(250, 100), smooth) is None  # 2.5:1 is allowed


def test_colour_spread_before_grayscale_conversion():
    g = shaded(80, 60, 120)
    assert colour_spread(Image.fromarray(g)) is None  # grayscale by format: nothing to measure
    assert colour_spread(Image.fromarray(np.stack([g] * 3, -1))) == 0.0  # gray stored as RGB
    rgb = np.stack([g, np.clip(g.astype(int) - 60, 0, 255), np.clip(g.astype(int) + 60, 0, 255)], -1).astype(np.uint8)
    assert 100 < colour_spread(Image.fromarray(rgb)) <= 120
    pal = Image.fromarray(g).convert("P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    assert colour_spread(pal) == 0.0  # a gray palette


def test_colour_and_gray_rgb_files_through_the_scan(tmp_path, qc_model):
    g = shaded(64, 64, 128)
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "gray_as_rgb.jpg", quality=90)
    photo = np.stack([g, g // 3, 255 - g], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    res = {Path(r.path).name: r for r in Classifier.load(qc_model).scan(tmp_path)}
    assert res["gray_as_rgb.jpg"].qc == "ok"
    assert res["photo.jpg"].qc == "not_chest_xray" and "colour" in res["photo.jpg"].prediction.qc_detail


# ----------------------------------------------------------------------------- DICOM header

@pytest.mark.parametrize("tags,qc", [
    ({"Modality": "CT"}, "not_chest_xray"),
    ({"Modality": "MR", "BodyPartExamined": "CHEST"}, "not_chest_xray"),
    ({"BodyPartExamined": "HAND"}, "not_chest_xray"),
    ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}, "not_frontal"),
    ({"ViewPosition": "LATERAL"}, "not_frontal"),
    ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, None),
    ({"Modality": "DX", "BodyPartExamined": "", "ViewPosition": ""}, None),  # blank: the pixels decide
])
def test_header_rules(tags, qc):
    v = header_verdict({k: v for k, v in tags.items() if v})
    assert (v.qc if v else None) == qc


def test_dicom_header_through_the_scan(tmp_path, qc_model):
    pytest.importorskip("pydicom")
    mid = np.full((64, 64), 1000, np.uint16)
    mid += (shaded(64, 64, 128) * 8).astype(np.uint16)  # smooth, mid-grey after the stretch
    write_dicom(tmp_path / "ct.dcm", mid, Modality="CT")
    write_dicom(tmp_path / "lateral.dcm", mid, BodyPartExamined="CHEST", ViewPosition="LL")
    write_dicom(tmp_path / "pa.dcm", mid, BodyPartExamined="CHEST", ViewPosition="PA")
    write_dicom(tmp_path / "blank_tags.dcm", mid, BodyPartExamined="", ViewPosition="")
    write_dicom(tmp_path / "blank_tags_blank_pixels.dcm", np.full((64, 64), 700, np.uint16), ViewPosition="")
    res = {Path(r.path).name: r for r in Classifier.load(qc_model).scan(tmp_path)}
    assert res["ct.dcm"].qc == "not_chest_xray" and "Modality CT" in res["ct.dcm"].prediction.qc_detail
    assert res["lateral.dcm"].qc == "not_frontal"
    assert res["pa.dcm"].qc == "ok" and res["blank_tags.dcm"].qc == "ok"
    assert res["blank_tags_blank_pixels.dcm"].qc == "not_chest_xray"  # header silent, pixels blank
    # a CT with a qc_score the model would call ok: the header wins, the score is still reported
    assert res["ct.dcm"].qc_score is not None and res["ct.dcm"].qc_score < THRESHOLDS["unfamiliar"]


# ----------------------------------------------------------------------------- the model's score

def test_score_thresholds_and_verdicts():
    check = ScoreCheck.from_metadata({"input_check": {"thresholds": THRESHOLDS}})
    assert [check.verdict(s).qc for s in (0.0, 5.0, 5.01, 12.0, 12.5, float("nan"))] == [
        "ok", "ok", "unfamiliar", "unfamiliar", "not_chest_xray", "not_chest_xray"]
    assert ScoreCheck.from_metadata({}) is None
    for bad in ({"thresholds": {"unfamiliar": 3}}, {"thresholds": {"unfamiliar": 9, "not_chest_xray": 3}}, [1]):
        with pytest.raises(ValueError):
            ScoreCheck.from_metadata({"input_check": bad})


def test_broken_input_check_metadata_refuses_to_load(tiny_model_path, tmp_path):
    p = add_score_output(tiny_model_path, tmp_path / "bad.onnx", thresholds={"unfamiliar": "high"})
    with pytest.raises(ModelLoadError, match="input_check"):
        load_model(p)


def test_old_model_is_unchecked_but_pixel_checks_still_run(tmp_path, tiny_model_path):
    gray(tmp_path / "mid.png", 128)
    Image.new("L", (64, 64), 128).save(tmp_path / "blank.png")
    r = run("scan", tmp_path, "--model", tiny_model_path, "--format", "jsonl")
    rows = {Path(x["path"]).name: x for x in map(json.loads, r.stdout.splitlines())}
    assert rows["mid.png"]["qc"] == "unchecked" and rows["mid.png"]["qc_score"] is None
    assert rows["mid.png"]["prediction"] == MID
    assert rows["blank.png"]["qc"] == "not_chest_xray" and rows["blank.png"]["prediction"] is None
    assert r.exit_code == 0, "a withheld row is no failure of the scan"
    assert "1 not_chest_xray, 1 unchecked" in r.stderr and "exported before" in r.stderr


def test_score_output_without_thresholds_is_reported_unchecked(tmp_path, tiny_model_path):
    p = add_score_output(tiny_model_path, tmp_path / "nometa.onnx", thresholds=None)
    gray(tmp_path / "x.png", 235)
    r = Classifier.load(p).classify(tmp_path / "x.png")
    assert r.qc == "unchecked" and r.qc_score == pytest.approx(16.9, abs=0.5)


@pytest.fixture()
def graded(tmp_path):
    """mid (ok), gray 85 (unfamiliar), near white (not_chest_xray by score), blank (by pixels)."""
    d = tmp_path / "imgs"
    d.mkdir()
    gray(d / "a_mid.png", 128)
    gray(d / "b_unfamiliar.png", 85)
    gray(d / "c_white.png", 238, w=64, h=64)
    Image.new("L", (64, 64), 128).save(d / "d_blank.png")
    return d


def test_every_format_carries_qc_and_withholds_no_diagnosis_rows(graded, qc_model):
    expect = {"a_mid.png": "ok", "b_unfamiliar.png": "unfamiliar", "c_white.png": "not_chest_xray",
              "d_blank.png": "not_chest_xray"}
    r = run("scan", graded, "--model", qc_model, "--format", "csv")
    header, rows = parse_csv(r.stdout)
    assert header[-3:] == ["qc", "qc_score", "triage"] and header[:2] == ["path", "prediction"]
    by = {Path(x["path"]).name: x for x in rows}
    assert {k: v["qc"] for k, v in by.items()} == expect
    assert by["a_mid.png"]["prediction"] == MID and float(by["a_mid.png"]["qc_score"]) < 1
    for name in ("b_unfamiliar.png", "c_white.png", "d_blank.png"):  # no diagnosis; probabilities stay as scores
        assert by[name]["prediction"] == "" and by[name]["confidence"] == "" and by[name]["p_Normal"] != ""
    assert r.exit_code == 0
    assert "input check: 1 unfamiliar, 2 not_chest_xray, 1 ok" in r.stderr
    assert "3 flagged image(s) show no prediction (--show-unfamiliar shows it for the 1 unfamiliar)" in r.stderr

    # asked for, an unfamiliar row shows its prediction (flagged); not_chest_xray rows never do
    r = run("scan", graded, "--model", qc_model, "--format", "csv", "--show-unfamiliar")
    by = {Path(x["path"]).name: x for x in parse_csv(r.stdout)[1]}
    assert by["b_unfamiliar.png"]["prediction"] != "" and by["b_unfamiliar.png"]["qc"] == "unfamiliar"
    assert by["c_white.png"]["prediction"] == "" and by["d_blank.png"]["prediction"] == ""
    assert r.exit_code == 0 and "2 flagged image(s) show no prediction\n" in r.stderr

    for fmt in ("jsonl", "json"):
        out = run("scan", graded, "--model", qc_model, "--format", fmt).stdout
        recs = json.loads(out) if fmt == "json" else [json.loads(x) for x in out.splitlines()]
        by = {Path(x["path"]).name: x for x in recs}
        assert {k: v["qc"] for k, v in by.items()} == expect
        assert by["c_white.png"]["prediction"] is None and by["c_white.png"]["p_Viral Pneumonia"] > 0.5
        assert by["c_white.png"]["qc_score"] > THRESHOLDS["not_chest_xray"]

    lines = run("scan", graded, "--model", qc_model, "--format", "table").stdout.splitlines()
    assert lines[0].split()[-4:] == ["qc", "qc_score", "triage", "path"]
    white = next(x for x in lines if "c_white.png" in x)
    assert white.split()[0] == "-" and "not_chest_xray" in white and "qc_score" in white  # the reason
    assert next(x for x in lines if "a_mid.png" in x).split()[0] == MID


def test_report_summary_and_api_carry_qc(graded, qc_model, tmp_path):
    rep = tmp_path / "rep.json"
    run("scan", graded, "--model", qc_model, "-o", tmp_path / "o.csv", "--report", rep)
    s = json.loads(rep.read_text())["summary"]
    assert s["qc"] == {"ok": 1, "unfamiliar": 1, "not_chest_xray": 2} and s["withheld"] == 3
    assert s["by_class"][MID] == 1 and sum(s["by_class"].values()) == 1  # withheld rows are not counted
    clf = Classifier.load(qc_model)
    p = clf.classify(graded / "c_white.png")
    assert p.label == BRIGHT and p.qc == "not_chest_xray" and p.diagnosis_withheld
    assert clf.classify(graded / "b_unfamiliar.png").diagnosis_withheld
    shown = Classifier.load(qc_model, show_unfamiliar=True)
    assert not shown.classify(graded / "b_unfamiliar.png").diagnosis_withheld
    assert shown.classify(graded / "c_white.png").diagnosis_withheld
    assert [r.prediction.diagnosis_withheld for r in shown.scan(graded)] == [False, False, True, True]
    assert clf.classify(np.full((40, 40, 3), (200, 30, 30), np.uint8)).qc == "not_chest_xray"  # colour array
    assert clf.classify(Image.fromarray(shaded(64, 64, 128))).qc == "ok"
    results = list(clf.scan(graded))
    assert [r.qc for r in results] == ["ok", "unfamiliar", "not_chest_xray", "not_chest_xray"]


def test_withheld_rows_exit_0_unless_strict_and_errors_win(graded, qc_model, tmp_path):
    d = tmp_path / "fine"
    d.mkdir()
    gray(d / "a.png", 128)
    gray(d / "b.png", 85)
    r = run("scan", d, "--model", qc_model)
    assert r.exit_code == 0 and "1 unfamiliar, 1 ok" in r.stderr  # the scan did its job
    assert "1 flagged image(s) show no prediction" in r.stderr  # and says what it withheld
    r = run("scan", d, "--model", qc_model, "--strict")
    assert r.exit_code == EXIT_NOT_CHEST_XRAY and "1 flagged image(s) show no prediction" in r.stderr
    r = run("scan", d, "--model", qc_model, "--strict", "--show-unfamiliar")
    assert r.exit_code == 0 and "1 unfamiliar, 1 ok" in r.stderr and "show no prediction" not in r.stderr
    (graded / "broken.png").write_bytes(b"")  # unreadable beside withheld rows: 1 wins over 3
    assert run("scan", graded, "--model", qc_model).exit_code == 1
    assert run("scan", graded, "--model", qc_model, "--strict").exit_code == 1


# ----------------------------------------------------------------------------- bench --not-xray

def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(0, 1, 40).round(1), rng.normal(1, 1, 30).round(1)  # rounding makes ties
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(want)
    assert auroc([0, 1], [2, np.inf]) == 1.0 and auroc([], [1]) is None


def test_bench_not_xray_per_kind_xrays_and_auroc(tmp_path, qc_model, tiny_model_path):
    data = tmp_path / "xrays"
    for c, mean in (("Normal", 128), ("COVID", 120)):
        (data / c).mkdir(parents=True)
        for i in range(4):
            gray(data / c / f"{i}.png", mean + i)
    gray(data / "COVID" / "odd.png", 85)  # one unfamiliar X-ray
    nx = tmp_path / "notx"
    for kind, mean in (("white", 240), ("dark", 15), ("grayish", 100)):
        (nx / kind / "images").mkdir(parents=True)
        for i in range(3):
            gray(nx / kind / "images" / f"{i}.png", mean + i)
    Image.new("RGB", (64, 64), (200, 20, 20)).save(nx / "grayish" / "images" / "red.png")
    js = tmp_path / "b.json"
    r = run("bench", data, "--model", qc_model, "--not-xray", nx, "--runs", "3", "--json", js)
    assert r.exit_code == 0, r.output
    q = json.loads(js.read_text())["models"][0]["input_check"]
    kinds = q["not_xray_per_kind"]
    assert kinds["white"]["flagged_share"] == 1.0 and kinds["dark"]["flagged_share"] == 1.0
    assert kinds["grayish"]["read"] == 4 and kinds["grayish"]["flagged_share"] == 0.25  # only the red one
    assert q["xray_per_source"]["xrays"]["flagged"] == 1 and q["xray_per_source"]["xrays"]["read"] == 9
    by_class = q["xray_per_source_class"]
    assert by_class["xrays / COVID"]["flagged_share"] == 0.2 and by_class["xrays / Normal"]["flagged"] == 0
    # X-ray scores ~0.1 to 0.3 and 6.7 (the odd one); not-X-rays 1.2 to 17 with the red image on top
    xr = [abs((m / 255 - 0.5) / 0.25) * 10 for m in (128, 129, 130, 131, 120, 121, 122, 123, 85)]
    nxs = [abs((m / 255 - 0.5) / 0.25) * 10 for m in (240, 241, 242, 15, 16, 17, 100, 101, 102)] + [np.inf]
    assert q["auroc_qc_score"] == pytest.approx(auroc(xr, nxs), abs=0.02)
    assert "not X-ray: white" in r.stdout and "X-ray: xrays / COVID" in r.stdout and "AUROC of qc_score" in r.stdout
    old = run("bench", data, "--model", tiny_model_path, "--not-xray", nx, "--runs", "3")
    assert old.exit_code == 0 and "this model has no input check" in old.stdout
    assert run("bench", data, "--model", qc_model, "--not-xray", tmp_path / "nope").exit_code == 2


def test_review_page_row_shows_no_class_for_a_withheld_diagnosis():
    from cxr.runtime.engine import Prediction, ScanResult
    from cxr.runtime.review_page import page_row

    probs = {"COVID": 0.9, "Normal": 0.1}
    shown = page_row(0, ScanResult("a.png", Prediction("COVID", 0.9, probs, qc="unfamiliar", show_unfamiliar=True)),
                     ["COVID", "Normal"], "a", {})
    hidden = page_row(1, ScanResult("b.png", Prediction("COVID", 0.9, probs, qc="not_chest_xray")),
                      ["COVID", "Normal"], "b", {})
    by_default = page_row(2, ScanResult("c.png", Prediction("COVID", 0.9, probs, qc="unfamiliar")), ["COVID", "Normal"], "c", {})
    assert shown["l"] == "COVID" and shown["q"] == "unfamiliar" and by_default["l"] == ""
    assert hidden["l"] == "" and hidden["q"] == "not_chest_xray" and "input check: not_chest_xray" in hidden["f"]
