"""Static int8 quantization (onnxruntime, QDQ, per-channel weights) and the scheme search.

Why a search: which int8 scheme is both accurate and fast depends on the CPU. Without VNNI,
x86 runs u8 activations x s8 weights through VPMADDUBSW, whose 16-bit intermediate can
saturate -- ``reduce_range`` (7-bit weights) avoids it at a small precision cost; s8
activations avoid it differently; the calibration method decides how outliers clip. So each
candidate is measured on validation images against fp32 and the fastest one inside the bound
is kept. Calibration uses training images only, never the images that measure the result,
and runs once per calibration method: the tensor ranges do not depend on the activation type
or reduce_range, so they are cached and reused across those.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .data import log
from .evaluate import agreement, classification_metrics, measure_speed, ort_runner, ort_session, run_batched

METHODS = ("minmax", "percentile", "entropy")
# Affordable default search on a small CPU: MinMax in all its variants (calibration is cheap),
# the histogram methods only with the variants most likely to win.
AUTO_CANDIDATES = ("u8s8-minmax", "u8s8-minmax-rr", "s8s8-minmax", "u8s8-percentile",
                   "s8s8-percentile", "u8s8-entropy")
KEEP_FLOAT_CHOICES = ("first_conv", "classifier")
_SCHEME_RE = re.compile(r"^(u8|s8)(u8|s8)-(minmax|percentile|entropy)(-rr)?$")


class QuantizationRefused(Exception):
    """No int8 candidate stayed within the accuracy/agreement bound."""


@dataclass(frozen=True)
class Scheme:
    activation: str  # "u8" | "s8"
    weight: str      # "s8" | "u8"
    method: str      # one of METHODS
    reduce_range: bool = False

    @property
    def name(self) -> str:
        return f"{self.activation}{self.weight}-{self.method}" + ("-rr" if self.reduce_range else "")

    @classmethod
    def parse(cls, text: str) -> "Scheme":
        m = _SCHEME_RE.match(text.strip().lower())
        if not m:
            raise ValueError(f"bad int8 scheme {text!r}: expected ACTWEIGHT-METHOD[-rr], e.g. u8s8-minmax, "
                             f"s8s8-percentile, u8s8-minmax-rr (methods: {', '.join(METHODS)})")
        act, w, method, rr = m.groups()
        if act == "s8" and w == "u8":
            raise ValueError("s8 activations with u8 weights is not supported by onnxruntime; use s8s8 or u8s8")
        return cls(act, w, method, bool(rr))

    def ort_args(self) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantType

        qt = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}
        return {"activation_type": qt[self.activation], "weight_type": qt[self.weight],
                "reduce_range": self.reduce_range, "calibrate_method": cm[self.method]}

    def to_dict(self) -> dict:
        return {"name": self.name, "activation_type": {"u8": "QUInt8", "s8": "QInt8"}[self.activation],
                "weight_type": {"u8": "QUInt8", "s8": "QInt8"}[self.weight],
                "calibration_method": self.method, "reduce_range": self.reduce_range,
                "per_channel": True, "format": "QDQ"}


def parse_schemes(text: str) -> list[Scheme]:
    """``auto`` -> the default candidates; otherwise one scheme or a comma-separated list."""
    names = AUTO_CANDIDATES if text.strip().lower() == "auto" else [t for t in text.split(",") if t.strip()]
    schemes = [Scheme.parse(n) for n in names]
    if not schemes:
        raise ValueError("no int8 scheme given")
    return list(dict.fromkeys(schemes))


def _calibration_reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds preprocessed images in batches of ``batch``, grouped in chunks of ``chunk``
        images. onnxruntime collects one chunk at a time (``CalibStridedMinMax`` with
        ``set_range`` in chunk units), so the histogram calibrators never hold every
        intermediate tensor of every calibration image in memory at once; chunks are large
        enough that the first histogram's range is representative."""

        def __init__(self, x: np.ndarray, input_name: str, batch: int = 8, chunk: int = 32):
            per = max(1, chunk // batch)
            batches = [x[i:i + batch] for i in range(0, len(x), batch)]
            self.chunks = [batches[i:i + per] for i in range(0, len(batches), per)]
            self.input_name = input_name
            self.set_range(0, len(self.chunks))

        def __len__(self) -> int:
            return len(self.chunks)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter([b for c in self.chunks[start_index:end_index] for b in c])

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {self.input_name: np.ascontiguousarray(b, dtype=np.float32)}

    return ArrayReader


def find_keep_float_nodes(model: onnx.ModelProto, which: list[str]) -> dict[str, str]:
    """Node names for ``first_conv`` (sees the raw image) and ``classifier`` (last Gemm/MatMul,
    or the last Conv for squeezenet's conv head). Returns {name: op_type}."""
    nodes = list(model.graph.node)  # ONNX graphs are topologically sorted
    if len(model.graph.output) > 1:  # only the probabilities' own path (not the qc_score branch)
        from .input_check import ancestors

        main = ancestors(model, [model.graph.output[0].name])
        nodes = [n for i, n in enumerate(nodes) if i in main]
    out: dict[str, str] = {}
    if "first_conv" in which:
        conv = next((n for n in nodes if n.op_type == "Conv"), None)
        if conv is not None:
            out[conv.name] = conv.op_type
    if "classifier" in which:
        head = next((n for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
        if head is None:
            head = next((n for n in reversed(nodes) if n.op_type == "Conv"), None)
        if head is not None:
            out[head.name] = head.op_type
    missing = [n for n in out if not n]
    if missing:
        raise ValueError("a node to keep in float has no name; cannot exclude it")
    return out


class Int8Builder:
    """Pre-processes the fp32 model once, then quantizes it under any scheme, reusing
    calibration ranges per method from a cache in ``workdir``."""

    def __init__(self, fp32_path: "str | os.PathLike[str]", workdir: "str | os.PathLike[str]",
                 calib_x: np.ndarray, input_name: str, keep_float: list[str] = (),
                 keep_float_nodes: list[str] = (), float_outputs: list[str] = ()):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pre_path = self.workdir / "preprocessed.onnx"
        self.calib_x = calib_x
        self.input_name = input_name
        t0 = time.perf_counter()
        quant_pre_process(str(fp32_path), str(self.pre_path))
        pre = onnx.load(str(self.pre_path))
        names = {n.name for n in pre.graph.node}
        self.keep_float = find_keep_float_nodes(pre, list(keep_float))
        # the output softmax stays float: quantized probabilities would move in steps of 1/255
        softmax_inputs = {i for n in pre.graph.node if n.op_type == "Softmax" for i in n.input}
        for n in pre.graph.node:
            if n.op_type == "Softmax" and n.name:
                self.keep_float[n.name] = n.op_type
            # so does the calibration temperature's Div feeding it (one scalar division)
            if n.op_type == "Div" and n.name and set(n.output) & softmax_inputs:
                self.keep_float[n.name] = n.op_type
        # the class-activation map's 1x1 conv stays float too: it is tiny, and the map is then
        # only as coarse as the int8 feature map it reads, not re-quantized on top of that
        for n in pre.graph.node:
            if "cam" in n.output and n.name:
                self.keep_float[n.name] = n.op_type
        for n in keep_float_nodes:
            if n not in names:
                raise ValueError(f"--keep-float-node {n!r} is not a node of the pre-processed graph")
            self.keep_float[n] = next(x.op_type for x in pre.graph.node if x.name == n)
        # outputs other than probabilities (the input check's qc_score) keep their own branch in
        # float: the whitening matmuls amplify quantization error in low-variance directions
        self.float_branch: dict[str, str] = {}
        if float_outputs:
            from .input_check import nodes_serving_only

            branch = nodes_serving_only(pre, list(float_outputs), pre.graph.output[0].name)
            self.float_branch = {n.name: n.op_type for n in branch if n.name}
            if len(self.float_branch) < len(branch):
                log(f"int8: {len(branch) - len(self.float_branch)} unnamed node(s) of the "
                    f"{', '.join(float_outputs)} branch cannot be kept in float")
        self.calibration_seconds: dict[str, float] = {}
        log(f"int8: pre-processed graph ({time.perf_counter() - t0:.1f}s); "
            f"kept in float: {', '.join(self.keep_float) or 'none'}"
            + (f"; plus the {len(self.float_branch)} nodes of the {', '.join(float_outputs)} branch"
               if self.float_branch else ""))

    def build(self, scheme: Scheme, out_path: "str | os.PathLike[str]") -> float:
        """Quantize to ``out_path``; returns seconds spent (calibration included the first time
        a method is used)."""
        from onnxruntime.quantization import QuantFormat, quantize_static

        cache = self.workdir / f"calibration-{scheme.method}.json"
        fresh = not cache.exists()
        reader = _calibration_reader_class()(self.calib_x, self.input_name)
        t0 = time.perf_counter()
        # the calibrators print progress on stdout, which is reserved for the report table
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(self.pre_path), str(out_path), reader,
                quant_format=QuantFormat.QDQ, per_channel=True,
                nodes_to_exclude=[*self.keep_float, *self.float_branch] or None,
                calibration_cache_path=str(cache),
                extra_options={"CalibStridedMinMax": 1},
                **scheme.ort_args(),
            )
        if self.float_branch:
            from .input_check import pool_quantized_taps

            model = onnx.load(str(out_path))
            if pool_quantized_taps(model, set(self.float_branch)):
                onnx.save(model, str(out_path))
        dt = time.perf_counter() - t0
        if fresh:
            self.calibration_seconds[scheme.method] = round(dt, 2)
        onnx.checker.check_model(str(out_path))
        return dt


def measure_candidate(path: "str | os.PathLike[str]", val_x: np.ndarray, val_y: np.ndarray,
                      fp32_probs: np.ndarray, classes: list[str], speed_runs: int = 30) -> dict:
    """One candidate against fp32 on the validation images: accuracy, macro-F1, agreement, speed."""
    sess = ort_session(path)
    run = ort_runner(sess)
    probs = run_batched(run, val_x)
    pred, pred32 = probs.argmax(1), fp32_probs.argmax(1)
    m8 = classification_metrics(val_y, pred, classes)
    m32 = classification_metrics(val_y, pred32, classes)
    speed = measure_speed(run, val_x[:32], runs=speed_runs, budget_s=3.0)
    drop = None
    if m8["accuracy"] is not None and m32["accuracy"] is not None:
        drop = round(100 * (m32["accuracy"] - m8["accuracy"]), 4)
    return {
        "n_val": len(val_x),
        "accuracy": m8["accuracy"], "macro_f1": m8["macro_f1"],
        "fp32_accuracy": m32["accuracy"], "fp32_macro_f1": m32["macro_f1"],
        "accuracy_drop_points": drop,
        "top1_agreement": round(agreement(fp32_probs, probs), 6),
        "max_abs_diff": float(np.abs(probs - fp32_probs).max()),
        "latency_ms_p50": speed["latency_ms_p50"], "throughput_ips": speed["throughput_ips"],
    }


def within_bound(result: dict, max_drop: float, min_agreement: float) -> tuple[bool, str]:
    drop, agree = result["accuracy_drop_points"], result["top1_agreement"]
    reasons = []
    if drop is None or drop > max_drop:
        reasons.append(f"accuracy drop {drop} points > {max_drop}")
    if agree < min_agreement:
        reasons.append(f"agreement {100 * agree:.2f}% < {100 * min_agreement:.2f}%")
    return (not reasons), "; ".join(reasons) or "ok"


def choose(results: list[dict]) -> dict | None:
    """The fastest (batch-1 p50) candidate within the bound; ties go to the earlier candidate."""
    ok = [r for r in results if r["within_bound"]]
    return min(ok, key=lambda r: r["metrics"]["latency_ms_p50"]) if ok else None


def search(builder: Int8Builder, schemes: list[Scheme], val_x: np.ndarray, val_y: np.ndarray,
           fp32_probs: np.ndarray, classes: list[str], max_drop: float, min_agreement: float,
           speed_runs: int = 30) -> tuple[dict | None, list[dict]]:
    """Build and measure each scheme; returns (chosen result or None, all results)."""
    results = []
    for i, scheme in enumerate(schemes, 1):
        path = builder.workdir / f"{scheme.name}.onnx"
        t0 = time.perf_counter()
        try:
            builder.build(scheme, path)
            metrics = measure_candidate(path, val_x, val_y, fp32_probs, classes, speed_runs)
        except Exception as exc:  # one broken scheme must not hide the others
            log(f"int8 [{i}/{len(schemes)}] {scheme.name}: FAILED ({type(exc).__name__}: {exc})")
            results.append({"scheme": scheme.name, "path": str(path), "error": f"{type(exc).__name__}: {exc}",
                            "within_bound": False, "reason": "failed to build"})
            continue
        ok, reason = within_bound(metrics, max_drop, min_agreement)
        dt = time.perf_counter() - t0
        results.append({"scheme": scheme.name, "path": str(path), "metrics": metrics, "within_bound": ok,
                        "reason": reason, "seconds": round(dt, 2)})
        log(f"int8 [{i}/{len(schemes)}] {scheme.name}: acc {_pct(metrics['accuracy'])} "
            f"(fp32 {_pct(metrics['fp32_accuracy'])}), agreement {_pct(metrics['top1_agreement'])}, "
            f"p50 {metrics['latency_ms_p50']:.2f} ms -> {'within bound' if ok else 'OUT: ' + reason} ({dt:.1f}s)")
    return choose(results), results


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def finalize(candidate_path: "str | os.PathLike[str]", dest: "str | os.PathLike[str]") -> None:
    shutil.copyfile(candidate_path, dest)
