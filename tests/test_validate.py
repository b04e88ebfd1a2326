"""cxr-infer validate: a site's labelled films measured against the model's own validation figures,
with intervals; folder names as truth (any unknown folder is abnormal); bad folders refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime.cli import cli
from cxr.runtime.site.validate import wilson
from synthetic import shaded
from test_triage import triage_model  # noqa: F401  (fixture: the tiny model with an operating-point table)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _folder(root: Path, name: str, levels) -> None:
    d = root / name
    d.mkdir(parents=True)
    for i, v in enumerate(levels):
        Image.fromarray(shaded(40, 40, float(v), 4)).save(d / f"{i:03d}.png")


@pytest.fixture()
def site(tmp_path):
    root = tmp_path / "site"
    _folder(root, "Normal", np.linspace(110, 170, 12))  # mid grey: the tiny model's Normal
    _folder(root, "COVID", np.linspace(10, 50, 8))  # dark: COVID
    _folder(root, "Effusion", [125] * 6)  # abnormal, but it looks Normal to the model: missed
    return root


def test_wilson_interval_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0 and wilson(0, 0) == (None, None)


def test_validate_measures_with_intervals_and_counts_unknown_folders_as_abnormal(triage_model, site, tmp_path):
    model, op = triage_model
    r = run("validate", site, "--model", model, "--report", tmp_path / "v.json", "--markdown", tmp_path / "v.md")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["films"]["Effusion"] == {"n": 6, "counts_as": "abnormal (no class of the model)"}
    assert rep["per_class"]["COVID"]["sensitivity"]["k"] == 8 and rep["per_class"]["COVID"]["sensitivity"]["n"] == 8
    assert rep["per_class"]["Normal"]["sensitivity"]["n"] == 12
    assert "Effusion" not in rep["per_class"]  # no class of the model: only in the triage
    t = rep["triage"]
    assert t["sensitivity"]["n"] == 14 and t["specificity"]["n"] == 12  # COVID + Effusion abnormal
    assert t["sensitivity"]["k"] <= 8  # the Effusion films look Normal: not referred
    assert t["sensitivity"]["ci95"] == list(wilson(t["sensitivity"]["k"], 14))
    assert t["validation"]["sensitivity"] == op["default"]["sensitivity"]
    assert rep["verdict"]["status"] == "not_ready" and "NOT READY" in r.output
    assert "abnormal referred (sensitivity)" in r.output and "[validation" in r.output
    assert rep["shift"] is not None and rep["ece"] is not None and rep["curve"] and rep["model_curve"]
    md = (tmp_path / "v.md").read_text()
    assert "![site operating curve" in md and "NOT READY" in md
    with Image.open(tmp_path / "v.roc.png") as im:
        assert im.size[0] > 300 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # a drawn figure, not blank


def test_validate_refuses_empty_single_class_and_no_normal(triage_model, tmp_path):
    model, _ = triage_model
    (tmp_path / "empty").mkdir()
    r = run("validate", tmp_path / "empty", "--model", model)
    assert r.exit_code == 2 and "no labelled images" in r.output
    _folder(tmp_path / "one", "Normal", [128] * 5)
    r = run("validate", tmp_path / "one", "--model", model)
    assert r.exit_code == 2 and "only one class folder" in r.output
    _folder(tmp_path / "sick", "COVID", [20] * 5)
    _folder(tmp_path / "sick", "Effusion", [20] * 5)
    r = run("validate", tmp_path / "sick", "--model", model)
    assert r.exit_code == 2 and "no Normal folder" in r.output
