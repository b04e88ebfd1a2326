"""The orientation check: a film the training films' mean layout matches better inverted, upside
down or on its side is `misoriented`, its diagnosis withheld; the template and margin come from
cxr-export (training films for the template, validation films for the margin)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxr.export.input_check import LAYOUT_GRID, layout_template
from cxr.export.input_check_report import CheckSet, orientation_entry
from cxr.runtime import Classifier
from cxr.runtime.cli import EXIT_NOT_CHEST_XRAY
from cxr.runtime.inputcheck import MISORIENTED, NO_DIAGNOSIS, OrientationCheck, early_verdict, layout_u8
from synthetic import chest_like
from test_input_check_runtime import THRESHOLDS, add_score_output, run


def _template(n: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    template, info = layout_template([layout_u8(chest_like(rng), LAYOUT_GRID) for _ in range(n)])
    assert template is not None and info["layout_agreement"] > 0.9
    return template


def test_mistakes_are_named_and_upright_films_pass():
    check = OrientationCheck(_template(), 0.2)
    rng = np.random.default_rng(1)
    film = chest_like(rng)
    assert check.verdict(film) is None
    assert check.verdict(np.fliplr(film).copy()) is None  # a mirrored chest is still upright
    for altered, name in ((255 - film, "inverted"), (np.rot90(film, 2).copy(), "upside down"),
                          (np.rot90(film, 1).copy(), "on its side"), (np.rot90(film, 3).copy(), "on its side")):
        v = check.verdict(altered)
        assert v is not None and v.qc == MISORIENTED and name in v.detail, name
    assert MISORIENTED in NO_DIAGNOSIS
    # a blank image or one smaller than the grid is left to the other checks
    assert check.verdict(np.full((224, 224), 90, np.uint8)) is None and check.verdict(np.zeros((4, 4), np.uint8)) is None
    # in a scan the header and pixel checks come first, then orientation, then the score
    from types import SimpleNamespace

    from cxr.runtime.engine import checked_verdicts
    from cxr.runtime.inputcheck import ScoreCheck, Verdict
    from cxr.runtime.preprocess import Preprocessing, normalize

    pp = Preprocessing(size=224)
    model = SimpleNamespace(input_check=ScoreCheck(5.0, 12.0, orientation=check), info=SimpleNamespace(preprocess=pp))
    batch = np.stack([normalize(f, pp) for f in (255 - film, 255 - film, film)])
    got = checked_verdicts(model, batch, [Verdict("not_chest_xray", "colour image"), None, None], np.array([0, 0, 6.0]))
    assert [v.qc for v in got] == ["not_chest_xray", MISORIENTED, "unfamiliar"]
    assert early_verdict(None, 255 - film) is None  # the pixel checks alone do not see orientation


def test_training_images_without_a_shared_layout_give_no_check():
    rng = np.random.default_rng(2)
    template, info = layout_template([layout_u8(rng.integers(0, 255, (64, 64)).astype(np.uint8), 8) for _ in range(40)])
    assert template is None and info["layout_agreement"] < 0.5


def test_margin_is_chosen_on_validation_per_source():
    rng = np.random.default_rng(3)
    u8 = np.stack([chest_like(rng) for _ in range(30)])
    val = CheckSet("val", u8, ["a"] * 20 + ["b"] * 10, [None] * 30)
    ood = CheckSet("dev", np.stack([255 - im for im in u8[:6]]), ["inverted"] * 6, [None] * 6)
    entry = orientation_entry(_template(), val, ood)
    check = OrientationCheck.from_doc(entry)
    gaps = np.array([b - a for a, _, b in (check.scores(im) for im in u8)])
    # small sources: each source's 99.75th percentile is its largest gap, so no validation film is flagged
    assert entry["margin"] == pytest.approx(max(0.0, gaps.max()), abs=1e-6)
    assert entry["validation_flagged"] == {"a": 0.0, "b": 0.0}
    assert entry["development_set_flagged"] == {"inverted": 1.0}
    assert len(entry["template"]) == LAYOUT_GRID ** 2 and "validation sources" in entry["rule"]
    for bad in ({"grid": 8, "template": [0.0] * 10, "margin": 0.1}, {"grid": 8, "template": [0.0] * 64, "margin": -1},
                {"template": []}):
        with pytest.raises(ValueError):
            OrientationCheck.from_doc(bad)


def test_scan_and_api_withhold_a_misoriented_film(tmp_path, tiny_model_path):
    """The test score model plus an orientation template in its metadata: an upright chest-like
    film is ok, the same film inverted or turned is misoriented, shown without a class, exit 3."""
    import onnx

    template = _template()
    model = add_score_output(tiny_model_path, tmp_path / "qc.onnx", scale=0.1)  # the score passes everything
    m = onnx.load(str(model))
    doc = {"output": "qc_score", "thresholds": THRESHOLDS,
           "orientation": {"grid": LAYOUT_GRID, "template": template.ravel().tolist(), "margin": 0.2}}
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, "cxr.input_check": json.dumps(doc)})
    onnx.save(m, str(model))
    film = chest_like(np.random.default_rng(4))
    d = tmp_path / "films"
    d.mkdir()
    Image.fromarray(film).save(d / "a_upright.png")
    ImageOps.invert(Image.fromarray(film)).save(d / "b_inverted.png")
    Image.fromarray(film).rotate(180).save(d / "c_upside_down.png")
    clf = Classifier.load(model)
    got = {r.path.rsplit("/", 1)[-1]: r for r in clf.scan(d)}
    assert got["a_upright.png"].qc == "ok" and not got["a_upright.png"].prediction.diagnosis_withheld
    for name in ("b_inverted.png", "c_upside_down.png"):
        r = got[name]
        assert r.qc == MISORIENTED and r.prediction.diagnosis_withheld and r.triage == "refer"
    assert "inverted" in got["b_inverted.png"].prediction.qc_detail
    assert clf.classify(Image.fromarray(255 - film)).qc == MISORIENTED  # the Python API, from a PIL image
    res = run("scan", d, "--model", model, "--format", "csv", "--strict")
    assert res.exit_code == EXIT_NOT_CHEST_XRAY and "2 misoriented" in res.stderr


def test_the_scan_batch_path_gives_the_per_image_verdicts():
    """A scan checks orientation on whole batches of normalised tensors; the export and the
    per-image path on uint8 pixels. Same layouts (normalising is affine), same verdicts."""
    from cxr.runtime.preprocess import Preprocessing, normalize

    check = OrientationCheck(_template(), 0.2)
    rng = np.random.default_rng(5)
    films = [chest_like(rng) for _ in range(4)]
    films += [255 - films[0], np.rot90(films[1], 2).copy(), np.rot90(films[2], 1).copy(),
              np.full((224, 224), 77, np.uint8)]
    for pp in (Preprocessing(size=224, mean=0.5, std=0.25), Preprocessing(size=224, mean=0.2, std=0.9)):
        batch = np.stack([normalize(f, pp) for f in films])
        got = check.batch_verdicts(batch, pp)
        want = [check.verdict(f) for f in films]
        assert [v.qc if v else None for v in got] == [v.qc if v else None for v in want]
        assert [v.detail.split(":")[0] if v else None for v in got] == [v.detail.split(":")[0] if v else None for v in want]
    assert [v is not None for v in got] == [False] * 4 + [True] * 3 + [False]
    three = np.repeat(batch, 3, axis=1)  # a 3-channel model averages the channels first
    assert [v is not None for v in check.batch_verdicts(three, pp)] == [v is not None for v in got]
