"""Python API for embedding the classifier in a workstation program.

Load once, classify many times; the CLI runs the very same engine, so results are identical::

    from cxr.runtime import Classifier

    clf = Classifier.load("model.onnx")          # or Classifier.load() for the shipped model
    p = clf.classify("patient1.png")              # a path, a PIL image or a numpy array
    print(p.label, p.confidence, p.probabilities, p.triage, p.qc)  # triage: "refer"/"routine"; qc: input check
    for r in clf.scan(["/data/xrays"]):           # folders recursively; one result per file
        print(r.path, r.status, r.qc, r.prediction.label if r.ok else r.error)

    p, maps = clf.explain("patient1.png")        # maps: float32 [K, h, w], one per class
    hot = maps[clf.classes.index(p.label)]        # where the evidence for the label is

Every result carries the input check (``qc``, ``qc_score``, ``qc_detail``; docs/input-check.md):
a flagged prediction (``qc`` ``not_chest_xray``, ``not_frontal``, or ``unfamiliar`` unless the
classifier was made with ``show_unfamiliar=True``) is no diagnosis
(``prediction.diagnosis_withheld``), whatever its label says.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .discover import iter_inputs
from .engine import (DEFAULT_BATCH_SIZE, Prediction, ScanResult, ScanStats, checked_verdicts, default_threads,
                     iter_scan, model_input, to_prediction)
from .imageio import load_image_with_facts, to_gray8
from .inputcheck import ImageFacts, Verdict, colour_spread
from .preprocess import Preprocessing
from .session import Model, load_model
from . import triage as triage_mod


class Classifier:
    """A loaded cxr model plus the scan engine. Create with ``Classifier.load``."""

    def __init__(self, model: Model, batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 sensitivity: float | None = None, show_unfamiliar: bool = False):
        self.model = model
        self.show_unfamiliar = show_unfamiliar
        self.batch_size = batch_size
        self.workers = workers
        # the refer/routine operating point; None (with triage_note saying why) when the model has none
        if sensitivity is None:
            self.triage_policy, self.triage_note = triage_mod.default_policy(model.info)
        else:  # asked for a point: raise TriageUnavailable rather than silently not triaging
            self.triage_policy, self.triage_note = triage_mod.policy_for(model.info, sensitivity), None

    @classmethod
    def load(
        cls,
        path: "str | os.PathLike[str] | None" = None,
        device: str = "cpu",
        threads: int | None = None,
        precision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int | None = None,
        sensitivity: float | None = None,
        show_unfamiliar: bool = False,
    ) -> "Classifier":
        """Open ``path`` (default: the shipped model, ``precision`` "fp32"/"int8" choosing which).

        ``device``: "cpu", "cuda" or "auto". Raises ``ModelLoadError`` when the model cannot be used.
        ``sensitivity``: triage at the highest threshold whose validation sensitivity reaches it
        (default: the model's stored point); ``TriageUnavailable`` when the model cannot.
        ``show_unfamiliar``: predictions the input check calls ``unfamiliar`` keep their label
        (``diagnosis_withheld`` False); by default they are withheld like every flagged one.

        >>> clf = Classifier.load("model.onnx", threads=2)  # doctest: +SKIP
        """
        if threads is None:
            threads = default_threads(device, workers)
        return cls(load_model(path, device=device, threads=threads, precision=precision), batch_size, workers,
                   sensitivity, show_unfamiliar)

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.info.preprocess

    def _tensor(self, x: "str | os.PathLike[str] | Image.Image | np.ndarray") -> tuple[np.ndarray, Verdict | None]:
        """(model input, the input check's header/pixel verdict) for any accepted input."""
        if isinstance(x, (str, os.PathLike)):
            x, facts = load_image_with_facts(x)
        elif isinstance(x, Image.Image):
            facts = ImageFacts(x.size[0], x.size[1], colour_spread(x))
            x = to_gray8(x)
        else:
            arr = np.asarray(x)
            colour = None
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                colour = colour_spread(Image.fromarray(arr[..., :3].astype(np.uint8) if arr.dtype != np.uint8
                                                       else np.ascontiguousarray(arr[..., :3])))
            facts = ImageFacts(arr.shape[1] if arr.ndim >= 2 else 1, arr.shape[0] if arr.ndim >= 1 else 1, colour)
        return model_input(x, facts, self.preprocessing)

    def classify(self, x: "str | os.PathLike[str] | Image.Image | np.ndarray") -> Prediction:
        """Classify one image: a file path, a PIL image (any mode) or a numpy array
        (2-D grayscale of any dtype, or HxWx3/4 uint8 colour). Raises ``ImageReadError`` for an
        unreadable file.

        >>> clf.classify(np.zeros((512, 512), np.uint8)).label  # doctest: +SKIP
        'Normal'
        """
        pred, _ = self._predict(x)
        return pred

    def _predict(self, x, cam: bool = False):
        """(Prediction with its input check and triage, maps [K, h, w] or None) for one image."""
        tensor, early = self._tensor(x)
        probs, maps, scores, _ = self.model.run_outputs(tensor[None], cam=cam)
        score = None if scores is None else float(scores[0])
        verdict = checked_verdicts(self.model, tensor[None], [early], scores)[0]
        pred = to_prediction(probs[0], self.model.classes, verdict, score, self.show_unfamiliar)
        pred = triage_mod.apply(ScanResult("", prediction=pred), self.triage_policy).prediction
        return pred, (maps[0] if maps is not None else None)

    @property
    def has_heatmaps(self) -> bool:
        """Whether the model file has a class-activation map output (``explain``, ``heatmaps=True``)."""
        return self.model.has_cam

    def explain(self, x: "str | os.PathLike[str] | Image.Image | np.ndarray") -> tuple[Prediction, np.ndarray]:
        """Classify one image and return its class-activation maps: (Prediction, float32 [K, h, w]
        in ``classes`` order, on the model's input grid). ``heatmap.map_on_image`` places a map on
        the original image. Raises ValueError for a model without maps.
        """
        return self._predict(x, cam=True)

    def classify_many(self, paths: "Iterable[str | os.PathLike[str]]", heatmaps: bool = False) -> list[ScanResult]:
        """Classify files (never skipped, never raising for bad ones): one ScanResult each, in order.
        ``heatmaps=True`` fills each classified result's ``heatmap`` (float32 [K, h, w])."""
        return list(iter_scan(self.model, [os.fspath(p) for p in paths],
                              batch_size=self.batch_size, workers=self.workers, triage=self.triage_policy, heatmaps=heatmaps,
                              show_unfamiliar=self.show_unfamiliar))

    def scan(
        self, paths_or_dirs: "Iterable[str | os.PathLike[str]] | str | os.PathLike[str]",
        stats: ScanStats | None = None, heatmaps: bool = False,
    ) -> Iterator[ScanResult]:
        """Iterate results for files and folders (recursive, sorted), exactly as ``cxr-infer scan``.

        Non-image files inside folders are skipped and counted in ``stats.skipped``.
        ``heatmaps=True`` fills each classified result's ``heatmap`` (float32 [K, h, w]).

        >>> stats = ScanStats()
        >>> rows = list(clf.scan("/data/xrays", stats=stats))  # doctest: +SKIP
        """
        if isinstance(paths_or_dirs, (str, os.PathLike)):
            paths_or_dirs = [paths_or_dirs]
        return iter_scan(self.model, iter_inputs(paths_or_dirs), batch_size=self.batch_size,
                         workers=self.workers, stats=stats, triage=self.triage_policy, heatmaps=heatmaps,
                         show_unfamiliar=self.show_unfamiliar)
