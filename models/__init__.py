"""Shipped model artifacts and the one function that finds the default one.

``manifest.json`` beside this file names the shipped pair::

    {"default_precision": "int8", "models": {"fp32": "cxr.onnx", "int8": "cxr.int8.onnx"}}

Kept free of numpy/onnxruntime imports so ``cxr-infer --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "int8")

_HOW_TO_GET_ONE = (
    "pass --model FILE (a .onnx made by cxr-export), or make one: "
    "pip install \".[train]\", then cxr-train and cxr-export, and copy the .onnx files plus a "
    f"{MANIFEST_NAME} into {{dir}}"
)


class NoShippedModelError(FileNotFoundError):
    """No usable shipped model; the message says how to get one."""


def shipped_models(models_dir: "str | Path | None" = None) -> dict:
    """The parsed manifest, or raise NoShippedModelError when there is none (or it is garbled)."""
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    manifest = d / MANIFEST_NAME
    if not manifest.is_file():
        raise NoShippedModelError(
            f"no shipped model: {manifest} does not exist; " + _HOW_TO_GET_ONE.format(dir=d)
        )
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NoShippedModelError(f"cannot read {manifest}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise NoShippedModelError(f"{manifest} lists no models (expected {{\"models\": {{\"fp32\": FILE}}}})")
    return data


def default_model_path(precision: "str | None" = None, models_dir: "str | Path | None" = None) -> Path:
    """Path of the shipped model for ``precision`` (default: the manifest's ``default_precision``)."""
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    data = shipped_models(d)
    models = data["models"]
    if precision is None:
        precision = data.get("default_precision") or ("int8" if "int8" in models else next(iter(models)))
    if precision not in models:
        raise NoShippedModelError(
            f"no shipped {precision} model (shipped: {', '.join(sorted(models))}); "
            + _HOW_TO_GET_ONE.format(dir=d)
        )
    path = d / str(models[precision])
    if not path.is_file():
        raise NoShippedModelError(
            f"{MANIFEST_NAME} names {path.name} for {precision} but the file is missing; "
            + _HOW_TO_GET_ONE.format(dir=d)
        )
    return path
