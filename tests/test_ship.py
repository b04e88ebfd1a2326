"""Shipping an export into models/: the manifest's default follows the export's int8 verdict."""

from __future__ import annotations

import json

import pytest

from cxr.export.ship import ship
from cxr.models import default_model_path


def _export(tmp_path, int8_status, ips=(100.0, 200.0)):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "m.onnx").write_bytes(b"fp32")
    (d / "m.card.md").write_text("# card")
    report = {"parity": {"passed": True}, "int8": None, "cpu": {"model": "TestCPU"},
              "models": {"onnx_fp32": {"speed": {"throughput_ips": ips[0], "throughput_batch": 32}},
                         "onnx_int8": {"speed": {"throughput_ips": ips[1], "throughput_batch": 32}}}}
    if int8_status:
        (d / "m.int8.onnx").write_bytes(b"int8")
        (d / "m.int8.card.md").write_text("# int8 card")
        report["int8"] = {"status": int8_status, "bound": {"max_accuracy_drop_points": 0.5}}
    (d / "m.report.json").write_text(json.dumps(report))
    return d / "m.onnx"


def test_int8_within_bound_becomes_the_default(tmp_path):
    manifest = ship(_export(tmp_path, "ok"), tmp_path / "models")
    assert manifest["default_precision"] == "int8"
    assert default_model_path(models_dir=tmp_path / "models").name == "m.int8.onnx"
    assert default_model_path("fp32", models_dir=tmp_path / "models").name == "m.onnx"
    assert (tmp_path / "models" / "m.int8.card.md").is_file()


def test_refused_int8_is_not_shipped(tmp_path):
    src = _export(tmp_path, "refused")
    manifest = ship(src, tmp_path / "models")
    assert manifest["default_precision"] == "fp32" and "int8" not in manifest["models"]
    assert not (tmp_path / "models" / "m.int8.onnx").exists()
    assert "refused" in manifest["reason"]


def test_unfinished_export_is_refused(tmp_path):
    src = _export(tmp_path, None)
    (src.parent / "m.report.json").unlink()
    with pytest.raises(Exception, match="report"):
        ship(src, tmp_path / "models")


def test_int8_that_is_slower_ships_but_is_not_the_default(tmp_path):
    manifest = ship(_export(tmp_path, "ok", ips=(580.0, 103.0)), tmp_path / "models")
    assert manifest["default_precision"] == "fp32"
    assert manifest["models"]["int8"] == "m.int8.onnx"
    assert "slower than fp32 on TestCPU" in manifest["reason"]
    assert default_model_path(models_dir=tmp_path / "models").name == "m.onnx"
