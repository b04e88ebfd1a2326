"""Classification metrics and speed measurements, numpy only.

Export compares three implementations of the same model (PyTorch, fp32 ONNX, int8 ONNX) on
the same images; every number in the report comes from these few functions so the three
columns are computed identically.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

from cxr.runtime.metrics import classification_report, per_source_report


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                           sources: Sequence[str] | None = None) -> dict:
    """The runtime's ``classification_report`` over the known labels, as the report stores it.

    Labels < 0 (a folder class the model does not know) are left out. Classes absent from
    ``y_true`` get null sensitivity and F1 (not 0) and are left out of the macro average, so a
    small eval subset does not pretend a class scored 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    keep = y_true >= 0
    rep = classification_report(y_true[keep], y_pred[keep], list(classes))
    for v in rep["per_class"].values():
        if v["support"] == 0:
            v["sensitivity"] = v["f1"] = None
    rep["confusion"] = rep.pop("confusion_matrix")
    if rep["n"] == 0:
        rep["accuracy"] = rep["macro_f1"] = None
    if sources is not None and len(sources) == len(y_true):
        rep["by_source"] = per_source_report(y_true, y_pred, sources, list(classes))
    return rep


def agreement(a_probs: np.ndarray, b_probs: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same under both models."""
    if len(a_probs) == 0:
        return float("nan")
    return float(np.mean(np.argmax(a_probs, axis=1) == np.argmax(b_probs, axis=1)))


def prob_diff(a_probs: np.ndarray, b_probs: np.ndarray) -> dict:
    d = np.abs(np.asarray(a_probs, np.float64) - np.asarray(b_probs, np.float64))
    return {"max_abs_diff": float(d.max()) if d.size else 0.0, "mean_abs_diff": float(d.mean()) if d.size else 0.0}


# --------------------------------------------------------------------------- running models

def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Apply ``fn`` to ``x`` in batches; the last batch is smaller, which also exercises the
    dynamic batch axis."""
    outs = [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), np.float32)


def ort_session(path: "str | os.PathLike[str]", threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    out = [session.get_outputs()[0].name]  # probabilities only: extra outputs (cam) are not computed
    return lambda x: session.run(out, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def torch_runner(model, temperature: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """PyTorch reference: eval mode, no grad, softmax over the logits (divided by the calibration
    ``temperature`` when given), which is what the graph appends."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            if temperature is not None:
                logits = logits / temperature
            return torch.softmax(logits, dim=1).numpy()

    return run


def measure_speed(fn: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, runs: int = 50,
                  batch: int = 32, budget_s: float = 5.0) -> dict:
    """onnxruntime_perf_test style: warm up, then percentiles of batch-1 latency, and
    throughput at ``batch``. ``budget_s`` caps each measurement so large models stay affordable."""
    one = np.ascontiguousarray(sample[:1])
    for _ in range(3):
        fn(one)
    times = []
    t_end = time.perf_counter() + budget_s
    for i in range(max(1, runs)):
        t0 = time.perf_counter()
        fn(one)
        times.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > t_end:
            break
    ms = np.array(times) * 1e3
    reps = -(-batch // len(sample))
    big = np.ascontiguousarray(np.concatenate([sample] * reps, axis=0)[:batch])
    fn(big)
    n_b, t_b = 0, 0.0
    t_end = time.perf_counter() + budget_s
    while n_b < max(1, runs // 10) and (n_b < 1 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(big)
        t_b += time.perf_counter() - t0
        n_b += 1
    return {
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 3),
        "latency_runs": len(times),
        "throughput_ips": round(batch * n_b / t_b, 1),
        "throughput_batch": batch,
    }
