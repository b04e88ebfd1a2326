"""The shift check's reference for a model file: its own validation films' ``shift_features``, by
source and predicted class (``shift.build_reference``).

Computed torch-free, with the runtime's own scan engine (the preprocessing, input check and
features every scan uses), from the model file and its split manifest -- so it can be added to a
model exported before the check (``cxr-infer shift-reference``), and refitted on a site's films
(``cxr-infer adapt``). The features are a graph output this module adds (``add_feature_output``):
the leading principal-component coordinates the input check already computes at each depth, sliced
and concatenated. Nothing else in the graph changes, which ``add_reference`` proves on the films it
scans (every earlier output bit-identical).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import model_edit
from ..dataset import item_path, override_roots, read_split_manifest
from . import shift

PROJECTION_PREFIX = "qc.comp"  # the input check's per-depth principal components (export/input_check.py)


def split_items(split: "str | os.PathLike[str]", subset: str = "val",
                data_roots: "Sequence[str | os.PathLike[str]] | None" = None) -> list[tuple[str, str]]:
    """(path, source) of one subset of a cxr-train split manifest."""
    doc = override_roots(read_split_manifest(split), list(data_roots) if data_roots else None)
    items = [(str(item_path(doc, it)), it["source"]) for it in doc["items"] if it.get("split") == subset]
    if not items:
        raise ValueError(f"{split} has no {subset!r} items")
    return items


def add_feature_output(proto, components: int = shift.COMPONENTS) -> int:
    """Add (or rebuild) the ``shift_features`` output to ``proto`` in place: the first
    ``components`` columns of every input-check projection (MatMul by a ``qc.comp*`` matrix),
    concatenated. Returns its width. ValueError for a graph without an input check."""
    import onnx
    from onnx import helper

    g = proto.graph
    tag = shift.OUTPUT + "/"
    ours = [n for n in g.node if n.name.startswith(tag) or any(o.startswith(tag) or o == shift.OUTPUT for o in n.output)]
    if ours:  # a second run replaces the first (also in an int8 file quantized from one that had it)
        outs = [o for o in g.output if o.name != shift.OUTPUT]
        del g.output[:]
        g.output.extend(outs)
        gone = {id(n) for n in ours}
        while True:  # and what fed only those nodes (e.g. Q/DQ pairs a quantizer put in front of them)
            consumers: dict[str, list] = {}
            for n in g.node:
                for i in n.input:
                    consumers.setdefault(i, []).append(n)
            graph_outs = {o.name for o in g.output}
            more = [n for n in g.node if id(n) not in gone and n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    and n.output and not any(o in graph_outs for o in n.output)
                    and any(consumers.get(o) for o in n.output)
                    and all(id(c) in gone for o in n.output for c in consumers.get(o, []))]
            if not more:
                break
            gone |= {id(n) for n in more}
        keep = [n for n in g.node if id(n) not in gone]
        del g.node[:]
        g.node.extend(keep)
    # Constants no node reads any more: ours, and what only the removed nodes read (a quantizer's
    # scale and zero point; also left behind in files an earlier version of this function wrote).
    model_edit.drop_unread_initializers(g)
    init = {i.name: i for i in g.initializer}
    proj = []
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1].startswith(PROJECTION_PREFIX):
            k = int(onnx.numpy_helper.to_array(init[n.input[1]]).shape[1]) if n.input[1] in init else components
            proj.append((n.output[0], min(components, k)))
    if not proj:
        raise ValueError("the graph has no input-check projections (qc.comp*): export the model with its input "
                         "check (cxr-export) before adding a shift reference")
    have = {i.name: i for i in g.initializer}

    def const(name: str, value: int) -> None:
        # A graph optimiser (onnxruntime's, before quantization) may have pointed another node at
        # one of our constants, so it outlived our nodes: reuse it, it holds the same number.
        if name in have:
            if onnx.numpy_helper.to_array(have[name]).tolist() != [value]:
                raise ValueError(f"the graph already has a constant {name!r} of another value")
            return
        g.initializer.append(onnx.numpy_helper.from_array(np.array([value], np.int64), name))

    const(tag + "starts", 0)
    const(tag + "axes", 1)
    sliced = []
    for i, (name, k) in enumerate(proj):
        const(f"{tag}ends{i}", k)
        out = f"{tag}depth{i}"
        g.node.append(helper.make_node("Slice", [name, tag + "starts", f"{tag}ends{i}", tag + "axes"], [out],
                                       name=f"{tag}slice{i}"))
        sliced.append(out)
    g.node.append(helper.make_node("Concat", sliced, [shift.OUTPUT], axis=1, name=tag + "concat"))
    width = sum(k for _, k in proj)
    g.output.append(helper.make_tensor_value_info(shift.OUTPUT, onnx.TensorProto.FLOAT, [None, width]))
    return width


def score_films(model, paths: Sequence[str], progress: Callable[[int, int], None] | None = None):
    """Scan ``paths`` with ``model``: [(qc, features or None, top-1 class)] in order (Nones for
    unreadable files)."""
    from ..engine import iter_scan

    out = []
    for i, r in enumerate(iter_scan(model, list(paths))):
        out.append((r.qc, r.features, r.prediction.label) if r.ok else (None, None, None))
        if progress is not None:
            progress(i + 1, len(paths))
    return out


def reference_from_scores(scored, sources: Sequence[str], *, fitted_on: str, precision: str) -> dict:
    keep = [(f, src, c) for (qc, f, c), src in zip(scored, sources) if shift.eligible(qc, f)]
    if not keep:
        raise ValueError("no film was judged a chest X-ray with shift features: does the model have an input check?")
    return shift.build_reference(np.stack([k[0] for k in keep]), [k[1] for k in keep], [k[2] for k in keep],
                                 fitted_on=fitted_on, precision=precision)


def stderr_progress(label: str) -> Callable[[int, int], None]:
    """A progress counter on stderr (every 200 films and at the end)."""
    def report(done: int, total: int) -> None:
        if done == total or done % 200 == 0:
            print(f"  {label}: {done}/{total} films", file=sys.stderr, flush=True)
    return report


def with_features(model_path: "str | os.PathLike[str]", what: str):
    """(proto with the shift_features output, its width): the file's graph, unchanged otherwise."""
    proto = model_edit.load_proto(model_path, what)
    return proto, add_feature_output(proto)


def add_reference(model_path: "str | os.PathLike[str]", out: "str | os.PathLike[str]", split, subset: str = "val",
                  data_roots=None, progress: bool = True, items: "Sequence[tuple[str, str]] | None" = None) -> dict:
    """Compute the reference of ``model_path`` on its split's ``subset`` and write the model with it
    to ``out`` (may be the same file); ``items`` ((path, source) pairs) instead of reading them
    from ``split`` (``cxr-export``, which has resolved them already). Only the ``shift_features`` output and the
    ``cxr.shift_reference`` entry are added; every earlier output is proved bit-identical on the
    scanned films before the file is written."""
    from ..session import load_model

    model_edit.require_onnx("cxr-infer shift-reference")
    proto, width = with_features(model_path, "cxr-infer shift-reference")
    model_edit.set_props(proto, {"cxr." + shift.METADATA_KEY: None})  # an older reference would not load
    out_p = Path(out)
    tmp = out_p.with_name(out_p.stem + ".features-tmp.onnx")
    model_edit.save_checked(proto, tmp)  # loads and runs in onnxruntime, metadata decodes
    name = Path(split).name if split else "split manifest"
    try:
        model = load_model(tmp, threads=None)
        if model.qc_output is None:
            raise ValueError(f"{model_path} has no qc_score output: the shift check reads the input check's features, "
                             "so a model exported before the input check cannot carry a reference (re-export it)")
        items = list(items) if items is not None else split_items(split, subset, data_roots)
        paths = [p for p, _ in items]
        scored = score_films(model, paths, stderr_progress("shift reference") if progress else None)
        parity = prove_outputs_unchanged(model_path, model, paths[:64])
    finally:
        tmp.unlink(missing_ok=True)
    entry = reference_from_scores(scored, [s for _, s in items], fitted_on=f"{subset} split of {name}",
                                  precision=model.info.precision)
    model_edit.set_props(proto, {"cxr." + shift.METADATA_KEY: model_edit.encode(entry)})
    model_edit.save_checked(proto, out)
    return {"out": str(out), "dim": width, "parity": parity,
            "sources": {k: v["n"] for k, v in entry["sources"].items()},
            "films": sum(v["n"] for v in entry["sources"].values()),
            "unreadable": sum(1 for q, *_ in scored if q is None)}


def prove_outputs_unchanged(base_path, model, paths: Sequence[str]) -> dict:
    """Run ``paths`` through the file at ``base_path`` and through ``model`` (the graph with
    ``shift_features`` added): every output of the base must be bit-identical. ModelEditError otherwise."""
    import onnxruntime as ort

    from ..engine import prepare_checked

    xs = [p[0] for p in (prepare_checked(x, model.info.preprocess) for x in paths) if p[1] is None]
    if not xs:
        raise model_edit.ModelEditError("no readable film to prove the new graph on")
    x = np.stack(xs).astype(np.float32)
    base = ort.InferenceSession(os.fspath(base_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in base.get_outputs() if o.name != shift.OUTPUT]  # that one is being (re)built
    a = base.run(names, {base.get_inputs()[0].name: x})
    b = model.session.run(names, {model.input_name: x})
    for name, u, v in zip(names, a, b):
        if not np.array_equal(np.asarray(u), np.asarray(v)):
            raise model_edit.ModelEditError(f"output {name!r} changed when shift_features was added: "
                                            f"max |d| {float(np.max(np.abs(np.asarray(u) - np.asarray(v)))):.3g}")
    return {"films": int(len(x)), "outputs": names, "identical": True}
