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
    floored at 1% of its largest magnitude so a flat map does not divide by ~0. ``peak_agreement``
    is the share of (image, class) maps whose hottest cell is the same cell in both."""

    n_images: int
    source: str
    compared: str
    max_rel_diff: float
    mean_rel_diff: float
    peak_agreement: float
    tolerance_max_rel_diff: float

    @property
    def passed(self) -> bool:
        return self.n_images > 0 and bool(np.isfinite(self.max_rel_diff)) and self.max_rel_diff <= self.tolerance_max_rel_diff

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (f"cam {self.compared}: max |dcam|/range {self.max_rel_diff:.3g} (tolerance "
                f"{self.tolerance_max_rel_diff:g}), mean {self.mean_rel_diff:.3g}, hottest cell the same in "
                f"{100 * self.peak_agreement:.1f}% of maps, on {self.n_images} images from {self.source}")


def compare_cam(ref: np.ndarray, got: np.ndarray, source: str, tolerance: float, compared: str) -> CamParity:
    """``ref``/``got``: float [N, K, h, w]."""
    if ref.shape != got.shape:
        raise ParityError(f"cam shapes differ: {compared} {ref.shape} vs {got.shape}")
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.size == 0:
        return CamParity(0, source, compared, float("nan"), float("nan"), float("nan"), tolerance)
    flat_r = ref.reshape(ref.shape[0], ref.shape[1], -1)
    flat_g = got.reshape(flat_r.shape)
    scale = np.maximum(np.ptp(flat_r, axis=2), 0.01 * np.abs(flat_r).max(axis=2))
    scale = np.maximum(scale, 1e-6)[..., None]
    rel = np.abs(flat_g - flat_r) / scale
    peaks = float(np.mean(flat_r.argmax(axis=2) == flat_g.argmax(axis=2)))
    return CamParity(len(ref), source, compared, float(rel.max()), float(rel.mean()), peaks, tolerance)


def require_cam(parity: CamParity) -> None:
    if not parity.passed:
        raise ParityError("class-activation map parity FAILED: " + parity.describe())
