"""cxr-export end to end on a tiny model trained in the test on synthetic, learnable images.

The three classes differ in brightness and texture, so a few optimiser steps separate them and
fp32/int8 agreement is a meaningful number rather than agreement on noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

torch = pytest.importorskip("torch")

from cxr.export import cli as export_cli  # noqa: E402
from cxr.export import onnx_export  # noqa: E402
from cxr.runtime.imageio import load_image  # noqa: E402
from cxr.runtime.metadata import decode_props  # noqa: E402
from cxr.runtime.preprocess import Preprocessing, preprocess  # noqa: E402

CLASSES = ["bright", "dark", "stripes"]
PER_SPLIT = {"train": 10, "val": 6, "test": 6}


def _synthetic(label: str, rng: np.random.Generator) -> np.ndarray:
    h = w = int(rng.integers(36, 48))
    noise = rng.normal(0, 12, (h, w))
    if label == "bright":
        img = 185 + noise
    elif label == "dark":
        img = 60 + noise
    else:
        img = 120 + 70 * ((np.arange(w) // 3) % 2)[None, :] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_run(base: Path, seed: int = 0, classes: list[str] | None = None,
             label_smoothing: float = 0.0, arch: str = "baseline_cnn", size: int = 32) -> tuple[Path, Path]:
    """Write a labelled folder, a split manifest and a trained contract checkpoint; returns
    (checkpoint path, data root). ``classes`` renames the bright/dark/stripes patterns (in that
    order); ``label_smoothing`` > 0 trains an under-confident model."""
    from cxr.train.models import build_model

    rng = np.random.default_rng(seed)
    root = base / "data"
    run_dir = base / "run"
    run_dir.mkdir(parents=True)
    items = []
    names = dict(zip(CLASSES, classes or CLASSES))
    for pattern, c in names.items():
        (root / c / "images").mkdir(parents=True)
        n = 0
        for split, k in PER_SPLIT.items():
            for _ in range(k):
                rel = f"{c}/images/{c}-{n}.png"
                Image.fromarray(_synthetic(pattern, rng), mode="L").save(root / rel)
                items.append({"path": rel, "label": c, "split": split})
                n += 1
    manifest = {"format": "cxr-split/1", "root": str(root), "seed": seed,
                "fractions": {"train": 0.45, "val": 0.27, "test": 0.28}, "classes": list(names.values()), "items": items}
    (run_dir / "split.json").write_text(json.dumps(manifest))
    man_sha = hashlib.sha256((run_dir / "split.json").read_bytes()).hexdigest()

    pp = Preprocessing(size=size, resize="squash", mean=0.5, std=0.25)
    train = [it for it in items if it["split"] == "train"]
    x = torch.from_numpy(np.stack([preprocess(load_image(root / it["path"]), pp) for it in train]))
    y = torch.tensor([list(names.values()).index(it["label"]) for it in train])
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=3, in_channels=1, input_size=size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        opt.step()
    model.eval()
    sizes = {s: sum(1 for it in items if it["split"] == s) for s in PER_SPLIT}
    ckpt = {
        "format": "cxr-checkpoint/1", "arch": arch, "classes": list(names.values()), "preprocess": pp.to_dict(),
        "state_dict": model.state_dict(),
        "model_kwargs": {"num_classes": 3, "in_channels": 1, "input_size": size},
        "epoch": 1, "val_metrics": {"accuracy": 1.0},
        "test_metrics": {"n": sizes["test"], "accuracy": 1.0, "macro_f1": 1.0,
                         "per_class": {c: {"sensitivity": 1.0} for c in names.values()}},
        "training_data": {"name": "synthetic-3", "root": str(root), "class_counts": {c: 22 for c in names.values()},
                          "split_sizes": sizes, "manifest": "split.json", "manifest_sha256": man_sha},
        "config": {"arch": arch, "epochs": 1, "command": f"cxr-train data --arch {arch} --size {size}"},
    }
    path = run_dir / "best.pt"
    torch.save(ckpt, path)
    return path, root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("exportrun"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """One fp32+int8 export shared by the read-only checks below (exporting costs seconds)."""
    ckpt, _ = run
    out = tmp_path_factory.mktemp("out") / "tiny.onnx"
    res = CliRunner().invoke(export_cli.main, [
        str(ckpt), "--out", str(out), "--int8", "--int8-scheme", "u8s8-minmax,s8s8-minmax,u8s8-percentile",
        "--calib-count", "12", "--bench-runs", "5", "--keep-float", "classifier"])
    return res, out


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_fp32_export_passes_parity_and_is_self_describing(run, exported):
    res, out = exported
    assert res.exit_code == 0, res.output
    assert out.is_file() and not Path(str(out) + ".partial").exists()
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities", "qc_score", "shift_features"]  # output 0 stays probabilities
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    info = decode_props(_props(out))
    assert info.classes == CLASSES and info.precision == "fp32" and info.arch == "baseline_cnn"
    assert info.input_name == "image" and info.preprocess.size == 32
    ex = info.extra
    assert ex["checkpoint_sha256"] == hashlib.sha256(run[0].read_bytes()).hexdigest()
    assert ex["parity"]["passed"] and ex["parity"]["max_abs_diff"] <= 1e-4
    assert ex["parity"]["top1_agreement"] == 1.0 and ex["parity"]["n_images"] == 18
    assert ex["metrics"]["training"]["test"]["accuracy"] == 1.0
    assert ex["metrics"]["export"]["onnx_fp32"]["accuracy"] >= 0.9  # classes are learnable
    assert ex["training_data"]["name"] == "synthetic-3"
    for key in ("created", "producer", "intended_use", "reproduce"):
        assert ex[key]
    assert "cxr-train data" in json.loads(ex["reproduce"])["train"]

    # the runtime's way of running it: probabilities over the classes, any batch size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    img = Image.fromarray(_synthetic("dark", np.random.default_rng(5)), mode="L")
    x = np.stack([preprocess(img, info.preprocess)] * 3)
    p = sess.run(None, {info.input_name: x})[0]
    assert p.shape == (3, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert CLASSES[int(p[0].argmax())] == "dark"


def test_report_and_card_written(exported):
    res, out = exported
    report = json.loads(out.with_name("tiny.report.json").read_text())
    assert report["parity"]["passed"]
    assert set(report["models"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    for m in report["models"].values():
        assert m["speed"]["latency_ms_p50"] > 0 and m["speed"]["throughput_ips"] > 0
        assert m["size_bytes"] > 0 and m["metrics"]["per_class"]["dark"]["sensitivity"] is not None
    assert "vnni" in report["cpu"] and report["cpu"]["model"]
    assert "ONNX int8" in res.stdout and "p50 ms b1" in res.stdout and "VNNI" in res.stdout
    card = out.with_name("tiny.card.md").read_text()
    assert "not a diagnosis" in card and "bright, dark, stripes" in card and "```sh" in card
    card8 = out.with_name("tiny.int8.card.md").read_text()
    assert "int8" in card8 and "nodes kept in float" in card8


def test_int8_model_valid_and_agreement_reported(exported):
    res, out = exported
    int8 = out.with_name("tiny.int8.onnx")
    assert int8.is_file() and not Path(str(int8) + ".partial").exists()
    model = onnx.load(str(int8))
    onnx.checker.check_model(model)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    read = {i for n in model.graph.node for i in n.input}  # quantized from an fp32 file that had shift_features:
    assert [t.name for t in model.graph.initializer if t.name not in read] == []  # its Q/DQ constants went too
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))  # and no constant of the new output was added twice
    info = decode_props(_props(int8))
    assert info.precision == "int8" and info.classes == CLASSES
    q = info.extra["quantization"]
    assert q["name"] in ("u8s8-minmax", "s8s8-minmax", "u8s8-percentile")
    assert q["format"] == "QDQ" and q["per_channel"] and q["calibration"]["source_split"] == "train"
    assert q["calibration"]["count"] == 12
    assert q["validation"]["top1_agreement"] >= 0.99 and q["validation"]["accuracy_drop_points"] <= 0.5
    assert sorted(q["nodes_kept_float"].values()) == ["Div", "Gemm", "Softmax"]  # Div: the temperature
    assert set(q["candidates"]) == {"u8s8-minmax", "s8s8-minmax", "u8s8-percentile"}
    report = json.loads(out.with_name("tiny.report.json").read_text())
    assert report["int8"]["status"] == "ok"
    assert report["models"]["onnx_int8"]["agreement_vs_fp32"] is not None
    # chosen = fastest within bound
    ok = [c for c in report["int8"]["candidates"] if c["within_bound"]]
    assert report["int8"]["chosen"]["metrics"]["latency_ms_p50"] == min(c["metrics"]["latency_ms_p50"] for c in ok)


def test_cxr_infer_info_and_runtime_loader_read_exported_models(exported):
    """Round trip through the runtime (written concurrently: skipped where it is not there yet)."""
    runtime_cli = pytest.importorskip("cxr.runtime.cli", reason="runtime CLI not written yet")
    group = getattr(runtime_cli, "cli", None) or runtime_cli.main
    _, out = exported
    for path, precision in ((out, "fp32"), (out.with_name("tiny.int8.onnx"), "int8")):
        res = CliRunner().invoke(group, ["info", str(path)])
        assert res.exit_code == 0, res.output
        assert "baseline_cnn" in res.output and "stripes" in res.output and precision in res.output
    session = pytest.importorskip("cxr.runtime.session")
    model = session.load_model(out.with_name("tiny.int8.onnx"))
    assert model.info.classes == CLASSES and model.info.precision == "int8"


def test_broken_parity_exits_nonzero_and_leaves_no_model(run, tmp_path, monkeypatch):
    """Perturb the PyTorch weights after the graph was exported: ONNX no longer matches."""
    real = onnx_export.export_fp32

    def export_then_perturb(model, *args, **kwargs):
        info = real(model, *args, **kwargs)
        with torch.no_grad():
            model.classifier[-1].weight.mul_(0.01)  # softens every probability
        return info

    monkeypatch.setattr(onnx_export, "export_fp32", export_then_perturb)
    out = tmp_path / "broken.onnx"
    res = CliRunner().invoke(export_cli.main, [str(run[0]), "--out", str(out), "--no-bench"])
    assert res.exit_code == export_cli.EXIT_PARITY, res.output
    assert "parity FAILED" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mismatched_preprocessing_fails_parity(run, tmp_path, monkeypatch):
    """The ONNX side fed differently preprocessed images than PyTorch: a real-world bug parity must catch."""
    from cxr.export import evaluate

    real_runner = evaluate.ort_runner

    def runner_with_other_normalisation(session):
        run_ = real_runner(session)
        return lambda x: run_(x * 0.5 + 0.25)

    monkeypatch.setattr(export_cli, "ort_runner", runner_with_other_normalisation)
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(export_cli.main, [str(run[0]), "--out", str(out), "--no-bench", "--exporter", "torchscript"])
    assert res.exit_code == export_cli.EXIT_PARITY, res.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_int8_impossible_bound_refuses(run, tmp_path):
    out = tmp_path / "r.onnx"
    res = CliRunner().invoke(export_cli.main, [
        str(run[0]), "--out", str(out), "--int8", "--int8-scheme", "u8s8-minmax", "--calib-count", "6",
        "--int8-max-drop", "-100", "--no-bench", "--no-card"])
    assert res.exit_code == export_cli.EXIT_INT8, res.output
    assert "REFUSED" in res.output
    assert out.is_file()  # fp32 passed its own parity and stays
    assert not out.with_name("r.int8.onnx").exists() and not out.with_name("r.int8.onnx.partial").exists()
    report = json.loads(out.with_name("r.report.json").read_text())
    assert report["int8"]["status"] == "refused" and not report["int8"]["candidates"][0]["within_bound"]


def test_images_folder_and_data_root_override(run, tmp_path):
    """--images with an unlabelled folder (parity needs no labels) and --data-root after the data moved."""
    import shutil

    ckpt, root = run
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((moved / "dark" / "images").glob("*.png"))[:5]:
        shutil.copy(p, flat / p.name)
    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(export_cli.main, [str(ckpt), "--out", str(out), "--images", str(flat),
                                               "--data-root", str(moved), "--no-bench", "--no-card",
                                               "--train-command", "# packed first\ncxr-train --data elsewhere"])
    assert res.exit_code == 0, res.output
    info = decode_props(_props(out))
    assert info.extra["parity"]["n_images"] == 5 and info.extra["parity"]["passed"]
    reproduce = json.loads(info.extra["reproduce"])
    assert reproduce["train"] == "# packed first\ncxr-train --data elsewhere"
    assert "--data-root" in reproduce["export"] and "--train-command" not in reproduce["export"]


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, bad)
    res = CliRunner().invoke(export_cli.main, [str(bad), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == export_cli.EXIT_INPUT
    assert "cxr-checkpoint/1" in res.output


def test_manifest_check_knows_the_split_a_checkpoint_was_tested_on(run, tmp_path):
    """Trained on a packed copy, tested on the originals: the originals' manifest is expected, others warned about."""
    ckpt_path, _ = run
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    real_sha = hashlib.sha256((ckpt_path.parent / "split.json").read_bytes()).hexdigest()
    ck["training_data"] = {**ck["training_data"], "manifest_sha256": "0" * 64}  # trained on another manifest
    outputs = {}
    for case, tested_sha in (("tested", real_sha), ("unknown", "1" * 64)):
        ck["test_metrics"] = {**ck["test_metrics"], "manifest_sha256": tested_sha}
        path = tmp_path / f"{case}.pt"
        torch.save(ck, path)
        res = CliRunner().invoke(export_cli.main, [str(path), "--out", str(tmp_path / f"{case}.onnx"),
                                                   "--manifest", str(ckpt_path.parent / "split.json"),
                                                   "--no-bench", "--no-card"])
        assert res.exit_code == 0, res.output
        outputs[case] = res.output
    assert "WARNING" not in outputs["tested"] and "the checkpoint was tested on" in outputs["tested"]
    assert "WARNING" in outputs["unknown"] and "may not be the split" in outputs["unknown"]
