"""cxr-infer adapt on the shipped model and real films of a source (the lung-opacity copy of the
database: Lung_Opacity is a class the shipped model does not have, so every such film counts as
abnormal): the site model is written with its provenance, card and parity; the base file is left
alone; a scan uses the site's point; too few films and bad folders are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnx", reason="adapt writes ONNX: pip install '.[site]'")

from cxr.runtime.site import adapt as A  # noqa: E402
from cxr.runtime.cli import cli  # noqa: E402
from cxr.runtime.modelinfo import sha256_file  # noqa: E402
from cxr.runtime.session import load_model, resolve_model_path  # noqa: E402

# CXR_DATA names the covid-radiography-3class folder (conftest.py); its siblings are the other sources
DATA = (Path(os.environ["CXR_DATA"]).parent if os.environ.get("CXR_DATA")
        else Path(__file__).resolve().parents[2] / "shared" / "data")
SOURCE = DATA / "covid-radiography-lung-opacity"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _images(folder: Path) -> list[Path]:
    sub = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(p for p in sub.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _site(root: Path, per_class: int, classes=("Normal", "Lung_Opacity")) -> Path:
    """Class folders of symlinks to every k-th real film (the data is never copied)."""
    for c in classes:
        films = _images(SOURCE / c)
        d = root / c
        d.mkdir(parents=True)
        for p in films[:: max(1, len(films) // per_class)][:per_class]:
            (d / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    if not SOURCE.is_dir():
        pytest.skip(f"{SOURCE} is absent (set CXR_DATA to the covid-radiography-3class folder beside it)")
    base = tmp_path_factory.mktemp("adapt")
    site = _site(base / "site", 70)
    out = base / "site.onnx"
    shipped = resolve_model_path(None)
    before = sha256_file(shipped)
    res = run("adapt", site, "--out", out, "--holdout", "0.5", "--report", base / "prov.json")
    assert res.exit_code == 0, res.output
    return {"base": base, "site": site, "out": out, "res": res, "shipped": shipped, "shipped_sha": before,
            "prov": json.loads((base / "prov.json").read_text())}


def test_site_model_written_with_provenance_and_parity(adapted):
    prov, out = adapted["prov"], adapted["out"]
    assert sha256_file(adapted["shipped"]) == adapted["shipped_sha"]  # the shipped model is never modified
    assert prov["base_model"]["sha256"] == adapted["shipped_sha"]
    assert prov["films"]["Normal"] == {"counts_as": "normal", "fit": 35, "held_out": 35}
    knows = "Lung_Opacity" in load_model(adapted["shipped"]).classes  # the four-class model does
    assert prov["films"]["Lung_Opacity"]["counts_as"] == ("Lung_Opacity" if knows else "abnormal (no class of the model)")
    p = prov["parity"]
    assert p["passed"] and p["base_initializers_changed"] == 0 and p["probabilities_max_abs_diff"] < 1e-4
    assert "site.temperature" in p["initializers_added"] and p["nodes_otherwise_identical"] > 100
    head = prov["refitted"]["head"]
    assert isinstance(head["adopted"], bool) and head["why"]
    if not head["adopted"]:
        assert "site.head.weight" not in p["initializers_added"]
    t = prov["refitted"]["threshold"]
    assert t["asked_sensitivity"] == 0.98 and 0 < t["threshold"] < 1
    assert t["fit"]["sensitivity"]["value"] >= 0.98  # the conformal rule on the fit films
    assert (out.with_name("site.card.md")).read_text().startswith("# site.onnx: a site model made by cxr-infer adapt")
    assert "(d) head:" in adapted["res"].output and "parity on" in adapted["res"].output


def test_site_model_describes_itself_and_scans_at_the_site_point(adapted, tmp_path):
    m = load_model(adapted["out"])
    assert json.loads(json.dumps(m.info.extra["adaptation"]))["format"] == A.FORMAT
    r = run("info", adapted["out"])
    assert "adaptation     site model made" in r.output and "site films (cxr-infer adapt" in r.output
    assert "shift check    reference from the site films" in r.output
    r = run("scan", adapted["site"] / "Normal", "--model", adapted["out"], "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["summary"]["triage"]["point"]["threshold"] == adapted["prov"]["refitted"]["threshold"]["threshold"]
    assert "on the site films (cxr-infer adapt" in r.output
    assert rep["shift"]["detected"] is False  # its own films are what the site model's reference holds


def test_held_out_figures_meet_the_targets(adapted):
    ev = adapted["prov"]["evaluation"]
    assert ev["on"].startswith("held-out") and ev["n"] == 70
    assert ev["adapted_point"]["sensitivity"]["value"] >= 0.98 - 0.10  # 35 abnormal films: one miss is 2.9 points
    assert ev["auroc_adapted"] >= ev["auroc_shipped"] - 0.02


def test_refusals(adapted, tmp_path):
    few = _site(tmp_path / "few", 20)
    r = run("adapt", few, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "at least 30 normal and 30 abnormal" in r.output
    one = _site(tmp_path / "one", 40, classes=("Normal",))
    r = run("adapt", one, "--out", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "only one class folder" in r.output
    r = run("adapt", adapted["site"], "--model", adapted["out"], "--out", adapted["out"])
    assert r.exit_code == 2 and "never modifies" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_conformal_threshold_and_ridge_fit_units():
    scores = np.arange(1, 100) / 100.0  # 99 abnormal films
    t, k = A.conformal_threshold(scores, 0.95)
    assert k == 5 and t == pytest.approx(0.06)  # floor(0.05 * 100) films below
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(float)
    w, c = A.fit_ridge_logistic(x, y, np.zeros(200), lam=1.0)
    assert w[0] > 2 and np.all(np.abs(w[1:]) < 1)
    w_big, _ = A.fit_ridge_logistic(x, y, np.zeros(200), lam=1e6)
    assert np.abs(w_big).max() < 1e-3  # a strong penalty keeps the shipped head
