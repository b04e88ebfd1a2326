"""cxr-export writes the shift check's reference into both files: each file's own validation
films' features, by source and top-1 class, the same values the runtime computes from the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the export needs torch (pip install '.[train]')")
onnx = pytest.importorskip("onnx")

from cxr.runtime.session import load_model  # noqa: E402
from cxr.runtime.site.shift_reference import reference_from_scores, score_films, split_items  # noqa: E402
from test_input_check_export import exported, run_two_sources  # noqa: E402,F401  (fixtures)


def test_export_writes_the_reference_the_runtime_would_compute(run_two_sources, exported):
    res, out = exported
    assert res.exit_code == 0, res.output
    ckpt, _, _ = run_two_sources
    for path in (out, out.with_name("tiny.int8.onnx")):
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        entry = json.loads(props["cxr.shift_reference"])
        model = load_model(path)
        assert entry["precision"] == model.info.precision and set(entry["sources"]) == {"site-a", "site-b"}
        assert model.shift_reference is not None
        items = split_items(ckpt.parent / "split.json", "val")
        again = reference_from_scores(score_films(model, [p for p, _ in items]), [s for _, s in items],
                                      fitted_on="validation split", precision=model.info.precision)
        assert entry["dim"] == again["dim"] == model.shift_reference.dim > 0
        np.testing.assert_allclose(entry["standardise"]["mean"], again["standardise"]["mean"], rtol=1e-5, atol=1e-6)
        for src, v in entry["sources"].items():
            assert v["n"] == again["sources"][src]["n"]
            for c, g in v["by_predicted_class"].items():
                h = again["sources"][src]["by_predicted_class"][c]
                assert g["n"] == h["n"]
                np.testing.assert_allclose(g["mean"], h["mean"], rtol=1e-4, atol=1e-5)
