"""Temperature scaling: make the exported probabilities mean what they say.

A model trained with label smoothing is under-confident (its 0.9 is right more often than 9 in
10 times); one scalar ``T`` fitted on held-out images fixes most of that (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017). The graph then computes
``softmax(logits / T)``. ``T > 0`` divides every logit of an image by the same number, so the
order of the classes -- and with it the top-1 class and accuracy -- cannot change.

Fitting: the negative log-likelihood of ``softmax(beta * z)`` is convex in ``beta = 1/T``
(a log-sum-exp minus a linear term), so a golden-section search on ``log beta`` finds its one
minimum; numpy only, deterministic, no optimiser settings to report.

ECE (expected calibration error) is the runtime's ``expected_calibration_error``: top-1
confidence in 15 equal-width bins ``(0, 1/15], (1/15, 2/15], ...``, the support-weighted mean of
|accuracy - mean confidence| per bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxr.runtime.metrics import expected_calibration_error, golden_section_min, softmax

ECE_BINS = 15
T_RANGE = (0.05, 20.0)  # searched; a fit at either end is reported as such


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-6) -> float:
    """The ``T`` in ``T_RANGE`` minimising the NLL of ``softmax(logits / T)`` (golden section on log 1/T)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits [N, K] and N labels, got {logits.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError("labels must be class indices of the logits")
    f = lambda log_beta: nll(logits, labels, 1.0 / math.exp(log_beta))  # noqa: E731
    return 1.0 / math.exp(golden_section_min(f, -math.log(T_RANGE[1]), -math.log(T_RANGE[0]), tol))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per-bin count, accuracy and mean confidence of the top-1 class (bins as in ECE)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=correct, minlength=bins)
    mconf = np.bincount(idx, weights=conf, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
                "accuracy": np.where(count > 0, acc / np.maximum(count, 1), np.nan).tolist(),
                "confidence": np.where(count > 0, mconf / np.maximum(count, 1), np.nan).tolist()}


def ece(labels: np.ndarray, probs: np.ndarray) -> float | None:
    labels = np.asarray(labels)
    return None if len(labels) == 0 else round(expected_calibration_error(labels, np.asarray(probs), ECE_BINS), 5)


@dataclass
class Calibration:
    """A fitted temperature and what it did, on the images it was fitted on."""

    temperature: float
    fitted_on: str
    n: int
    ece_before: float | None
    ece_after: float | None
    nll_before: float
    nll_after: float
    by_source: dict

    def to_metadata(self, extra: dict | None = None) -> dict:
        """The ``cxr.calibration`` value (``extra``: e.g. the same numbers on the test split)."""
        return {"method": "temperature", "temperature": round(self.temperature, 6), "fitted_on": self.fitted_on,
                "n": self.n, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "bins": {"count": ECE_BINS, "kind": "equal-width on top-1 confidence"},
                "nll_before": round(self.nll_before, 5), "nll_after": round(self.nll_after, 5),
                "by_source": self.by_source, **(extra or {})}


def ece_by_source(labels: np.ndarray, logits: np.ndarray, sources: list[str], temperature: float) -> dict:
    """{source: {n, ece_before, ece_after}} for every source among the images."""
    labels = np.asarray(labels)
    src = np.asarray(sources, dtype=object)
    out = {}
    for s in sorted(set(sources)):
        sel = src == s
        out[s] = {"n": int(sel.sum()), "ece_before": ece(labels[sel], softmax(logits[sel])),
                  "ece_after": ece(labels[sel], softmax(logits[sel], temperature))}
    return out


def calibrate(logits: np.ndarray, labels: np.ndarray, sources: list[str], fitted_on: str) -> Calibration:
    """Fit ``T`` on labelled held-out logits and measure ECE/NLL before and after."""
    labels = np.asarray(labels, dtype=np.int64)
    t = fit_temperature(logits, labels)
    return Calibration(t, fitted_on, len(labels), ece(labels, softmax(logits)), ece(labels, softmax(logits, t)),
                       nll(logits, labels, 1.0), nll(logits, labels, t), ece_by_source(labels, logits, sources, t))
