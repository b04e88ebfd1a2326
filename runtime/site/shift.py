"""The folder-level shift check: are these films, taken together, unlike the model's validation films?

Why a folder test: at a hospital no training source holds, every film can stay below the input
check's per-film threshold while the whole folder's ``qc_score`` is shifted (issue 19 measured
medians of 0.44 and 0.97 against -0.04 in-source) -- and the model's figures with it. One film
cannot show that; a hundred can.

The test (fixed from principles, not fitted to any folder; docs/site.md):

- **What is compared**: ``qc_score``, the input check's distance to the training films, which the
  model already computes for every film. Only films the input check judged to be chest X-rays take
  part (``qc`` ``ok`` or ``unfamiliar``): a CT slice in the folder is already flagged on its own.
- **Against what**: the model's own validation films' scores, per validation source, stored in the
  model file (``cxr.shift_reference``, written by ``cxr-export`` or ``cxr-infer shift-reference``).
- **Statistic**: one-sided Mann-Whitney U -- is a film of this folder more likely to score above a
  validation film than below (the effect size ``auc`` = U / (n m), 0.5 when alike)? Rank-based, so
  distribution-free; one-sided, because only a folder *farther* from the training films is a worry.
  Normal approximation with the tie correction and a continuity correction.
- **Stratified by the predicted class** (van Elteren's test): abnormal films score higher than
  normal ones (on the shipped model's held-out films, 100-film subsets of only its COVID or only
  its Viral Pneumonia films were "shifted" 99 % of the time against the pooled validation films,
  though they are in-source). A clinic's case mix is no shift, so each film is compared with the
  validation films the model gave the same top-1 class.
- **Which reference**: a hospital is one place, and it may resemble any one training source. The
  folder is tested against all validation sources pooled and against every source that holds
  enough films predicted like these (``MIN_STRATUM`` per class, ``min_films`` compared in all), and
  the shift is ``detected`` only when **every** one of those tests rejects at ``alpha`` (an
  intersection-union test: its false-alarm rate is at most ``alpha`` for a folder drawn from any
  one source, or from the pooled mix, with no multiplicity correction). The p-value reported is the
  largest.
- **alpha = 0.01**: the target is at most 5 % false alarms on 100-film subsets of held-out in-source
  films; 0.01 keeps well inside it while a shift like the issue's (medians half a unit or more
  apart, most of a validation sd) is found in 100 films with near certainty.
- **At least 30 films**: below that the normal approximation of U is loose near alpha and only very
  large shifts can be found, so silence would read as reassurance; the check says it did not run
  (``detected: false`` with the reason).

numpy only: it runs in every scan, on the workstation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

METADATA_KEY = "shift_reference"  # cxr.shift_reference
FORMAT = "cxr-shift/1"
ALPHA = 0.01
MIN_FILMS = 30
MAX_PER_SOURCE = 2000  # validation scores kept per (source, class) (a seeded sample beyond), ~8 bytes each
MIN_REFERENCE = 5  # validation films a reference needs at all (the strata need MIN_STRATUM to be used)
MIN_STRATUM = 10  # validation films of a predicted class a source needs to be compared in that class
DECIMALS = 4
POOLED = "all validation sources"
ELIGIBLE_QC = frozenset({"ok", "unfamiliar"})  # films the input check judged to be chest X-rays
MESSAGE_SHIFTED = "these films are unlike the training films: validate before use"
TEST = ("one-sided van Elteren test (Mann-Whitney U stratified by the predicted class) of qc_score (this folder "
        "scores higher) against all validation sources pooled and against each source that holds films predicted like "
        "these; detected when every one rejects at alpha (intersection-union test)")


def eligible(qc: str | None, score: float | None) -> bool:
    """Whether a film takes part in the shift check."""
    return qc in ELIGIBLE_QC and score is not None and math.isfinite(score)


def build_reference(scores: Sequence[float], sources: Sequence[str], labels: Sequence[str], *, fitted_on: str,
                    precision: str, seed: int = 0, alpha: float = ALPHA, min_films: int = MIN_FILMS) -> dict:
    """The ``cxr.shift_reference`` entry from one model file's own validation scores and top-1
    classes (films the input check judged to be chest X-rays only; the caller filters). Scores are
    rounded to ``DECIMALS``; a (source, class) with more than ``MAX_PER_SOURCE`` films keeps a seeded
    random sample of them."""
    s = np.asarray(scores, np.float64).reshape(-1)
    src = np.asarray([str(x) for x in sources], dtype=object)
    lab = np.asarray([str(x) for x in labels], dtype=object)
    if not len(s) == len(src) == len(lab):
        raise ValueError(f"{len(s)} scores, {len(src)} sources and {len(lab)} labels")
    keep = np.isfinite(s)
    s, src, lab = s[keep], src[keep], lab[keep]
    if len(s) < MIN_REFERENCE:
        raise ValueError(f"a shift reference needs at least {MIN_REFERENCE} validation films with a qc_score; got {len(s)}")
    rng = np.random.default_rng(seed)
    per: dict[str, dict] = {}
    for name in sorted(set(src.tolist())):
        classes = {}
        for c in sorted(set(lab[src == name].tolist())):
            v = s[(src == name) & (lab == c)]
            if len(v) > MAX_PER_SOURCE:
                v = v[np.sort(rng.choice(len(v), MAX_PER_SOURCE, replace=False))]
            classes[c] = [round(float(x), DECIMALS) for x in np.sort(v)]
        v = s[src == name]
        per[name] = {"n": int(len(v)), "median": round(float(np.median(v)), DECIMALS), "by_predicted_class": classes}
    return {"format": FORMAT, "statistic": "qc_score", "strata": "predicted class (top-1)", "test": TEST,
            "alpha": alpha, "min_films": min_films, "min_stratum": MIN_STRATUM, "fitted_on": fitted_on,
            "precision": precision, "eligible": sorted(ELIGIBLE_QC), "sources": per}


@dataclass(frozen=True)
class ShiftReference:
    """The validation scores a folder is compared with (``cxr.shift_reference``): per source, per
    predicted class, sorted."""

    sources: Mapping[str, Mapping[str, np.ndarray]]
    alpha: float = ALPHA
    min_films: int = MIN_FILMS
    min_stratum: int = 10
    fitted_on: str = "validation split"
    precision: str | None = None

    @classmethod
    def from_metadata(cls, extra: Mapping[str, Any]) -> "ShiftReference | None":
        """From a loaded model's parsed metadata; None when it has none; ValueError when unusable."""
        doc = extra.get(METADATA_KEY)
        if doc is None:
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"cxr.{METADATA_KEY} must be a {FORMAT!r} JSON object")
        try:
            per = {str(k): {str(c): np.sort(np.asarray(x, np.float64)) for c, x in dict(v["by_predicted_class"]).items()}
                   for k, v in dict(doc["sources"]).items()}
            alpha, min_films = float(doc.get("alpha", ALPHA)), int(doc.get("min_films", MIN_FILMS))
            min_stratum = int(doc.get("min_stratum", MIN_STRATUM))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"cxr.{METADATA_KEY} needs sources with score lists by predicted class") from None
        if not per or any(not v or any(x.ndim != 1 or not np.all(np.isfinite(x)) for x in v.values())
                          for v in per.values()):
            raise ValueError(f"cxr.{METADATA_KEY}: every source needs lists of finite scores")
        if not (0.0 < alpha < 1.0) or min_films < 2 or min_stratum < 1:
            raise ValueError(f"cxr.{METADATA_KEY}: alpha must lie in (0, 1), min_films >= 2, min_stratum >= 1")
        return cls(per, alpha, min_films, min_stratum, str(doc.get("fitted_on", "validation split")),
                   doc.get("precision"))

    def references(self) -> dict[str, dict[str, np.ndarray]]:
        """All sources pooled (where there is more than one), then each source; class -> scores."""
        refs = dict(self.sources)
        if len(refs) > 1:
            pooled: dict[str, list] = {}
            for by in refs.values():
                for c, x in by.items():
                    pooled.setdefault(c, []).append(x)
            refs = {POOLED: {c: np.sort(np.concatenate(x)) for c, x in pooled.items()}, **refs}
        return refs


def _ranks(both: np.ndarray) -> tuple[np.ndarray, float]:
    """(1-based average ranks, sum of t^3 - t over runs of ties)."""
    order = np.argsort(both, kind="mergesort")
    s = both[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], len(s)]
    sizes = (ends - starts).astype(np.float64)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, (ends - starts))
    return ranks, float((sizes ** 3 - sizes).sum())


def _u_stat(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(U of "x above ref", its tie-corrected null variance)."""
    n, m = len(x), len(ref)
    ranks, ties = _ranks(np.concatenate([x, ref]))
    total = n + m
    u = float(ranks[:n].sum() - n * (n + 1) / 2.0)
    var = n * m / 12.0 * ((total + 1) - (ties / (total * (total - 1)) if total > 1 else 0.0))
    return u, var


def mann_whitney_greater(x: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(auc = U / (n m), z, one-sided p) for "``x`` tends to be larger than ``ref``": average ranks
    for ties, the tie-corrected variance, a continuity correction of 1/2."""
    return stratified_greater([(np.asarray(x, np.float64), np.asarray(ref, np.float64))])


def stratified_greater(strata: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, float]:
    """Van Elteren's stratified Mann-Whitney test, one-sided: (weighted auc, z, p). Each stratum's U
    is weighted by 1 / (n + m + 1), the weights that make the sum most powerful against a shift of
    the same size in every stratum; the null holds whatever the mix of strata."""
    t = e = v = w_nm = 0.0
    cc = 0.0
    for x, ref in strata:
        n, m = len(x), len(ref)
        if n == 0 or m == 0:
            continue
        u, var = _u_stat(x, ref)
        w = 1.0 / (n + m + 1)
        t += w * u
        e += w * n * m / 2.0
        v += w * w * var
        w_nm += w * n * m
        cc = max(cc, 0.5 * w)
    if w_nm == 0:
        return 0.5, 0.0, 1.0
    if v <= 0:
        return t / w_nm, 0.0, 1.0
    z = (t - e - cc) / math.sqrt(v)
    return t / w_nm, z, 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass
class ShiftResult:
    """The shift check of one scan. ``detected`` is False whenever the check could not run
    (``reason`` says why: no reference in the model, too few films)."""

    detected: bool
    n: int
    available: bool
    reason: str | None = None
    statistic: float | None = None  # auc against the closest reference: P(film here > validation film)
    z: float | None = None
    p_value: float | None = None  # the largest over references (the intersection-union test's p)
    alpha: float = ALPHA
    min_films: int = MIN_FILMS
    closest: str | None = None  # the reference with the largest p-value
    median: float | None = None
    per_reference: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"detected": self.detected, "available": self.available, "n": self.n, "reason": self.reason,
                "statistic": None if self.statistic is None else round(self.statistic, 4),
                "statistic_name": "auc: P(a film here scores above a validation film), Mann-Whitney U / (n m)",
                "z": None if self.z is None else round(self.z, 3),
                "p_value": None if self.p_value is None else float(f"{self.p_value:.3g}"),
                "alpha": self.alpha, "min_films": self.min_films, "closest_reference": self.closest,
                "median_qc_score": None if self.median is None else round(self.median, 4),
                "test": TEST, "per_reference": self.per_reference,
                "message": self.message()}

    def message(self) -> str:
        """One line in plain words, for the summary on stderr and the review page."""
        if not self.available or self.p_value is None:
            return f"shift check: not run ({self.reason})"
        if self.detected:
            return (f"shift check: {MESSAGE_SHIFTED} ({self.n} films; a film here scores above a validation film "
                    f"{100 * self.statistic:.0f} % of the time even against the closest source, {self.closest}; "
                    f"p = {self.p_value:.2g} < {self.alpha:g})")
        return (f"shift check: no shift found ({self.n} films; closest validation source {self.closest}, "
                f"p = {self.p_value:.2g} >= {self.alpha:g})")


def check(reference: ShiftReference | None, scores: Iterable[float], labels: Iterable[str]) -> ShiftResult:
    """Run the test on a folder's eligible ``qc_score`` values and their films' top-1 classes."""
    x = np.asarray(list(scores), np.float64)
    lab = np.asarray([str(c) for c in labels], dtype=object)
    if len(lab) != len(x):
        raise ValueError(f"{len(x)} scores but {len(lab)} labels")
    fin = np.isfinite(x)
    x, lab = x[fin], lab[fin]
    n = int(len(x))
    if reference is None:
        return ShiftResult(False, n, False, "the model carries no shift reference (cxr.shift_reference); add one with "
                                            "cxr-infer shift-reference MODEL --split split.json")
    base = dict(alpha=reference.alpha, min_films=reference.min_films)
    if n < reference.min_films:
        return ShiftResult(False, n, True, f"{n} films judged to be chest X-rays; the check needs at least "
                                           f"{reference.min_films}", **base)
    per = {}
    for name, by_class in reference.references().items():
        # strata: predicted classes this reference holds enough validation films of
        strata = [(x[lab == c], ref) for c, ref in by_class.items() if len(ref) >= reference.min_stratum]
        covered = sum(len(a) for a, _ in strata)
        entry = {"n_reference": int(sum(len(r) for _, r in strata)), "n_compared": covered}
        if covered < reference.min_films:  # this source never saw films predicted like these: not applicable
            per[name] = {**entry, "applicable": False}
            continue
        auc, z, p = stratified_greater(strata)
        per[name] = {**entry, "applicable": True, "auc": round(auc, 4), "z": round(z, 3), "p_value": float(f"{p:.3g}")}
    applicable = [k for k, v in per.items() if v["applicable"]]
    if not applicable:
        return ShiftResult(False, n, True, "no validation source holds films predicted like these "
                                           f"(at least {reference.min_films} in classes it has "
                                           f"{reference.min_stratum}+ films of)", per_reference=per, **base)
    closest = max(applicable, key=lambda k: (per[k]["p_value"], -per[k]["auc"]))
    c = per[closest]
    p_max = c["p_value"]
    return ShiftResult(bool(p_max < reference.alpha), n, True, None, c["auc"], c["z"], p_max, closest=closest,
                       median=float(np.median(x)), per_reference=per, **base)
