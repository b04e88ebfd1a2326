"""cxr-export adds the class-activation map output ``cam`` (fp32 and int8) where the head allows.

A mobilenet_v2 at 64 px (a 2x2 map) trained a few steps on the synthetic classes of
test_export.py; the baseline CNN of that file has no map and its metadata must say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from test_export import CLASSES, make_run  # noqa: E402

from cxr.export import cam as cam_mod  # noqa: E402
from cxr.export import cli as export_cli  # noqa: E402
from cxr.export import parity  # noqa: E402
from cxr.runtime.metadata import decode_props  # noqa: E402


@pytest.fixture(scope="module")
def cam_export(tmp_path_factory):
    ckpt, root = make_run(tmp_path_factory.mktemp("camrun"), arch="mobilenet_v2", size=64)
    out = tmp_path_factory.mktemp("camout") / "m.onnx"
    res = CliRunner().invoke(export_cli.main, [
        str(ckpt), "--out", str(out), "--int8", "--int8-scheme", "u8s8-minmax", "--calib-count", "12",
        "--int8-max-drop", "100", "--int8-min-agreement", "0", "--bench-runs", "3", "--no-card",
        # a 64 px net trained for seconds: its int8 input-check score is noise, and the bound would
        # (rightly) refuse it; this test is about the maps
        "--qc-int8-min-spearman", "-1"])
    return res, out, root


def _meta(path: Path) -> dict:
    return decode_props({p.key: p.value for p in onnx.load(str(path)).metadata_props}).extra


def _images(root: Path, n: int = 9) -> np.ndarray:
    from cxr.runtime.imageio import load_image
    from cxr.runtime.preprocess import Preprocessing, preprocess

    pp = Preprocessing(size=64, mean=0.5, std=0.25)
    files = sorted(root.rglob("*.png"))[::7][:n]
    return np.stack([preprocess(load_image(f), pp) for f in files])


def test_fp32_and_int8_have_cam_output_and_metadata(cam_export):
    res, out, _ = cam_export
    assert res.exit_code == 0, res.output
    int8 = out.with_name("m.int8.onnx")
    for path in (out, int8):
        graph = onnx.load(str(path)).graph
        # probabilities stays output 0; the input check appends qc_score (docs/input-check.md)
        assert [o.name for o in graph.output] == ["probabilities", "cam", "qc_score", "shift_features"]
        meta = _meta(path)["cam"]
        assert meta["available"] and meta["output"] == "cam" and meta["layer"] == "features"
        assert meta["grid"] == [2, 2]
        assert meta["parity"]["fp32_vs_pytorch"]["passed"]
    assert _meta(int8)["cam"]["parity"]["int8_vs_fp32"]["passed"]
    report = json.loads(out.with_name("m.report.json").read_text())
    assert report["parity_cam"]["max_rel_diff"] <= 1e-3
    assert report["models"]["onnx_int8"]["cam_vs_fp32"]["n_images"] == report["parity_cam"]["n_images"] > 0
    # the int8 map's 1x1 conv is kept in float, like the softmax
    assert "Conv" in _meta(int8)["quantization"]["nodes_kept_float"].values()
    from cxr.export.card import model_card

    card = model_card({p.key: p.value for p in onnx.load(str(int8)).metadata_props})
    assert "heatmaps: output `cam` [N, K, 2, 2]" in card and "int8 vs fp32 p95 worst cell" in card


def test_cam_spatial_mean_is_the_logit(cam_export):
    """The CAM identity: softmax over each map's mean (divided by the calibration temperature
    baked into the graph, docs/triage.md) gives back the probabilities output."""
    import onnxruntime as ort

    res, out, root = cam_export
    assert res.exit_code == 0, res.output
    x = _images(root)
    calibration = _meta(out).get("calibration")
    t = calibration["temperature"] if calibration else 1.0
    # int8: the head's Gemm is quantized while the map's conv stays float, so only close
    for path, atol in ((out, 1e-5), (out.with_name("m.int8.onnx"), 1e-2)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs, cam = sess.run(["probabilities", "cam"], {"image": x})
        assert cam.shape == (len(x), len(CLASSES), 2, 2)
        logits = cam.mean(axis=(2, 3)) / t
        e = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs, atol=atol)
        # asking for the probabilities alone gives the same numbers
        np.testing.assert_array_equal(sess.run(["probabilities"], {"image": x})[0], probs)


def test_runtime_reads_cam(cam_export):
    from cxr.runtime.session import load_model

    res, out, root = cam_export
    assert res.exit_code == 0, res.output
    model = load_model(out)
    assert model.has_cam and model.cam_output == "cam"
    x = _images(root, 3)
    p, cam, _, _ = model.run_outputs(x, cam=True)
    np.testing.assert_array_equal(p, model.run(x))
    assert cam.shape == (3, 3, 2, 2) and cam.dtype == np.float32


def test_architectures_without_cam_say_why(tmp_path):
    assert not cam_mod.cam_support("baseline_cnn").available
    assert "dense" in cam_mod.cam_support("baseline_cnn").reason
    assert not cam_mod.cam_support("mobilenet_v3_small").available
    assert not cam_mod.cam_support("squeezenet1_0").available
    assert all(cam_mod.cam_support(a).available for a in ("mobilenet_v2", "resnet18", "efficientnet_b0"))
    ckpt, _ = make_run(tmp_path / "run")
    out = tmp_path / "b.onnx"
    res = CliRunner().invoke(export_cli.main, [str(ckpt), "--out", str(out), "--no-bench", "--no-card"])
    assert res.exit_code == 0, res.output
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities", "qc_score", "shift_features"]  # no cam
    meta = _meta(out)["cam"]
    assert meta == {"available": False, "reason": cam_mod.cam_support("baseline_cnn").reason}
    from cxr.export.card import model_card

    assert "heatmaps: none (the head flattens" in model_card({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    from cxr.runtime.session import load_model

    assert not load_model(out).has_cam


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_other_heads_export_a_cam_matching_torch(arch, tmp_path):
    from cxr.export import onnx_export
    from cxr.train.models import build_model
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(arch, 3, 1, 64).eval()
    path = tmp_path / f"{arch}.onnx"
    onnx_export.export_fp32(model, (1, 64, 64), path, cam_arch=arch)
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    probs, cam = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.inference_mode():
        ref = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-5)  # the rewired head gives the model's own answer
    ref_cam = cam_mod.torch_cam_runner(cam_mod.with_softmax_and_cam(model, arch))(x)
    assert parity.compare_cam(ref_cam, cam, "random", 1e-3, "fp32").passed


def test_cam_parity_fails_on_a_moved_map():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 3, 7, 7)).astype(np.float32)
    assert parity.compare_cam(ref, ref + 1e-6, "x", 1e-3, "same").passed
    moved = np.roll(ref, 1, axis=3)
    bad = parity.compare_cam(ref, moved, "x", 1e-3, "rolled")
    assert not bad.passed and bad.peak_agreement < 1.0
    # int8's criterion: one bad map in 120 passes at p95, not at max; 12 in 120 fail both
    many = rng.normal(size=(40, 3, 7, 7)).astype(np.float32)
    noisy = many.copy()
    noisy[0, 0, 0, 0] += 10 * np.ptp(many[0, 0])
    assert parity.compare_cam(many, noisy, "x", 0.2, "i8", criterion="p95").passed
    assert not parity.compare_cam(many, noisy, "x", 0.2, "i8", criterion="max").passed
    noisy[:12, 1, 3, 3] += 10 * np.ptp(many[:12, 1], axis=(1, 2))
    assert not parity.compare_cam(many, noisy, "x", 0.2, "i8", criterion="p95").passed
    assert not parity.compare_cam(many, noisy, "x", 0.2, "i8", criterion="max").passed
    with pytest.raises(parity.ParityError, match="class-activation map parity FAILED"):
        parity.require_cam(bad)
