"""Checkpoints are data, never code: the one loader and the one sanitiser for ``.pt`` files.

``torch.load`` unpickles, and a pickle can call any function while it loads (``os.system``
included), so a checkpoint from a colleague, a shared run folder or a USB stick could run code
the moment cxr opened it. Every cxr command reads checkpoints through ``load_checkpoint``,
which uses ``torch.load(weights_only=True)``: tensors and plain containers (dict, list, tuple)
of str/int/float/bool/None, nothing else, and no fallback that unpickles more. The writer puts
every checkpoint through ``to_plain`` so what cxr-train saves is always readable that way.
"""

from __future__ import annotations

import os
import pathlib
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "cxr-checkpoint/1"

RESAVE_HINT = (
    "If you made this file yourself with an older cxr-train, re-save it as plain data where it was "
    "trained (that step unpickles it, so only for a file you trust): python -c \"import torch; "
    "from cxr.train.checkpoint import save_checkpoint; "
    "save_checkpoint(torch.load('OLD.pt', weights_only=False), 'NEW.pt')\". "
    "Never do that with a file from someone else: ask them to re-save it."
)


class CheckpointError(Exception):
    """The file cannot be read as a cxr checkpoint without running code; ``str(err)`` says why."""


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` rebuilt from tensors, dict/list/tuple and str/int/float/bool/None only.

    numpy scalars become Python numbers, numpy arrays tensors, paths strings, OrderedDicts
    dicts, sets sorted lists, namedtuples tuples. Anything else is a TypeError naming where it
    sits: a writer bug shows up when the checkpoint is saved, not when someone tries to load it.
    """
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach() if type(obj) is not torch.Tensor else obj
    if isinstance(obj, (dict, OrderedDict)):
        out = {}
        for k, v in obj.items():
            key = to_plain(k, f"{where} key")
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a str/int/float/bool")
            out[key] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return sorted((to_plain(v, f"{where} item") for v in obj), key=repr)
    if isinstance(obj, (str, int, float)):  # subclasses: str enums, IntEnum, numpy.float64
        return (str if isinstance(obj, str) else bool if isinstance(obj, bool)
                else int if isinstance(obj, int) else float)(obj)
    if isinstance(obj, os.PathLike) or isinstance(obj, pathlib.PurePath):
        return os.fspath(obj)
    np = _numpy()
    if np is not None:
        if isinstance(obj, np.generic):
            return to_plain(obj.item(), where)
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj.tolist())]
            return torch.from_numpy(obj.copy())
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
                    "(tensor, dict, list, tuple, str, int, float, bool, None)")


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a runtime dependency
        return None
    return numpy


def save_checkpoint(obj: dict, path: "str | os.PathLike[str]") -> None:
    """``to_plain(obj)`` written atomically (temp file, then rename): a crash keeps the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(to_plain(obj), tmp)
    os.replace(tmp, path)


def _unsafe_globals(path: Path) -> list[str]:
    """The classes/functions the pickle would call, read from its opcodes without running them."""
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if lister is None:
        return []
    try:
        return list(lister(os.fspath(path)))
    except Exception:
        return []


def load_checkpoint(path: "str | os.PathLike[str]", map_location: Any = "cpu",
                    expect_format: str | None = CHECKPOINT_FORMAT) -> dict:
    """Read a checkpoint as data only (``weights_only=True``), or raise CheckpointError.

    Nothing in the file runs: a pickle that needs any class or function outside tensors and
    plain containers is refused, with the names it asked for and how to re-save it.
    ``expect_format`` (default ``cxr-checkpoint/1``; None to skip) checks the ``format`` key.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}" if not p.exists() else f"not a file: {p}")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(p)
        what = (f"it asks to run {', '.join(names)}" if names
                else f"it holds more than tensors and plain data ({str(exc).strip().splitlines()[0][:200]})")
        raise CheckpointError(
            f"{p}: refused: {what}. Checkpoints are read as data only (tensors, dicts, lists, numbers, "
            f"strings); unpickling anything else could run code. {RESAVE_HINT}") from None
    except Exception as exc:  # not a torch file, truncated zip, wrong magic number ...
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint: {first}") from None
    if expect_format is not None:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        if got != expect_format:
            raise CheckpointError(f"{p} is not a {expect_format} checkpoint (format: {got!r}); make it with cxr-train")
    return ck
