"""The fp32 parity proof: PyTorch and onnxruntime must give the same probabilities on real
images preprocessed by the runtime, within a stated tolerance, or the export is refused."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .evaluate import agreement, prob_diff


class ParityError(Exception):
    """The exported graph does not reproduce the PyTorch model; no file is left behind."""


@dataclass
class Parity:
    n_images: int
    source: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tolerance_max_abs_diff: float
    required_agreement: float
    temperature: float | None = None  # the calibrated outputs were compared (None: plain softmax)

    @property
    def passed(self) -> bool:
        return (self.n_images > 0 and self.max_abs_diff <= self.tolerance_max_abs_diff
                and self.top1_agreement >= self.required_agreement)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (f"max |dp| {self.max_abs_diff:.3g} (tolerance {self.tolerance_max_abs_diff:g}), "
                f"mean |dp| {self.mean_abs_diff:.3g}, top-1 agreement {100 * self.top1_agreement:.2f}% "
                f"(required {100 * self.required_agreement:.2f}%) on {self.n_images} images from {self.source}")


def compare(torch_probs: np.ndarray, onnx_probs: np.ndarray, source: str,
            atol: float = 1e-4, min_agreement: float = 1.0, temperature: float | None = None) -> Parity:
    if torch_probs.shape != onnx_probs.shape:
        raise ParityError(f"output shapes differ: PyTorch {torch_probs.shape} vs ONNX {onnx_probs.shape}")
    d = prob_diff(torch_probs, onnx_probs)
    return Parity(len(torch_probs), source, d["max_abs_diff"], d["mean_abs_diff"],
                  agreement(torch_probs, onnx_probs), atol, min_agreement, temperature)


def require(parity: Parity) -> None:
    if not np.isfinite(parity.max_abs_diff) or not parity.passed:
        raise ParityError("fp32 parity FAILED: " + parity.describe())


@dataclass
class CamParity:
    """Class-activation maps compared cell by cell, each difference divided by the scale of its
    reference map: the map's range over the grid (what a display stretches to full colour),
    floored at 1% of its largest magnitude so a flat map does not divide by ~0.

    Per map, its worst cell gives one number; ``max_rel_diff`` is the worst map and
    ``p95_rel_diff`` the 95th percentile over maps. ``criterion`` says which one must stay within
    ``tolerance``: "max" for fp32 (ONNX must reproduce PyTorch everywhere), "p95" for int8, whose
    8-bit feature map moves a few maps' small ranges by more (docs/heatmaps.md has the figures).
    ``peak_agreement``: share of maps whose hottest cell is the same cell in both."""

    n_images: int
    source: str
    compared: str
    max_rel_diff: float
    p95_rel_diff: float
    mean_rel_diff: float
    peak_agreement: float
    tolerance: float
    criterion: str = "max"

    @property
    def judged(self) -> float:
        return self.p95_rel_diff if self.criterion == "p95" else self.max_rel_diff

    @property
    def passed(self) -> bool:
        return self.n_images > 0 and bool(np.isfinite(self.judged)) and self.judged <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (f"cam {self.compared}: worst cell |dcam|/range over maps: max {self.max_rel_diff:.3g}, "
                f"p95 {self.p95_rel_diff:.3g} ({self.criterion} tolerance {self.tolerance:g}); mean cell "
                f"{self.mean_rel_diff:.3g}; hottest cell the same in {100 * self.peak_agreement:.1f}% of maps; "
                f"{self.n_images} images from {self.source}")


def compare_cam(ref: np.ndarray, got: np.ndarray, source: str, tolerance: float, compared: str,
                criterion: str = "max") -> CamParity:
    """``ref``/``got``: float [N, K, h, w]."""
    if criterion not in ("max", "p95"):
        raise ValueError(f"criterion must be 'max' or 'p95', got {criterion!r}")
    if ref.shape != got.shape:
        raise ParityError(f"cam shapes differ: {compared} {ref.shape} vs {got.shape}")
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.size == 0:
        nan = float("nan")
        return CamParity(0, source, compared, nan, nan, nan, nan, tolerance, criterion)
    flat_r = ref.reshape(ref.shape[0], ref.shape[1], -1)
    flat_g = got.reshape(flat_r.shape)
    scale = np.maximum(np.ptp(flat_r, axis=2), 0.01 * np.abs(flat_r).max(axis=2))
    scale = np.maximum(scale, 1e-6)[..., None]
    rel = np.abs(flat_g - flat_r) / scale
    worst = rel.max(axis=2)
    peaks = float(np.mean(flat_r.argmax(axis=2) == flat_g.argmax(axis=2)))
    return CamParity(len(ref), source, compared, float(worst.max()), float(np.percentile(worst, 95)),
                     float(rel.mean()), peaks, tolerance, criterion)


def require_cam(parity: CamParity) -> None:
    if not parity.passed:
        raise ParityError("class-activation map parity FAILED: " + parity.describe())
