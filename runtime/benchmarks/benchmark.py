"""``cxr-infer bench``: accuracy and speed of one or more models on a labelled folder, in one table.

Shaped like Ultralytics' ``yolo benchmark`` (one row per model: format, size, accuracy, speed)
with onnxruntime_perf_test's habits (warm-up first, then percentiles, never a lone mean).

For each model the labelled folder is scanned by the runtime's own scan engine
(``engine.scan_files``, the code path of ``cxr-infer scan``), so accuracy and end-to-end
throughput (decode included) come from the same pass. Pure inference is timed separately on
already-preprocessed images: latency at batch 1, and the throughput the model alone sustains at
the scan's batch size. The decode stage is timed alone too (files -> preprocessed tensors, no
model), and the two give the ceiling a scan can approach ("how close to the limit"): the slower
stage, and on a CPU, where the stages share the cores, the cores divided by the core-seconds
both stages spend per image.

Folder classes the model does not know (e.g. Lung_Opacity given to a 3-class model) are not
dropped silently: they are counted, with what the model predicted for them, and left out of
accuracy with a note. The first model is the reference for top-1 agreement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..cpu import cpu_info
from ..dataset import (LabelledImage, discover_labelled, item_path, override_roots, read_split_manifest, source_name,
                       source_roots)
from ..engine import DEFAULT_BATCH_SIZE, default_threads, default_workers, prepare, scan_files
from ..latency import percentiles_ms
from ..metrics import classification_report, format_per_source, per_source_report
from ..session import Model, ModelLoadError, load_model
from .triage_bench import TriageUnavailable, bench_triage, bench_triage_policy, format_bench_triage

FORMAT = "cxr-bench/1"
DEFAULT_RUNS = 100  # timed batch-1 inferences per model
WARMUP_RUNS = 10
LATENCY_SAMPLES = 16  # distinct preprocessed images cycled through by the inference timings
MIN_TIMED_S = 2.0  # the model-alone throughput is timed for at least this long
DECODE_SAMPLES = 256  # files decoded + preprocessed (no model) to time the decode stage alone
MAX_ERROR_EXAMPLES = 5


class BenchError(Exception):
    """Bad input to the benchmark (folder, models); the CLI exits 2 with this message."""


# ---------------------------------------------------------------------------------------------
# inputs


def shipped_model_paths() -> list[Path]:
    """The shipped models, fp32 first (the reference), then int8; BenchError when none."""
    from cxr.models import PRECISIONS, NoShippedModelError, default_model_path, shipped_models

    try:
        listed = shipped_models()["models"]
        order = [p for p in PRECISIONS if p in listed] + sorted(p for p in listed if p not in PRECISIONS)
        return [default_model_path(p) for p in order]
    except NoShippedModelError as exc:
        raise BenchError(f"no --model given and {exc}") from None


def select_items(items: Sequence[LabelledImage], limit: int | None) -> list[LabelledImage]:
    """At most ``limit`` images, taken round-robin across (source, class) groups (so a small limit
    still covers every class of every source), returned in the folders' order. Deterministic."""
    if not limit or limit >= len(items):
        return list(items)
    by_class: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault((it.source, it.label), []).append(i)
    queues = [iter(v) for v in by_class.values()]
    chosen: list[int] = []
    while len(chosen) < limit and queues:
        for q in list(queues):
            i = next(q, None)
            if i is None:
                queues.remove(q)
            elif len(chosen) < limit:
                chosen.append(i)
    return [items[i] for i in sorted(chosen)]


def split_items(data_dirs: "Sequence[str | os.PathLike[str]]", split_path: "str | os.PathLike[str]",
                subset: str = "test") -> tuple[list[str], list[LabelledImage]]:
    """(classes, items) of one subset of a cxr-train split manifest (``split.json``, see
    docs/contracts.md), each image under its source's root (``data_dirs``, one per source, where
    the data moved): accuracy on the held-out test split, not on images the model was trained on."""
    try:
        manifest = override_roots(read_split_manifest(split_path), list(data_dirs) or None)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    roots = source_roots(manifest)
    for name, root in roots.items():
        if not root.is_dir():
            raise BenchError(f"source {name!r} of {split_path}: {root} is not a folder (give its folder as DATA_DIR)")
    rows = [it for it in manifest["items"] if it.get("split") == subset]
    if not rows:
        subsets = sorted({str(it.get("split")) for it in manifest["items"]})
        raise BenchError(f"{split_path} has no {subset!r} items (it has: {', '.join(subsets) or 'none'})")
    items = [LabelledImage(item_path(manifest, it, roots), str(it["label"]), it["source"]) for it in rows]
    labels = {it.label for it in items}
    classes = [c for c in manifest.get("classes", []) if c in labels] + sorted(labels - set(manifest.get("classes", [])))
    return classes, items


def folder_items(data_dirs: "Sequence[str | os.PathLike[str]]") -> tuple[list[str], list[LabelledImage]]:
    """Labelled folders, each a source named after it; classes are the union, first-seen order."""
    classes: list[str] = []
    items: list[LabelledImage] = []
    taken: set[str] = set()
    for d in data_dirs:
        if not os.path.isdir(d):
            raise BenchError(f"{d} is not a folder")
        try:
            found, labelled = discover_labelled(d)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        name = source_name(d, taken)
        taken.add(name)
        classes += [c for c in found if c not in classes]
        items += [LabelledImage(it.path, it.label, name) for it in labelled]
    return classes, items


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def map_labels(folder_classes: Sequence[str], model_classes: Sequence[str]) -> tuple[dict[str, int | None], list[str]]:
    """Folder class -> model output index (None: the model does not know it), plus notes.

    Exact names first; then names equal up to case and ``_``/``-``/space (``Viral_Pneumonia`` is
    ``Viral Pneumonia``), which is reported so the match is never silent."""
    exact = {c: i for i, c in enumerate(model_classes)}
    loose = {_norm(c): i for i, c in enumerate(model_classes)}
    mapping: dict[str, int | None] = {}
    notes: list[str] = []
    for c in folder_classes:
        if c in exact:
            mapping[c] = exact[c]
        elif _norm(c) in loose:
            mapping[c] = loose[_norm(c)]
            notes.append(f"folder class {c!r} taken as model class {model_classes[mapping[c]]!r}")
        else:
            mapping[c] = None
    return mapping, notes


def warm_file_cache(paths: Sequence[str]) -> None:
    """Read every file once so the first model's scan does not pay for a cold disk the others skip."""
    for p in paths:
        try:
            with open(p, "rb") as fh:
                while fh.read(1 << 20):
                    pass
        except OSError:
            pass  # the scan reports it


# ---------------------------------------------------------------------------------------------
# timings


def sample_inputs(model: Model, paths: Sequence[str], count: int = LATENCY_SAMPLES) -> np.ndarray | None:
    """Up to ``count`` preprocessed images spread over ``paths`` (same decode+preprocess as a scan)."""
    if not paths:
        return None
    step = max(1, len(paths) // count)
    tensors = []
    for p in list(paths[::step]) + list(paths):  # evenly spaced first; fill from the start if some fail
        if len(tensors) >= count:
            break
        x, err, _, _ = prepare(p, model.info.preprocess)
        if x is not None:
            tensors.append(x)
    return np.stack(tensors) if tensors else None


def time_batch1(model: Model, samples: np.ndarray, runs: int, warmup: int = WARMUP_RUNS) -> dict[str, Any]:
    """Warm per-image latency at batch 1 on preprocessed inputs: pure inference."""
    for i in range(warmup):
        model.run(samples[i % len(samples)][None])
    times = []
    for i in range(runs):
        x = samples[i % len(samples)][None]
        t0 = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - t0)
    return {"batch_size": 1, "warmup_runs": warmup, **percentiles_ms(times)}


def time_batched(model: Model, samples: np.ndarray, batch_size: int, runs: int) -> dict[str, Any]:
    """Images/s the model alone sustains at ``batch_size`` (median batch time; no decode)."""
    idx = np.arange(batch_size) % len(samples)
    batch = np.ascontiguousarray(samples[idx])
    n_batches = max(5, math.ceil(runs / batch_size))
    for _ in range(2):
        model.run(batch)
    times = []
    start, cpu0 = time.perf_counter(), time.process_time()
    # at least n_batches, and at least MIN_TIMED_S of them: a handful of batches on a shared
    # machine is noise, and this number is the ceiling the scan is judged against
    while len(times) < n_batches or time.perf_counter() - start < MIN_TIMED_S:
        t0 = time.perf_counter()
        model.run(batch)
        times.append(time.perf_counter() - t0)
    cores = (time.process_time() - cpu0) / max(time.perf_counter() - start, 1e-9)
    median = float(np.median(times))
    return {"batch_size": batch_size, "batches": len(times), "batch_ms_p50": median * 1e3, "cores_busy": cores,
            "images_per_s": batch_size / median if median > 0 else None}


def time_decode(paths: Sequence[str], pp, workers: int, count: int = DECODE_SAMPLES) -> dict[str, Any] | None:
    """Images/s the read + decode + preprocess stage alone sustains with ``workers`` threads
    (up to ``count`` files spread over ``paths``; no model)."""
    if not paths:
        return None
    step = max(1, len(paths) // count)
    sample = list(paths[::step])[:count]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda p: prepare(p, pp), sample[: 2 * workers]))  # warm the threads
        t0, cpu0 = time.perf_counter(), time.process_time()
        ok = sum(1 for x, _, _, _ in pool.map(lambda p: prepare(p, pp), sample) if x is not None)
        dt = time.perf_counter() - t0
        cores = (time.process_time() - cpu0) / max(dt, 1e-9)
    return {"images": len(sample), "readable": ok, "workers": workers, "cores_busy": cores,
            "images_per_s": len(sample) / dt if dt > 0 else None}


def pipeline_limit(decode: dict | None, infer: dict | None, shared_cores: bool,
                   cpus: int | None = None) -> float | None:
    """The best a scan could do given each stage timed alone (``images_per_s`` and the CPU
    cores it kept busy, ``cores_busy``). No scan beats its slower stage; on a CPU provider the
    two stages also share the machine's cores, so per image their core-seconds add up and
    ``cpus / (decode core-s + inference core-s)`` bounds it too. (A model that alone keeps only
    part of the cores busy leaves room for decoding, which this accounts for.)"""
    d_ips = (decode or {}).get("images_per_s")
    i_ips = (infer or {}).get("images_per_s")
    if not d_ips or not i_ips:
        return None
    limit = min(d_ips, i_ips)
    if shared_cores:
        cpus = cpus or os.cpu_count() or 1
        core_s = decode.get("cores_busy", cpus) / d_ips + infer.get("cores_busy", cpus) / i_ips
        if core_s > 0:
            limit = min(limit, cpus / core_s)
    return limit


# ---------------------------------------------------------------------------------------------
# one model


def bench_model(
    model: Model,
    items: Sequence[LabelledImage],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    runs: int = DEFAULT_RUNS,
    log: Callable[[str], None] = lambda s: None,
    sensitivity: float | None = None,
    not_xray: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str | None]]:
    """Scan ``items`` with ``model`` and time it; returns (row, predicted label per item or None)."""
    classes = list(model.classes)
    pp = model.info.preprocess
    paths = [os.fspath(it.path) for it in items]
    folder_classes = list(dict.fromkeys(it.label for it in items))
    mapping, notes = map_labels(folder_classes, classes)
    workers = workers or default_workers(model.runs_on)
    scan_batch = min(batch_size, model.max_batch or batch_size)

    log(f"  pure inference: batch 1 x {runs}, batch {scan_batch}")
    samples = sample_inputs(model, paths)
    latency = percentiles_ms([])
    if samples is None:
        notes.append("no image could be read, so pure inference was not timed")
    elif model.max_batch not in (None, 1):
        notes.append(f"the graph has a fixed batch of {model.max_batch}: batch-1 latency cannot be measured")
    else:
        latency = time_batch1(model, samples, runs)
    limit = time_batched(model, samples, scan_batch, runs) if samples is not None else None
    decode = time_decode(paths, pp, os.cpu_count() or 1)

    log(f"  scan: {len(paths)} images, batch {scan_batch}, {workers} decode workers")
    policy, no_triage = bench_triage_policy(model, sensitivity)
    results, stats = scan_files(model, paths, batch_size=scan_batch, workers=workers, triage=policy)
    if len(results) != len(paths):  # the engine promises one result per file; say so loudly if not
        raise RuntimeError(f"scan returned {len(results)} results for {len(paths)} files")

    predicted: list[str | None] = []
    y_true: list[int] = []
    y_pred: list[int] = []
    y_src: list[str] = []
    probs: list[list[float]] = []
    unknown: dict[str, dict[str, Any]] = {}
    errors: Counter = Counter()
    error_examples: list[dict[str, str]] = []
    display: dict[str, Counter] = {c: Counter() for c in folder_classes}  # folder class -> predictions
    for item, res in zip(items, results):
        idx = mapping[item.label]
        if idx is None:
            u = unknown.setdefault(item.label, {"count": 0, "errors": 0, "predicted": Counter()})
            u["count"] += 1
        if not res.ok:
            predicted.append(None)
            errors[item.label] += 1
            display[item.label]["(error)"] += 1
            if idx is None:
                unknown[item.label]["errors"] += 1
            if len(error_examples) < MAX_ERROR_EXAMPLES:
                error_examples.append({"path": os.fspath(item.path), "error": res.error or ""})
            continue
        label = res.prediction.label
        predicted.append(label)
        display[item.label][label] += 1
        if idx is None:
            unknown[item.label]["predicted"][label] += 1
        else:
            y_true.append(idx)
            y_pred.append(classes.index(label))
            y_src.append(item.source)
            probs.append([res.prediction.probabilities[c] for c in classes])

    if y_true:
        rep = classification_report(np.array(y_true), np.array(y_pred), classes, np.array(probs))
        for c, pc in rep["per_class"].items():
            if pc["support"] == 0:  # no images of this class in the folder: recall is undefined
                pc["sensitivity"] = None
                pc["f1"] = None
    else:
        rep = None
        notes.append("no image in the folder has a class this model knows: accuracy is undefined")
    unknown_note = None
    if unknown:
        n_unknown = sum(u["count"] for u in unknown.values())
        unknown_note = (
            f"{n_unknown} image(s) of class(es) the model does not know ({', '.join(unknown)}) are "
            "left out of accuracy, macro-F1 and sensitivity; their predictions are listed under unknown_labels"
        )
    n_err = sum(errors.values())
    if n_err:
        notes.append(f"{n_err} file(s) could not be read and are left out of every metric")

    wall = stats.wall_s
    scan_ips = stats.ok / wall if wall > 0 else None
    infer_ips = limit["images_per_s"] if limit else None
    shared = model.runs_on == "cpu"  # on CUDA inference has its own cores
    limit_ips = pipeline_limit(decode, limit, shared)
    attempted = max(stats.files, 1)
    row: dict[str, Any] = {
        "model": os.fspath(model.path),
        "name": model.path.name,
        "format": "ONNX",
        "precision": model.info.precision,
        "arch": model.info.arch,
        "input_size": pp.size,
        "classes": classes,
        "providers": list(model.providers),
        "size_bytes": model.path.stat().st_size,
        "size_mb": model.path.stat().st_size / 1e6,
        "model_load_ms": model.load_ms,
        "first_inference_ms": model.first_inference_ms,
        "images": len(items),
        "classified": stats.ok,
        "errors": n_err,
        "errors_by_class": dict(errors),
        "error_examples": error_examples,
        "evaluated": len(y_true),
        "accuracy": rep["accuracy"] if rep else None,
        "macro_f1": rep["macro_f1"] if rep else None,
        "macro_roc_auc": rep.get("macro_roc_auc") if rep else None,
        "per_class": rep["per_class"] if rep else {},
        "by_source": per_source_report(y_true, y_pred, y_src, classes) if rep else {},
        "confusion_matrix": rep["confusion_matrix"] if rep else None,
        "confusion_by_folder_class": {c: dict(cnt) for c, cnt in display.items()},
        "label_mapping": {c: (classes[i] if i is not None else None) for c, i in mapping.items()},
        "unknown_labels": {k: {**v, "predicted": dict(v["predicted"])} for k, v in unknown.items()},
        "unknown_labels_note": unknown_note,
        "latency_batch1_ms": latency,
        "inference_throughput": limit,
        "decode_throughput": decode,
        "pipeline_limit": {"images_per_s": limit_ips, "shared_cores": shared},
        "scan": {
            "batch_size": scan_batch,
            "decode_workers": workers,
            "wall_s": wall,
            "images_per_s": scan_ips,
            "stages_ms_per_image": {
                "read_decode": stats.read_s * 1e3 / attempted,
                "preprocess": stats.preprocess_s * 1e3 / attempted,
                "inference": stats.inference_s * 1e3 / max(stats.ok, 1),
            },
        },
        "scan_pct_of_limit": (100.0 * scan_ips / limit_ips) if scan_ips and limit_ips else None,
        "scan_pct_of_model_alone": (100.0 * scan_ips / infer_ips) if scan_ips and infer_ips else None,
        "agreement": None,
        "notes": notes + list(model.notes),
    }
    row["triage"] = bench_triage(policy, no_triage, items, results)
    from .inputcheck_bench import bench_not_xray

    row["input_check"] = bench_not_xray(model, results, [(it.source or "-", it.label) for it in items],
                                        not_xray, batch_size=scan_batch, workers=workers, log=log)
    return row, predicted


def agreement(reference: Sequence[str | None], other: Sequence[str | None]) -> dict[str, Any]:
    """Top-1 agreement over the images both models classified (unknown-label images included)."""
    pairs = [(a, b) for a, b in zip(reference, other) if a is not None and b is not None]
    agree = sum(a == b for a, b in pairs)
    return {"compared": len(pairs), "agree": agree, "top1_agreement": agree / len(pairs) if pairs else None}


# ---------------------------------------------------------------------------------------------
# the whole run


def run_bench(
    data_dir: "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]",
    model_paths: Sequence["str | os.PathLike[str]"] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    device: str = "cpu",
    limit: int | None = None,
    workers: int | None = None,
    runs: int = DEFAULT_RUNS,
    split: "str | os.PathLike[str] | None" = None,
    subset: str = "test",
    log: Callable[[str], None] = lambda s: None,
    sensitivity: float | None = None,
    not_xray: Sequence["str | os.PathLike[str]"] = (),
) -> dict[str, Any]:
    """Benchmark ``model_paths`` (default: the shipped fp32 + int8) on a labelled folder, or on
    the ``subset`` of a split manifest resolved against it.

    Raises BenchError (bad folder, no shipped model) or ModelLoadError (a model cannot be used).
    """
    import onnxruntime as ort

    data_dirs = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir or [])
    for d in not_xray:
        if not os.path.isdir(d):
            raise BenchError(f"--not-xray {d} is not a folder")
    if split is not None:
        folder_classes, items = split_items(data_dirs, split, subset)
    elif not data_dirs:
        raise BenchError("no labelled folder given")
    else:
        folder_classes, items = folder_items(data_dirs)
    sources = list(dict.fromkeys(it.source for it in items))
    total = len(items)
    items = select_items(items, limit)
    paths = [Path(p) for p in model_paths] if model_paths else shipped_model_paths()
    for p in paths:
        if not p.is_file():
            raise BenchError(f"model file not found: {p}")
    if threads is None:
        threads = default_threads(device, workers)
    workers = workers or default_workers(device)
    counts = Counter(it.label for it in items)
    log(f"bench: {len(items)} of {total} images in {', '.join(map(os.fspath, data_dirs)) or split} "
        f"({', '.join(f'{c} {counts[c]}' for c in folder_classes)}), {len(paths)} model(s)")
    warm_file_cache([os.fspath(it.path) for it in items])

    rows: list[dict[str, Any]] = []
    reference: list[str | None] | None = None
    for i, p in enumerate(paths):
        log(f"[{i + 1}/{len(paths)}] {p}")
        model = load_model(p, device=device, threads=threads)
        row, predicted = bench_model(model, items, batch_size=batch_size, workers=workers, runs=runs, log=log,
                                     sensitivity=sensitivity, not_xray=[os.fspath(d) for d in not_xray])
        if reference is None:
            reference = predicted
        else:
            row["agreement"] = {"reference": rows[0]["name"], **agreement(reference, predicted)}
        rows.append(row)
        del model  # free the session before the next one
    return {
        "format": FORMAT,
        "data": ", ".join(map(os.fspath, data_dirs)) if data_dirs else "sources " + ", ".join(sources),
        "sources": sources,
        "images_per_source": dict(Counter(it.source for it in items)),
        "folder_classes": folder_classes,
        "split": {"manifest": os.fspath(split), "subset": subset} if split is not None else None,
        "images_in_folder": total,
        "images": len(items),
        "images_per_class": {c: counts[c] for c in folder_classes},
        "limit": limit,
        "device": device,
        "intra_op_threads": threads or "auto",
        "batch_size": batch_size,
        "decode_workers": workers,
        "latency_runs": runs,
        "cpu": cpu_info()["model"] or "unknown CPU",
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "file_cache": "every file was read once before timing, so no model pays for a cold disk",
        "models": rows,
    }


# ---------------------------------------------------------------------------------------------
# text output


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _size_mb(mb: float) -> str:
    return f"{mb:.2f}" if mb >= 0.1 else f"{mb:.2g}"


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(header)))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_summary(result: dict[str, Any]) -> str:
    """The one table (Ultralytics style), then per-model details, unknown labels and the limit."""
    rows = result["models"]
    classes: list[str] = []
    for r in rows:
        classes += [c for c in r["classes"] if c not in classes]
    batch = rows[0]["scan"]["batch_size"] if rows else result["batch_size"]
    header = ["Model", "Format", "Size MB", "Acc %", "Macro-F1", *[f"Sens {c}" for c in classes],
              "p50 ms", "p90 ms", f"img/s (scan, b{batch})", "Agree %"]
    body = []
    for r in rows:
        pc = r["per_class"]
        body.append([
            r["name"], f"{r['format']} {r['precision']}", _size_mb(r["size_mb"]), _pct(r["accuracy"]),
            _num(r["macro_f1"], ".4f"),
            *[_num(pc.get(c, {}).get("sensitivity"), ".3f") for c in classes],
            _num(r["latency_batch1_ms"]["p50"]), _num(r["latency_batch1_ms"]["p90"]),
            _num(r["scan"]["images_per_s"], ".1f"),
            "ref" if r["agreement"] is None else _pct(r["agreement"]["top1_agreement"], 2),
        ])
    counts = ", ".join(f"{c} {n}" for c, n in result["images_per_class"].items())
    where = result["data"]
    if result.get("split"):
        where += f"  ({result['split']['subset']} split of {result['split']['manifest']})"
    out = [
        f"cxr-infer bench  {where}  ({result['images']} images: {counts})",
        f"{result['cpu']} ({result['cpu_count']} CPUs), onnxruntime {result['onnxruntime']}, device "
        f"{result['device']}, threads {result['intra_op_threads']}, decode workers {result['decode_workers']}",
        "",
        _table(header, body),
        "",
        "Acc/Macro-F1/Sens: images whose folder class the model knows; p50/p90: warm batch-1 inference on "
        "preprocessed images; img/s: end-to-end scan (decode included); Agree: top-1 vs the first model.",
    ]
    for r in rows:
        out += ["", f"== {r['name']} ({r['format']} {r['precision']}, {r['arch']}, {r['input_size']} px)"]
        if len(r.get("by_source") or {}) > 1 or (r.get("by_source") and result.get("split")):
            out += [format_per_source(r["by_source"], [c for c in classes if c in r["classes"]],
                                      "by source (accuracy, then each class's sensitivity and n within the source):"), ""]
        if r["per_class"]:
            pc_rows = [[c, str(v["support"]), _num(v["sensitivity"], ".3f"), _num(v["specificity"], ".3f"),
                        _num(v["precision"], ".3f"), _num(v["f1"], ".3f")] for c, v in r["per_class"].items()]
            out += [_table(["class", "support", "sens", "spec", "precision", "F1"], pc_rows), ""]
        cols = list(r["classes"])
        if any("(error)" in cnt for cnt in r["confusion_by_folder_class"].values()):
            cols.append("(error)")
        cm_rows = []
        for folder_cls, cnt in r["confusion_by_folder_class"].items():
            mark = "" if r["label_mapping"].get(folder_cls) is not None else " *"
            cm_rows.append([folder_cls + mark, *[str(cnt.get(c, 0)) for c in cols]])
        out.append("confusion matrix (rows: folder class, columns: predicted)")
        out.append(_table(["true \\ pred", *cols], cm_rows))
        for name, u in r["unknown_labels"].items():
            preds = ", ".join(f"{c} {n}" for c, n in sorted(u["predicted"].items(), key=lambda kv: -kv[1])) or "none"
            err = f", {u['errors']} unreadable" if u["errors"] else ""
            out.append(f"* {name}: {u['count']} image(s) of a class this model does not know{err}; "
                       f"predicted as: {preds}")
        if r["unknown_labels_note"]:
            out.append(f"note: {r['unknown_labels_note']}")
        for ex in r["error_examples"]:
            out.append(f"unreadable: {ex['path']}: {ex['error']}")
        out += [f"note: {note}" for note in r["notes"]]
        out.append(format_bench_triage(r.get("triage")))
    from .inputcheck_bench import format_not_xray

    out += format_not_xray(rows, _table)
    out += ["", f"How close to the limit (batch {batch}): each stage alone, the best a scan could do "
            "with both, and the scan:"]
    for r in rows:
        lim = r["inference_throughput"]
        dec = r.get("decode_throughput")
        pl = r.get("pipeline_limit") or {}
        st = r["scan"]["stages_ms_per_image"]
        how = (f"{dec['cores_busy'] if dec else 0:.1f} + {lim['cores_busy'] if lim else 0:.1f} cores busy alone, "
               f"sharing {result['cpu_count']}" if pl.get("shared_cores") and dec and lim
               else "the slower stage bounds it")
        out.append(
            f"  {r['name']}: decode alone {_num(dec['images_per_s'] if dec else None, '.0f')} img/s "
            f"({dec['workers'] if dec else '-'} threads), model alone {_num(lim['images_per_s'] if lim else None, '.0f')} "
            f"img/s -> limit {_num(pl.get('images_per_s'), '.0f')} img/s ({how}); "
            f"scan {_num(r['scan']['images_per_s'], '.0f')} img/s = {_num(r['scan_pct_of_limit'], '.0f')}% of the limit"
        )
        out.append(
            f"    per image in the scan: read+decode {st['read_decode']:.2f} ms, preprocess {st['preprocess']:.2f} ms "
            f"in {r['scan']['decode_workers']} threads; inference {st['inference']:.2f} ms"
        )
    return "\n".join(out)


def write_json(result: dict[str, Any], path: "str | os.PathLike[str]") -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")


def bench_command(data_dir, model_paths, *, json_path=None, batch_size=DEFAULT_BATCH_SIZE, threads=None,
                  device="cpu", limit=None, workers=None, runs=DEFAULT_RUNS, split=None, subset="test",
                  sensitivity=None, not_xray=()) -> int:
    """What ``cxr-infer bench`` does; returns the exit status (0 ok, 1 some files unreadable, 2 bad input)."""
    import click

    if json_path:
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent) or os.path.isdir(json_path):
            click.echo(f"error: cannot write --json {json_path}: {parent} is not a folder"
                       if not os.path.isdir(parent) else f"error: --json {json_path} is a folder", err=True)
            return 2

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        result = run_bench(data_dir, model_paths, batch_size=batch_size, threads=threads, device=device,
                           limit=limit, workers=workers, runs=runs, split=split, subset=subset, log=log,
                           sensitivity=sensitivity, not_xray=not_xray)
    except (BenchError, ModelLoadError, TriageUnavailable) as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    click.echo(format_summary(result))
    if json_path:
        try:
            write_json(result, json_path)
        except OSError as exc:
            click.echo(f"error: cannot write {json_path}: {exc.strerror or exc}", err=True)
            return 2
        click.echo(f"wrote {json_path}", err=True)
    return 1 if any(r["errors"] for r in result["models"]) else 0


if __name__ == "__main__":  # python -m cxr.runtime.benchmarks.benchmark DIR MODEL...
    sys.exit(bench_command(sys.argv[1], sys.argv[2:] or None))
