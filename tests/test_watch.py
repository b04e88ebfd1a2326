"""``cxr-infer watch``: files that land in a folder are classified once each, after they stop
growing, across restarts and kill -9; plus the exactly-once row log it shares with ``listen``."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pacs import wait_for
from synthetic import DARK, BRIGHT, MID, shaded


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnx", reason="building the test model needs onnx (pip install '.[dev]')")
    from tiny_cam_model import build_tiny_cam_model

    return build_tiny_cam_model(tmp_path_factory.mktemp("watch-model") / "tiny-cam.onnx")


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def watch_cmd(folder: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cxr.runtime.cli", "watch", str(folder), "-o", str(out), "--model", str(model),
            "--threads", "1", "--interval", "0.1", *extra]


def run_once(folder, out, model, *extra):
    res = subprocess.run(watch_cmd(folder, out, model, "--once", "--settle", "0.3", *extra), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def png(path: Path, mean: float, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shaded(size, size, mean)).save(path)
    return path


def test_restart_resumes_and_never_classifies_a_file_twice(tmp_path, cam_model):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    png(inbox / "a.png", 20)
    png(inbox / "sub" / "deeper" / "b.png", 235)
    (inbox / "notes.txt").write_text("not an image")
    run_once(inbox, out, cam_model)
    first = rows(out)
    assert sorted((Path(r["path"]).name, r["prediction"]) for r in first) == [("a.png", DARK), ("b.png", BRIGHT)]
    png(inbox / "c.png", 128)
    second = run_once(inbox, out, cam_model)
    assert "2 file(s) done before" in second.stderr
    got = rows(out)
    assert [Path(r["path"]).name for r in got] == ["a.png", "b.png", "c.png"], "each file once, in arrival order"
    assert got[2]["prediction"] == MID
    run_once(inbox, out, cam_model)
    assert len(rows(out)) == 3, "a third run with nothing new must add nothing"
    # a file replaced by another film (new size and mtime) is a new film: one more row
    png(inbox / "a.png", 235, size=80)
    run_once(inbox, out, cam_model)
    got = rows(out)
    assert len(got) == 4 and Path(got[3]["path"]).name == "a.png" and got[3]["prediction"] == BRIGHT
    from cxr.runtime.output import columns

    assert list(got[0]) == columns(["COVID", "Normal", "Viral Pneumonia"]), "the scan's columns"


def test_a_growing_file_waits_until_it_stops_growing(tmp_path, cam_model):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    inbox.mkdir()
    noise = (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = buf.getvalue()
    proc = subprocess.Popen(watch_cmd(inbox, out, cam_model, "--settle", "3"), stderr=subprocess.PIPE, text=True)
    try:
        growing = inbox / "growing.png"
        with open(growing, "wb") as fh:
            fh.write(data[:1000])
            fh.flush()
            png(inbox / "marker.png", 20)
            pos = 1000
            # keep the film growing (a copy in progress) until the marker, written after it started, has its row
            while not any(Path(r["path"]).name == "marker.png" for r in rows(out)):
                assert proc.poll() is None, proc.stderr.read()
                assert pos < len(data) - 100, "the marker was never classified while the film kept growing"
                fh.write(data[pos:pos + 50])
                fh.flush()
                pos += 50
                time.sleep(0.1)
            assert [Path(r["path"]).name for r in rows(out)] == ["marker.png"], "a growing file was read"
            fh.write(data[pos:])
        wait_for("the finished film's row", lambda: len(rows(out)) == 2, timeout=60)
        row = rows(out)[1]
        assert Path(row["path"]).name == "growing.png" and row["status"] == "ok", row
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert "watch stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_then_restart_gives_every_file_exactly_one_row(tmp_path, cam_model):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    names = [f"f{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        png(inbox / name, [20, 128, 235][i % 3], size=400)
    proc = subprocess.Popen(watch_cmd(inbox, out, cam_model, "--settle", "0", "--batch-size", "2"),
                            stderr=subprocess.DEVNULL)
    wait_for("some rows", lambda: len(rows(out)) >= 3, timeout=120, interval=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = len(rows(out))
    run_once(inbox, out, cam_model)
    got = [Path(r["path"]).name for r in rows(out)]
    assert sorted(got) == names, f"killed after {before} rows: {len(got)} rows for {len(names)} files"


def test_heatmaps_and_review_page(tmp_path, cam_model):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    png(inbox / "x.png", 235)
    png(inbox / "y.png", 20)
    run_once(inbox, out, cam_model, "--heatmaps", str(inbox / "maps"), "--html", str(tmp_path / "page.html"))
    assert len(list((inbox / "maps").glob("*.heatmap.png"))) == 2
    assert len(rows(out)) == 2, "the heatmaps written inside the watched folder must not be classified"
    page = (tmp_path / "page.html").read_text()
    assert "x.png" in page and "y.png" in page


def test_withheld_and_unreadable_files_are_logged_and_do_not_stop_it(tmp_path, cam_model):
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    png(inbox / "a.png", 128)
    Image.new("L", (64, 64), 128).save(inbox / "blank.png")  # no structure: not_chest_xray by the pixel checks
    (inbox / "empty.png").write_bytes(b"")
    res = run_once(inbox, out, cam_model)  # exit 0 whatever the films were
    log = res.stderr.splitlines()
    assert any(x.endswith("blank.png: withheld (not_chest_xray)") for x in log), res.stderr
    assert any("empty.png: error: " in x for x in log), res.stderr
    assert "2 classified (1 withheld by the input check), 1 errors this run" in res.stderr
    assert len(rows(out)) == 3


def test_rowlog_drops_a_row_whose_ledger_line_never_made_it(tmp_path, classifier):
    from cxr.runtime.engine import ScanResult
    from cxr.runtime.rowlog import RowLog

    classes = classifier.classes
    out, ledger = tmp_path / "r.csv", tmp_path / "r.csv.ledger.jsonl"
    log = RowLog(str(out), str(ledger), classes)
    log.append("k1", ScanResult("one.png", error="x"))
    log.close()
    with open(out, "a") as fh:  # killed after the row, before its ledger line
        fh.write("two.png,,,,,,error,y,,,\n")
    with open(ledger, "a") as fh:  # and a torn ledger line
        fh.write('{"key": "k2", "pa')
    log = RowLog(str(out), str(ledger), classes)
    assert set(log.done) == {"k1"}
    assert [r["path"] for r in rows(out)] == ["one.png"]
    log.append("k3", ScanResult("three.png", error="z"))
    log.close()
    assert [r["path"] for r in rows(out)] == ["one.png", "three.png"]
    assert RowLog(str(out), str(ledger), classes).done.keys() == {"k1", "k3"}
    with pytest.raises(ValueError, match="other columns"):
        RowLog(str(out), str(ledger), ["A", "B"])
