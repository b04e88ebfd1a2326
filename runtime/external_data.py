"""External-data references of an ONNX file, checked before onnxruntime opens it.

An ONNX tensor may keep its bytes in another file (``external_data`` ``location``), which
onnxruntime reads relative to the model's folder. A model from elsewhere could name
``/etc/shadow``, ``../../secret`` or a symlink leading out of its folder. Recent onnxruntime
releases refuse those themselves; older ones this package allows (``onnxruntime>=1.17``) do
not, so the runtime checks every reference first, with its own clear message.

The runtime does not depend on the ``onnx`` package, so this module reads the protobuf wire
format directly: it walks only the messages that can hold tensors (graph initializers, node
attributes, subgraphs, functions, training graphs) and skips tensor payloads by their length,
so a model of tens of MB is scanned in milliseconds without copying its weights. A file
without the bytes ``location`` anywhere (every self-contained model) skips the walk.
"""

from __future__ import annotations

import mmap
import os
import re

__all__ = ["ExternalDataError", "MalformedModelError", "external_data_locations", "check_external_data"]

MAX_DEPTH = 48  # nested subgraphs (If/Loop/Scan bodies) deeper than this are not a real model

# field number -> message kind, for the fields that lead to TensorProtos (onnx/onnx.proto)
_MODEL, _GRAPH, _NODE, _ATTR, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTR},  # attribute
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t g tensors graphs ...
    _FUNCTION: {7: _NODE},  # node
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION_KIND = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class ExternalDataError(ValueError):
    """An external-data reference that must not be followed; ``str(err)`` says which and why."""


class MalformedModelError(ValueError):
    """The file is not a well-formed protobuf (so not an ONNX model)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedModelError(f"bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, varint value or (start, end) of a length-delimited payload)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedModelError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise MalformedModelError(f"field {number} runs past its message at byte {pos}")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise MalformedModelError(f"truncated fixed-width field {number}")
        else:  # 3/4 (groups) never occur in ONNX; 6/7 do not exist
            raise MalformedModelError(f"wire type {wire} of field {number} at byte {pos}")


def _tensor_refs(buf: memoryview, start: int, end: int) -> tuple[str, list[str], bool]:
    name, locations, external = "", [], False
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif number == _TENSOR_LOCATION_KIND and wire == 0:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL and wire == 2:
            key = val = b""
            for n2, w2, v2 in _fields(buf, *value):
                if w2 == 2 and n2 in (1, 2):
                    if n2 == 1:
                        key = bytes(buf[v2[0]:v2[1]])
                    else:
                        val = bytes(buf[v2[0]:v2[1]])
            if key == b"location":
                locations.append(os.fsdecode(val))
    return name, locations, external


def _walk(buf: memoryview, start: int, end: int, kind: int, depth: int, out: list[tuple[str, str]]) -> None:
    if depth > MAX_DEPTH:
        raise MalformedModelError(f"subgraphs nested deeper than {MAX_DEPTH}")
    if kind == _TENSOR:
        name, locations, external = _tensor_refs(buf, start, end)
        if external and not locations:
            out.append((name, ""))
        out.extend((name, loc) for loc in locations)
        return
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is not None and wire == 2:
            _walk(buf, value[0], value[1], child, depth + 1, out)


def external_data_locations(data: bytes) -> list[tuple[str, str]]:
    """(tensor name, location) for every tensor of a serialized ModelProto whose bytes live in
    another file. Raises MalformedModelError when the bytes are not a protobuf message."""
    buf = memoryview(data)
    out: list[tuple[str, str]] = []
    _walk(buf, 0, len(buf), _MODEL, 0, out)
    return out


def _escape_reason(base: str, location: str) -> str | None:
    if not location:
        return "has no location"
    if "\x00" in location:
        return "holds a NUL byte"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", location):
        return "climbs out of the model's folder with '..'"
    real_base = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([real_base, resolved]) != real_base or resolved == real_base:
        return f"resolves to {resolved}, outside the model's folder (a symbolic link)"
    if not os.path.isfile(resolved):
        return "does not exist or is not a regular file" if not os.path.exists(resolved) else "is not a regular file"
    return None


def check_external_data(model_path: "str | os.PathLike[str]") -> list[str]:
    """The external-data files ``model_path`` reads (all inside its folder), or ExternalDataError
    naming the first tensor whose reference is absolute, climbs out with ``..``, leaves the
    folder through a symlink, or is not a regular file. MalformedModelError for non-protobuf."""
    path = os.fspath(model_path)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return []  # nothing to follow; onnxruntime says why an empty file is no model
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b"location") < 0:  # the entry's key is stored verbatim: no key, no reference
                return []
            data = mm[:]
    base = os.path.dirname(os.path.abspath(path))  # onnxruntime resolves against the path as given
    seen: list[str] = []
    for name, location in external_data_locations(data):
        reason = _escape_reason(base, location)
        if reason:
            raise ExternalDataError(
                f"tensor {name!r} keeps its data in another file whose location {location!r} {reason}; "
                "a model may only read external data from files inside its own folder")
        if location not in seen:
            seen.append(location)
    return seen
