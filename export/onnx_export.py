"""PyTorch model -> fp32 ONNX with softmax in the graph, checked and self-describing.

Exporter choice: torch's dynamo exporter (``torch.export`` + onnxscript, opset 18) is the
default: it is the supported path from PyTorch 2.9 on and exports every architecture in
``cxr.train.models``. The TorchScript exporter (``--exporter torchscript``, opset 17) remains
as a fallback while torch still ships it; it is deprecated upstream. Either way the result is
checked by ``onnx.checker`` and full shape inference, and then proven by the parity step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import onnx

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}


def _with_softmax(model, temperature: float | None = None):
    """``temperature``: calibration (export/temperature.py), one Div before the softmax; T > 0
    scales every logit of an image alike, so the top-1 class cannot change."""
    import torch

    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    class WithSoftmax(torch.nn.Module):
        """Logits -> probabilities, so every consumer of the file gets the same numbers."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            logits = self.net(image)
            if temperature is not None:
                logits = logits / temperature
            return torch.softmax(logits, dim=1)

    return WithSoftmax(model).eval()


def export_fp32(model, input_shape: tuple[int, int, int], path: "str | os.PathLike[str]",
                exporter: str = "dynamo", opset: int | None = None, temperature: float | None = None,
                cam_arch: str | None = None, score=None) -> dict:
    """Write ``path`` (a single file, weights inline); returns what was used, for the report.
    ``temperature``: divide the logits by it before the softmax (None: plain softmax).
    ``cam_arch``: also export the class-activation map as output ``cam`` (see ``cam.py``).
    ``score``: (output name, function that wraps the module to add that output last): the input
    check's ``qc_score`` (see ``input_check.py``). Output 0 is always ``probabilities``."""
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"unknown exporter {exporter!r}")
    output_names = [OUTPUT_NAME]
    if cam_arch:
        from .cam import OUTPUT_NAME as CAM_OUTPUT, with_softmax_and_cam

        wrapped = with_softmax_and_cam(model, cam_arch, temperature)
        output_names.append(CAM_OUTPUT)
    else:
        wrapped = _with_softmax(model, temperature)
    if score is not None:
        name, add_output = score
        wrapped = add_output(wrapped)
        output_names.append(name)
    return export_module(wrapped, input_shape, path, output_names, exporter, opset)


def export_module(wrapped, input_shape: tuple[int, int, int], path: "str | os.PathLike[str]",
                  output_names: list[str], exporter: str = "dynamo", opset: int | None = None) -> dict:
    """Export any module image -> ``output_names`` (dynamic batch, weights inline), then check it;
    ``export_fp32`` builds the model's module, the input check exports its tap pooling with it."""
    import torch

    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"unknown exporter {exporter!r}")
    opset = opset or DEFAULT_OPSET[exporter]
    # batch 2 so no exporter specialises the batch dimension to 1
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    path = str(path)
    # the exporters print progress on stdout; stdout is reserved for the report table
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            prog = torch.onnx.export(
                wrapped, (example,), input_names=[INPUT_NAME], output_names=output_names,
                opset_version=opset, dynamo=True, external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            prog.save(path, external_data=False)
        else:
            torch.onnx.export(
                wrapped, (example,), path, input_names=[INPUT_NAME], output_names=output_names,
                opset_version=opset, dynamo=False, do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            )
    check_onnx(path)
    return {"exporter": exporter, "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__}


def check_onnx(path: "str | os.PathLike[str]") -> onnx.ModelProto:
    """Checker plus strict shape inference; raises with onnx's own message if either fails."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


def io_signature(model: onnx.ModelProto) -> dict:
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {"inputs": {i.name: dims(i) for i in model.graph.input},
            "outputs": {o.name: dims(o) for o in model.graph.output}}


def write_metadata(path: "str | os.PathLike[str]", props: dict[str, str]) -> None:
    """Replace all ``cxr.*`` metadata_props of ``path`` with ``props`` (others are kept)."""
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith("cxr.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in keep}, **props})
    model.producer_name = "cxr-export"
    onnx.save(model, str(path))


def read_metadata(path: "str | os.PathLike[str]") -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def file_size(path: "str | os.PathLike[str]") -> int:
    return Path(path).stat().st_size
