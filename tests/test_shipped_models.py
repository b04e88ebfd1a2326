"""The models that ship in models/: they load without torch, describe themselves, and answer
real X-rays sensibly. Skipped (saying why) until models/manifest.json exists."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cxr.models import NoShippedModelError, default_model_path, shipped_models


@pytest.fixture(scope="module")
def manifest():
    try:
        return shipped_models()
    except NoShippedModelError as exc:
        pytest.skip(f"no shipped model: {exc}")


def test_shipped_pair_is_small_and_self_describing(manifest):
    from cxr.runtime.session import load_model

    total = 0
    for precision in manifest["models"]:
        path = default_model_path(precision)
        total += path.stat().st_size
        model = load_model(path, device="cpu", threads=1)
        assert model.info.precision == precision
        assert len(model.classes) >= 2
        extra = model.info.extra
        assert "training_data" in extra and "metrics" in extra and "intended_use" in extra
        if precision == "int8":
            q = extra["quantization"]
            assert q["validation"]["accuracy_drop_points"] <= q["bound"]["max_accuracy_drop_points"]
    assert total < 40e6
    assert default_model_path().name == manifest["models"][manifest["default_precision"]]


@pytest.mark.realdata
def test_shipped_models_classify_real_xrays(manifest, real_data_root):
    """A sample of real images per class: the shipped model gets most right, int8 agrees with fp32."""
    from cxr.runtime import Classifier
    from cxr.runtime.dataset import discover_labelled

    classes, items = discover_labelled(real_data_root)
    rng = random.Random(0)
    sample = []
    for c in classes:
        group = [it for it in items if it.label == c]
        sample += rng.sample(group, min(20, len(group)))
    results = {}
    for precision in manifest["models"]:
        clf = Classifier.load(precision=precision, threads=1)
        known = [it for it in sample if it.label in clf.classes]
        preds = [r.prediction.label for r in clf.scan([str(it.path) for it in known])]
        results[precision] = preds
        acc = np.mean([p == it.label for p, it in zip(preds, known)])
        assert acc >= 0.85, f"{precision}: {acc:.2%} on {len(known)} real images"
    if {"fp32", "int8"} <= set(results):
        agree = np.mean([a == b for a, b in zip(results["fp32"], results["int8"])])
        assert agree >= 0.95


@pytest.mark.realdata
def test_shipped_models_withhold_a_diagnosis_for_what_is_not_a_chest_xray(manifest, real_data_root):
    """Ten images of every kind in the development folder of non-X-rays: each flagged and shown with
    no class, except that one hand radiograph in ten may pass (an X-ray of another body part is the
    score's documented hard case: the four-class model lets 2 of the folder's 60 hands through);
    and the same sample of real X-rays as above mostly passes the check."""
    import os
    from pathlib import Path

    from cxr.runtime import Classifier
    from cxr.runtime.dataset import discover_labelled, is_candidate_image

    folder = Path(os.environ.get("CXR_NOT_XRAY", real_data_root.parent / "not-chest-xray"))
    if not folder.is_dir():
        pytest.skip(f"no folder of non-X-rays at {folder} (set CXR_NOT_XRAY)")
    rng = random.Random(0)
    nx = []
    for kind in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(str(p) for p in kind.rglob("*") if p.is_file() and is_candidate_image(p.name))
        nx += rng.sample(files, min(10, len(files)))
    assert len(nx) >= 30
    _, items = discover_labelled(real_data_root)
    xr = [str(it.path) for it in random.Random(1).sample(items, 60)]
    for precision in manifest["models"]:
        clf = Classifier.load(precision=precision, threads=1)
        got = clf.classify_many(nx)
        assert all(r.ok for r in got)
        missed = [r.path for r in got if r.qc not in ("unfamiliar", "not_chest_xray", "misoriented")]
        assert all("/hand-xray/" in p for p in missed) and len(missed) <= 1, (precision, missed)
        assert all(r.prediction.diagnosis_withheld and r.triage == "refer" for r in got if r.path not in missed)
        passed = [r.qc == "ok" for r in clf.classify_many(xr)]
        assert sum(passed) >= 58, f"{precision}: {60 - sum(passed)} of 60 real X-rays flagged"
