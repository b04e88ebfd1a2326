"""The folder-level shift check: are these films, taken together, unlike the model's validation films?

Why a folder test: at a hospital no training source holds, every film can stay below the input
check's per-film threshold while the whole folder is shifted (issue 19 measured ``qc_score`` medians
of 0.44 and 0.97 against -0.04 in-source) -- and the model's figures with it. One film cannot show
that; a hundred can.

The test (docs/site.md; its parameters are fixed from principles, none fitted to a folder):

- **What is compared**: ``shift_features``, a graph output that the shift reference adds to the model
  file: for every depth the input check reads, the film's coordinates on the ``COMPONENTS`` leading
  principal components of that depth's training-film statistics (the input check's own projection,
  ``export/input_check.py``). Texture, intensity and layout statistics of several depths, so an
  acquisition that moves none of them far enough to flag one film still moves their *mean*. Only
  films the input check judged to be chest X-rays take part (``qc`` ``ok`` or ``unfamiliar``): a CT
  slice in the folder is flagged on its own. (Version 1 compared ``qc_score`` alone, a distance: a
  hospital whose films are as far from the training films as one training source is from the
  others went unnoticed, and left-out sources raised no alarm; docs/site.md keeps its figures.)
- **Against what**: the validation films' features, summarised by source and by the model's top-1
  class -- count, mean and covariance of each group (``cxr.shift_reference``, a few kilobytes).
- **Statistic**: the folder's mean feature vector against the mean the reference predicts for a
  folder with the same mix of predicted classes, ``sum_c pi_c mu_c``: a clinic's case mix is no
  shift. The difference is first projected off the span of the reference's class-mean differences,
  so films a class too many or too few (a ward of COVID films, the misclassified films of such a
  ward) do not read as a shift, then weighed by its null covariance
  ``sum_c pi_c S_c / n + sum_c pi_c^2 S_c / m_c`` (the folder's sampling error and the reference
  means' own): ``T = d' V^-1 d`` is chi-square with as many degrees of freedom as the projected
  dimension when the folder's films of each predicted class are like the reference's. ``S_c`` is
  shrunk toward the pooled within-group covariance by ``dim`` pseudo-films, so a group of a few dozen
  validation films does not make the test over-eager.
- **Which reference**: a hospital may resemble any one training source, or mix them. The folder is tested against
  all validation sources pooled -- there with every (source, class) mean difference projected off,
  so any mix of the training sources reads as none -- and against every source that has validation
  films of the classes predicted here (``MIN_GROUP`` films a class, ``min_films`` of the folder's
  films in such classes), and the shift is ``detected`` only when **every** one of those tests rejects at ``alpha`` (an
  intersection-union test: at most ``alpha`` false alarms for a folder drawn from any one source or
  from the pooled mix, with no multiplicity correction). The p-value reported is the largest.
- **alpha = 0.01**, **at least 30 films** (below that a mean of 28 dimensions is too noisy for the
  chi-square approximation near alpha, and only very large shifts could be found; the check says it
  did not run, ``detected: false`` with the reason).

Sufficient statistics only (per predicted class: a count and a sum vector), so a cluster scan's
shards and a resumed scan add up to exactly what one uninterrupted scan sees. numpy only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

METADATA_KEY = "shift_reference"  # cxr.shift_reference
FORMAT = "cxr-shift/2"
OUTPUT = "shift_features"  # the graph output the reference reads
COMPONENTS = 4  # leading principal components per input-check depth
ALPHA = 0.01
MIN_FILMS = 30
MIN_GROUP = 10  # validation films of a predicted class a source needs for that class to be compared
MIN_REFERENCE = 5  # films a reference needs at all (groups below MIN_GROUP are stored, never compared)
SIG = 7  # significant digits stored
POOLED = "all validation sources"
ELIGIBLE_QC = frozenset({"ok", "unfamiliar"})  # films the input check judged to be chest X-rays
MESSAGE_SHIFTED = "these films are unlike the training films: validate before use"
TEST = ("chi-square test of the mean shift_features (input-check principal components) against the mean the "
        "validation films of the same predicted classes give, off the span of the class-mean differences; against "
        "all validation sources pooled and each source with films predicted like these; detected when every one "
        "rejects at alpha (intersection-union test)")
STATISTIC_NAME = "T: chi-square of the folder's mean features against the validation films' (Hotelling-type)"


def eligible(qc: str | None, features) -> bool:
    """Whether a film takes part in the shift check."""
    return qc in ELIGIBLE_QC and features is not None and bool(np.all(np.isfinite(features)))


def _r(a) -> list:
    return [float(f"{x:.{SIG}g}") for x in np.asarray(a, np.float64).reshape(-1)]


def _upper(s: np.ndarray) -> list:
    return _r(s[np.triu_indices(len(s))])


def _from_upper(v, d: int) -> np.ndarray:
    s = np.zeros((d, d))
    s[np.triu_indices(d)] = np.asarray(v, np.float64)
    return s + np.triu(s, 1).T


def build_reference(features, sources: Sequence[str], labels: Sequence[str], *, fitted_on: str, precision: str,
                    alpha: float = ALPHA, min_films: int = MIN_FILMS) -> dict:
    """The ``cxr.shift_reference`` entry from one model file's own validation films: their
    ``shift_features`` rows, sources and top-1 classes (films the input check judged to be chest
    X-rays only; the caller filters). Features are standardised by the films' own mean and sd."""
    x = np.asarray(features, np.float64)
    src = np.asarray([str(s) for s in sources], dtype=object)
    lab = np.asarray([str(c) for c in labels], dtype=object)
    if x.ndim != 2 or not len(x) == len(src) == len(lab):
        raise ValueError(f"features of shape {x.shape}, {len(src)} sources and {len(lab)} labels")
    keep = np.all(np.isfinite(x), axis=1)
    x, src, lab = x[keep], src[keep], lab[keep]
    if len(x) < MIN_REFERENCE:
        raise ValueError(f"a shift reference needs at least {MIN_REFERENCE} validation films; got {len(x)}")
    mean, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mean) / sd
    per: dict[str, dict] = {}
    for name in sorted(set(src.tolist())):
        groups = {}
        for c in sorted(set(lab[src == name].tolist())):
            g = z[(src == name) & (lab == c)]
            cov = np.cov(g, rowvar=False) if len(g) > 1 else np.zeros((z.shape[1],) * 2)
            groups[c] = {"n": int(len(g)), "mean": _r(g.mean(0)), "cov_upper": _upper(np.atleast_2d(cov))}
        per[name] = {"n": int((src == name).sum()), "by_predicted_class": groups}
    return {"format": FORMAT, "output": OUTPUT, "dim": int(z.shape[1]), "standardise": {"mean": _r(mean), "sd": _r(sd)},
            "strata": "predicted class (top-1)", "test": TEST, "alpha": alpha, "min_films": min_films,
            "min_group": MIN_GROUP, "fitted_on": fitted_on, "precision": precision, "eligible": sorted(ELIGIBLE_QC),
            "sources": per}


class OutdatedReference(ValueError):
    """A reference of an earlier format: the model still loads, the check says it cannot run."""


@dataclass(frozen=True)
class Group:
    n: int
    mean: np.ndarray
    cov: np.ndarray


@dataclass(frozen=True)
class ShiftReference:
    """The validation films' feature statistics a folder is compared with (``cxr.shift_reference``):
    per source, per predicted class, a count, mean and covariance of the standardised features."""

    sources: Mapping[str, Mapping[str, Group]]
    mean: np.ndarray
    sd: np.ndarray
    alpha: float = ALPHA
    min_films: int = MIN_FILMS
    min_group: int = MIN_GROUP
    fitted_on: str = "validation split"
    precision: str | None = None
    output: str = OUTPUT

    @property
    def dim(self) -> int:
        return int(len(self.mean))

    @classmethod
    def from_metadata(cls, extra: Mapping[str, Any]) -> "ShiftReference | None":
        """From a loaded model's parsed metadata; None when it has none; ValueError when unusable."""
        doc = extra.get(METADATA_KEY)
        if doc is None:
            return None
        if isinstance(doc, dict) and str(doc.get("format", "")).startswith("cxr-shift/") and doc["format"] != FORMAT:
            raise OutdatedReference(f"cxr.{METADATA_KEY} is {doc['format']!r}, which this version cannot use "
                                    f"(it needs {FORMAT!r}): the shift check will not run; re-add the reference with "
                                    "cxr-infer shift-reference MODEL --split split.json")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            old = doc.get("format") if isinstance(doc, dict) else None
            raise ValueError(f"cxr.{METADATA_KEY} must be a {FORMAT!r} JSON object"
                             + (f" (this one is {old!r}: re-add it with cxr-infer shift-reference)" if old else ""))
        try:
            d = int(doc["dim"])
            mean = np.asarray(doc["standardise"]["mean"], np.float64)
            sd = np.asarray(doc["standardise"]["sd"], np.float64)
            per = {str(k): {str(c): Group(int(g["n"]), np.asarray(g["mean"], np.float64), _from_upper(g["cov_upper"], d))
                            for c, g in dict(v["by_predicted_class"]).items()}
                   for k, v in dict(doc["sources"]).items()}
            alpha, min_films = float(doc.get("alpha", ALPHA)), int(doc.get("min_films", MIN_FILMS))
            min_group = int(doc.get("min_group", MIN_GROUP))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise ValueError(f"cxr.{METADATA_KEY} needs dim, standardise and sources with groups by predicted class") from None
        if (d < 1 or mean.shape != (d,) or sd.shape != (d,) or not np.all(sd > 0) or not per
                or any(g.mean.shape != (d,) or not np.all(np.isfinite(g.cov)) or g.n < 1
                       for by in per.values() for g in by.values())):
            raise ValueError(f"cxr.{METADATA_KEY}: every group needs a count, a {d}-vector mean and a covariance")
        if not (0.0 < alpha < 1.0) or min_films < 2 or min_group < 2:
            raise ValueError(f"cxr.{METADATA_KEY}: alpha must lie in (0, 1), min_films >= 2, min_group >= 2")
        return cls(per, mean, sd, alpha, min_films, min_group, str(doc.get("fitted_on", "validation split")),
                   doc.get("precision"), str(doc.get("output", OUTPUT)))

    @cached_property
    def within(self) -> np.ndarray:
        """The pooled within-group covariance (every source's every class): the shrinkage target
        (computed once per reference: a bench checks thousands of folders against one)."""
        num = sum((g.n - 1) * g.cov for by in self.sources.values() for g in by.values() if g.n > 1)
        den = sum(g.n - 1 for by in self.sources.values() for g in by.values() if g.n > 1)
        return num / den if den > 0 else np.eye(self.dim)

    @cached_property
    def references(self) -> dict[str, dict[str, Group]]:
        """All sources pooled (where there is more than one), then each source; class -> group."""
        refs = dict(self.sources)
        if len(refs) > 1:
            pooled: dict[str, Group] = {}
            for c in sorted({c for by in refs.values() for c in by}):
                gs = [by[c] for by in refs.values() if c in by]
                n = sum(g.n for g in gs)
                mu = sum(g.n * g.mean for g in gs) / n
                scatter = sum((g.n - 1) * g.cov + g.n * np.outer(g.mean - mu, g.mean - mu) for g in gs)
                pooled[c] = Group(n, mu, scatter / max(n - 1, 1))
            refs = {POOLED: pooled, **refs}
        return refs


@dataclass
class ShiftStats:
    """What a scan keeps for the check: per predicted class, the number of eligible films and the
    sum of their standardised features (and of their qc_score, for the summary). Adds up exactly
    across shards and resumed runs (``merge``, ``to_json``/``from_json``)."""

    count: Counter = field(default_factory=Counter)
    sums: dict = field(default_factory=dict)  # class -> float64 [dim] sum of raw features
    qc_sum: float = 0.0

    @property
    def n(self) -> int:
        return int(sum(self.count.values()))

    def add(self, features, label: str, qc_score: float | None = None) -> None:
        v = np.asarray(features, np.float64).reshape(-1)
        self.count[label] += 1
        self.sums[label] = self.sums[label] + v if label in self.sums else v.copy()
        if qc_score is not None and math.isfinite(qc_score):
            self.qc_sum += float(qc_score)

    def merge(self, other: "ShiftStats") -> None:
        for c, k in other.count.items():
            self.count[c] += k
            self.sums[c] = self.sums[c] + other.sums[c] if c in self.sums else np.array(other.sums[c], np.float64)
        self.qc_sum += other.qc_sum

    def to_json(self) -> dict:
        """Exact: JSON keeps a float64 exactly (repr round-trips)."""
        return {"count": dict(self.count), "sums": {c: [float(x) for x in v] for c, v in self.sums.items()},
                "qc_sum": self.qc_sum}

    @classmethod
    def from_json(cls, doc: Any) -> "ShiftStats":
        """Empty for anything but such a dict (e.g. an older ledger's per-film list)."""
        s = cls()
        if isinstance(doc, Mapping):
            s.count.update({str(c): int(k) for c, k in dict(doc.get("count", {})).items()})
            s.sums = {str(c): np.asarray(v, np.float64) for c, v in dict(doc.get("sums", {})).items()}
            s.qc_sum = float(doc.get("qc_sum", 0.0))
        return s


def chi2_sf(t: float, dof: int) -> float:
    """P(chi-square with ``dof`` degrees of freedom > t): the regularised upper incomplete gamma
    Q(dof/2, t/2), by its series below a+1 and its continued fraction above (numpy-free)."""
    a, x = dof / 2.0, t / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_front)))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_front) * h))


def _complement(means: list[np.ndarray], d: int) -> np.ndarray:
    """Orthonormal basis [d, d'] of the directions orthogonal to every class-mean difference."""
    if len(means) < 2:
        return np.eye(d)
    diff = np.stack([m - means[0] for m in means[1:]], axis=1)
    u, s, _ = np.linalg.svd(diff, full_matrices=True)
    rank = int(np.sum(s > 1e-9 * max(1.0, float(s.max()) if len(s) else 1.0)))
    return u[:, rank:]


def _test(groups: Mapping[str, Group], stats: ShiftStats, mean: np.ndarray, sd: np.ndarray, within: np.ndarray,
          min_group: int, span: Sequence[np.ndarray] | None = None) -> tuple[int, float, int, float] | None:
    """(films compared, T, dof, p) of one reference; None when its classes hold none of these films.
    ``span``: the means whose differences are projected off (default: the classes' means)."""
    use = [c for c, g in groups.items() if g.n >= min_group and stats.count.get(c, 0) > 0]
    n = sum(stats.count[c] for c in use)
    if not use or n == 0:
        return None
    d = len(mean)
    xbar = (sum(stats.sums[c] for c in use) / n - mean) / sd
    pi = {c: stats.count[c] / n for c in use}
    shrunk = {c: ((groups[c].n - 1) * groups[c].cov + d * within) / (groups[c].n - 1 + d) for c in use}
    target = sum(pi[c] * groups[c].mean for c in use)
    basis = _complement(list(span) if span is not None else [g.mean for g in groups.values() if g.n >= min_group], d)
    if basis.shape[1] == 0:
        return None
    v = sum(pi[c] * shrunk[c] / n + pi[c] ** 2 * shrunk[c] / groups[c].n for c in use)
    diff = basis.T @ (xbar - target)
    vb = basis.T @ v @ basis
    try:
        t = float(diff @ np.linalg.solve(vb, diff))
    except np.linalg.LinAlgError:
        t = float(diff @ np.linalg.pinv(vb) @ diff)
    dof = int(basis.shape[1])
    return n, t, dof, chi2_sf(t, dof)


@dataclass
class ShiftResult:
    """The shift check of one scan. ``detected`` is False whenever the check could not run
    (``reason`` says why: no reference in the model, too few films)."""

    detected: bool
    n: int
    available: bool
    reason: str | None = None
    statistic: float | None = None  # T against the closest reference
    dof: int | None = None
    p_value: float | None = None  # the largest over references (the intersection-union test's p)
    alpha: float = ALPHA
    min_films: int = MIN_FILMS
    closest: str | None = None  # the reference with the largest p-value
    mean_qc_score: float | None = None
    per_reference: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"detected": self.detected, "available": self.available, "n": self.n, "reason": self.reason,
                "statistic": None if self.statistic is None else round(self.statistic, 3),
                "statistic_name": STATISTIC_NAME, "dof": self.dof,
                "p_value": None if self.p_value is None else float(f"{self.p_value:.3g}"),
                "alpha": self.alpha, "min_films": self.min_films, "closest_reference": self.closest,
                "mean_qc_score": None if self.mean_qc_score is None else round(self.mean_qc_score, 4),
                "test": TEST, "per_reference": self.per_reference, "message": self.message()}

    def message(self) -> str:
        """One line in plain words, for the summary on stderr and the review page."""
        if not self.available or self.p_value is None:
            return f"shift check: not run ({self.reason})"
        if self.detected:
            return (f"shift check: {MESSAGE_SHIFTED} ({self.n} films; unlike even the closest validation source, "
                    f"{self.closest}: T = {self.statistic:.0f} on {self.dof} degrees of freedom, "
                    f"p = {self.p_value:.2g} < {self.alpha:g})")
        return (f"shift check: no shift found ({self.n} films; closest validation source {self.closest}, "
                f"p = {self.p_value:.2g} >= {self.alpha:g})")


def check(reference: ShiftReference | None, stats: ShiftStats) -> ShiftResult:
    """Run the test on what a scan kept (``ShiftStats``)."""
    n = stats.n
    mean_qc = stats.qc_sum / n if n else None
    if reference is None:
        return ShiftResult(False, n, False, "the model carries no shift reference (cxr.shift_reference); add one with "
                                            "cxr-infer shift-reference MODEL --split split.json")
    base = dict(alpha=reference.alpha, min_films=reference.min_films, mean_qc_score=mean_qc)
    if n < reference.min_films:
        return ShiftResult(False, n, True, f"{n} films judged to be chest X-rays; the check needs at least "
                                           f"{reference.min_films}", **base)
    if any(len(v) != reference.dim for v in stats.sums.values()):
        return ShiftResult(False, n, False, f"the scan's features do not have the reference's {reference.dim} "
                                            "dimensions", **base)
    within = reference.within
    # the pooled reference accepts any mix of the sources: every (source, class) mean difference is projected off
    every = [g.mean for by in reference.sources.values() for g in by.values() if g.n >= reference.min_group]
    per, raw_p = {}, {}  # the report rounds p; the decision uses it unrounded
    for name, groups in reference.references.items():
        r = _test(groups, stats, reference.mean, reference.sd, within, reference.min_group,
                  every if name == POOLED else None)
        if r is None or r[0] < reference.min_films:  # this source never saw films predicted like these
            per[name] = {"n_compared": 0 if r is None else r[0], "applicable": False}
            continue
        k, t, dof, p = r
        raw_p[name] = p
        per[name] = {"n_compared": k, "applicable": True, "statistic": round(t, 3), "dof": dof,
                     "p_value": float(f"{p:.3g}")}
    applicable = [k for k, v in per.items() if v["applicable"]]
    if not applicable:
        return ShiftResult(False, n, True, "no validation source holds films predicted like these "
                                           f"(at least {reference.min_films} in classes it has "
                                           f"{reference.min_group}+ films of)", per_reference=per, **base)
    closest = max(applicable, key=lambda k: (raw_p[k], -per[k]["statistic"] / per[k]["dof"]))
    c = per[closest]
    return ShiftResult(bool(raw_p[closest] < reference.alpha), n, True, None, c["statistic"], c["dof"], c["p_value"],
                       closest=closest, per_reference=per, **base)
