"""The input check: should the model answer for this image at all?

A classifier trained on frontal chest X-rays answers for anything it is given -- a CT slice, a
photo, a blank page -- with a confident disease label. Each scanned image therefore gets a QC
verdict, from three layers, cheapest and surest first:

1. the DICOM header, where there is one (``Modality``, ``BodyPartExamined``, ``ViewPosition``);
2. pixel checks that features cannot make: blank or near-constant images, white noise, colour
   images, extreme aspect ratios; and, with the model's template of the training films' coarse
   layout, films that are inverted, upside down or on their side;
3. the model's own ``qc_score`` graph output (a distance to the training data's feature
   statistics, computed by cxr-export) against the two thresholds the export stored in the
   ``cxr.input_check`` metadata.

Verdicts (``qc``): ``ok``; ``unfamiliar`` (unlike the training X-rays: the prediction is withheld
unless the caller asks to see it); ``not_chest_xray``, ``not_frontal`` and ``misoriented`` (no
diagnosis is shown); ``unchecked`` (a model exported before the check: no score to judge by, only
the header and pixel checks ran). numpy only: this runs on the workstation. See docs/input-check.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

OK, UNFAMILIAR, NOT_CHEST_XRAY, NOT_FRONTAL, MISORIENTED, UNCHECKED = (
    "ok", "unfamiliar", "not_chest_xray", "not_frontal", "misoriented", "unchecked")
QC_VALUES = (OK, UNFAMILIAR, NOT_CHEST_XRAY, NOT_FRONTAL, MISORIENTED, UNCHECKED)
# Rows whose prediction is withheld whatever the caller asks: the model was not made for such an image.
NO_DIAGNOSIS = frozenset({NOT_CHEST_XRAY, NOT_FRONTAL, MISORIENTED})
FLAGGED = frozenset({UNFAMILIAR, NOT_CHEST_XRAY, NOT_FRONTAL, MISORIENTED})
# ``unfamiliar`` rows are withheld too unless the caller asks to see them (``show_unfamiliar``):
# the score cannot tell an unusual chest film from an X-ray of another body part (both sit
# between the two thresholds; docs/input-check.md), so such a row may not be a chest at all.


def withholds(qc: str, show_unfamiliar: bool = False) -> bool:
    """Whether a row with this verdict shows no prediction."""
    return qc in NO_DIAGNOSIS or (qc == UNFAMILIAR and not show_unfamiliar)

METADATA_KEY = "input_check"  # cxr.input_check
SCORE_OUTPUT = "qc_score"

# -- pixel-check limits (fixed, not fitted; why each value is safe for real X-rays is in
#    docs/input-check.md) ----------------------------------------------------------------------
COLOUR_THUMBNAIL = 64  # px, longest side of the copy the colour statistic is computed on
COLOUR_SPREAD_MAX = 12.0  # mean per-pixel (max - min) over R, G, B, in 8-bit levels
ASPECT_MAX = 3.0  # longer side / shorter side of the decoded image
BLANK_STD_MIN = 2.0  # gray-level standard deviation of the model-size image, 8-bit levels
NOISE_CORRELATION_MIN = 0.3  # correlation of horizontally adjacent pixels of the model-size image

# -- DICOM header rules ------------------------------------------------------------------------
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})  # computed/digital radiography
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHESTLAT"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
DICOM_TAGS = ("Modality", "BodyPartExamined", "ViewPosition")


@dataclass(frozen=True)
class Verdict:
    """A QC reason plus a short human explanation (``detail``) of where it came from."""

    qc: str
    detail: str | None = None


@dataclass(frozen=True)
class ImageFacts:
    """What the decoder saw that grayscale conversion throws away; collected while reading.

    ``colour_spread`` is None for sources that are grayscale by format (no colour channels).
    ``dicom`` holds the DICOM_TAGS found in the header (upper-case, stripped; blank tags absent).
    """

    width: int
    height: int
    colour_spread: float | None = None
    dicom: Mapping[str, str] | None = None


def colour_spread(image) -> float | None:
    """Mean per-pixel channel spread (max - min of R, G, B) on a small copy of a colour PIL
    image; None for modes that carry no colour. Gray stored as RGB gives about 0 (JPEG chroma
    noise a level or two); a photo or a dermoscopy image tens of levels."""
    from PIL import Image

    mode = image.mode
    if mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return None
    if mode == "P":
        pal = image.getpalette() or []
        if pal and all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3)):
            return 0.0  # a gray palette
    w, h = image.size
    scale = COLOUR_THUMBNAIL / max(w, h, 1)
    size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
    try:
        rgb = np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST) if scale >= 1
                         else image.resize(size, Image.Resampling.NEAREST).convert("RGB"), dtype=np.int16)
    except (ValueError, OSError):  # a mode Pillow cannot turn into RGB: no colour verdict
        return None
    if rgb.size == 0:
        return None
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())


def header_verdict(dicom: Mapping[str, str] | None) -> Verdict | None:
    """The DICOM header's answer, or None when it has none (not DICOM, or the tags are blank).

    A lateral view is a chest X-ray, but not the frontal view the model learned: ``not_frontal``,
    with the prediction withheld like ``not_chest_xray``."""
    if not dicom:
        return None
    modality = dicom.get("Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return Verdict(NOT_CHEST_XRAY, f"DICOM Modality {modality} is not a radiograph")
    body = dicom.get("BodyPartExamined")
    if body and body.replace(" ", "_") not in CHEST_BODY_PARTS:
        return Verdict(NOT_CHEST_XRAY, f"DICOM BodyPartExamined {body} is not the chest")
    view = dicom.get("ViewPosition")
    if (view and view in LATERAL_VIEWS) or (body and "LAT" in body):
        return Verdict(NOT_FRONTAL, f"DICOM ViewPosition {view or body}: a lateral view")
    return None


def pixel_verdict(facts: ImageFacts | None, pixels: np.ndarray | None) -> Verdict | None:
    """Checks on the decoded image; ``pixels`` is the model-size uint8 image (before normalising).

    Tens of microseconds in all: the statistics run on every 8th row of ``pixels``."""
    if facts is not None:
        if facts.colour_spread is not None and facts.colour_spread > COLOUR_SPREAD_MAX:
            return Verdict(NOT_CHEST_XRAY, f"colour image (channel spread {facts.colour_spread:.0f} > "
                                           f"{COLOUR_SPREAD_MAX:g})")
        long_side, short_side = max(facts.width, facts.height), max(1, min(facts.width, facts.height))
        if long_side / short_side > ASPECT_MAX:
            return Verdict(NOT_CHEST_XRAY, f"aspect ratio {long_side / short_side:.1f}:1 (> {ASPECT_MAX:g}:1) "
                                           f"of a {facts.width}x{facts.height} image")
    if pixels is not None and pixels.ndim == 2 and pixels.size:
        rows = pixels[::8].astype(np.float32)  # every 8th row of the model-size image
        std = float(rows.std())
        if std < BLANK_STD_MIN:
            return Verdict(NOT_CHEST_XRAY, f"blank or near-constant image (gray-level std {std:.1f})")
        left, right = rows[:, :-1:3].ravel(), rows[:, 1::3].ravel()  # horizontally adjacent pairs
        n = min(left.size, right.size)
        if n > 8:
            left, right = left[:n] - left[:n].mean(), right[:n] - right[:n].mean()
            denom = float(np.sqrt(np.dot(left, left) * np.dot(right, right)))
            corr = float(np.dot(left, right)) / denom if denom > 0 else 1.0
            if corr < NOISE_CORRELATION_MIN:
                return Verdict(NOT_CHEST_XRAY, f"noise-like image (neighbouring pixels correlate {corr:.2f})")
    return None


LAYOUT_EPS_LEVELS = 1.0  # added to a layout's sd, in 8-bit gray levels (a blank image stays finite)
# The mistakes, each as what it does to the film's layout on the grid [g, g]. Every one is a sign
# flip or a rotation, so the template matches a film after the mistake is undone exactly as well
# as the film matches the template with the mistake applied: ``_variants`` turns the template once
# and the check is then one small matrix product per film.
MISTAKES = (("inverted", lambda t: -t), ("upside down", lambda t: t[::-1, ::-1]),
            ("on its side (rotated 90 degrees)", lambda t: np.rot90(t, 1)),
            ("on its side (rotated 270 degrees)", lambda t: np.rot90(t, 3)),
            ("inverted and upside down", lambda t: -t[::-1, ::-1]))


def _layouts(images: np.ndarray, grid: int, eps: float) -> np.ndarray:
    """[N, grid*grid]: images [N, H, W] averaged over grid x grid blocks (a remainder of rows or
    columns left out), each standardised by its own mean and sd (+ ``eps``). The block sums are
    two contiguous reductions (rows within a block, then columns), five times faster than one
    reduction over both block axes; float32 sums (a 224 px uint8 image's block sums stay below
    2**24, so they are exact), the rest in float64."""
    n = len(images)
    h, w = images.shape[1] // grid, images.shape[2] // grid
    rows = images[:, :h * grid, :w * grid].reshape(n, grid, h, w * grid).sum(axis=2, dtype=np.float32)
    t = rows.reshape(n, grid, grid, w).sum(axis=3).reshape(n, -1).astype(np.float64) / (h * w)
    t = t - t.mean(axis=1, keepdims=True)
    return t / (np.sqrt((t * t).mean(axis=1, keepdims=True)) + eps)


def layout_u8(pixels: np.ndarray, grid: int) -> np.ndarray:
    """[grid, grid]: the model-size uint8 image's layout (``_layouts``, epsilon LAYOUT_EPS_LEVELS).
    cxr-export builds the template from training films with this function."""
    return _layouts(pixels[None], grid, LAYOUT_EPS_LEVELS)[0].reshape(grid, grid)


def layout_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class OrientationCheck:
    """The training films' mean coarse layout (``template``, grid x grid) and a ``margin``, as
    cxr-export stored them in ``cxr.input_check`` under ``orientation``.

    A film is ``misoriented`` when the template matches it better after undoing a mistake --
    inversion, a half turn, a quarter turn -- than as it is, by more than the margin: a frontal
    chest film has two dark lung fields either side of a bright mediastinum and is bright below
    the diaphragm, which an inverted or turned film is not. Parameter-free but for the margin,
    which the export chose so that at most a quarter of a percent of any validation source is
    flagged. A left-right flip is no mistake here (chests are nearly symmetric, and a flipped film
    is still a chest film the right way up)."""

    template: np.ndarray
    margin: float

    @functools.cached_property
    def _variants(self) -> np.ndarray:
        """[1 + mistakes, g*g]: the template as it is, then as each mistake would show it, each
        centred and of unit norm, so that one product with a centred layout gives correlations."""
        rows = [self.template] + [np.ascontiguousarray(mistake(self.template)) for _, mistake in MISTAKES]
        m = np.stack([r.ravel() - r.mean() for r in rows]).astype(np.float64)
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norms > 0, norms, 1.0)

    @classmethod
    def from_doc(cls, doc: Any) -> "OrientationCheck | None":
        if doc is None:
            return None
        try:
            grid = int(doc["grid"])
            template = np.asarray(doc["template"], np.float32).reshape(grid, grid)
            margin = float(doc["margin"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cxr.{METADATA_KEY} orientation needs grid, grid x grid template and margin") from None
        if not (grid >= 2 and np.all(np.isfinite(template)) and np.isfinite(margin) and margin >= 0):
            raise ValueError(f"cxr.{METADATA_KEY} orientation: grid >= 2, finite template, margin >= 0 required")
        return cls(template, margin)

    def _correlations(self, layouts: np.ndarray) -> np.ndarray:
        """[N, 1 + mistakes]: each layout's correlation with the template as it is, then with
        each mistake (0 for a layout with no contrast at all)."""
        v = layouts - layouts.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(v, axis=1)
        r = (v @ self._variants.T) / np.where(norms > 0, norms, 1.0)[:, None]
        r[norms == 0] = 0.0
        return r

    def _best(self, row: np.ndarray) -> tuple[float, str, float]:
        k = int(np.argmax(row[1:]))
        return float(row[0]), MISTAKES[k][0], float(row[1 + k])

    def scores(self, pixels: np.ndarray) -> tuple[float, str, float]:
        """(correlation as it is, the best-fitting mistake, its correlation) for one model-size
        uint8 image."""
        g = self.template.shape[0]
        return self._best(self._correlations(_layouts(pixels[None], g, LAYOUT_EPS_LEVELS))[0])

    def verdict(self, pixels: np.ndarray | None) -> Verdict | None:
        """For one model-size uint8 image (the export's and the tests' path)."""
        if pixels is None or pixels.ndim != 2 or min(pixels.shape) < self.template.shape[0]:
            return None
        return self._judge(*self.scores(pixels))

    def batch_verdicts(self, batch: np.ndarray, pp) -> list:
        """For a batch of model inputs [N, C, H, W] (normalised as ``pp`` says): the same layout
        as ``layout_u8`` -- normalising is affine, which the per-image standardisation removes,
        and the sd's epsilon is converted to input units -- in one vectorised pass. This is the
        scan's path."""
        g = self.template.shape[0]
        x = np.asarray(batch, np.float32)
        if x.ndim != 4 or min(x.shape[2:]) < g:
            return [None] * len(x)
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        layouts = _layouts(x, g, LAYOUT_EPS_LEVELS / (255.0 * float(pp.std)))
        return [self._judge(*self._best(row)) for row in self._correlations(layouts)]

    def _judge(self, as_is: float, name: str, best: float) -> Verdict | None:
        if best - as_is > self.margin:
            return Verdict(MISORIENTED, f"looks {name}: the training films' layout matches it so (r {best:.2f}) "
                                        f"better than as it is (r {as_is:.2f})")
        return None


def early_verdict(facts: ImageFacts | None, pixels: np.ndarray | None) -> Verdict | None:
    """Header first (surest), then pixels; None when neither objects. The orientation check,
    which needs the model's template, runs next on whole batches (``engine.checked_verdicts``)."""
    return header_verdict(facts.dicom if facts is not None else None) or pixel_verdict(facts, pixels)


@dataclass(frozen=True)
class ScoreCheck:
    """The model's ``qc_score`` thresholds, as cxr-export stored them in ``cxr.input_check``.

    score > ``not_chest_xray`` -> not_chest_xray; score > ``unfamiliar`` -> unfamiliar; else ok.
    """

    unfamiliar: float
    not_chest_xray: float
    output: str = SCORE_OUTPUT
    meta: Mapping[str, Any] | None = None
    orientation: OrientationCheck | None = None  # models exported before it have none

    @classmethod
    def from_metadata(cls, extra: Mapping[str, Any]) -> "ScoreCheck | None":
        """From a model's decoded metadata extras (``decode_props`` has parsed the JSON); None
        when the model has no check (exported before it). Raises ValueError for a present but
        unusable entry."""
        doc = extra.get(METADATA_KEY)
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise ValueError(f"cxr.{METADATA_KEY} must be a JSON object")
        th = doc.get("thresholds") or {}
        try:
            lo, hi = float(th[UNFAMILIAR]), float(th[NOT_CHEST_XRAY])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cxr.{METADATA_KEY} lacks numeric thresholds.{UNFAMILIAR} and "
                             f"thresholds.{NOT_CHEST_XRAY}") from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(f"cxr.{METADATA_KEY} thresholds must be finite with "
                             f"{NOT_CHEST_XRAY} >= {UNFAMILIAR} (got {lo}, {hi})")
        return cls(lo, hi, str(doc.get("output", SCORE_OUTPUT)), doc, OrientationCheck.from_doc(doc.get("orientation")))

    def verdict(self, score: float) -> Verdict:
        if not np.isfinite(score) or score > self.not_chest_xray:
            return Verdict(NOT_CHEST_XRAY, f"qc_score {score:.3g} > {self.not_chest_xray:.3g}: far from "
                                           "every training X-ray")
        if score > self.unfamiliar:
            return Verdict(UNFAMILIAR, f"qc_score {score:.3g} > {self.unfamiliar:.3g}: unlike the training X-rays")
        return Verdict(OK)


def find_score_check(extra: Mapping[str, Any], outputs: list[str]) -> tuple[str | None, ScoreCheck | None, str | None]:
    """(score output name, thresholds, a note for the user) for a loaded model's metadata extras
    and graph outputs. A model exported before the check has neither: (None, None, None)."""
    check = ScoreCheck.from_metadata(extra)
    name = check.output if check is not None else SCORE_OUTPUT
    if name not in outputs:
        if check is None:
            return None, None, None
        return None, None, (f"note: the metadata describes an input check but the graph has no {name!r} output; "
                            "qc is 'unchecked' (header and pixel checks still run)")
    if check is None:
        return name, None, (f"note: the graph has a {name!r} output but no cxr.{METADATA_KEY} thresholds; "
                            "qc is 'unchecked' and qc_score is reported as is")
    return name, check, None


def final_verdict(early: Verdict | None, score: float | None, check: ScoreCheck | None) -> Verdict:
    """Combine: a header/pixel objection wins; then the model's score; without one, unchecked."""
    if early is not None:
        return early
    if check is None or score is None:
        return Verdict(UNCHECKED, "this model has no input check (exported before it)" if check is None
                       else "the model gave no qc_score")
    return check.verdict(score)
