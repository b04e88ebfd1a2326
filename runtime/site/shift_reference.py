"""The shift check's reference for a model file: its own validation films' ``qc_score``, by source.

Computed torch-free, with the runtime's own scan engine (the preprocessing, input check and score
every scan uses), from the model file and its split manifest -- so it can be added to a model that
was exported before the check (``cxr-infer shift-reference``) and refitted on a site's films
(``cxr-infer adapt``). ``cxr-export`` writes the same entry from the validation scores it already
computes for the input check's thresholds (``shift.build_reference``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .. import model_edit
from ..dataset import item_path, override_roots, read_split_manifest
from . import shift


def split_items(split: "str | os.PathLike[str]", subset: str = "val",
                data_roots: "Sequence[str | os.PathLike[str]] | None" = None) -> list[tuple[str, str]]:
    """(path, source) of one subset of a cxr-train split manifest."""
    doc = override_roots(read_split_manifest(split), list(data_roots) if data_roots else None)
    items = [(str(item_path(doc, it)), it["source"]) for it in doc["items"] if it.get("split") == subset]
    if not items:
        raise ValueError(f"{split} has no {subset!r} items")
    return items


def score_films(model, paths: Sequence[str], progress: Callable[[int, int], None] | None = None):
    """Scan ``paths`` with ``model``: [(qc, qc_score, top-1 class)] in order (Nones for unreadable files)."""
    from ..engine import iter_scan

    out = []
    for i, r in enumerate(iter_scan(model, list(paths))):
        out.append((r.qc, r.qc_score, r.prediction.label) if r.ok else (None, None, None))
        if progress is not None:
            progress(i + 1, len(paths))
    return out


def reference_from_scores(scored, sources: Sequence[str], *, fitted_on: str, precision: str) -> dict:
    keep = [(s, src, c) for (qc, s, c), src in zip(scored, sources) if shift.eligible(qc, s)]
    if not keep:
        raise ValueError("no film was judged a chest X-ray with a qc_score: does the model have an input check?")
    return shift.build_reference([k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep],
                                 fitted_on=fitted_on, precision=precision)


def stderr_progress(label: str) -> Callable[[int, int], None]:
    """A progress counter on stderr (every 200 films and at the end)."""
    def report(done: int, total: int) -> None:
        if done == total or done % 200 == 0:
            print(f"  {label}: {done}/{total} films", file=sys.stderr, flush=True)
    return report


def add_reference(model_path: "str | os.PathLike[str]", out: "str | os.PathLike[str]", split, subset: str = "val",
                  data_roots=None, progress: bool = True) -> dict:
    """Compute the reference of ``model_path`` on its split's ``subset`` and write the model with it
    to ``out`` (may be the same file: only the ``cxr.shift_reference`` entry changes, which the
    returned summary proves with the graph's digest before and after)."""
    from ..session import load_model

    model_edit.require_onnx("cxr-infer shift-reference")
    model = load_model(model_path, threads=None)
    if model.qc_output is None:
        raise ValueError(f"{model_path} has no qc_score output: the shift check compares qc_score, so a model "
                         "exported before the input check cannot carry a reference (re-export it)")
    items = split_items(split, subset, data_roots)
    scored = score_films(model, [p for p, _ in items], stderr_progress("shift reference") if progress else None)
    entry = reference_from_scores(scored, [s for _, s in items], fitted_on=f"{subset} split of {Path(split).name}",
                                  precision=model.info.precision)
    proto = model_edit.load_proto(model_path, "cxr-infer shift-reference")
    before = model_edit.graph_digest(proto)
    model_edit.set_props(proto, {"cxr." + shift.METADATA_KEY: model_edit.encode(entry)})
    model_edit.save_checked(proto, out)
    after = model_edit.graph_digest(model_edit.load_proto(out))
    if after != before:  # cannot happen unless onnx rewrote the graph; never leave such a file
        raise model_edit.ModelEditError(f"the graph of {out} changed while only metadata was written")
    return {"out": str(out), "graph_sha256": after, "sources": {k: v["n"] for k, v in entry["sources"].items()},
            "films": sum(v["n"] for v in entry["sources"].values()), "unreadable": sum(1 for q, _, _ in scored if q is None)}
