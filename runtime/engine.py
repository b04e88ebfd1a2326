"""The scan engine shared by the CLI, the Python API and benchmarks.

Decoding and preprocessing run in a thread pool (Pillow and numpy release the GIL) while the
main thread runs batched onnxruntime inference, so the two overlap. At most ``prefetch`` files
are in flight at once, which bounds memory no matter how many files the scan covers; the file
list itself is consumed lazily. Results come back in input order, one per file, each either a
prediction or an error -- a bad file never stops the scan.

Entry points: ``iter_scan`` (a generator; results are yielded as each batch finishes) and
``scan_files`` (a list of results plus ``ScanStats``, for benchmarks).
"""

from __future__ import annotations

import os
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from .discover import Entry
from .imageio import ImageReadError, load_image_with_facts
from .inputcheck import Verdict, early_verdict, final_verdict, withholds
from .preprocess import Preprocessing, normalize, resize_to_uint8
from .session import Model
from .site import shift as shift_mod
from . import triage as triage_mod

DEFAULT_BATCH_SIZE = 16


def default_workers(device: str = "cpu") -> int:
    """Decode threads: enough to keep inference fed, few enough not to starve it.

    On CPU the decoders share the cores with onnxruntime's intra-op threads, whose parallel
    sections stall whenever a decoder preempts one of them, so more decoders made scans slower.
    On a 16-core Xeon (int8, medians of 3 rounds): 2 decoders 1,157 img/s, 4: 1,081, 8: 912,
    12: 827; on 2 cores, 1 to 3 decoders were equal within noise. On a GPU the cores are free
    for decoding, which is then what limits a scan.
    """
    return max(1, min(4 if device == "cuda" else 2, os.cpu_count() or 1))


def default_threads(device: str, workers: int | None = None) -> int | None:
    """onnxruntime intra-op threads for a scan when none are given.

    None (onnxruntime's own default, one per physical core) except on a CPU of 8 or more
    physical cores, where the decoders get cores of their own: physical cores - decode workers.
    On a 16-core Xeon that scanned 9 % faster (medians of 3: int8 1,145 -> 1,249 img/s, fp32
    888 -> 966); on 2 cores sharing them is faster, as one thread alone halves the model's speed.
    """
    if device == "cuda":
        return None
    from .cpu import physical_cores

    cores = physical_cores()
    return cores - (workers or default_workers("cpu")) if cores >= 8 else None


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image: the top class and every class's probability, and
    the input check's verdict on the image (``qc``, see ``inputcheck``). For a flagged ``qc``
    (``not_chest_xray``, ``not_frontal``, and ``unfamiliar`` unless ``show_unfamiliar``) the
    outputs withhold ``label`` (``diagnosis_withheld``): it is no diagnosis."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    triage: str | None = None  # "refer" / "routine" at the model's operating point (runtime/triage.py)
    qc: str = "unchecked"
    qc_score: float | None = None
    qc_detail: str | None = None
    show_unfamiliar: bool = field(default=False, compare=False)

    @property
    def diagnosis_withheld(self) -> bool:
        return withholds(self.qc, self.show_unfamiliar)


@dataclass(frozen=True)
class ScanResult:
    """One input file's outcome: ``prediction`` when it was classified, else ``error``.

    ``heatmap`` (``iter_scan(heatmaps=True)``, models with a ``cam`` output): float32 [K, h, w],
    one class-activation map per class in ``model.classes`` order. ``preview``
    (``iter_scan(previews=N)``): the decoded image as an 8-bit grayscale PIL image, at most N
    pixels on its longer side, for drawing heatmaps and thumbnails without decoding twice.
    """

    path: str
    prediction: Prediction | None = None
    error: str | None = None
    heatmap: Any = field(default=None, repr=False, compare=False)
    preview: Any = field(default=None, repr=False, compare=False)
    features: Any = field(default=None, repr=False, compare=False)  # the shift check's [D] row, when the model has one

    @property
    def status(self) -> str:
        return "ok" if self.prediction is not None else "error"

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    @property
    def triage(self) -> str | None:
        """"refer"/"routine" as ``triage.apply`` decided it (an input the input check flagged is
        always "refer"); None on error rows and for models without operating points."""
        return self.prediction.triage if self.prediction is not None else None

    @property
    def qc(self) -> str | None:
        """The input check's verdict (None for an error row: the image was never read)."""
        return self.prediction.qc if self.prediction is not None else None

    @property
    def qc_score(self) -> float | None:
        return self.prediction.qc_score if self.prediction is not None else None

    @property
    def qc_detail(self) -> str | None:
        return self.prediction.qc_detail if self.prediction is not None else None


@dataclass
class ScanStats:
    """Counts and stage timings of one scan; the latency report is computed from this."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    by_class: Counter = field(default_factory=Counter)  # rows that show a prediction
    withheld: int = 0  # classified rows whose prediction is withheld (input check)
    qc: Counter = field(default_factory=Counter)  # input-check verdicts of the classified rows
    triage: Counter = field(default_factory=Counter)  # "refer"/"routine" counts
    shift_stats: Any = field(default_factory=lambda: shift_mod.ShiftStats())  # what the shift check reads
    shift: Any = None  # shift.ShiftResult once the scan ends (docs/site.md)
    skip_reasons: Counter = field(default_factory=Counter)
    read_s: float = 0.0  # summed over images (decode threads run in parallel)
    preprocess_s: float = 0.0
    inference_s: float = 0.0  # main thread, batched
    batches: int = 0
    image_latency_s: array = field(default_factory=lambda: array("d"))  # batch time / batch size, per image
    started: float | None = None
    finished: float | None = None
    interrupted: bool = False

    @property
    def files(self) -> int:
        return self.ok + self.errors

    @property
    def wall_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.started

    def count(self, result: ScanResult) -> None:
        if result.prediction is not None:
            self.ok += 1
            self.qc[result.prediction.qc] += 1
            if result.prediction.diagnosis_withheld:
                self.withheld += 1
            else:
                self.by_class[result.prediction.label] += 1
            if result.triage:
                self.triage[result.triage] += 1
            if shift_mod.eligible(result.prediction.qc, result.features):
                self.shift_stats.add(result.features, result.prediction.label, result.prediction.qc_score)
        else:
            self.errors += 1

    def add_skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] += 1

    def add_batch(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.inference_s += seconds
        self.image_latency_s.extend([seconds / n] * n)


def to_prediction(probs: np.ndarray, classes: list[str], verdict: Verdict | None = None,
                  score: float | None = None, show_unfamiliar: bool = False) -> Prediction:
    i = int(np.argmax(probs))
    return Prediction(
        label=classes[i],
        confidence=float(probs[i]),
        probabilities={c: float(p) for c, p in zip(classes, probs)},
        qc=verdict.qc if verdict is not None else "unchecked",
        qc_score=None if score is None else float(score),
        qc_detail=verdict.detail if verdict is not None else None,
        show_unfamiliar=show_unfamiliar,
    )


def _decode(path: str):
    """((image, facts), None) or (None, reason): a bad file never raises out of a worker. The
    facts are what the input check needs from before the grayscale conversion."""
    try:
        return load_image_with_facts(path), None
    except ImageReadError as exc:
        return None, str(exc)
    except MemoryError:
        return None, "out of memory while decoding"
    except Exception as exc:  # a decoder bug must still become an error row, not end the scan
        return None, f"unexpected read error: {exc.__class__.__name__}: {exc}"


def prepare(path: str, pp: Preprocessing) -> tuple[np.ndarray | None, str | None, float, float]:
    """Read + preprocess one file (runs in a worker thread): (tensor, error, read_s, preprocess_s)."""
    return prepare_checked(path, pp)[:4]


def model_input(image, facts, pp: Preprocessing) -> tuple[np.ndarray, Verdict | None]:
    """(model input tensor, the input check's header/pixel verdict or None) for a decoded image
    and the facts gathered while decoding it: the one preprocessing a scan and the Python API
    share. (The orientation check runs on whole batches of these tensors: ``checked_verdicts``.)"""
    pixels = resize_to_uint8(image, pp)
    return normalize(pixels, pp), early_verdict(facts, pixels)


def checked_verdicts(model: Model, batch: np.ndarray, early: list, scores: np.ndarray | None) -> list[Verdict]:
    """Every image's final verdict: its header/pixel objection, else the orientation check (one
    vectorised pass over the batch, in the thread that runs the model, where it costs a few
    microseconds per image instead of a tenth of a millisecond of contended decode-thread time),
    else the model's score."""
    check = model.input_check
    orientation = check.orientation if check is not None else None
    turned = orientation.batch_verdicts(batch, model.info.preprocess) if orientation is not None else [None] * len(batch)
    return [final_verdict(e or t, None if scores is None else float(s), check)
            for e, t, s in zip(early, turned, scores if scores is not None else [None] * len(batch))]


def prepare_checked(path: str, pp: Preprocessing, preview_side: int = 0):
    """``prepare`` plus the input check's header/pixel verdict, computed while the colour and the
    header are still at hand: (tensor, error, read_s, preprocess_s, verdict or None, preview).
    ``preview_side`` > 0 also keeps the decoded image shrunk to at most that many pixels."""
    t0 = time.perf_counter()
    decoded, err = _decode(path)
    if err is not None:
        return None, err, time.perf_counter() - t0, 0.0, None, None
    image, facts = decoded
    t1 = time.perf_counter()
    preview = None
    try:
        x, early = model_input(image, facts, pp)
        if preview_side:
            preview = image.copy()
            preview.thumbnail((preview_side, preview_side))
    except Exception as exc:
        return None, f"preprocessing failed: {exc}", t1 - t0, time.perf_counter() - t1, None, None
    return x, None, t1 - t0, time.perf_counter() - t1, early, preview


def _as_entry(item: "Entry | str | os.PathLike[str]") -> Entry:
    return item if isinstance(item, Entry) else Entry(os.fspath(item))


def iter_scan(
    model: Model,
    entries: "Iterable[Entry | str | os.PathLike[str]]",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    stats: ScanStats | None = None,
    triage: "triage_mod.TriagePolicy | None" = None,
    heatmaps: bool = False,
    previews: int = 0,
    show_unfamiliar: bool = False,
) -> Iterator[ScanResult]:
    """Yield one ScanResult per scanned entry, in input order; skip entries only update ``stats``.

    ``entries`` are ``discover.Entry`` objects (from ``iter_inputs``) or plain file paths (always
    read, never skipped). Pass a ``ScanStats`` to get counts and timings while or after iterating.
    ``triage``: the refer/routine operating point (default: the model's stored default, if any).
    ``heatmaps=True`` fills ``ScanResult.heatmap`` (the model needs a ``cam`` output);
    ``previews=N`` fills ``ScanResult.preview``. Without them a scan costs what it always did.
    ``show_unfamiliar=True``: rows the input check calls ``unfamiliar`` show their prediction
    (default: withheld, like every flagged row; docs/input-check.md).
    """
    stats = stats if stats is not None else ScanStats()
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if heatmaps and not model.has_cam:
        raise ValueError(f"{model.path} has no class-activation map output ({model.info.arch}); "
                         "heatmaps need a model exported with one (docs/heatmaps.md)")
    if model.max_batch:
        batch_size = min(batch_size, model.max_batch)
    workers = workers or default_workers(model.runs_on)
    prefetch = max(2 * batch_size, batch_size + 2 * workers)
    pp, classes = model.info.preprocess, model.classes
    if triage is None:
        triage = triage_mod.default_policy(model.info)[0]
    source = iter(entries)
    pending: deque[tuple[Entry, Future | None]] = deque()
    exhausted = False
    if stats.started is None:
        stats.started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-decode")

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < prefetch:
            item = next(source, None)
            if item is None:
                exhausted = True
                return
            entry = _as_entry(item)
            if entry.skip is not None:
                stats.add_skip(entry.skip)
            elif entry.error is not None:
                pending.append((entry, None))
            else:
                pending.append((entry, pool.submit(prepare_checked, entry.path, pp, previews)))

    # The first batch holds one image, so the first result comes as soon as one image is decoded
    # (not after a whole batch is decoded and inferred); every later batch is full.
    target = 1
    try:
        while True:
            fill()
            if not pending:
                break
            # A chunk: consecutive entries until ``target`` of them are ready for the model.
            chunk: list[tuple[str, np.ndarray | None, str | None, Any, Verdict | None]] = []
            tensors: list[np.ndarray] = []
            while pending and len(tensors) < target:
                entry, fut = pending.popleft()
                if fut is None:
                    chunk.append((entry.path, None, entry.error, None, None))
                else:
                    x, err, read_s, pre_s, early, preview = fut.result()
                    stats.read_s += read_s
                    stats.preprocess_s += pre_s
                    chunk.append((entry.path, x, err, preview, early))
                    if x is not None:
                        tensors.append(x)
                fill()  # keep the decode threads busy while this thread waits or infers
            probs: np.ndarray | None = None
            cams: np.ndarray | None = None
            scores: np.ndarray | None = None
            feats: np.ndarray | None = None
            infer_error = None
            if tensors:
                target = batch_size
                batch = np.stack(tensors)
                t0 = time.perf_counter()
                try:
                    probs, cams, scores, feats = model.run_outputs(batch, cam=heatmaps)
                except Exception as exc:
                    infer_error = f"inference failed: {exc}"
                stats.add_batch(len(tensors), time.perf_counter() - t0)
                if infer_error is None:
                    verdicts = checked_verdicts(model, batch, [c[4] for c in chunk if c[1] is not None], scores)
            k = 0
            for path, x, err, preview, early in chunk:
                if x is None:
                    result = ScanResult(path, error=err)
                elif infer_error is not None:
                    result = ScanResult(path, error=infer_error)
                else:
                    p = probs[k]
                    cam = cams[k] if cams is not None else None
                    score = None if scores is None else float(scores[k])
                    verdict = verdicts[k]
                    k += 1
                    if not np.all(np.isfinite(p)):
                        result = ScanResult(path, error="model produced non-finite probabilities")
                    else:
                        pred = to_prediction(p, classes, verdict, score, show_unfamiliar)
                        result = ScanResult(path, prediction=pred, heatmap=cam, preview=preview,
                                            features=None if feats is None else feats[k - 1])
                result = triage_mod.apply(result, triage)
                stats.count(result)
                yield result
    except KeyboardInterrupt:
        stats.interrupted = True
        raise
    finally:
        stats.finished = time.perf_counter()
        pool.shutdown(wait=False, cancel_futures=True)
        check_shift(model, stats)


def check_shift(model: Model, stats: ScanStats) -> None:
    """The folder-level shift check over every film ``stats`` has seen (this scan's, and any earlier
    scan's counted into the same stats, e.g. a resumed cluster scan's shards)."""
    stats.shift = shift_mod.check(getattr(model, "shift_reference", None), stats.shift_stats)


def scan_files(
    model: Model,
    paths: "Iterable[Entry | str | os.PathLike[str]]",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    triage: "triage_mod.TriagePolicy | None" = None,
) -> tuple[list[ScanResult], ScanStats]:
    """Scan ``paths`` to completion: (results in input order, stats). For benchmarks and tests."""
    stats = ScanStats()
    results = list(iter_scan(model, paths, batch_size=batch_size, workers=workers, stats=stats, triage=triage))
    return results, stats
