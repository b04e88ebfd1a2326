"""A model file from elsewhere is checked, not trusted: metadata that lies, absurd metadata and
external data outside the model's folder give a clear ModelLoadError (CLI: exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="building test models needs onnx (pip install '.[dev]')")
from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402

from cxr.runtime import Classifier, ModelLoadError  # noqa: E402
from cxr.runtime.cli import cli  # noqa: E402
from cxr.runtime.external_data import MalformedModelError, external_data_locations  # noqa: E402
from cxr.runtime.metadata import MAX_TOTAL_BYTES, MAX_VALUE_BYTES  # noqa: E402
from cxr.runtime.session import load_model  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUR_EXTERNAL_MESSAGE = "may only read external data from files inside its own folder"


def _with_props(src: Path, dst: Path, **changes: str) -> Path:
    """Copy a model with metadata_props replaced (key without the cxr. prefix) or added."""
    m = onnx.load(src)
    props = {p.key: p.value for p in m.metadata_props}
    for k, v in changes.items():
        props["cxr." + k] = v
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    dst.write_bytes(m.SerializeToString())
    return dst


def _refused(path: Path, fragment: str) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(path, threads=1)
    msg = str(err.value)
    assert fragment in msg, msg
    assert str(path) in msg  # the user learns which file
    return msg


# ----------------------------------------------------------------- metadata that lies

def test_class_names_not_matching_a_static_output_width(tiny_model_path, tmp_path):
    liar = _with_props(tiny_model_path, tmp_path / "four.onnx", classes=json.dumps(["A", "B", "C", "D"]))
    _refused(liar, "metadata lists 4 classes")
    liar = _with_props(tiny_model_path, tmp_path / "two.onnx", classes=json.dumps(["A", "B"]))
    _refused(liar, "metadata lists 2 classes")
    with pytest.raises(ModelLoadError, match="metadata lists 2 classes"):
        Classifier.load(liar)  # the Python API says the same


def test_class_names_not_matching_a_dynamic_output_width(tmp_path):
    path = build_tiny_model(tmp_path / "dyn.onnx")
    m = onnx.load(path)
    dim = m.graph.output[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "K"  # the graph no longer states its width; only running it tells
    path.write_bytes(m.SerializeToString())
    liar = _with_props(path, tmp_path / "dyn4.onnx", classes=json.dumps(["A", "B", "C", "D"]))
    _refused(liar, "metadata lists 4 classes")
    assert load_model(path, threads=1).classes == ["COVID", "Normal", "Viral Pneumonia"]  # the truth loads


def test_input_size_not_matching_the_graph(tiny_model_path, tmp_path):
    m = onnx.load(tiny_model_path)
    pre = json.loads(next(p.value for p in m.metadata_props if p.key == "cxr.preprocess"))
    liar = _with_props(tiny_model_path, tmp_path / "size.onnx", preprocess=json.dumps({**pre, "size": 48}))
    _refused(liar, "preprocessing metadata says 48")
    liar = _with_props(tiny_model_path, tmp_path / "chan.onnx", preprocess=json.dumps({**pre, "channels": 3}))
    _refused(liar, "preprocessing metadata says 3")


@pytest.mark.parametrize("key,value,fragment", [
    ("classes", "[\"A\", \"B\"", "cxr.classes is not valid JSON"),
    ("preprocess", "{size: 32}", "cxr.preprocess is not valid JSON"),
    ("metrics", "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ("classes", json.dumps("COVID"), "must be a non-empty list"),
    ("classes", json.dumps(["COVID", 3, None]), "must be a non-empty list"),
    ("classes", json.dumps(["COVID", "Nor\nmal", "Viral"]), "is not a class name"),
    ("classes", json.dumps(["COVID", "=HYPERLINK(\"x\")" + "x" * 300, "V"]), "is not a class name"),
    ("preprocess", json.dumps({"size": 32, "std": float("nan")}), "finite"),
    ("preprocess", json.dumps({"size": 100_000}), "larger than 4096"),
    ("preprocess", json.dumps([32]), "cxr.preprocess is invalid"),
    ("preprocess", json.dumps({"size": "huge"}), "cxr.preprocess is invalid"),
    ("preprocess", '{"size": 1e400}', "size must be an integer"),
    ("preprocess", json.dumps({"size": 32, "channels": 1.0}), "channels must be an integer"),
    ("preprocess", json.dumps({"size": 32, "mean": "0.5"}), "mean must be a number"),
    ("preprocess", json.dumps({"size": 32, "resize": "pad", "pad_value": "x"}), "pad_value must be an integer"),
    ("preprocess", json.dumps({"size": 32, "resize": "pad", "pad_value": 300}), "not an 8-bit grey level"),
    ("preprocess", json.dumps({"size": 32, "interpolation": ["bilinear"]}), "must be names"),
    ("format", "cxr-onnx/999", "unsupported model format"),
    ("calibration", "{\"temperature\": 1.5", "cxr.calibration is not valid JSON"),
    ("cam", "[" * 100_000, "cxr.cam is"),
])
def test_garbled_metadata_is_a_clear_error(tiny_model_path, tmp_path, key, value, fragment):
    _refused(_with_props(tiny_model_path, tmp_path / "bad.onnx", **{key: value}), fragment)


def test_absurdly_large_metadata(tiny_model_path, tmp_path):
    big = json.dumps({"note": "x" * (MAX_VALUE_BYTES + 10)})
    _refused(_with_props(tiny_model_path, tmp_path / "big.onnx", metrics=big), "at most 1048576")
    many = {f"blob{i}": "y" * (MAX_VALUE_BYTES - 100) for i in range(MAX_TOTAL_BYTES // MAX_VALUE_BYTES + 1)}
    _refused(_with_props(tiny_model_path, tmp_path / "many.onnx", **many), "at most 4194304")


def test_real_metadata_is_far_below_the_caps():
    import onnxruntime as ort

    for name in ("cxr-mnv2-224.onnx", "cxr-mnv2-224.int8.onnx"):
        meta = ort.InferenceSession(str(REPO / "models" / name), providers=["CPUExecutionProvider"]) \
            .get_modelmeta().custom_metadata_map
        # The four-class files carry about 126 KB, 3 % of the cap: the shift reference 59 KB and the
        # operating points 42 KB, both growing with sources x classes (the three-class files: 77 KB).
        # The cap must stay at least 25 times what a real model needs; a much longer class list
        # would need a denser encoding of those two entries before it needed a larger cap.
        assert sum(len(k) + len(v) for k, v in meta.items()) < MAX_TOTAL_BYTES / 25


# ----------------------------------------------------------------- external data

W = np.arange(4, dtype=np.float32)


def _external_model(path: Path, location: str, length: int = 16) -> Path:
    """y = x + w, with w's bytes in another file named by ``location`` (written verbatim)."""
    t = numpy_helper.from_array(W, "w")
    external_data_helper.set_external_data(t, location=location, length=length)
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "models").mkdir()
    W.tofile(tmp_path / "models" / "inside.bin")
    W.tofile(tmp_path / "secret.bin")
    return tmp_path / "models"


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    tiny = onnx.load(build_tiny_model(tmp_path / "tiny.onnx"))
    external_data_helper.convert_model_to_external_data(tiny, all_tensors_to_one_file=True,
                                                        location="weights/tiny.bin", size_threshold=0)
    axes = next(t for t in tiny.graph.initializer if t.name == "axes1")
    del axes.external_data[:]  # onnxruntime needs ReduceMean's axes inline
    axes.data_location = TensorProto.DEFAULT
    onnx.save_model(tiny, folder / "tiny.onnx")
    assert [n for n, _ in external_data_locations((folder / "tiny.onnx").read_bytes())] == ["W", "B"]
    model = load_model(folder / "tiny.onnx", threads=1)  # checks pass, then onnxruntime reads the data
    assert model.classes == ["COVID", "Normal", "Viral Pneumonia"]


@pytest.mark.parametrize("location,fragment", [
    ("../secret.bin", "climbs out of the model's folder"),
    ("sub/../../secret.bin", "climbs out of the model's folder"),
    ("..\\secret.bin", "climbs out of the model's folder"),
    ("ABSOLUTE", "is an absolute path"),
    ("\\\\server\\share\\w.bin", "is an absolute path"),
    ("C:\\Windows\\w.bin", "is an absolute path"),
    ("escape.bin", "outside the model's folder (a symbolic link)"),
    ("linkdir/w.bin", "outside the model's folder (a symbolic link)"),
    ("missing.bin", "does not exist"),
    ("fifo.bin", "is not a regular file"),
    ("", "has no location"),
])
def test_external_data_outside_the_folder_is_refused(model_dir, location, fragment):
    if location == "ABSOLUTE":
        location = str(model_dir.parent / "secret.bin")
    os.symlink(model_dir.parent / "secret.bin", model_dir / "escape.bin")
    os.symlink(model_dir.parent, model_dir / "linkdir")
    (model_dir.parent / "w.bin").write_bytes(W.tobytes())
    os.mkfifo(model_dir / "fifo.bin")  # onnxruntime would block reading it
    path = _external_model(model_dir / "evil.onnx", location)
    msg = _refused(path, fragment)
    assert OUR_EXTERNAL_MESSAGE in msg and "'w'" in msg  # our check, naming the tensor, not onnxruntime's


def test_external_reference_hidden_in_a_subgraph_is_found(model_dir):
    inner = numpy_helper.from_array(W, "inner_w")
    external_data_helper.set_external_data(inner, location="../secret.bin", length=16)
    inner.data_location = TensorProto.EXTERNAL
    inner.ClearField("raw_data")
    branch = helper.make_graph([helper.make_node("Identity", ["inner_w"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])], [inner])
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "c"))
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([const, node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    assert external_data_locations(data) == [("inner_w", "../secret.bin")] * 2  # both branches
    (model_dir / "if.onnx").write_bytes(data)
    _refused(model_dir / "if.onnx", "climbs out of the model's folder")


def test_the_wire_scan_agrees_with_onnx_on_a_real_model(tmp_path):
    """The shipped int8 model converted to external data: the scan finds exactly what onnx lists."""
    m = onnx.load(REPO / "models" / "cxr-mnv2-224.int8.onnx")
    assert external_data_locations(m.SerializeToString()) == []
    onnx.save_model(m, tmp_path / "x.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=256)
    reloaded = onnx.load(tmp_path / "x.onnx", load_external_data=False)
    want = sorted((t.name, next(e.value for e in t.external_data if e.key == "location"))
                  for t in external_data_helper._get_all_tensors(reloaded)
                  if external_data_helper.uses_external_data(t))
    got = sorted(external_data_locations((tmp_path / "x.onnx").read_bytes()))
    assert len(want) > 20 and got == want


@pytest.mark.parametrize("data", [b"not a model", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x08" + b"\xff" * 11])
def test_malformed_protobuf(data, tmp_path):
    with pytest.raises(MalformedModelError):
        external_data_locations(data)
    (tmp_path / "m.onnx").write_bytes(data + b"location")  # defeat the fast path
    _refused(tmp_path / "m.onnx", "not a loadable ONNX model")


# ----------------------------------------------------------------- the CLI says it plainly

def test_cli_exit_2_and_no_traceback(model_dir, tiny_model_path, tmp_path):
    (tmp_path / "imgs").mkdir()
    cases = [
        (_external_model(model_dir / "evil.onnx", "../secret.bin"), OUR_EXTERNAL_MESSAGE),
        (_with_props(tiny_model_path, tmp_path / "liar.onnx", classes=json.dumps(list("ABCD"))), "metadata lists 4"),
        (_with_props(tiny_model_path, tmp_path / "deep.onnx", training_data="[" * 100_000), "cxr.training_data"),
    ]
    for path, fragment in cases:
        for args in (["scan", str(tmp_path / "imgs"), "--model", str(path)], ["info", str(path)]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 2, (args, r.output)
            assert fragment in r.stderr and "Traceback" not in r.output, r.output


def test_loading_a_model_does_not_import_onnx(tiny_model_path):
    code = ("import sys; from cxr.runtime.session import load_model; "
            f"load_model({str(tiny_model_path)!r}, threads=1); print('onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_info_does_not_send_metadata_control_sequences_to_the_terminal(tiny_model_path, tmp_path):
    m = _with_props(tiny_model_path, tmp_path / "esc.onnx", arch="x\x1b]0;owned\x07", intended_use="a\x1b[2Jb",
                    producer="p\u202eq")
    r = CliRunner().invoke(cli, ["info", str(m)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert "x\\x1b]0;owned\\x07" in r.stdout and "a\\x1b[2Jb" in r.stdout and "p\\u202eq" in r.stdout
