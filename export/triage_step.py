"""The export step that makes a classifier a triage tool: temperature, ECE, operating points.

``cxr-export`` (unless ``--no-calibrate``) runs the PyTorch model on the manifest's
*validation* split, fits one temperature on its logits (``temperature.py``) and bakes it into
the graph before the softmax, so fp32 and int8 both output calibrated probabilities. Each
written model then gets the refer/routine operating points measured on its *own* calibrated
validation outputs (``operating_points.py``): the table the runtime applies is the one the
file's own numbers produced. ECE is reported before and after, on the validation split (where
T was fitted) and on the held-out eval images (the test split), overall and per source.

Sources: each image's source as the manifest reader gives it (``Manifest.source_of``;
manifests written before sources existed have one source, named after their root folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import operating_points, temperature
from .data import ImageSet, Manifest, load_images, log, stratified_subset
from .evaluate import run_batched


def torch_logits(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    import torch

    model.eval()

    def run(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))).double().numpy()

    return run_batched(run, x, batch_size)


def _ece_split(y: np.ndarray, probs: np.ndarray, sources: list[str]) -> dict:
    keep = y >= 0
    src = np.asarray(sources, dtype=object)
    out = {"n": int(keep.sum()), "ece": temperature.ece(y[keep], probs[keep]), "by_source": {}}
    for s in sorted(set(src[keep].tolist())):
        sel = keep & (src == s)
        out["by_source"][s] = {"n": int(sel.sum()), "ece": temperature.ece(y[sel], probs[sel])}
    return out


class TriageStep:
    """Holds the validation images, their logits and the fitted temperature for one export."""

    def __init__(self, model, man: Manifest, classes: list[str], pp, seed: int, limit: int, target: float):
        self.classes, self.target = classes, target
        items = stratified_subset(man.split("val"), limit, seed, key=man.group)
        log(f"calibration: loading {len(items)} validation images to fit the temperature")
        self.val = load_images("validation split", items, classes, pp, man.source_of)
        self.val_sources = list(self.val.sources)
        keep = self.val.y >= 0
        if keep.sum() == 0:
            raise ValueError("no labelled validation image")
        log("calibration: PyTorch logits on the validation images")
        self.val_logits = torch_logits(model, self.val.x)
        self.cal = temperature.calibrate(self.val_logits[keep], self.val.y[keep],
                                         [s for s, k in zip(self.val_sources, keep) if k],
                                         fitted_on="validation split")
        self.temperature = self.cal.temperature
        at_edge = min(abs(self.temperature - t) / t for t in temperature.T_RANGE) < 1e-3
        log(f"calibration: temperature {self.temperature:.4f} on {self.cal.n} validation images "
            f"(NLL {self.cal.nll_before:.4f} -> {self.cal.nll_after:.4f}, ECE {self.cal.ece_before} -> "
            f"{self.cal.ece_after})" + ("; WARNING: at the edge of the searched range" if at_edge else ""))
        self.eval: dict | None = None
        self.metadata_fp32: dict = {}

    @classmethod
    def prepare(cls, model, man: Manifest | None, classes, pp, seed: int, limit: int, target: float):
        """A TriageStep, or None (logged) when there is no labelled validation split to fit on."""
        if man is None or not man.split("val"):
            log("calibration: SKIPPED -- no validation split in the manifest; probabilities stay uncalibrated "
                "and the model gets no operating points")
            return None
        try:
            return cls(model, man, classes, pp, seed, limit, target)
        except ValueError as exc:
            log(f"calibration: SKIPPED -- {exc}")
            return None

    def fp32(self, model, onnx_run, ev: ImageSet, png: Path) -> dict:
        """Report entries for the fp32 model (and the metadata kept for ``fp32_metadata``)."""
        report: dict = {}
        t = self.temperature
        val_probs = run_batched(onnx_run, self.val.x)
        op = operating_points.build(val_probs, self.val.y, self.classes, self.val_sources, self.target)
        cal = self.cal.to_metadata()
        ev_sources = list(ev.sources) or [ev.name] * len(ev)  # --images: the set's name
        if ev.labelled:
            ev_logits = torch_logits(model, ev.x)
            before = _ece_split(ev.y, temperature.softmax(ev_logits), ev_sources)
            after = _ece_split(ev.y, temperature.softmax(ev_logits, t), ev_sources)
            self.eval = {"images": ev.name, "n": before["n"], "ece_before": before["ece"], "ece_after": after["ece"],
                         "by_source": {s: {"n": v["n"], "ece_before": v["ece"], "ece_after": after["by_source"][s]["ece"]}
                                       for s, v in before["by_source"].items()},
                         "argmax_unchanged": bool(np.array_equal(ev_logits.argmax(1), (ev_logits / t).argmax(1)))}
            cal["eval"] = self.eval
            plot_y, plot_logits, plot_on = ev.y[ev.y >= 0], ev_logits[ev.y >= 0], f"held-out eval images ({ev.name})"
        else:
            keep = self.val.y >= 0
            plot_y, plot_logits, plot_on = self.val.y[keep], self.val_logits[keep], "validation split (fitted on)"
        b0 = temperature.reliability_bins(plot_y, temperature.softmax(plot_logits))
        b1 = temperature.reliability_bins(plot_y, temperature.softmax(plot_logits, t))
        try:
            from .reliability import plot

            plot(b0, b1, temperature.ece(plot_y, temperature.softmax(plot_logits)),
                 temperature.ece(plot_y, temperature.softmax(plot_logits, t)),
                 f"Reliability on {len(plot_y)} {plot_on}; T = {t:.3f}", png)
            log(f"wrote {png}")
            png_path = str(png)
        except Exception as exc:  # a missing plotting backend must not cost the export
            log(f"reliability diagram not drawn: {type(exc).__name__}: {exc}")
            png_path = None
        vk = self.val.y >= 0
        cal["onnx_fp32_ece_val"] = temperature.ece(self.val.y[vk], val_probs[vk])
        self.metadata_fp32 = {"calibration": cal, "operating_points": op}
        report["calibration"] = {**cal, "reliability_png": png_path, "reliability_on": plot_on,
                                 "reliability_bins": {"before": b0, "after": b1},
                                 "argmax_unchanged_val": bool(np.array_equal(self.val_logits.argmax(1),
                                                                             (self.val_logits / t).argmax(1)))}
        report["operating_points"] = {"onnx_fp32": op}
        self._log_point("fp32", op)
        return report

    def int8(self, run8, p8_eval: np.ndarray, ev: ImageSet, report: dict) -> dict:
        """Metadata for the int8 model: the same temperature, its own ECE and operating points."""
        val_probs = run_batched(run8, self.val.x)
        op = operating_points.build(val_probs, self.val.y, self.classes, self.val_sources, self.target)
        cal = dict(self.metadata_fp32.get("calibration") or self.cal.to_metadata())
        cal.pop("onnx_fp32_ece_val", None)
        vk = self.val.y >= 0
        cal["onnx_int8_ece_val"] = temperature.ece(self.val.y[vk], val_probs[vk])
        if ev.labelled:
            ek = ev.y >= 0
            cal["onnx_int8_ece_eval"] = temperature.ece(ev.y[ek], p8_eval[ek])
        report.setdefault("operating_points", {})["onnx_int8"] = op
        if "calibration" in report:
            report["calibration"]["onnx_int8_ece_val"] = cal["onnx_int8_ece_val"]
            report["calibration"]["onnx_int8_ece_eval"] = cal.get("onnx_int8_ece_eval")
        self._log_point("int8", op)
        return {"calibration": cal, "operating_points": op}

    def fp32_metadata(self) -> dict:
        return dict(self.metadata_fp32)

    @staticmethod
    def _log_point(name: str, op: dict) -> None:
        if not op.get("available"):
            log(f"triage ({name}): {op.get('reason')}")
            return
        d = op["default"]
        log(f"triage ({name}): default threshold {d['threshold']:.6g} on P(not {op['normal_class']}): validation "
            f"sensitivity {d['sensitivity']}, specificity {d['specificity']}, referred {d['referred']}")


def report_lines(report: dict) -> list[str]:
    """Lines for the export's terminal table."""
    cal = report.get("calibration")
    if not cal:
        return ["calibration: none (--no-calibrate or no validation split): probabilities are the raw softmax"]
    ev = cal.get("eval") or {}
    out = [f"calibration: temperature {cal['temperature']:.4f} fitted on {cal['n']} validation images; "
           f"ECE (15 bins) validation {cal['ece_before']} -> {cal['ece_after']}"
           + (f", eval images {ev.get('ece_before')} -> {ev.get('ece_after')}" if ev else "")
           + (f"; int8 eval {cal['onnx_int8_ece_eval']}" if cal.get("onnx_int8_ece_eval") is not None else "")]
    for name, op in (report.get("operating_points") or {}).items():
        if op.get("available"):
            d = op["default"]
            out.append(f"triage {name}: refer when P(not {op['normal_class']}) >= {d['threshold']:.6g} -- validation "
                       f"sensitivity {100 * d['sensitivity']:.2f}%, specificity {100 * d['specificity']:.2f}%, "
                       f"referred {100 * d['referred']:.1f}%")
        else:
            out.append(f"triage {name}: unavailable ({op.get('reason')})")
    return out
