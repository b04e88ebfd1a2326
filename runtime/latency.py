"""The latency report, shaped like onnxruntime_perf_test: cold costs apart, then warm percentiles.

Field meanings (also in docs/runtime.md):

- ``session_create_ms``: ``onnxruntime.InferenceSession(...)`` (parse + graph optimisation).
- ``model_load_ms``: all of loading -- finding the file, session creation, metadata checks.
- ``first_inference_ms``: one blank image right after loading (the warm-up run).
- ``warm_latency_ms``: per-image inference latency of the scan's batches, each image counted as
  its batch's inference time divided by the batch size (p50/p90/p99/mean/min/max over images).
- ``throughput_images_per_s``: classified images / wall time of the whole scan (discovery, decode,
  preprocessing, inference and writing output included).
- ``stages_ms_per_image``: mean per classified-or-attempted image of read+decode, preprocess
  (both measured in the decode threads, which run in parallel with inference) and inference.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .engine import ScanStats
from .session import Model

LATENCY_DEFINITION = "batch inference time / images in the batch, warm (after one warm-up inference)"


def percentiles_ms(values) -> dict[str, float | int | None]:
    """n, p50/p90/p99, mean, min, max in ms of durations given in seconds."""
    a = np.asarray(values, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
    }


def build_report(model: Model, stats: ScanStats, *, batch_size: int, workers: int) -> dict[str, Any]:
    """The report as a JSON-ready dict (what ``--report FILE`` writes)."""
    wall = stats.wall_s
    attempted = max(stats.files, 1)
    return {
        "model": str(model.path),
        "precision": model.info.precision,
        "providers": list(model.providers),
        "device": model.device,
        "intra_op_threads": model.threads or "auto",
        "decode_workers": workers,
        "batch_size": batch_size,
        "images_classified": stats.ok,
        "errors": stats.errors,
        "skipped": stats.skipped,
        "interrupted": stats.interrupted,
        "model_load_ms": model.load_ms,
        "session_create_ms": model.session_create_ms,
        "first_inference_ms": model.first_inference_ms,
        "warm_latency_ms": {"definition": LATENCY_DEFINITION, **percentiles_ms(stats.image_latency_s)},
        "wall_s": wall,
        "throughput_images_per_s": (stats.ok / wall) if wall > 0 else None,
        "stages_ms_per_image": {
            "read_decode": stats.read_s * 1e3 / attempted,
            "preprocess": stats.preprocess_s * 1e3 / attempted,
            "inference": stats.inference_s * 1e3 / max(stats.ok, 1),
        },
        "stages_total_s": {
            "read_decode": stats.read_s, "preprocess": stats.preprocess_s, "inference": stats.inference_s,
        },
        "batches": stats.batches,
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(r: dict[str, Any]) -> str:
    """Human-readable report for stderr."""
    lat = r["warm_latency_ms"]
    st = r["stages_ms_per_image"]
    tput = r["throughput_images_per_s"]
    lines = [
        f"latency  ({r['precision']}, {', '.join(r['providers'])}, batch {r['batch_size']}, "
        f"threads {r['intra_op_threads']}, decode workers {r['decode_workers']})",
        f"  model load            {_ms(r['model_load_ms'])} ms (session creation {_ms(r['session_create_ms'])} ms)",
        f"  first inference       {_ms(r['first_inference_ms'])} ms",
        f"  warm per-image        p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  "
        f"mean {_ms(lat['mean'])} ms  (n={lat['n']}; batch time / batch size)",
        f"  throughput            {'-' if tput is None else f'{tput:.1f}'} images/s over {r['wall_s']:.2f} s wall",
        f"  stages per image      read+decode {_ms(st['read_decode'])}  preprocess {_ms(st['preprocess'])}  "
        f"inference {_ms(st['inference'])} ms  (decode overlaps inference)",
    ]
    return "\n".join(lines)


def write_report(r: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(r, fh, indent=2)
        fh.write("\n")
