"""cxr-train on a tiny synthetic dataset whose classes differ by a learnable pattern."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="cxr-train needs the 'train' extra (torch)")

from click.testing import CliRunner  # noqa: E402

from cxr.runtime.preprocess import Preprocessing, normalize, resize_to_uint8  # noqa: E402
from cxr.train import engine  # noqa: E402
from cxr.train.augment import AugmentConfig, augment_batch, normalize_tensor, to_unit  # noqa: E402
from cxr.train.cli import main as train_main  # noqa: E402
from cxr.train.models import build_model, load_pretrained  # noqa: E402
from cxr.runtime.dataset import item_path  # noqa: E402
from cxr.train.split import load_manifest, make_split  # noqa: E402

CLASSES = ("Bottom", "Stripes", "Top")


def _pattern(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Flip/rotation-invariant class cues: bright top half, bright bottom half, or stripes."""
    img = rng.normal(90, 20, (size, size))
    if label == "Top":
        img[: size // 2] += 110
    elif label == "Bottom":
        img[size // 2:] += 110
    else:
        img[::4] += 110
        img[1::4] += 110
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Database layout, with the clutter real folders have: masks/, metadata, .DS_Store."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c / "images").mkdir(parents=True)
        (root / c / "masks").mkdir()
        n = 40 if c != "Stripes" else 24  # imbalanced on purpose
        for i in range(n):
            Image.fromarray(_pattern(c, rng)).save(root / c / "images" / f"{c}-{i}.png")
            Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / c / "masks" / f"{c}-{i}.png")
        (root / f"{c}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really")
        (root / c / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def _train(data: Path, out: Path, *extra: str, epochs: int = 6) -> None:
    args = ["--data", str(data), "--arch", "baseline_cnn", "--image-size", "32", "--epochs", str(epochs),
            "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0.5", "--threads", "1", "--patience", "0",
            "--out", str(out), *extra]
    res = CliRunner().invoke(train_main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_split_is_stratified_deterministic_and_disjoint(tiny_dataset):
    a = make_split(tiny_dataset, (0.6, 0.2, 0.2), seed=3)
    b = make_split(tiny_dataset, (0.6, 0.2, 0.2), seed=3)
    c = make_split(tiny_dataset, (0.6, 0.2, 0.2), seed=4)
    assert a == b
    assert a["items"] != c["items"]
    assert a["classes"] == sorted(CLASSES)
    paths = [r["path"] for r in a["items"]]
    assert len(paths) == len(set(paths)) == 104  # masks/ and non-images skipped
    assert not any("masks" in p for p in paths)
    for cls, n in (("Top", 40), ("Bottom", 40), ("Stripes", 24)):
        per = {s: sum(1 for r in a["items"] if r["label"] == cls and r["split"] == s) for s in ("train", "val", "test")}
        assert sum(per.values()) == n
        assert abs(per["train"] - 0.6 * n) <= 1 and abs(per["val"] - 0.2 * n) <= 1


def test_training_learns_writes_everything_and_never_touches_test_before_the_end(tiny_dataset, tmp_path, monkeypatch):
    decoded_before_finish: list[str] = []
    real_decode, real_finish = engine.decode_all, engine.finish
    finished = {"flag": False}

    def spy_decode(paths, *a, **k):
        if not finished["flag"]:
            decoded_before_finish.extend(str(p) for p in paths)
        return real_decode(paths, *a, **k)

    def spy_finish(*a, **k):
        finished["flag"] = True
        return real_finish(*a, **k)

    monkeypatch.setattr(engine, "decode_all", spy_decode)
    monkeypatch.setattr(engine, "finish", spy_finish)
    out = tmp_path / "run"
    _train(tiny_dataset, out)

    for name in ("config.json", "split.json", "best.pt", "last.pt", "metrics.json", "curves.png",
                 "confusion_matrix.png", "test_report.json"):
        assert (out / name).is_file(), name
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = load_manifest(out / "split.json")
    test_paths = {str(item_path(manifest, r)) for r in manifest["items"] if r["split"] == "test"}
    assert decoded_before_finish and not (set(decoded_before_finish) & test_paths)

    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["val"]["accuracy"] > 0.7  # chance is 1/3
    report = json.loads((out / "test_report.json").read_text())
    assert report["n"] == len(test_paths)
    assert report["accuracy"] > 0.7
    for c in CLASSES:
        pc = report["per_class"][c]
        assert set(pc) >= {"precision", "sensitivity", "specificity", "f1", "roc_auc"}
    assert 0.0 <= report["ece"] <= 1.0
    assert "acquisition_shift" in report and "accuracy_drop_points" in report["acquisition_shift"]

    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ck["format"] == "cxr-checkpoint/1"
    assert ck["classes"] == sorted(CLASSES)
    assert ck["preprocess"]["size"] == 32
    assert ck["test_metrics"]["accuracy"] == report["accuracy"]
    assert ck["training_data"]["class_counts"] == {"Bottom": 40, "Stripes": 24, "Top": 40}
    model = build_model(ck["arch"], **ck["model_kwargs"])
    model.load_state_dict(ck["state_dict"])  # the checkpoint rebuilds exactly


def test_resume_continues_where_it_stopped(tiny_dataset, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(tiny_dataset, straight, "--no-shift-eval", epochs=3)

    calls = {"n": 0}
    real_flag = engine.D.broadcast_flag

    def interrupt_after_two_epochs(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the machine went away after epoch 2 was saved
        return real_flag(*a, **k)

    monkeypatch.setattr(engine.D, "broadcast_flag", interrupt_after_two_epochs)
    res = CliRunner().invoke(train_main, ["--data", str(tiny_dataset), "--arch", "baseline_cnn", "--image-size", "32",
                                          "--epochs", "3", "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs",
                                          "0.5", "--threads", "1", "--patience", "0", "--no-shift-eval",
                                          "--out", str(resumed)])
    assert res.exit_code != 0 and "Aborted" in res.output
    monkeypatch.setattr(engine.D, "broadcast_flag", real_flag)
    assert not (resumed / "test_report.json").exists()

    res = CliRunner().invoke(train_main, ["--out", str(resumed), "--resume", "--epochs", "3"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[resume]" in res.output and "at epoch 2" in res.output
    hist = json.loads((resumed / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    a = torch.load(straight / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "last.pt", weights_only=True)["state_dict"]
    for k in a:  # same seeds per epoch, same schedule: resuming changes nothing
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_refuses_to_overwrite_a_run(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    _train(tiny_dataset, out, "--no-shift-eval", epochs=1)
    res = CliRunner().invoke(train_main, ["--data", str(tiny_dataset), "--out", str(out), "--arch", "baseline_cnn"])
    assert res.exit_code != 0 and "already holds a run" in res.output


def test_class_weights_come_from_the_training_split():
    w = engine.class_weight_vector(np.array([0] * 30 + [1] * 10 + [2] * 20), 3)
    counts = np.array([30, 10, 20])
    np.testing.assert_allclose(w.numpy(), 60 / (3 * counts), rtol=1e-6)


def test_lr_schedule_warms_up_then_decays():
    lrs = [engine.lr_lambda(s, 100, 10, 0.01) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


def test_training_normalisation_is_the_runtime_normalisation():
    pp = Preprocessing(size=32, mean=0.4, std=0.3)
    u8 = resize_to_uint8(np.random.default_rng(1).integers(0, 256, (50, 70), dtype=np.uint8), pp)
    ours = normalize_tensor(to_unit(torch.from_numpy(u8[None].copy())), pp).numpy()
    np.testing.assert_allclose(ours[0], normalize(u8, pp), atol=1e-6)


def test_augmentation_keeps_range_and_is_seeded():
    import random

    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 48, 48), dtype=np.uint8))
    cfg = AugmentConfig(resample_p=1.0, blur_sharpen_p=1.0, jpeg_p=1.0, intensity_p=1.0)
    a = augment_batch(batch.clone(), cfg, torch.Generator().manual_seed(5), random.Random(5))
    b = augment_batch(batch.clone(), cfg, torch.Generator().manual_seed(5), random.Random(5))
    assert a.shape == (8, 1, 48, 48) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.allclose(a, to_unit(batch))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_weight_folding_preserves_the_stem_response_to_gray(arch, tmp_path):
    from torchvision import models as tvm

    rgb = getattr(tvm, arch)(weights=None)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in rgb.parameters():
            p.normal_(0, 0.1)
    weights = tmp_path / f"{arch}.pth"
    torch.save(rgb.state_dict(), weights)

    gray_model = build_model(arch, num_classes=3, in_channels=1)
    summary = load_pretrained(gray_model, arch, weights)
    assert summary["stem_folded"] and summary["loaded"] > 10
    gray = torch.rand(2, 1, 64, 64)
    stem_rgb = rgb.conv1 if arch == "resnet18" else rgb.features[0][0]
    stem_gray = gray_model.conv1 if arch == "resnet18" else gray_model.features[0][0]
    with torch.no_grad():
        torch.testing.assert_close(stem_gray(gray), stem_rgb(gray.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)
        # the rest of the network came along too (not re-initialised)
        rest = [k for k in rgb.state_dict() if "fc" not in k and "classifier" not in k and k.endswith("weight")]
        k = rest[len(rest) // 2]
        assert torch.equal(gray_model.state_dict()[k], rgb.state_dict()[k])


def test_unknown_weights_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"nothing": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="shares no tensors"):
        load_pretrained(build_model("resnet18", 3), "resnet18", bogus)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "cxr.train.cli", "--data", str(tiny_dataset), "--arch", "baseline_cnn", "--image-size", "32",
           "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--patience", "0", "--no-shift-eval",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2" in proc.stderr
    hist = json.loads((out / "metrics.json").read_text())
    assert len(hist) == 4
    assert json.loads((out / "test_report.json").read_text())["accuracy"] > 0.6


def test_disk_cache_is_keyed_by_content_and_preprocessing(tmp_path):
    from cxr.train.cache import cache_key, decode_all

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(p)
        paths.append(p)
    pp = Preprocessing(size=16)
    first = decode_all(paths, pp, workers=2, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    np.testing.assert_array_equal(decode_all(paths, pp, workers=2, cache_dir=tmp_path / "c"), first)
    key = cache_key(paths, pp)
    assert cache_key(paths, Preprocessing(size=16, resize="pad")) != key
    Image.fromarray(np.full((20, 30), 250, np.uint8)).save(paths[0])  # same name, new content
    assert cache_key(paths, pp) != key
    assert decode_all(paths, pp, workers=2, cache_dir=tmp_path / "c")[0].min() == 250


def test_bn_momentum_is_set_for_short_schedules():
    model = build_model("mobilenet_v3_small", num_classes=3)
    moms = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert moms == {0.1}


def test_long_epochs_report_step_progress(tiny_dataset, tmp_path, monkeypatch):
    # an epoch of a real run takes minutes on a CPU; it must not be silent until it ends
    monkeypatch.setattr(engine, "PROGRESS_EVERY_S", 0.0)
    args = ["--data", str(tiny_dataset), "--arch", "baseline_cnn", "--image-size", "32", "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--no-shift-eval", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(train_main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip().startswith("epoch 1: step")]
    steps = [int(ln.split("step ")[1].split("/")[0]) for ln in lines]
    assert steps and steps == sorted(steps) and steps[0] == 1
    assert all("img/s" in ln and "ETA" in ln for ln in lines)


def test_pack_split_then_train_on_the_copy_and_test_on_the_originals(tiny_dataset, tmp_path):
    """The GPU-machine route: pack a split as JPEG, train on the copy, judge best.pt on the original files."""
    import zipfile

    first = tmp_path / "first"
    _train(tiny_dataset, first, "--no-shift-eval", epochs=1)
    original = load_manifest(first / "split.json")
    packed = tmp_path / "packed"
    tool = Path(__file__).resolve().parents[1] / "tools" / "pack_split.py"
    res = subprocess.run([sys.executable, str(tool), str(first / "split.json"), str(packed), "--size", "32",
                          "--quality", "90", "--test-quality", "30"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    copy = json.loads((packed / "split.json").read_text())
    assert [(r["label"], r["split"]) for r in copy["items"]] == [(r["label"], r["split"]) for r in original["items"]]
    assert all(r["path"].endswith(".jpg") for r in copy["items"])
    with zipfile.ZipFile(packed / "data.zip") as zf:
        zf.extractall(tmp_path / "unz")
    pp = Preprocessing(size=32)
    for orig, new in list(zip(original["items"], copy["items"]))[:10]:
        want = resize_to_uint8(Image.open(item_path(original, orig)), pp).astype(int)
        got = np.asarray(Image.open(tmp_path / "unz" / "data" / new["source"] / new["path"]).convert("L")).astype(int)
        assert got.shape == want.shape == (32, 32)
        assert np.abs(got - want).mean() < (12 if new["split"] == "test" else 6)  # lossy, but the same image

    run = tmp_path / "gpu-run"
    src = original["sources"][0]["name"]
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path / "unz" / "data" / src), "--split", str(packed / "split.json"),
                                          "--arch", "baseline_cnn", "--image-size", "32", "--epochs", "2",
                                          "--batch-size", "16", "--threads", "1", "--no-shift-eval", "--out", str(run)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    on_copy = json.loads((run / "test_report.json").read_text())
    assert on_copy["manifest"] == str((run / "split.json").resolve())

    res = CliRunner().invoke(train_main, ["--out", str(run), "--test-only", "--split", str(first / "split.json"),
                                          "--no-shift-eval", "--threads", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((run / "test_report.json").read_text())
    n_test = sum(r["split"] == "test" for r in original["items"])
    assert report["n"] == n_test and report["manifest"] == str((first / "split.json").resolve())
    assert report["sources"] == original["sources"]
    printed = [line for line in res.output.splitlines() if line.startswith("{")]
    assert json.loads(printed[-1])["accuracy"] == report["accuracy"]
    ck = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert ck["test_metrics"]["manifest"] == report["manifest"]


def test_test_only_needs_a_checkpoint_and_matching_classes(tiny_dataset, tmp_path):
    res = CliRunner().invoke(train_main, ["--out", str(tmp_path / "none"), "--test-only"])
    assert res.exit_code != 0 and "no best.pt" in res.output
    run = tmp_path / "run"
    _train(tiny_dataset, run, "--no-shift-eval", epochs=1)
    other = json.loads((run / "split.json").read_text())
    other["classes"] = ["A", "B", "C"]
    other["items"] = [{**r, "label": {"Bottom": "A", "Stripes": "B", "Top": "C"}[r["label"]]} for r in other["items"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = CliRunner().invoke(train_main, ["--out", str(run), "--test-only", "--split", str(tmp_path / "other.json")])
    assert res.exit_code != 0 and "has classes" in str(res.exception or res.output)


def test_split_seed_keeps_the_test_set_while_the_training_seed_varies(tiny_dataset, tmp_path):
    _train(tiny_dataset, tmp_path / "run", "--seed", "1", "--split-seed", "3", "--no-shift-eval", epochs=1)
    written = load_manifest(tmp_path / "run" / "split.json")
    assert written["items"] == make_split(tiny_dataset, seed=3)["items"]
    assert written["items"] != make_split(tiny_dataset, seed=1)["items"]
