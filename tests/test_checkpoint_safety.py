"""Checkpoints are data, never code: a .pt whose pickle would run a command is refused by
cxr-export, cxr-train --resume and cxr-train --test-only, and nothing in it runs."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="checkpoints need the 'train' extra (torch)")

from click.testing import CliRunner  # noqa: E402

from cxr.export import cli as export_cli  # noqa: E402
from cxr.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_plain  # noqa: E402
from cxr.train.cli import main as train_main  # noqa: E402


class _RunsCommand:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _OpensFile:
    """Unpickling this creates a file through builtins.open (no shell needed)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _hostile_checkpoint(path: pathlib.Path, payload) -> pathlib.Path:
    """A plausible cxr checkpoint with the payload tucked into its config."""
    torch.save({"format": "cxr-checkpoint/1", "arch": "baseline_cnn", "classes": ["A", "B", "C"],
                "preprocess": {"size": 32}, "state_dict": {"w": torch.zeros(2)},
                "model_kwargs": {"num_classes": 3}, "config": {"note": payload}}, path)
    return path


def _pattern(label: str, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(90, 20, (32, 32))
    if label == "Top":
        img[:16] += 110
    elif label == "Bottom":
        img[16:] += 110
    else:
        img[::4] += 110
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real one-epoch cxr-train run (baseline_cnn, 32 px, 36 images)."""
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in ("Bottom", "Stripes", "Top"):
        (data / c).mkdir()
        for i in range(12):
            Image.fromarray(_pattern(c, rng)).save(data / c / f"{c}-{i}.png")
    out = tmp_path_factory.mktemp("runs") / "run"
    res = CliRunner().invoke(train_main, [
        "--data", str(data), "--arch", "baseline_cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--threads", "1", "--patience", "0", "--no-shift-eval", "--workers", "1", "--out", str(out)],
        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def _copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


PAYLOADS = {
    "os.system": lambda marker: _RunsCommand(f"touch {shlex.quote(str(marker))}"),
    "builtins.open": lambda marker: _OpensFile(str(marker)),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_hostile_checkpoint_is_refused_by_every_command(tiny_run, tmp_path, kind):
    marker = tmp_path / "PWNED"
    evil = _hostile_checkpoint(tmp_path / "evil.pt", PAYLOADS[kind](marker))
    # the file really carries the payload (read from its opcodes, without running it)
    assert any(kind.split(".")[1] in g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(evil)))

    # 1. cxr-export evil.pt
    res = CliRunner().invoke(export_cli.main, [str(evil), "--out", str(tmp_path / "x.onnx"), "--no-bench"])
    assert res.exit_code != 0
    assert "refused" in res.output and "re-save" in res.output, res.output
    assert "Traceback" not in res.output
    assert not marker.exists()
    assert not (tmp_path / "x.onnx").exists()

    # 2. cxr-train --resume on a run whose last.pt is hostile
    run = _copy_run(tiny_run, tmp_path / "resume-run")
    _hostile_checkpoint(run / "last.pt", PAYLOADS[kind](marker))
    res = CliRunner().invoke(train_main, ["--out", str(run), "--resume", "--epochs", "2", "--threads", "1"])
    assert res.exit_code != 0
    msg = str(res.exception) if isinstance(res.exception, SystemExit) else res.output
    assert "cannot resume" in msg and "refused" in msg, msg
    assert not marker.exists()
    assert len(json.loads((run / "metrics.json").read_text())) == 1  # no epoch was trained on top

    # 3. cxr-train --test-only on a run whose best.pt is hostile
    run = _copy_run(tiny_run, tmp_path / "test-run")
    _hostile_checkpoint(run / "best.pt", PAYLOADS[kind](marker))
    res = CliRunner().invoke(train_main, ["--out", str(run), "--test-only", "--no-shift-eval", "--threads", "1"])
    assert res.exit_code != 0
    msg = str(res.exception) if isinstance(res.exception, SystemExit) else res.output
    assert "refused" in msg, msg
    assert not marker.exists()


def test_hostile_checkpoint_refused_by_the_installed_cxr_export_command(tmp_path):
    """The console script itself (a fresh process): non-zero exit, clear message, no marker."""
    import shutil
    import subprocess

    exe = shutil.which("cxr-export")
    if exe is None:
        pytest.skip("cxr-export is not on PATH (pip install -e '.[train]')")
    marker = tmp_path / "PWNED"
    evil = _hostile_checkpoint(tmp_path / "evil.pt", PAYLOADS["os.system"](marker))
    proc = subprocess.run([exe, str(evil), "--out", str(tmp_path / "x.onnx"), "--no-bench"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "posix.system" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_real_run_checkpoints_are_plain_data_and_resume(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(run / name)) == []
    last = load_checkpoint(run / "last.pt")
    assert {"optimizer", "scheduler", "state_dict", "history"} <= set(last)
    assert json.loads((run / "config.json").read_text())["threads"] == 1
    res = CliRunner().invoke(train_main, ["--out", str(run), "--resume", "--epochs", "2", "--threads", "2"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[resume]" in res.output and "at epoch 1" in res.output
    assert json.loads((run / "config.json").read_text())["threads"] == 2  # where it runs: the command line wins
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())] == [1, 2]
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2
    # the optimizer really continued (its step count went on from the saved state)
    steps = [s["step"] for s in resumed["optimizer"]["state"].values()]
    first = [s["step"] for s in last["optimizer"]["state"].values()]
    assert steps and all(float(b) == 2 * float(a) for a, b in zip(first, steps))
    # finish re-saved best.pt with the test report, still plain data
    best = load_checkpoint(run / "best.pt")
    assert "test_metrics" in best
    res = CliRunner().invoke(train_main, ["--out", str(run), "--test-only", "--no-shift-eval", "--threads", "1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_legacy_checkpoint_with_numpy_values_is_refused_with_the_resave_recipe(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "cxr-checkpoint/1", "val_metrics": {"accuracy": np.float64(0.9)}}, legacy)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(legacy)
    msg = str(err.value)
    assert "multiarray.scalar" in msg and "save_checkpoint" in msg and "someone else" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle case; torch warns, then refuses
@pytest.mark.parametrize("content,fragment", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"PK\x03\x04truncated zip", "not a readable PyTorch checkpoint"),
    (b"\x80\x04K\x01.", "not a readable PyTorch checkpoint"),  # a bare pickle, legacy format
])
def test_garbage_is_a_clear_error(tmp_path, content, fragment):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(p)


def test_wrong_format_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match="cxr-checkpoint/1"):
        load_checkpoint(tmp_path / "o.pt")
    torch.save([torch.zeros(1)], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="format: 'list'"):
        load_checkpoint(tmp_path / "l.pt")


def test_to_plain_converts_what_training_produces(tmp_path):
    Pair = namedtuple("Pair", "a b")
    raw = {
        "format": "cxr-checkpoint/1",
        "np_float": np.float32(0.5), "np_int": np.int64(7), "np_bool": np.bool_(True),
        "array": np.arange(4, dtype=np.float32), "path": pathlib.Path("/data/run"),
        "fractions": (0.7, 0.15, 0.15), "pair": Pair(1, 2), "ordered": OrderedDict(x=torch.ones(2)),
        "labels": {"b", "a"}, "device": torch.device("cpu"), "param": torch.nn.Parameter(torch.ones(3)),
        "nested": [{"k": np.float64(1.25)}], 3: "int keys (optimizer state) stay",
    }
    save_checkpoint(raw, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt.tmp").exists()
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck["np_float"] == 0.5 and type(ck["np_float"]) is float
    assert ck["np_int"] == 7 and type(ck["np_int"]) is int
    assert ck["np_bool"] is True
    assert torch.equal(ck["array"], torch.arange(4, dtype=torch.float32))
    assert ck["path"] == "/data/run" and ck["fractions"] == (0.7, 0.15, 0.15)
    assert ck["pair"] == (1, 2) and type(ck["pair"]) is tuple
    assert type(ck["ordered"]) is dict and torch.equal(ck["ordered"]["x"], torch.ones(2))
    assert ck["labels"] == ["a", "b"] and ck["device"] == "cpu"
    assert type(ck["param"]) is torch.Tensor and ck["nested"][0]["k"] == 1.25 and ck[3].startswith("int")


def test_to_plain_refuses_objects_it_cannot_flatten():
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['fn'\].*not plain data"):
        to_plain({"config": {"fn": _RunsCommand("true")}})


def test_optimizer_and_scheduler_state_round_trip_through_the_safe_loader(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    save_checkpoint({"format": "cxr-checkpoint/1", "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                    tmp_path / "s.pt")
    ck = load_checkpoint(tmp_path / "s.pt")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
