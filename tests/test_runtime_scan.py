"""The scan engine and the Python API: every input exactly once, with the right status."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.runtime import Classifier, ImageReadError, ScanStats, scan_files
from cxr.runtime.discover import iter_inputs
from cxr.runtime.output import display_path
from synthetic import BRIGHT, DARK, MID, shaded, write_bad_files, write_good_images, write_skippable
from tiny_model import build_tiny_model

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good = write_good_images(root / "good")
    bad = write_bad_files(root / "bad")
    skip = write_skippable(root / "clutter")
    os.symlink(root / "good" / "gray8_dark.png", root / "good" / "link_to_dark.png")
    good["link_to_dark.png"] = DARK
    os.symlink(root / "good" / "sub", root / "good" / "linked_folder")  # not followed
    weird = os.fsdecode(b"caf\xe9-latin1.png")  # not valid UTF-8
    Image.fromarray(shaded(16, 16, 235)).save(os.path.join(os.fsencode(root / "good"), os.fsencode(weird)))
    good[weird] = BRIGHT
    return root, good, bad, skip


def _by_path(results, base):
    return {os.path.relpath(r.path, base): r for r in results}


def test_every_input_once_with_right_status(classifier, mixed_folder):
    root, good, bad, skip = mixed_folder
    stats = ScanStats()
    results = list(classifier.scan([root], stats=stats))
    paths = [r.path for r in results]
    assert len(paths) == len(set(paths))
    got_good = _by_path([r for r in results if r.path.startswith(str(root / "good"))], root / "good")
    got_bad = _by_path([r for r in results if r.path.startswith(str(root / "bad"))], root / "bad")
    assert set(got_good) == set(good)
    assert set(got_bad) == set(bad)
    for rel, label in good.items():
        r = got_good[rel]
        assert r.status == "ok", (rel, r.error)
        assert r.prediction.label == label, (rel, r.prediction)
        assert abs(sum(r.prediction.probabilities.values()) - 1) < 1e-4
    for rel, fragment in bad.items():
        r = got_bad[rel]
        assert r.status == "error" and fragment in r.error, (rel, r.error)
    assert not any("clutter" in p for p in paths)  # masks/mask1.png, .xlsx, .DS_Store, README
    assert stats.ok == len(good) and stats.errors == len(bad)
    assert stats.skip_reasons == Counter({**Counter(skip.values()), "symlinked folder (not followed)": 1})
    assert stats.skipped == len(skip) + 1
    assert sum(stats.by_class.values()) == stats.ok
    assert stats.batches >= stats.ok / classifier.batch_size


def test_order_is_deterministic_and_sorted(classifier, mixed_folder):
    root = mixed_folder[0]
    a = [r.path for r in classifier.scan(root)]
    b = [r.path for r in classifier.scan(root)]
    assert a == b
    good = [p for p in a if os.path.dirname(p) == str(root / "good")]
    assert good == sorted(good)


def test_results_independent_of_batching(tiny_model_path, mixed_folder):
    root = mixed_folder[0]
    one = Classifier.load(tiny_model_path, batch_size=1, workers=1)
    many = Classifier.load(tiny_model_path, batch_size=7, workers=3)
    r1, r2 = list(one.scan(root)), list(many.scan(root))
    assert [(r.path, r.status, r.error) for r in r1] == [(r.path, r.status, r.error) for r in r2]
    for a, b in zip(r1, r2):
        if a.ok:
            assert a.prediction.label == b.prediction.label
            np.testing.assert_allclose(list(a.prediction.probabilities.values()),
                                       list(b.prediction.probabilities.values()), atol=1e-5)


def test_explicit_files_are_never_skipped(classifier, tmp_path):
    (tmp_path / "notes.xlsx").write_bytes(b"PK")
    (tmp_path / ".hidden.png").write_bytes(b"")
    Image.new("L", (8, 8), 20).save(tmp_path / "ok.png")
    files = [tmp_path / "notes.xlsx", tmp_path / ".hidden.png", tmp_path / "missing.png", tmp_path / "ok.png"]
    stats = ScanStats()
    results = list(classifier.scan(files, stats=stats))
    assert [r.path for r in results] == [str(f) for f in files]
    assert [r.status for r in results] == ["error", "error", "error", "ok"]
    assert "not a recognised" in results[0].error and "empty" in results[1].error
    assert "not found" in results[2].error
    assert stats.skipped == 0


def test_duplicate_arguments_reported_once(classifier, tmp_path):
    Image.new("L", (8, 8), 20).save(tmp_path / "a.png")
    results = list(classifier.scan([tmp_path, tmp_path / "a.png", str(tmp_path / "a.png")]))
    assert [r.path for r in results] == [str(tmp_path / "a.png")]


def test_classify_accepts_path_pil_and_numpy(classifier, tmp_path):
    Image.new("L", (50, 30), 235).save(tmp_path / "b.png")
    assert classifier.classify(tmp_path / "b.png").label == BRIGHT
    assert classifier.classify(str(tmp_path / "b.png")).label == BRIGHT
    assert classifier.classify(Image.new("RGB", (40, 40), (10, 10, 10))).label == DARK
    assert classifier.classify(np.full((30, 60), 128, np.uint8)).label == MID
    assert classifier.classify(np.full((30, 60, 3), 240, np.uint8)).label == BRIGHT
    u16 = np.zeros((20, 20), np.uint16)
    u16[:10] = 5000
    assert classifier.classify(u16).label == MID  # stretched: half black, half white
    with pytest.raises(ImageReadError):
        classifier.classify(tmp_path / "nope.png")


def test_classify_matches_scan(classifier, mixed_folder):
    root, good, _, _ = mixed_folder
    files = [root / "good" / rel for rel in sorted(good)][:6]
    many = classifier.classify_many(files)
    assert [r.path for r in many] == [str(f) for f in files]
    for f, r in zip(files, many):
        single = classifier.classify(f)
        assert single.label == r.prediction.label
        assert abs(single.confidence - r.prediction.confidence) < 1e-5


def test_scan_files_returns_results_and_stage_timings(classifier, mixed_folder):
    root, good, bad, _ = mixed_folder
    files = list(iter_inputs([root / "good"]))
    results, stats = scan_files(classifier.model, files, batch_size=4)
    assert len(results) == len(good) and stats.ok == len(good)
    assert stats.read_s > 0 and stats.preprocess_s > 0 and stats.inference_s > 0
    assert len(stats.image_latency_s) == stats.ok
    assert stats.wall_s > 0


def test_fixed_batch_model_runs_one_at_a_time(tmp_path, mixed_folder):
    model = build_tiny_model(tmp_path / "fixed.onnx", batch=1)
    clf = Classifier.load(model, batch_size=8)
    stats = ScanStats()
    results = list(clf.scan(mixed_folder[0] / "good", stats=stats))
    assert results and all(r.ok for r in results)
    assert stats.batches == len(results)


def test_non_utf8_name_is_scanned_and_printable(classifier, mixed_folder):
    root = mixed_folder[0]
    weird = [r for r in classifier.scan(root / "good") if "latin1" in r.path]
    assert len(weird) == 1 and weird[0].ok
    shown = display_path(weird[0].path)
    assert "\\xe9" in shown
    shown.encode("utf-8")  # printable: no lone surrogates left
    assert os.path.exists(weird[0].path)  # and the original path still opens the file


def test_unreadable_subfolder_is_an_error_row(classifier, tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    Image.new("L", (8, 8), 20).save(tmp_path / "a.png")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    results = list(classifier.scan(tmp_path))
    assert [(Path(r.path).name, r.status) for r in results] == [("a.png", "ok"), ("locked", "error")]
    assert "permission denied" in results[1].error


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipes_never_block_the_scan(classifier, tmp_path):
    os.mkfifo(tmp_path / "PIPE")  # no suffix: must not be opened to look for a DICM marker
    os.mkfifo(tmp_path / "pipe.png")  # image suffix: an error row, without blocking on open
    Image.new("L", (8, 8), 20).save(tmp_path / "a.png")
    stats = ScanStats()
    results = list(classifier.scan(tmp_path, stats=stats))
    assert [(Path(r.path).name, r.status) for r in results] == [("a.png", "ok"), ("pipe.png", "error")]
    assert "not a regular file" in results[1].error
    assert stats.skipped == 1


def test_session_threads_do_not_spin_against_the_decoders():
    from cxr.runtime.session import _session_options

    so = _session_options(2)
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_first_batch_is_one_image_then_full_batches(tiny_model_path, mixed_folder):
    """The first result should not wait for a whole batch to be decoded and inferred."""
    root, good, _, _ = mixed_folder
    files = [root / "good" / rel for rel in sorted(good)]
    assert len(files) >= 6
    model = Classifier.load(tiny_model_path).model
    sizes: list[int] = []
    real_run = model.run
    model.run = lambda batch: (sizes.append(len(batch)), real_run(batch))[1]
    results, _ = scan_files(model, files, batch_size=4)
    assert all(r.ok for r in results) and len(results) == len(files)
    n = len(files) - 1
    assert sizes == [1] + [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_decode_workers_default_by_where_inference_runs(monkeypatch, tiny_model_path):
    """CPU: two decoders (more preempt onnxruntime's threads); CUDA: up to four; never more than CPUs."""
    import cxr.runtime.engine as engine

    for cpus, cpu_want, cuda_want in ((1, 1, 1), (2, 2, 2), (16, 2, 4)):
        monkeypatch.setattr(engine.os, "cpu_count", lambda n=cpus: n)
        assert engine.default_workers("cpu") == cpu_want
        assert engine.default_workers("cuda") == cuda_want
    model = Classifier.load(tiny_model_path).model
    assert model.runs_on == "cpu"
    model.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as a CUDA session reports it
    assert model.runs_on == "cuda"


def test_intra_op_threads_leave_the_decoders_their_cores_only_on_big_cpus(monkeypatch):
    import cxr.runtime.cpu as cpu
    import cxr.runtime.engine as engine

    assert 1 <= cpu.physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 16)
    for cores, workers, want in ((2, None, None), (4, None, None), (8, None, 6), (16, None, 14), (16, 4, 12)):
        monkeypatch.setattr(cpu, "physical_cores", lambda n=cores: n)
        assert engine.default_threads("cpu", workers) == want
        assert engine.default_threads("auto", workers) == want
        assert engine.default_threads("cuda", workers) is None  # GPU inference leaves the cores alone


def test_classifier_load_applies_the_default_threads(monkeypatch, tiny_model_path):
    import cxr.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "physical_cores", lambda: 16)
    assert Classifier.load(tiny_model_path, workers=2).model.threads == 14
    assert Classifier.load(tiny_model_path, threads=3).model.threads == 3  # an explicit choice wins
    monkeypatch.setattr(cpu, "physical_cores", lambda: 2)
    assert Classifier.load(tiny_model_path).model.threads is None
