"""bench/cam_audit.py and bench/cam_cost.py on the tiny CAM model: regions, shares, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tiny_cam_model import build_tiny_cam_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import cam_audit  # noqa: E402


def test_regions_are_disjoint_and_cover_the_square():
    masks = cam_audit.region_masks(64)
    total = sum(m.astype(int) for m in masks.values())
    assert (total == 1).all()
    assert masks["corners"][0, 0] and masks["corners"][-1, -1] and masks["chest"][32, 32]
    assert masks["border"][32, 0] and masks["border"][0, 32]


def test_heat_in_a_corner_and_in_the_chest():
    masks = cam_audit.region_masks(64)
    corner = np.zeros((8, 8), np.float32)
    corner[0, 0] = 1.0
    shares, peak = cam_audit.heat_shares(corner, masks)
    assert peak == "corners" and shares["corners"] > 0.9 and abs(sum(shares.values()) - 1) < 1e-6
    centre = np.zeros((8, 8), np.float32)
    centre[3:5, 3:5] = 1.0
    shares, peak = cam_audit.heat_shares(centre, masks)
    assert peak == "chest" and shares["chest"] > 0.9


def test_audit_script_prints_the_table_per_source(tmp_path):
    """Films with a bright marker in the top-left corner: the bright class's map must put its
    heat there, and the script must say so."""
    model = build_tiny_cam_model(tmp_path / "cam.onnx", size=32, grid=8)
    root = tmp_path / "data"
    for label, level in (("COVID", 10), ("Viral Pneumonia", 200)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            a = np.full((64, 64), level, np.uint8)
            a[:8, :8] = 255  # a burnt-in marker
            Image.fromarray(a).save(root / label / f"{i}.png")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "cam_audit.py"), "--model", str(model),
                          "--folder", f"site-a={root}", "--json", str(tmp_path / "a.json"),
                          "--examples", str(tmp_path / "ex"), "--n-examples", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "site-a" in out.stdout and "even spread" in out.stdout
    recs = json.loads((tmp_path / "a.json").read_text())["records"]
    bright = [r for r in recs if r["label"] == "Viral Pneumonia"]
    assert len(recs) == 6 and all(r["pred"] == "Viral Pneumonia" and r["peak"] == "corners" for r in bright)
    assert len(list((tmp_path / "ex").iterdir())) == 2


def test_audit_reads_a_split_with_sources(tmp_path):
    model = build_tiny_cam_model(tmp_path / "cam.onnx", size=32, grid=4)
    items = []
    for source in ("site-a", "site-b"):
        (tmp_path / source / "COVID").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (40, 40), 10).save(tmp_path / source / "COVID" / f"{i}.png")
            items.append({"path": f"COVID/{i}.png", "label": "COVID", "split": "test" if i else "train",
                          "source": source})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"format": "cxr-split/2", "seed": 0, "classes": ["COVID"], "items": items,
                                 "sources": [{"name": s, "root": str(tmp_path / s)} for s in ("site-a", "site-b")]}))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "cam_audit.py"), "--model", str(model),
                          "--split", str(split), "--subset", "test"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "site-a (test)" in out.stdout and "site-b (test)" in out.stdout and "2 images" in out.stdout
