"""Unit tests for cxr-export's small modules: metrics, schemes, subsets, manifest, card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.export import evaluate, quantize
from cxr.export.data import ExportInputError, read_manifest, stratified_subset
from cxr.export.parity import ParityError, compare, require
from cxr.runtime.metadata import ModelInfo
from cxr.runtime.preprocess import Preprocessing


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2, -1])
    p = np.array([0, 1, 1, 1, 2, 0, 2])
    m = evaluate.classification_metrics(y, p, ["a", "b", "c"])
    assert m["n"] == 6  # the unknown label is ignored
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["a"]["sensitivity"] == 0.5
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(np.mean(f1), abs=1e-6)


def test_metrics_absent_class_is_null_not_zero():
    m = evaluate.classification_metrics(np.array([0, 0]), np.array([0, 0]), ["a", "b"])
    assert m["per_class"]["b"]["sensitivity"] is None and m["macro_f1"] == 1.0


def test_agreement_and_parity_verdict():
    a = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    assert evaluate.agreement(a, a[::-1]) == 0.0
    ok = compare(a, a + 1e-6, "x")
    assert ok.passed
    bad = compare(a, a + 2e-4, "x")
    assert not bad.passed
    with pytest.raises(ParityError, match="max"):
        require(bad)


def test_speed_and_cpu_info():
    s = evaluate.measure_speed(lambda x: x * 2, np.zeros((3, 1, 4, 4), np.float32), runs=5, batch=8)
    assert s["latency_ms_p50"] >= 0 and s["throughput_ips"] > 0 and s["throughput_batch"] == 8
    from cxr.runtime.cpu import cpu_info

    cpu = cpu_info()
    assert isinstance(cpu["vnni"], bool) and cpu["cores"] >= 1


@pytest.mark.parametrize("name, act, method, rr", [
    ("u8s8-minmax", "u8", "minmax", False), ("s8s8-percentile", "s8", "percentile", False),
    ("u8s8-entropy-rr", "u8", "entropy", True), ("U8U8-MinMax", "u8", "minmax", False)])
def test_scheme_names_round_trip(name, act, method, rr):
    s = quantize.Scheme.parse(name)
    assert (s.activation, s.method, s.reduce_range) == (act, method, rr)
    assert quantize.Scheme.parse(s.name) == s


@pytest.mark.parametrize("bad", ["u8-minmax", "s8u8-minmax", "u8s8-kl", ""])
def test_bad_schemes_rejected(bad):
    with pytest.raises(ValueError):
        quantize.parse_schemes(bad)


def test_auto_candidates_parse():
    names = [s.name for s in quantize.parse_schemes("auto")]
    assert names == list(quantize.AUTO_CANDIDATES)
    assert [s.name for s in quantize.parse_schemes("s8s8-minmax, u8s8-minmax")] == ["s8s8-minmax", "u8s8-minmax"]


def test_choose_fastest_within_bound():
    mk = lambda n, ok, p50: {"scheme": n, "within_bound": ok, "metrics": {"latency_ms_p50": p50}}  # noqa: E731
    assert quantize.choose([mk("a", True, 2.0), mk("b", False, 1.0), mk("c", True, 1.5)])["scheme"] == "c"
    assert quantize.choose([mk("a", False, 2.0)]) is None
    ok, reason = quantize.within_bound({"accuracy_drop_points": 0.6, "top1_agreement": 0.995}, 0.5, 0.99)
    assert not ok and "drop" in reason


def test_stratified_subset_keeps_classes_and_is_deterministic():
    items = [(Path(f"{c}/{i}.png"), c) for c, n in (("big", 90), ("small", 10)) for i in range(n)]
    prop = stratified_subset(items, 20, seed=1)
    assert len(prop) == 20 and sum(1 for _, c in prop if c == "small") == 2
    assert prop == stratified_subset(items, 20, seed=1)
    bal = stratified_subset(items, 20, seed=1, balanced=True)
    assert sum(1 for _, c in bal if c == "small") == 10
    assert stratified_subset(items, 0) == items


def test_manifest_reader_resolves_root_and_override(tmp_path):
    (tmp_path / "a").mkdir()
    doc = {"format": "cxr-split/1", "root": str(tmp_path / "gone"), "seed": 0, "classes": ["x"],
           "items": [{"path": "x/1.png", "label": "x", "split": "test"}]}
    p = tmp_path / "split.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ExportInputError, match="--data-root"):
        read_manifest(p)
    m = read_manifest(p, data_root=tmp_path / "a")
    assert m.split("test") == [(tmp_path / "a" / "x/1.png", "x")]
    assert m.sizes() == {"train": 0, "val": 0, "test": 1}
    p.write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(ExportInputError, match="cxr-split/1"):
        read_manifest(p, data_root=tmp_path / "a")


def test_keep_float_nodes_found_by_role():
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="stem"),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="mid"),
             helper.make_node("Flatten", ["b"], ["c"], name="flat"),
             helper.make_node("Gemm", ["c", "w3"], ["d"], name="head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 2])])
    m = helper.make_model(g)
    assert quantize.find_keep_float_nodes(m, ["first_conv", "classifier"]) == {"stem": "Conv", "head": "Gemm"}
    assert quantize.find_keep_float_nodes(m, []) == {}
    assert isinstance(m, onnx.ModelProto)


def _props(classes, **extra):
    return ModelInfo(classes=classes, preprocess=Preprocessing(size=224), arch="mobilenet_v2",
                     precision="int8", input_name="image", extra=extra).to_props()


def test_card_for_the_database_model_states_limits_and_citations():
    from cxr.export.card import model_card

    props = _props(["COVID", "Normal", "Viral Pneumonia"],
                   training_data={"name": "covid-radiography-3class", "class_counts": {"COVID": 2847},
                                  "split_sizes": {"train": 6122, "val": 1312, "test": 1312}},
                   metrics={"training": {"test": {"n": 1312, "accuracy": 0.95, "macro_f1": 0.94,
                                                  "per_class": {"COVID": {"sensitivity": 0.9}}}}},
                   quantization={"name": "u8s8-minmax", "validation": {"n": 1000}, "nodes_kept_float": {"n1": "Conv"}},
                   reproduce=json.dumps({"train": "cxr-train --data D", "export": "cxr-export run/best.pt --out m.onnx"}))
    card = model_card(props, "m.int8.onnx")
    for text in ("not a diagnosis", "Lung_Opacity", "DeGrave", "Chowdhury", "Rahman", "IEEE Access",
                 "Computers in Biology and Medicine", "cxr-train --data D", "cxr-export run/best.pt",
                 "6122", "95.00", "n1 (Conv)", "u8s8-minmax"):
        assert text in card, text


def test_card_for_other_data_has_no_database_claims():
    from cxr.export.card import model_card

    card = model_card(_props(["cat", "dog"]), "x.onnx")
    assert "not a diagnosis" in card and "Lung_Opacity" not in card and "DeGrave" not in card
    assert "Commands not recorded" in card
