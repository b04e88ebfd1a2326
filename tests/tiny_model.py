"""A tiny cxr ONNX classifier built with the onnx helper API (no torch), for tests.

Graph: image [N, C, S, S] -> GlobalAveragePool -> Flatten -> Gemm (1 -> K) -> Softmax.
Its answer depends only on mean brightness, so tests can predict it: with the default weights
and ``mean=0.5, std=0.25`` a dark image is the first class, mid-grey the second, bright the third.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cxr.runtime.metadata import ModelInfo
from cxr.runtime.preprocess import Preprocessing

CLASSES = ("COVID", "Normal", "Viral Pneumonia")  # dark, mid, bright


def brightness_weights(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits linear in mean normalised brightness m (-2 black .. +2 white): class i peaks near
    m = -2 + 4 i / (k - 1)."""
    centres = np.linspace(-2.0, 2.0, k)
    w = (2.0 * centres).reshape(1, k)  # logit_i = 2 c_i m - c_i^2  (= -(m - c_i)^2 + m^2)
    b = -(centres ** 2)
    return w.astype(np.float32) * 3, b.astype(np.float32) * 3


def build_tiny_model(
    path: "str | Path",
    classes=CLASSES,
    size: int = 32,
    channels: int = 1,
    batch: "int | str" = "N",
    precision: str = "fp32",
    arch: str = "tiny_brightness",
    extra: dict | None = None,
    metadata: bool = True,
    pp: Preprocessing | None = None,
) -> Path:
    """Write the tiny model to ``path`` and return it. ``batch`` may be an int for a fixed batch."""
    k = len(classes)
    pp = pp or Preprocessing(size=size, channels=channels, mean=0.5, std=0.25)
    w, b = brightness_weights(k)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat", "axes1"], ["m"], keepdims=1),
        helper.make_node("Gemm", ["m", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cxr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, pp.channels, pp.size, pp.size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, k])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="cxr-tests")
    model.ir_version = 8
    if metadata:
        info = ModelInfo(classes=list(classes), preprocess=pp, arch=arch, precision=precision,
                         input_name="image", extra=extra or {})
        onnx.helper.set_model_props(model, info.to_props())
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path
