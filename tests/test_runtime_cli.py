"""``cxr-infer`` through click's test runner and as a real console script."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

import cxr.models
from cxr.runtime import engine
from cxr.runtime.cli import cli
from cxr.runtime.engine import Prediction, ScanResult
from cxr.runtime.output import make_writer
from synthetic import BRIGHT, DARK, shaded, write_bad_files, write_good_images
from tiny_model import build_tiny_model

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
COLUMNS = ["path", "prediction", "confidence", "p_COVID", "p_Normal", "p_Viral Pneumonia", "status", "error",
           "qc", "qc_score", "triage"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "good").mkdir()
    good = {}
    for i in range(5):
        Image.fromarray(shaded(40, 30, 20)).save(root / "good" / f"dark{i}.png")
        good[f"dark{i}.png"] = DARK
    Image.fromarray(shaded(30, 40, 240)).save(root / "good" / "bright.png")
    good["bright.png"] = BRIGHT
    (root / "good" / "notes.xlsx").write_bytes(b"PK")
    bad = {"empty.png": "empty file", "text.png": "not a recognised image format"}
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "text.png").write_text("hello")
    return root, good, bad


def parse_csv(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from cxr.runtime.cli import cli; "
            "heavy = [m for m in ('numpy', 'onnxruntime', 'PIL', 'torch') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    r = run("--help")
    assert r.exit_code == 0 and "scan" in r.stdout and "info" in r.stdout


def test_scan_all_good_exit_0_csv(folders, tiny_model_path):
    root, good, _ = folders
    r = run("scan", root / "good", "--model", tiny_model_path)
    assert r.exit_code == 0, r.stderr
    header, rows = parse_csv(r.stdout)
    assert header == COLUMNS
    assert {Path(row["path"]).name: row["prediction"] for row in rows} == good
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        probs = [float(row[c]) for c in COLUMNS[3:6]]
        assert abs(sum(probs) - 1) < 1e-4 and float(row["confidence"]) == max(probs)
    assert "5" in r.stderr.split("COVID")[1].splitlines()[0]  # summary: COVID count
    assert "skipped" in r.stderr and "1 non-image file" in r.stderr
    for field in ("first inference", "p50", "p90", "p99", "throughput", "read+decode", "preprocess"):
        assert field in r.stderr


def test_scan_with_errors_exit_1_output_complete(folders, tiny_model_path):
    root, good, bad = folders
    r = run("scan", root, "--model", tiny_model_path, "--format", "jsonl")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(good) + len(bad)
    by_name = {Path(x["path"]).name: x for x in rows}
    for name, fragment in bad.items():
        assert by_name[name]["status"] == "error" and fragment in by_name[name]["error"]
        assert by_name[name]["prediction"] is None and by_name[name]["p_COVID"] is None
    assert set(rows[0]) == set(COLUMNS)
    assert "2 errors" in r.stderr


@pytest.mark.parametrize("fmt", ["json", "table"])
def test_other_formats(folders, tiny_model_path, fmt):
    root, good, bad = folders
    r = run("scan", root, "--model", tiny_model_path, "--format", fmt)
    assert r.exit_code == 1
    if fmt == "json":
        rows = json.loads(r.stdout)
        assert len(rows) == len(good) + len(bad)
    else:
        lines = r.stdout.splitlines()
        assert lines[0].split()[:2] == ["prediction", "conf"] and "p_Viral Pneumonia" in lines[0]
        assert len(lines) == 1 + len(good) + len(bad)
        assert sum(line.startswith("ERROR") for line in lines) == len(bad)


def test_output_file_format_from_suffix_and_report(folders, tiny_model_path, tmp_path):
    root, good, bad = folders
    out, rep = tmp_path / "res.jsonl", tmp_path / "rep.json"
    r = run("scan", root, "--model", tiny_model_path, "-o", out, "--report", rep, "--batch-size", "2",
            "--threads", "1")
    assert r.exit_code == 1 and r.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(good) + len(bad)
    report = json.loads(rep.read_text())
    assert report["images_classified"] == len(good) and report["errors"] == len(bad)
    assert report["skipped"] == 1 and report["batch_size"] == 2 and report["intra_op_threads"] == 1
    lat = report["warm_latency_ms"]
    assert lat["n"] == len(good) and lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert "batch inference time" in lat["definition"]
    for key in ("model_load_ms", "session_create_ms", "first_inference_ms", "throughput_images_per_s"):
        assert report[key] > 0
    assert set(report["stages_ms_per_image"]) == {"read_decode", "preprocess", "inference"}
    assert report["summary"]["by_class"] == {"COVID": 5, "Normal": 0, "Viral Pneumonia": 1}


def test_model_errors_exit_2(tmp_path, folders, tiny_model_path):
    root = folders[0]
    r = run("scan", root, "--model", tmp_path / "missing.onnx")
    assert r.exit_code == 2 and "model file not found" in r.stderr
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    r = run("scan", root, "--model", tmp_path / "garbage.onnx")
    assert r.exit_code == 2 and "not a loadable ONNX model" in r.stderr
    plain = build_tiny_model(tmp_path / "plain.onnx", metadata=False)
    r = run("scan", root, "--model", plain)
    assert r.exit_code == 2 and "not a cxr model" in r.stderr
    m = onnx.load(tiny_model_path)  # metadata says 64x64 input, graph says 32x32
    for prop in m.metadata_props:
        if prop.key == "cxr.preprocess":
            prop.value = prop.value.replace('"size": 32', '"size": 64')
    onnx.save(m, tmp_path / "liar.onnx")
    r = run("scan", root, "--model", tmp_path / "liar.onnx")
    assert r.exit_code == 2 and "preprocessing metadata says 64" in r.stderr
    assert r.stdout == ""  # nothing written before the model is known to work


def test_usage_errors_exit_2(folders, tiny_model_path):
    assert run("scan", "--model", tiny_model_path).exit_code == 2  # no PATH
    r = run("scan", folders[0], "--model", tiny_model_path, "--precision", "int8")
    assert r.exit_code == 2 and "--precision" in r.stderr
    assert run("scan", folders[0], "--model", tiny_model_path, "--batch-size", "0").exit_code == 2


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_unavailable_exit_2_names_providers(folders, tiny_model_path):
    r = run("scan", folders[0], "--model", tiny_model_path, "--device", "cuda")
    assert r.exit_code == 2
    assert "CUDAExecutionProvider" in r.stderr
    for provider in ort.get_available_providers():
        assert provider in r.stderr
    r = run("scan", folders[0] / "good", "--model", tiny_model_path, "--device", "auto")
    assert r.exit_code == 0 and "CPUExecutionProvider" in r.stderr


def test_shipped_model_manifest(tmp_path, folders, monkeypatch):
    monkeypatch.setattr(cxr.models, "MODELS_DIR", tmp_path)
    r = run("scan", folders[0] / "good")
    assert r.exit_code == 2 and "no shipped model" in r.stderr and "--model" in r.stderr
    build_tiny_model(tmp_path / "m.onnx", precision="fp32")
    build_tiny_model(tmp_path / "m.int8.onnx", precision="int8")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"default_precision": "int8", "models": {"fp32": "m.onnx", "int8": "m.int8.onnx"}}))
    r = run("info", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["precision"] == "int8"
    r = run("info", "--json", "--precision", "fp32")
    assert json.loads(r.stdout)["file"] == str(tmp_path / "m.onnx")
    rep = tmp_path / "rep.json"
    r = run("scan", folders[0] / "good", "--precision", "fp32", "--report", rep)
    assert r.exit_code == 0 and json.loads(rep.read_text())["precision"] == "fp32"
    (tmp_path / "m.int8.onnx").unlink()
    r = run("scan", folders[0] / "good")
    assert r.exit_code == 2 and "missing" in r.stderr


def test_info(tmp_path):
    model = build_tiny_model(tmp_path / "m.onnx", extra={"metrics": {"test": {"accuracy": 0.91}},
                                                        "training_data": {"name": "synthetic"}})
    r = run("info", model)
    assert r.exit_code == 0
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    for text in (sha, "COVID, Normal, Viral Pneumonia", "tiny_brightness", "0.91", "synthetic", "size=32",
                 str(model.stat().st_size)):
        assert text in r.stdout
    d = json.loads(run("info", model, "--json").stdout)
    assert d["sha256"] == sha and d["classes"] == CLASSES and d["input"]["shape"][1:] == [1, 32, 32]
    assert d["quantization"] is None and d["input_check"] is None
    assert "input check    none in this model" in r.stdout
    assert run("info", tmp_path / "nope.onnx").exit_code == 2
    assert run("info", "--model", model).stdout == r.stdout  # --model, as in scan and bench
    assert run("info", model, "--model", tmp_path / "other.onnx").exit_code == 2


def test_info_names_the_input_check(tmp_path):
    from test_input_check_runtime import THRESHOLDS, add_score_output

    model = add_score_output(build_tiny_model(tmp_path / "m.onnx"), tmp_path / "qc.onnx")
    r = run("info", model)
    assert r.exit_code == 0
    assert (f"input check    qc_score from output 'qc_score': unfamiliar above {THRESHOLDS['unfamiliar']:.4g}, "
            f"not_chest_xray above {THRESHOLDS['not_chest_xray']:.4g}; no orientation check") in r.stdout
    d = json.loads(run("info", model, "--json").stdout)["input_check"]
    assert d == {"score_output": "qc_score", "unfamiliar_above": 5.0, "not_chest_xray_above": 12.0,
                 "orientation_margin": None}


def test_writers_flush_each_row(tmp_path):
    res = ScanResult("a.png", prediction=Prediction("COVID", 0.9, {"COVID": 0.9, "Normal": 0.05,
                                                                   "Viral Pneumonia": 0.05}))
    for fmt in ("csv", "jsonl", "json", "table"):
        path = tmp_path / f"out.{fmt}"
        with open(path, "w", encoding="utf-8") as fh:
            w = make_writer(fmt, fh, CLASSES)
            for n in range(1, 4):
                w.write(res)
                assert path.read_text().count("a.png") == n, fmt  # on disk while still open
            w.close()
        if fmt == "json":
            assert len(json.loads(path.read_text())) == 3


def test_ctrl_c_keeps_finished_rows_and_prints_summary(tmp_path, tiny_model_path, monkeypatch):
    for i in range(8):
        Image.new("L", (16, 16), 20).save(tmp_path / f"img_{i:03d}.png")
    real = engine.load_image_with_facts

    def interrupting(path):
        if Path(path).name == "img_005.png":
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(engine, "load_image_with_facts", interrupting)
    out = tmp_path / "res.csv"
    r = run("scan", tmp_path, "--model", tiny_model_path, "-o", out, "--batch-size", "1", "--workers", "1")
    assert r.exit_code == 130
    _, rows = parse_csv(out.read_text())
    assert [Path(x["path"]).name for x in rows] == [f"img_{i:03d}.png" for i in range(5)]
    assert "scan interrupted: 5 files" in r.stderr and "p50" in r.stderr


def _console_script() -> str:
    exe = shutil.which("cxr-infer") or str(Path(sys.executable).parent / "cxr-infer")
    if not os.path.exists(exe):
        pytest.skip("cxr-infer console script not installed (pip install -e .)")
    return exe


def test_console_script_subprocess(folders, tiny_model_path):
    root, good, bad = folders
    p = subprocess.run([_console_script(), "scan", str(root), "--model", str(tiny_model_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    header, rows = parse_csv(p.stdout)  # not a terminal: csv by default, no progress bar
    assert header == COLUMNS and len(rows) == len(good) + len(bad)
    assert "\r" not in p.stderr
    assert "scan finished" in p.stderr and "warm per-image" in p.stderr


def test_scan_never_imports_torch_or_training(tmp_path, tiny_model_path):
    good = write_good_images(tmp_path / "imgs") if _has_pydicom() else None
    target = tmp_path / "imgs" if good else tmp_path
    if not good:
        Image.fromarray(shaded(16, 16, 20)).save(tmp_path / "a.png")
    code = f"""
import json, sys
from cxr.runtime.cli import main
from cxr.runtime import Classifier
try:
    main(["scan", {str(target)!r}, "--model", {str(tiny_model_path)!r}, "-o", {str(tmp_path / 'o.csv')!r}])
except SystemExit as e:
    code = e.code
list(Classifier.load({str(tiny_model_path)!r}).scan([{str(target)!r}]))
print(json.dumps({{"code": code, "loaded": [m for m in ("torch", "torchvision", "cxr.train", "cxr.export")
                                            if m in sys.modules], "ort": "onnxruntime" in sys.modules}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"code": 0, "loaded": [], "ort": True}


def _has_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def test_bad_inputs_via_cli_each_once(tmp_path, tiny_model_path):
    pytest.importorskip("pydicom")
    expected = write_bad_files(tmp_path)
    r = run("scan", tmp_path, "--model", tiny_model_path, "--format", "jsonl")
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    names = [Path(x["path"]).name for x in rows]
    assert sorted(names) == sorted(expected)
    for x in rows:
        assert x["status"] == "error" and expected[Path(x["path"]).name] in x["error"]


def test_progress_only_on_a_terminal():
    from cxr.runtime.engine import ScanStats
    from cxr.runtime.output import Progress

    stats = ScanStats(ok=3, errors=1, started=0.0)
    quiet = io.StringIO()  # isatty() is False, like a pipe or a file
    Progress(stats, quiet).update()
    assert quiet.getvalue() == ""
    tty = io.StringIO()
    p = Progress(stats, tty, enabled=True)
    p.update()
    p.close()
    assert tty.getvalue().startswith("\r4 files  3 ok  1 errors") and tty.getvalue().endswith("\r\033[K")


def test_non_utf8_names_printed_escaped_in_every_format(tmp_path, tiny_model_path):
    name = os.path.join(os.fsencode(tmp_path), b"r\xe9sum\xe9.png")
    Image.new("L", (16, 16), 20).save(name)
    os.symlink(b"missing\xff.png", os.path.join(os.fsencode(tmp_path), b"link\xff.png"))
    for fmt in ("csv", "jsonl", "json", "table"):
        r = run("scan", tmp_path, "--model", tiny_model_path, "--format", fmt)
        assert r.exit_code == 1, (fmt, r.stderr)
        if fmt in ("jsonl", "json"):
            recs = json.loads(r.stdout) if fmt == "json" else [json.loads(x) for x in r.stdout.splitlines()]
            text = "\n".join(f"{x['path']} {x['error']}" for x in recs)
        else:
            text = r.stdout
        assert "r\\xe9sum\\xe9.png" in text and "link\\xff.png" in text
        assert "broken symlink" in text
