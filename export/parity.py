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
