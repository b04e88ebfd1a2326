"""Writing model files from the runtime: new metadata (the shift reference) or a site model (adapt).

Reading a model needs only onnxruntime; writing one needs the ``onnx`` package, which the plain
runtime install leaves out, so it lives in an extra: ``pip install 'cxr-infer[site]'``. A file is
written beside its destination as ``.partial``, checked (it loads in onnxruntime and its metadata
decodes), then renamed: a half-written model never sits under the final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

EXTRA = "site"


class ModelEditError(Exception):
    """The model file cannot be written as asked; the message says why and what to do."""


def require_onnx(what: str):
    """The ``onnx`` module, or a ModelEditError naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise ModelEditError(f"{what} writes an ONNX file, which needs the onnx package: "
                             f"pip install 'cxr-infer[{EXTRA}]' (or pip install onnx)") from None
    return onnx


def load_proto(path: "str | os.PathLike[str]", what: str = "writing a model"):
    onnx = require_onnx(what)
    try:
        return onnx.load(os.fspath(path))
    except Exception as exc:
        raise ModelEditError(f"cannot read {path} as ONNX: {exc}") from None


def props_of(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_props(model, updates: "dict[str, str | None]") -> None:
    """Replace (or, for a None value, remove) metadata entries; the others stay as they are."""
    props = props_of(model)
    for k, v in updates.items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = v
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def names_read(graph) -> set:
    """Every name a node of ``graph`` reads, also inside If/Loop/Scan bodies (outer-scope names)."""
    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= names_read(sub)
    return names


def drop_unread_initializers(graph) -> None:
    """Remove the constants of ``graph`` that no node reads and that are neither a graph input nor
    an output (left behind when nodes were removed or rewired)."""
    read = names_read(graph) | {o.name for o in graph.output} | {i.name for i in graph.input}
    if any(i.name not in read for i in graph.initializer):
        keep = [i for i in graph.initializer if i.name in read]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def tensor_digest(tensor) -> str:
    return hashlib.sha256(tensor.SerializeToString(deterministic=True)).hexdigest()


def save_checked(model, dest: "str | os.PathLike[str]") -> Path:
    """Write ``model`` to ``dest`` via ``dest.partial``, refusing a file the runtime would refuse."""
    onnx = require_onnx("writing a model")
    from .metadata import ModelMetadataError, decode_props

    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    try:
        decode_props(props_of(model))
    except ModelMetadataError as exc:
        raise ModelEditError(f"refusing to write {dest}: {exc}") from None
    try:
        onnx.save(model, os.fspath(partial))
        import onnxruntime as ort

        ort.InferenceSession(os.fspath(partial), providers=["CPUExecutionProvider"])
        os.replace(partial, dest)
    except ModelEditError:
        raise
    except Exception as exc:
        raise ModelEditError(f"could not write a loadable model to {dest}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return dest


def same_file(a: "str | os.PathLike[str]", b: "str | os.PathLike[str]") -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False


def encode(value: Any) -> str:
    from .metadata import encode_props

    return next(iter(encode_props({"x": value}).values()))
