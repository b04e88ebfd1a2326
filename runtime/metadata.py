"""The model-file contract: everything the runtime needs lives in ONNX ``metadata_props``.

Keys (all values are strings; structured values are JSON):

- ``cxr.format``        "cxr-onnx/1"
- ``cxr.classes``       JSON list of class names, in output order
- ``cxr.preprocess``    JSON ``Preprocessing.to_dict()``
- ``cxr.input_name``    graph input name (float32, shape [N, channels, size, size])
- ``cxr.output``        "probabilities" (softmax is inside the graph)
- ``cxr.arch``          architecture name (e.g. "mobilenet_v2")
- ``cxr.precision``     "fp32" or "int8"
- ``cxr.training_data`` JSON: dataset name/root, class counts, split sizes, manifest sha256
- ``cxr.metrics``       JSON: test metrics from training (and per-precision export metrics)
- ``cxr.quantization``  JSON: scheme, calibration, nodes kept in float, measured drop (int8 only)
- ``cxr.parity``        JSON: summary of the export parity report
- ``cxr.checkpoint_sha256``, ``cxr.created``, ``cxr.producer``
- ``cxr.intended_use``  short statement of intended use and limits
- ``cxr.calibration``   JSON: temperature baked in before the softmax, ECE before/after (docs/triage.md)
- ``cxr.operating_points`` JSON: refer/routine thresholds measured on validation (``cxr.runtime.triage``)
- ``cxr.cam``           JSON: whether output ``cam`` (class-activation maps) exists, its layer and
                        grid, or why the architecture has none (docs/heatmaps.md)
- ``cxr.input_check``   JSON: the ``qc_score`` output's thresholds and how they were chosen
                        (``inputcheck.ScoreCheck``; absent in models exported before the check)
- ``cxr.shift_reference`` JSON: count, mean and covariance of the validation films' input-check
                        features (the ``shift_features`` output) per source and predicted class, the
                        folder-level shift check's reference (``shift.ShiftReference``; docs/site.md)
- ``cxr.adaptation``    JSON: a site model's provenance -- base model sha256, site films by class,
                        what ``cxr-infer adapt`` refitted, held-out figures (``adapt``; docs/site.md)

Only ``cxr.format``, ``cxr.classes`` and ``cxr.preprocess`` are required to run a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .preprocess import Preprocessing

FORMAT = "cxr-onnx/1"
PREFIX = "cxr."
REQUIRED = ("format", "classes", "preprocess")
JSON_KEYS = frozenset({"classes", "preprocess", "training_data", "metrics", "quantization", "parity"})
# JSON-valued keys whose content their own features check (calibration/triage, input check,
# heatmaps): parsed once here (a model whose value is not JSON is refused at load time, with the
# others), then handed to those features as parsed values
FEATURE_JSON_KEYS = frozenset({"calibration", "operating_points", "input_check", "cam", "shift_reference", "adaptation"})


# A model file from elsewhere may carry anything in its metadata; real cxr models hold ~10 KB.
MAX_VALUE_BYTES = 1 << 20  # one metadata value
MAX_TOTAL_BYTES = 4 << 20  # all of them together
MAX_CLASS_NAME = 200  # characters; names become CSV columns, table headers and HTML text
_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f"}


class ModelMetadataError(ValueError):
    """The ONNX file lacks or garbles the metadata that makes it a cxr model."""


@dataclass
class ModelInfo:
    classes: list[str]
    preprocess: Preprocessing
    arch: str = "unknown"
    precision: str = "fp32"
    input_name: str | None = None
    output: str = "probabilities"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """Serialize to ONNX metadata_props (str -> str)."""
        props: dict[str, Any] = {
            "format": FORMAT,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "arch": self.arch,
            "precision": self.precision,
            "output": self.output,
        }
        if self.input_name:
            props["input_name"] = self.input_name
        props.update(self.extra)
        return encode_props(props)


def encode_props(props: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in props.items():
        key = k if k.startswith(PREFIX) else PREFIX + k
        out[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def check_sizes(raw: dict[str, str]) -> None:
    """Refuse absurdly large metadata before parsing any of it (JSON parsing is not free)."""
    total = 0
    for k, v in raw.items():
        n = len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
        if n > MAX_VALUE_BYTES:
            raise ModelMetadataError(f"metadata {k[:80]!r} is {n} bytes; at most {MAX_VALUE_BYTES} are accepted")
        total += n
    if total > MAX_TOTAL_BYTES:
        raise ModelMetadataError(f"metadata holds {total} bytes in {len(raw)} entries; "
                                 f"at most {MAX_TOTAL_BYTES} are accepted")


def decode_props(raw: dict[str, str]) -> ModelInfo:
    """Parse ``cxr.*`` metadata_props into a ModelInfo, with errors that say what is wrong."""
    check_sizes(raw)
    props = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    missing = [k for k in REQUIRED if k not in props]
    if missing:
        raise ModelMetadataError(
            "not a cxr model: metadata lacks " + ", ".join(PREFIX + k for k in missing)
            + " (export it with cxr-export)"
        )
    if props["format"] != FORMAT:
        raise ModelMetadataError(f"unsupported model format {props['format']!r} (this runtime reads {FORMAT!r})")
    parsed: dict[str, Any] = {}
    for k, v in props.items():
        if k in JSON_KEYS or k in FEATURE_JSON_KEYS:
            try:
                value = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ModelMetadataError(f"metadata {PREFIX}{k} is not valid JSON: {exc}") from None
            except RecursionError:
                raise ModelMetadataError(f"metadata {PREFIX}{k} is JSON nested too deeply to be real") from None
            parsed[k] = value
        else:
            parsed[k] = v
    classes = parsed.pop("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelMetadataError(f"{PREFIX}classes must be a non-empty list of names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ModelMetadataError(f"{PREFIX}classes has duplicates: {classes}")
    for c in classes:
        if len(c) > MAX_CLASS_NAME or any(ch in _CONTROL for ch in c) or c != c.strip():
            raise ModelMetadataError(
                f"{PREFIX}classes: {c[:60]!r}{'...' if len(c) > 60 else ''} is not a class name (at most "
                f"{MAX_CLASS_NAME} characters, no control characters, no leading or trailing spaces)")
    if not isinstance(parsed["preprocess"], dict):
        raise ModelMetadataError(f"{PREFIX}preprocess is invalid: expected a JSON object, got "
                                 f"{type(parsed['preprocess']).__name__}")
    try:
        pp = Preprocessing.from_dict(parsed.pop("preprocess"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelMetadataError(f"{PREFIX}preprocess is invalid: {exc}") from None
    parsed.pop("format")
    return ModelInfo(
        classes=classes,
        preprocess=pp,
        arch=parsed.pop("arch", "unknown"),
        precision=parsed.pop("precision", "fp32"),
        input_name=parsed.pop("input_name", None),
        output=parsed.pop("output", "probabilities"),
        extra=parsed,
    )
