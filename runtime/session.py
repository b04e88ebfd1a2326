"""Open a cxr ONNX model on the requested device, and refuse loudly when that is impossible.

Everything that can be wrong with a model (missing file, not ONNX, not a cxr model, input shape
that contradicts its own metadata, CUDA asked for but absent) is found here, at load time, as a
``ModelLoadError`` -- the CLI's exit status 2 -- never half-way through a scan.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .external_data import ExternalDataError, MalformedModelError, check_external_data
from .metadata import ModelInfo, ModelMetadataError, decode_props

DEVICES = ("cpu", "cuda", "auto")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"


class ModelLoadError(Exception):
    """The model cannot be used as asked; ``str(err)`` says why and what to do."""


def resolve_model_path(path: "str | os.PathLike[str] | None", precision: str | None = None) -> Path:
    """An explicit path, or the shipped model for ``precision`` (``cxr.models`` manifest)."""
    if path is not None:
        if precision is not None:
            raise ModelLoadError("precision selects a shipped model; do not combine it with an explicit model path")
        return Path(path)
    from cxr.models import NoShippedModelError, default_model_path

    try:
        return default_model_path(precision)
    except NoShippedModelError as exc:
        raise ModelLoadError(str(exc)) from None


def resolve_providers(device: str) -> list[str]:
    """Execution providers for ``device``; CUDA that is not available is an error, not a fallback."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU_EP]
    if CUDA_EP in available:
        return [CUDA_EP, CPU_EP]
    if device == "auto":
        return [CPU_EP]
    raise ModelLoadError(
        "--device cuda asked for, but onnxruntime has no CUDAExecutionProvider "
        f"(available providers: {', '.join(available)}); install onnxruntime-gpu with a matching "
        "CUDA, or use --device cpu"
    )


@dataclass
class Model:
    """A loaded model: the onnxruntime session plus what its metadata says about it."""

    path: Path
    info: ModelInfo
    session: Any
    input_name: str
    output_name: str
    providers: list[str]
    device: str
    threads: int | None
    session_create_ms: float
    load_ms: float
    max_batch: int | None = None  # set when the graph has a fixed batch dimension
    first_inference_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    cam_output: str | None = None  # the class-activation map output, when the model has one
    qc_output: str | None = None  # the graph's qc_score output, when it has one
    input_check: Any = None  # inputcheck.ScoreCheck from cxr.input_check; None: model exported before it
    shift_reference: Any = None  # shift.ShiftReference from cxr.shift_reference; None: the model carries none
    shift_output: str | None = None  # the graph's shift_features output (cxr-infer shift-reference adds it)

    @property
    def has_cam(self) -> bool:
        return self.cam_output is not None

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def runs_on(self) -> str:
        """Where inference actually runs: "cuda" when the CUDA provider is active, else "cpu"
        (``device`` is what was asked for, which may be "auto")."""
        return "cuda" if CUDA_EP in self.providers else "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, C, S, S] -> probabilities [N, K]."""
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)

    def run_outputs(self, batch: np.ndarray, cam: bool = False):
        """(probabilities [N, K], maps [N, K, h, w] or None, qc_score [N] or None, shift features
        [N, D] or None) in one call: the map only when asked (``cam``), the input check's score
        whenever the graph has one, the shift check's features when the model carries a reference.
        onnxruntime runs the map's nodes either way (docs/heatmaps.md); not fetching it saves the copy."""
        if cam and self.cam_output is None:
            raise ValueError(f"{self.path} has no class-activation map output (re-export it with cxr-export)")
        if not cam and not self.qc_output:
            return self.run(batch), None, None, None
        names = [self.output_name] + [x for x in (self.cam_output if cam else None, self.qc_output, self.shift_output) if x]
        outs = dict(zip(names, self.session.run(names, {self.input_name: batch})))
        n = batch.shape[0]
        probs = np.asarray(outs[self.output_name], dtype=np.float32).reshape(n, -1)
        maps = np.asarray(outs[self.cam_output], dtype=np.float32) if cam else None
        score = np.asarray(outs[self.qc_output], dtype=np.float32).reshape(n) if self.qc_output else None
        feats = np.asarray(outs[self.shift_output], dtype=np.float32).reshape(n, -1) if self.shift_output else None
        return probs, maps, score, feats

    def warmup(self) -> float:
        """One inference on a blank image: lazily allocated buffers and kernels get built here,
        not in the first real batch. Returns (and records) the first-inference time in ms."""
        pp = self.info.preprocess
        x = np.zeros((1, pp.channels, pp.size, pp.size), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            out = self.run(x)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: inference on a blank input failed: {exc}") from None
        self.first_inference_ms = (time.perf_counter() - t0) * 1e3
        if out.shape != (1, len(self.classes)):
            raise ModelLoadError(
                f"{self.path}: output {self.output_name!r} has shape {list(out.shape)} for one image, "
                f"but metadata lists {len(self.classes)} classes"
            )
        return self.first_inference_ms


def _session_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime picks (physical cores)
    so.inter_op_num_threads = 1
    # Decode threads share the cores with inference; onnxruntime's spinning workers would burn
    # the CPU that decoding needs. Measured here (2 cores, 2,187 real X-rays, fp32): scans ran
    # 15-40 % faster with spinning off (e.g. 687 vs 569 img/s).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: warnings would interleave with the report
    return so


def _check_io(path: Path, session, info: ModelInfo) -> tuple[str, str, int | None]:
    inputs = session.get_inputs()
    if info.input_name:
        match = [i for i in inputs if i.name == info.input_name]
        if not match:
            raise ModelLoadError(f"{path}: metadata names input {info.input_name!r}, the graph has "
                                 f"{[i.name for i in inputs]}")
        inp = match[0]
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        raise ModelLoadError(f"{path}: graph has {len(inputs)} inputs and metadata names none")
    if inp.type != "tensor(float)":
        raise ModelLoadError(f"{path}: input {inp.name!r} is {inp.type}, expected tensor(float)")
    shape = list(inp.shape)
    pp = info.preprocess
    expected = [None, pp.channels, pp.size, pp.size]
    if len(shape) != 4:
        raise ModelLoadError(f"{path}: input {inp.name!r} has shape {shape}, expected [N, C, S, S]")
    for dim, want, what in zip(shape[1:], expected[1:], ("channels", "height", "width")):
        if isinstance(dim, int) and dim != want:
            raise ModelLoadError(
                f"{path}: input {what} is {dim} but the preprocessing metadata says {want} (input shape {shape})"
            )
    max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    outputs = [o.name for o in session.get_outputs()]
    if info.output in outputs:
        out = info.output
    elif len(outputs) == 1:
        out = outputs[0]
    else:
        raise ModelLoadError(f"{path}: no output named {info.output!r} among {outputs}")
    out_shape = next(o for o in session.get_outputs() if o.name == out).shape  # None: rank unknown
    if out_shape is not None and (len(out_shape) != 2 or (isinstance(out_shape[1], int)
                                                           and out_shape[1] != len(info.classes))):
        raise ModelLoadError(
            f"{path}: output {out!r} has shape {out_shape}, but metadata lists {len(info.classes)} classes "
            f"({', '.join(info.classes)}); expected [N, {len(info.classes)}]"
        )
    return inp.name, out, max_batch


def _check_model_file(path: Path) -> None:
    """Refuse, before onnxruntime reads it, a file whose external data lies outside its folder."""
    try:
        check_external_data(path)
    except MalformedModelError as exc:
        raise ModelLoadError(f"{path}: not a loadable ONNX model: malformed protobuf ({exc})") from None
    except ExternalDataError as exc:
        raise ModelLoadError(f"{path}: refused: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the model file: {exc.strerror or exc}") from None


def cam_metadata(info: ModelInfo) -> dict | None:
    """The ``cxr.cam`` metadata (parsed by the metadata reader) as a dict, or None when the model
    has none."""
    meta = info.extra.get("cam")
    return meta if isinstance(meta, dict) else None


def _find_cam_output(path: Path, session, info: ModelInfo) -> str | None:
    """The ``cam`` output named by ``cxr.cam`` metadata, checked against the graph: float, 4-D,
    one map per class. A model without it (older files, or architectures without CAM) is fine."""
    meta = cam_metadata(info)
    if meta is None or not meta.get("available"):
        return None
    name = meta.get("output", "cam")
    outs = {o.name: o for o in session.get_outputs()}
    if name not in outs:
        raise ModelLoadError(f"{path}: metadata cxr.cam names output {name!r}, the graph has {sorted(outs)}")
    o = outs[name]
    k = o.shape[1] if len(o.shape) == 4 else None
    if o.type != "tensor(float)" or len(o.shape) != 4 or (isinstance(k, int) and k != len(info.classes)):
        raise ModelLoadError(f"{path}: output {name!r} is {o.type} {list(o.shape)}; expected float "
                             f"[N, {len(info.classes)}, h, w] (one map per class)")
    return name


def load_model(
    path: "str | os.PathLike[str] | None" = None,
    device: str = "cpu",
    threads: int | None = None,
    precision: str | None = None,
    warmup: bool = True,
) -> Model:
    """Load and validate a model; ``path=None`` means the shipped one. Raises ModelLoadError.

    ``load_ms`` covers finding the file, session creation and metadata checks, not the one-off
    ``import onnxruntime``.
    """
    import onnxruntime as ort

    t0 = time.perf_counter()
    path = resolve_model_path(path, precision)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}" if not path.exists() else f"not a file: {path}")
    providers = resolve_providers(device)
    _check_model_file(path)
    t1 = time.perf_counter()
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=_session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for invalid/unsupported graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(f"{path}: not a loadable ONNX model: {first}") from None
    session_ms = (time.perf_counter() - t1) * 1e3
    active = session.get_providers()
    if CUDA_EP in providers and CUDA_EP not in active:
        raise ModelLoadError(
            f"CUDAExecutionProvider is installed but could not start (active: {', '.join(active)}); "
            "check the CUDA/cuDNN libraries, or use --device cpu"
        )
    try:
        info = decode_props(session.get_modelmeta().custom_metadata_map)
    except ModelMetadataError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    input_name, output_name, max_batch = _check_io(path, session, info)
    from .inputcheck import find_score_check

    try:
        qc_output, input_check, qc_note = find_score_check(info.extra, [o.name for o in session.get_outputs()])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    notes = [qc_note] if qc_note else []
    from .site.shift import OutdatedReference, ShiftReference

    try:
        shift_reference = ShiftReference.from_metadata(info.extra)
    except OutdatedReference as exc:
        shift_reference = None
        notes.append(f"note: {exc}")
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    from .site.shift import OUTPUT as SHIFT_OUTPUT

    graph_outputs = {o.name: o for o in session.get_outputs()}
    shift_output = SHIFT_OUTPUT if (SHIFT_OUTPUT in graph_outputs and qc_output is not None) else None
    if shift_reference is not None:
        feats = graph_outputs.get(shift_reference.output)
        if feats is None or qc_output is None:
            raise ModelLoadError(f"{path}: cxr.shift_reference reads the output {shift_reference.output!r} and qc_score, "
                                 "which the graph lacks (re-add it with cxr-infer shift-reference)")
        width = feats.shape[-1] if feats.shape else None
        if isinstance(width, int) and width != shift_reference.dim:
            raise ModelLoadError(f"{path}: output {shift_reference.output!r} has {width} columns but "
                                 f"cxr.shift_reference describes {shift_reference.dim}")
        shift_output = shift_reference.output
    if CUDA_EP in active and info.precision == "int8":
        notes.append(
            "note: this is an int8 (QDQ) model; the CUDA provider runs it no faster than fp32 "
            "(use the fp32 model on GPU, int8 on CPU)"
        )
    model = Model(
        path=path, info=info, session=session, input_name=input_name, output_name=output_name,
        providers=active, device=device, threads=threads, session_create_ms=session_ms,
        load_ms=0.0, max_batch=max_batch, notes=notes, qc_output=qc_output, input_check=input_check,
        shift_reference=shift_reference, shift_output=shift_output,
    )
    model.cam_output = _find_cam_output(path, session, info)
    model.load_ms = (time.perf_counter() - t0) * 1e3
    if warmup:
        model.warmup()
    return model
