"""The tiny brightness classifier of tiny_model.py, with a class-activation map output.

Graph: image -> AveragePool to a G x G grid of local brightness F -> 1x1 Conv (the classifier's
weights) = cam [N, K, G, G] -> mean over the grid = logits -> Softmax. It answers exactly as the
tiny model does, and its map for a class with a positive weight (the last, "bright" class) is
hottest where the image is brightest, so tests can tell where a heatmap must glow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cxr.runtime.metadata import ModelInfo
from cxr.runtime.preprocess import Preprocessing
from tiny_model import CLASSES, brightness_weights


def build_tiny_cam_model(path: "str | Path", classes=CLASSES, size: int = 32, grid: int = 4,
                         resize: str = "squash", intended_use: str = "tests only <b>not</b> for patients") -> Path:
    k = len(classes)
    pp = Preprocessing(size=size, channels=1, mean=0.5, std=0.25, resize=resize)
    w, b = brightness_weights(k)
    cell = size // grid
    nodes = [
        helper.make_node("AveragePool", ["image"], ["features"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Conv", ["features", "W", "B"], ["cam"]),
        helper.make_node("ReduceMean", ["cam", "axes23"], ["logits"], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cam_cxr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", k, grid, grid])],
        initializer=[numpy_helper.from_array(w.reshape(k, 1, 1, 1), "W"), numpy_helper.from_array(b, "B"),
                     numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes23")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="cxr-tests")
    model.ir_version = 8
    cam = {"available": True, "output": "cam", "layer": "avgpool", "grid": [grid, grid]}
    info = ModelInfo(classes=list(classes), preprocess=pp, arch="tiny_cam", input_name="image",
                     extra={"cam": cam, "intended_use": intended_use})
    onnx.helper.set_model_props(model, info.to_props())
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path
