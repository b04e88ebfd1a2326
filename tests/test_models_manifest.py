"""cxr.models.default_model_path: the shipped pair chosen by precision, clear errors otherwise."""

from __future__ import annotations

import json

import pytest

from cxr.models import NoShippedModelError, default_model_path


def _ship(d, manifest, files=()):
    for f in files:
        (d / f).write_bytes(b"onnx")
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_no_manifest_says_how_to_get_a_model(tmp_path):
    with pytest.raises(NoShippedModelError, match="--model FILE.*cxr-train.*cxr-export"):
        default_model_path(models_dir=tmp_path)


def test_precision_choice(tmp_path):
    _ship(tmp_path, {"default_precision": "int8", "models": {"fp32": "a.onnx", "int8": "a.int8.onnx"}},
          ["a.onnx", "a.int8.onnx"])
    assert default_model_path(models_dir=tmp_path) == tmp_path / "a.int8.onnx"
    assert default_model_path("fp32", models_dir=tmp_path) == tmp_path / "a.onnx"


def test_missing_precision_and_missing_file(tmp_path):
    _ship(tmp_path, {"models": {"fp32": "a.onnx"}}, ["a.onnx"])
    assert default_model_path(models_dir=tmp_path) == tmp_path / "a.onnx"
    with pytest.raises(NoShippedModelError, match="no shipped int8 model.*fp32"):
        default_model_path("int8", models_dir=tmp_path)
    _ship(tmp_path, {"models": {"fp32": "gone.onnx"}})
    with pytest.raises(NoShippedModelError, match="missing"):
        default_model_path(models_dir=tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(NoShippedModelError, match="cannot read"):
        default_model_path(models_dir=tmp_path)
