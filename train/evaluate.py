"""Predictions and the held-out test report, including the acquisition-shift check.

The shift check passes each test image through another pipeline than the training data's
(upsampled to 299 px with bicubic, JPEG quality 75, then the model's own preprocessing from
the decoded file) and reports the drop, because X-rays reach users through other resizers
and encoders than the ones in the database.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr.runtime.imageio import load_image
from cxr.runtime.metrics import classification_report, per_source_report
from cxr.runtime.preprocess import Preprocessing, resize_to_uint8

from .augment import normalize_tensor, to_unit


@torch.no_grad()
def predict_probs(model: torch.nn.Module, pixels: np.ndarray, pp: Preprocessing, device: torch.device,
                  batch_size: int = 128) -> np.ndarray:
    """Softmax probabilities for cached uint8 images (N,S,S)."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = normalize_tensor(to_unit(torch.from_numpy(pixels[i:i + batch_size])), pp).to(device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def shifted_pipeline(path: Path, pp: Preprocessing, size: int = 299, quality: int = 75) -> np.ndarray:
    """Another hospital's export path: resize to ``size`` (bicubic), JPEG ``quality``, then ours."""
    img = load_image(path).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as jpg:
        return resize_to_uint8(jpg.convert("L"), pp)


def shifted_pixels(paths: list[Path], pp: Preprocessing, workers: int = 4) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(lambda p: shifted_pipeline(p, pp), paths)))


def test_report(model, pixels: np.ndarray, labels: np.ndarray, paths: list[Path], classes: list[str],
                pp: Preprocessing, device: torch.device, shift: bool = True, sources: list[str] | None = None) -> dict:
    probs = predict_probs(model, pixels, pp, device)
    report = classification_report(labels, probs.argmax(1), classes, probs)
    sources = sources if sources is not None else ["data"] * len(labels)
    report["by_source"] = per_source_report(labels, probs.argmax(1), sources, classes)
    if shift and len(paths):
        sp = predict_probs(model, shifted_pixels(paths, pp), pp, device)
        shifted = classification_report(labels, sp.argmax(1), classes, sp)
        report["acquisition_shift"] = {
            "pipeline": "resize to 299 px (bicubic) -> JPEG q75 -> model preprocessing",
            "accuracy": shifted["accuracy"],
            "macro_f1": shifted["macro_f1"],
            "accuracy_drop_points": 100.0 * (report["accuracy"] - shifted["accuracy"]),
            "macro_f1_drop": report["macro_f1"] - shifted["macro_f1"],
            "per_class_sensitivity": {c: v["sensitivity"] for c, v in shifted["per_class"].items()},
            "agreement_with_original": float((sp.argmax(1) == probs.argmax(1)).mean()),
            "by_source": per_source_report(labels, sp.argmax(1), sources, classes),
        }
    return report
