"""cxr-export's input check on a tiny trained model: the qc_score output in fp32 and int8, its
parity proof, the thresholds chosen on the validation split (per source), the development folder,
the card, and the runtime reading all of it back."""

from __future__ import annotations

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
from cxr.export import input_check as ic  # noqa: E402
from cxr.export import input_check_report as icr  # noqa: E402
from cxr.runtime import Classifier  # noqa: E402
from cxr.runtime.imageio import load_image  # noqa: E402
from cxr.runtime.preprocess import Preprocessing, preprocess  # noqa: E402
from synthetic import shaded  # noqa: E402
from test_export import make_run  # noqa: E402


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _dev_folder(root: Path) -> Path:
    rng = np.random.default_rng(5)
    for kind in ("photo", "noise"):
        (root / kind / "images").mkdir(parents=True)
    for i in range(4):
        rgb = np.stack([rng.integers(0, 60, (40, 40)), rng.integers(100, 255, (40, 40)),
                        np.full((40, 40), 30)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "photo" / "images" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "noise" / "images" / f"n{i}.png")
    return root


@pytest.fixture(scope="module")
def run_two_sources(tmp_path_factory):
    """The test_export run, with its items split between two sources (alternating)."""
    base = tmp_path_factory.mktemp("qcrun")
    ckpt, root = make_run(base)
    man = ckpt.parent / "split.json"
    doc = json.loads(man.read_text())
    for i, it in enumerate(doc["items"]):
        it["source"] = "site-a" if i % 2 else "site-b"
    doc["format"] = "cxr-split/2"
    doc["sources"] = [{"name": "site-a", "root": doc["root"]}, {"name": "site-b", "root": doc.pop("root")}]
    man.write_text(json.dumps(doc))
    return ckpt, root, _dev_folder(base / "dev")


@pytest.fixture(scope="module")
def exported(run_two_sources, tmp_path_factory):
    ckpt, _, dev = run_two_sources
    out = tmp_path_factory.mktemp("qcout") / "tiny.onnx"
    res = CliRunner().invoke(export_cli.main, [
        str(ckpt), "--out", str(out), "--int8", "--int8-scheme", "u8s8-minmax,s8s8-minmax", "--calib-count", "12",
        "--no-bench", "--keep-float", "classifier", "--qc-components", "8", "--ood-dir", str(dev)])
    return res, out


def _val_scores(session, manifest: Path, root: Path, pp: Preprocessing):
    doc = json.loads(manifest.read_text())
    val = [it for it in doc["items"] if it["split"] == "val"]
    x = np.stack([preprocess(load_image(root / it["path"]), pp) for it in val])
    return session.run(["qc_score"], {"image": x})[0].astype(np.float64), [it["source"] for it in val]


def test_score_output_in_fp32_and_int8_with_parity(exported):
    res, out = exported
    assert res.exit_code == 0, res.output
    int8 = out.with_name("tiny.int8.onnx")
    report = json.loads(out.with_name("tiny.report.json").read_text())
    for path in (out, int8):
        m = onnx.load(str(path))
        assert [o.name for o in m.graph.output] == ["probabilities", "qc_score", "shift_features"]
        dims = [d.dim_param or d.dim_value for d in m.graph.output[1].type.tensor_type.shape.dim]
        assert len(dims) == 1 and isinstance(dims[0], str)  # [N], dynamic
    par = report["input_check"]["parity"]
    assert par["passed"] and par["n_images"] == 18 and par["max_abs_diff"] <= 1e-3 + 1e-4 * 1e3
    assert "input check (fp32)" in res.output and "input check (int8)" in res.output
    q8 = json.loads(_props(int8)["cxr.input_check"])
    assert q8["precision"] == "int8" and 0 <= q8["int8_vs_fp32"]["verdict_agreement"] <= 1
    assert q8["parity"]["vs"] == "fp32" and np.isfinite(q8["parity"]["max_abs_diff"])
    # the score's own branch stayed float: no quantize/dequantize node serves only qc_score
    branch = ic.nodes_serving_only(onnx.load(str(int8)), ["qc_score"], "probabilities")
    assert branch and not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in branch)
    assert any(n.op_type == "MatMul" for n in branch)
    # and it pools the taps from their uint8 tensors, each read once (pool_quantized_taps)
    assert any(n.op_type == "Cast" for n in branch)


def test_thresholds_follow_the_validation_rule(run_two_sources, exported):
    ckpt, root, _ = run_two_sources
    res, out = exported
    pp = Preprocessing(size=32, resize="squash", mean=0.5, std=0.25)
    for path in (out, out.with_name("tiny.int8.onnx")):
        q = json.loads(_props(path)["cxr.input_check"])
        scores, sources = _val_scores(ort.InferenceSession(str(path)), ckpt.parent / "split.json", root, pp)
        src = np.array(sources)
        # each source's 95 % upper confidence bound on its 99th percentile (its largest score when the
        # source is too small for 95 % confidence: these sources have tens of images)
        per = {s: np.sort(scores[src == s])[min(_binomial_rank((src == s).sum(), 0.99, 0.95), (src == s).sum()) - 1]
               for s in ("site-a", "site-b")}
        lo = max(per.values())
        assert q["thresholds"]["unfamiliar"] == pytest.approx(lo, rel=1e-5, abs=1e-6)
        med = np.median(scores)
        assert q["thresholds"]["not_chest_xray"] == pytest.approx(med + 2 * (lo - med), rel=1e-5, abs=1e-6)
        for s in ("site-a", "site-b"):  # no source has more than 1 % above it
            assert (scores[src == s] > q["thresholds"]["unfamiliar"] + 1e-6).mean() <= 0.01
            assert q["validation"]["per_source"][s]["n"] == (src == s).sum()
        assert "99th percentile" in q["rule"] and "95% upper confidence bound" in q["rule"] and "median + 2" in q["rule"]


def _binomial_rank(n: int, q: float, confidence: float) -> int:
    """Smallest k with P(Binomial(n, q) <= k - 1) >= confidence, by exact integer binomials."""
    from fractions import Fraction
    from math import comb

    n, qf, cdf = int(n), Fraction(q).limit_denominator(10_000), Fraction(0)
    for j in range(n + 1):
        cdf += comb(n, j) * qf ** j * (1 - qf) ** (n - j)
        if cdf >= Fraction(confidence).limit_denominator(10_000):
            return j + 1
    return n + 1


@pytest.mark.parametrize("n", [1, 51, 145, 299, 300, 1312, 4000])
def test_confident_rank_matches_exact_binomial(n):
    assert icr.confident_rank(n, 99.0, 0.95) == _binomial_rank(n, 0.99, 0.95)


def test_confident_rank_bounds_the_percentile_with_its_confidence():
    # uniform scores: the true 99th percentile is 0.99; the chosen order statistic must lie at or
    # above it in at least 95 % of samples, and the next lower one in fewer
    rng = np.random.default_rng(0)
    n = 1312
    k = icr.confident_rank(n, 99.0, 0.95)
    u = np.sort(rng.random((4000, n)), axis=1)
    assert (u[:, k - 1] >= 0.99).mean() >= 0.94
    assert (u[:, k - 2] >= 0.99).mean() < 0.95
    assert k > int(np.ceil(0.99 * n))  # stricter than the plain percentile
    assert icr.confident_rank(100, 99.0, 0.95) == 101  # 100 images cannot bound a 99th percentile with 95 %


def test_dev_folder_reported_not_used(exported):
    res, out = exported
    report = json.loads(out.with_name("tiny.report.json").read_text())
    dev = report["input_check"]["development_set"]
    assert dev["flagged_per_kind"]["photo"] == 1.0 and dev["flagged_per_kind"]["noise"] == 1.0  # pixel checks
    assert 0 <= dev["auroc_score"] <= 1 and dev["auroc_with_pixel_checks"] == 1.0
    assert "not used to choose" in dev["used_for"]
    card = out.with_name("tiny.card.md").read_text()
    assert "## Input check" in card and "unfamiliar" in card and "not_chest_xray" in card and "site-a" in card


def test_runtime_reads_the_exported_check(run_two_sources, exported, tmp_path):
    _, root, dev = run_two_sources
    res, out = exported
    for path in (out, out.with_name("tiny.int8.onnx")):
        clf = Classifier.load(path)
        xr = list(clf.scan(root))
        assert all(r.qc in ("ok", "unfamiliar", "not_chest_xray") and r.qc_score is not None for r in xr)
        # these synthetic stand-ins are flat + white noise, which the pixel check calls noise-like;
        # the model's own score still finds most of them familiar
        lo = clf.model.input_check.unfamiliar
        assert sum(r.qc_score <= lo for r in xr) >= 0.8 * len(xr)
        assert all(r.qc == "not_chest_xray" for r in clf.scan(dev))


def test_no_input_check_gives_an_unchecked_model(run_two_sources, tmp_path):
    ckpt, root, _ = run_two_sources
    out = tmp_path / "plain.onnx"
    res = CliRunner().invoke(export_cli.main, [str(ckpt), "--out", str(out), "--no-bench", "--no-input-check"])
    assert res.exit_code == 0, res.output
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities"]
    assert "cxr.input_check" not in _props(out)
    clf = Classifier.load(out)
    assert {r.qc_score for r in clf.scan(root)} == {None}
    assert clf.classify(Image.fromarray(shaded(32, 32, 120))).qc == "unchecked"
    assert "None in this file" in out.with_name("plain.card.md").read_text()


def test_score_parity_failure_refuses_the_export(run_two_sources, tmp_path, monkeypatch):
    ckpt, _, _ = run_two_sources
    real = icr.torch_score_fn
    monkeypatch.setattr(icr, "torch_score_fn", lambda w: (lambda x: real(w)(x) + 0.01))
    out = tmp_path / "bad.onnx"
    res = CliRunner().invoke(export_cli.main, [str(ckpt), "--out", str(out), "--no-bench", "--qc-components", "8"])
    assert res.exit_code == export_cli.EXIT_PARITY, res.output
    assert "parity FAILED for qc_score" in res.output and not out.exists()


def test_ppca_distance_is_mahalanobis_with_the_ppca_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
    dm = ic.fit_depth("t", x, k=4)
    # the covariance the fit stands for, in standardised coordinates
    v = dm.components
    cov = v @ np.diag(1 / dm.inv_var) @ v.T + (np.eye(12) - v @ v.T) / dm.inv_residual
    y = rng.normal(size=(5, 12)) * 3
    z = (y - dm.mean) * dm.inv_sd
    want = np.einsum("ij,ij->i", z, np.linalg.solve(cov, z.T).T)
    np.testing.assert_allclose(dm.distance2(y), want, rtol=1e-8)
    train = dm.distance2(x)
    assert abs(((train - dm.center) * dm.inv_scale).mean()) < 1e-9  # standardised on the training split
    head = ic.build_head([dm])
    got = head([torch.as_tensor(y, dtype=torch.float32)]).numpy()
    np.testing.assert_allclose(got, ic.score_from_depths([dm], [y]), rtol=1e-4, atol=1e-3)


def test_taps_are_stage_ends_plus_a_distinct_head():
    from cxr.train.models import build_model

    taps = ic.find_taps(build_model("mobilenet_v2", num_classes=3, input_size=224), (1, 224, 224))
    # features.0 (the stem) is left out, and so are features.1's 112 px and features.3's 56 px maps
    assert [t.name for t in taps] == ["features.6", "features.10", "features.13", "features.16", "features.17",
                                      "features.18", "input.layout"]
    assert [t.dim for t in taps[:2]] == [2 * 32, 2 * 64]
    assert taps[-2].dim == 2 * 1280  # its pooled mean is the penultimate layer: no separate head tap
    assert taps[-1].kind == "layout" and taps[-1].dim == 64 and taps[-1].block == (28, 28)
    cnn = ic.find_taps(build_model("baseline_cnn", num_classes=3, input_size=32), (1, 32, 32))
    assert cnn[-2].kind == "head" and cnn[-2].dim == 128 and cnn[-1].kind == "layout"
    # every stage's map larger than 28 px: the last stage is still read
    big = ic.find_taps(build_model("baseline_cnn", num_classes=3, input_size=512), (1, 512, 512))
    assert [t.kind for t in big] == ["stage", "head", "layout"]


def test_layout_ignores_brightness_and_contrast_but_not_where_things_are():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.normal(size=(1, 1, 224, 224)).astype(np.float32)) * 0.2
    img[:, :, :, 100:124] += 1.0  # a bright band down the middle (a mediastinum)
    v = ic.layout(img, (28, 28))
    assert v.shape == (1, 64)
    np.testing.assert_allclose(v.mean().item(), 0, atol=1e-5)
    # another machine's brightness and contrast: the same layout (up to LAYOUT_EPS)
    np.testing.assert_allclose(ic.layout(img * 1.5 - 0.7, (28, 28)).numpy(), v.numpy(), atol=0.05)
    np.testing.assert_allclose(ic.layout(img * 0.5 + 0.2, (28, 28)).numpy(), v.numpy(), rtol=0.1, atol=0.02)
    # the same pixels in another place: another layout
    assert (ic.layout(torch.rot90(img, 1, (2, 3)), (28, 28)) - v).abs().max().item() > 1.0
    # 3 channels are averaged; a size that 8 does not divide leaves the remainder out
    assert ic.layout(img.repeat(1, 3, 1, 1), (28, 28)).shape == (1, 64) and ic.layout(torch.nn.functional.pad(img, (0, 3, 0, 3)), (28, 28)).shape == (1, 64)
    assert ic.layout(torch.zeros(2, 1, 230, 230), (28, 28)).abs().max().item() == 0.0  # a blank input stays finite


def test_pooled_statistics():
    t = torch.rand(2, 3, 20, 20)
    v = ic.pooled(t).numpy()
    np.testing.assert_allclose(v[:, :3], t.numpy().mean(axis=(2, 3)), rtol=1e-5)
    # the second statistic is the root mean square
    np.testing.assert_allclose(v[:, 3:], np.sqrt((t.numpy() ** 2).mean(axis=(2, 3))), rtol=1e-5)


def _qdq_tap_graph(zero_point: int, with_square: bool = True) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv (the network) and DQ -> pooled mean and mean of squares (the score's
    branch), as cxr-export's int8 graph has them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(zero_point, np.uint8), "z"),
            numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["t"], name="dq"),
             helper.make_node("Conv", ["t", "w"], ["y"], name="net"),
             helper.make_node("ReduceMean", ["t", "axes"], ["m"], name="mean", keepdims=0)]
    outs = ["y", "m"]
    if with_square:
        nodes += [helper.make_node("Mul", ["t", "t"], ["tt"], name="square"),
                  helper.make_node("ReduceMean", ["tt", "axes"], ["e2"], name="mean2", keepdims=0),
                  helper.make_node("Sqrt", ["e2"], ["rms"], name="sqrt")]
        outs.append("rms")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 6])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 4, 5, 6] if o == "y" else [2, 3])
                               for o in outs], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("zero_point,with_square", [(128, True), (0, True), (37, False)])
def test_pooling_quantized_taps_reads_the_uint8_tensor_once_and_keeps_the_values(zero_point, with_square):
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 6)).astype(np.float32) * 3
    model = _qdq_tap_graph(zero_point, with_square)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    branch = {"mean", "square", "mean2", "sqrt"}
    assert ic.pool_quantized_taps(model, branch) == ["dq"]
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 1 and casts[0].input[0] == "q"
    # the network still reads the dequantized tensor; the branch no longer does
    readers = {n.name for n in model.graph.node if "t" in n.input}
    assert readers == {"net"}


def test_pooling_quantized_taps_leaves_other_patterns_alone():
    model = _qdq_tap_graph(128)
    before = model.SerializeToString()
    # the only branch consumer named is the Conv: no pooling pattern, nothing to rewrite
    assert ic.pool_quantized_taps(model, {"net"}) == []
    assert model.SerializeToString() == before


def test_int8_whose_score_is_reordered_is_refused(run_two_sources, tmp_path, monkeypatch):
    """int8 gets its own thresholds, which absorb a shifted score but not a reordered one: below
    --qc-int8-min-spearman no int8 file is written, the fp32 file stays, and the exit says why."""
    ckpt, _, _ = run_two_sources
    monkeypatch.setattr(icr, "spearman", lambda a, b: 0.5)  # as a quantized score branch once measured 0.68
    out = tmp_path / "tiny.onnx"
    res = CliRunner().invoke(export_cli.main, [
        str(ckpt), "--out", str(out), "--int8", "--int8-scheme", "u8s8-minmax", "--calib-count", "12",
        "--no-bench", "--qc-components", "8"])
    assert res.exit_code == export_cli.EXIT_INT8, res.output
    assert "not the input check (qc_score rank correlation with fp32" in res.output and "0.500 < 0.9" in res.output
    assert out.exists() and not out.with_name("tiny.int8.onnx").exists()
    assert not out.with_name("tiny.int8.card.md").exists()


def test_int8_refusal_rule():
    check = icr.CheckExport.__new__(icr.CheckExport)
    check.int8_min_spearman = 0.9
    assert check.int8_refusal({"int8_vs_fp32": {"n": 10, "spearman": 0.95}}) is None
    assert "0.850 < 0.9" in check.int8_refusal({"int8_vs_fp32": {"n": 10, "spearman": 0.85}})
    assert check.int8_refusal({"int8_vs_fp32": {"n": 10, "spearman": float("nan")}})  # NaN is no proof
    assert check.int8_refusal({}) == "no int8 score comparison"
