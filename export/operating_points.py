"""Operating points of the refer/routine decision, measured on the validation split.

A clinic sorts its worklist: *refer* a film (a reader sees it first) when the probability that
it is not Normal reaches a threshold, otherwise *routine*. Every threshold trades sensitivity to
abnormal films for the share of films referred; this module measures that trade-off on the
validation split -- overall, per source, per abnormal class and one-vs-rest per class -- and
picks the default: the highest threshold that keeps validation sensitivity >= the target (0.98)
**in every source** that has abnormal films (and so overall). A pooled point would let the
largest source carry the figure while a small source's abnormal films slip to routine. The
runtime (``cxr.runtime.triage``) reads the table back from the model file and applies it; an
asked ``--sensitivity`` is held in every source the same way.

Thresholds: a uniform grid (step 0.02, 0 included, so sensitivity 1 is always attainable),
the scores at which sensitivity crosses every percent from 50 to 100 and the exact points for
common targets, overall and within each source. The exact point for target ``s`` is the ``ceil(s * n_abnormal)``-th highest
abnormal score: the highest threshold keeping at least that share of abnormal films.
Thresholds are rounded *down* to 6 decimals and every rate is measured at the stored value, so
the table is exactly what the runtime will do on these images.
"""

from __future__ import annotations

import math

import numpy as np

from cxr.runtime.triage import FORMAT, COLUMNS, find_normal_class

GRID_STEP = 0.02
TARGETS = (0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
DEFAULT_TARGET = 0.98
DECIMALS = 6


def _floor(x: float) -> float:
    return math.floor(float(x) * 10 ** DECIMALS) / 10 ** DECIMALS


def exact_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> float | None:
    """Highest threshold with sensitivity >= ``target`` (None without positives)."""
    pos = np.sort(np.asarray(scores, np.float64)[np.asarray(positive, bool)])[::-1]
    if len(pos) == 0:
        return None
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return _floor(pos[min(k, len(pos)) - 1])


def thresholds_for(scores: np.ndarray, positive: np.ndarray, grid_step: float = GRID_STEP) -> list[float]:
    """Descending thresholds: grid, per-percent sensitivity crossings, exact target points."""
    ts = set(np.round(np.arange(0.0, 1.0 + 1e-9, grid_step), 6).tolist())
    for s in list(np.arange(0.50, 1.0001, 0.01)) + list(TARGETS):
        t = exact_threshold(scores, positive, float(s))
        if t is not None:
            ts.add(t)
    return sorted(ts, reverse=True)


def rates(scores: np.ndarray, positive: np.ndarray, thresholds: list[float]) -> list[list[float | None]]:
    """[sensitivity, specificity, share flagged] at each threshold (flag when score >= t);
    None where a rate has no denominator."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    t = np.asarray(thresholds, np.float64)[:, None]
    flag = scores[None, :] >= t
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    tp = (flag & positive[None, :]).sum(1)
    fp = (flag & ~positive[None, :]).sum(1)
    out = []
    for i in range(len(thresholds)):
        out.append([round(tp[i] / n_pos, 5) if n_pos else None,
                    round(1 - fp[i] / n_neg, 5) if n_neg else None,
                    round((tp[i] + fp[i]) / len(scores), 5) if len(scores) else None])
    return out


def build(probs: np.ndarray, labels: np.ndarray, classes: list[str], sources: list[str] | None = None,
          target: float = DEFAULT_TARGET, fitted_on: str = "validation split",
          calibrated: bool = True) -> dict:
    """The ``cxr.operating_points`` value for labelled validation probabilities ``probs`` [N, K].

    Without a class named Normal there is no refer/routine decision: the value then says so
    (``available: false``) and only the per-class one-vs-rest tables are kept.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    srcs = np.asarray(sources if sources is not None else ["all"] * len(keep), dtype=object)[keep]
    doc: dict = {"format": FORMAT, "fitted_on": fitted_on, "n": int(len(labels)), "calibrated": calibrated,
                 "columns": list(COLUMNS)}
    normal = find_normal_class(classes)
    if normal is None:
        doc.update(available=False, reason=f"no class named Normal among {classes}: no refer/routine decision")
    else:
        ni = classes.index(normal)
        score = 1.0 - probs[:, ni]
        abnormal = labels != ni
        ts = set(thresholds_for(score, abnormal))
        groups = sorted(set(srcs.tolist()))
        per_source_t = {}
        for s in groups:
            sel = srcs == s
            if len(groups) > 1 and abnormal[sel].any():
                ts.update(thresholds_for(score[sel], abnormal[sel], grid_step=1.0))
                per_source_t[s] = exact_threshold(score[sel], abnormal[sel], target)
        pooled_t = exact_threshold(score, abnormal, target)
        if pooled_t is None:  # no abnormal validation film: nothing to be sensitive to
            pooled_t = 0.0
        default_t = min([pooled_t, *per_source_t.values()])
        ts = sorted(ts | {default_t}, reverse=True)
        rows = rates(score, abnormal, ts)
        d_row = rates(score, abnormal, [default_t])[0]
        doc.update(
            available=True, normal_class=normal, score=f"1 - P({normal})",
            rule="refer when score >= threshold", n_abnormal=int(abnormal.sum()), n_normal=int((~abnormal).sum()),
            default={"threshold": default_t, "target_sensitivity": target, "sensitivity": d_row[0],
                     "specificity": d_row[1], "referred": d_row[2],
                     "rule": "every source" if per_source_t else "pooled", "pooled_threshold": pooled_t,
                     "source_thresholds": per_source_t},
            table=[[t, *r] for t, r in zip(ts, rows)],
        )
        by_source = {}
        for s in sorted(set(srcs.tolist())):
            sel = srcs == s
            by_source[s] = {"n": int(sel.sum()), "n_abnormal": int(abnormal[sel].sum()),
                            "default": rates(score[sel], abnormal[sel], [default_t])[0],
                            "rows": rates(score[sel], abnormal[sel], ts)}
        doc["by_source"] = by_source
        doc["by_source_columns"] = list(COLUMNS[1:])
        # each abnormal class's share referred: a class the pooled figure hides (Lung_Opacity,
        # a small class) shows here
        by_class = {}
        for i, c in enumerate(classes):
            sel = labels == i
            if i == ni or not sel.any():
                continue
            by_class[c] = {"n": int(sel.sum()), "default": rates(score[sel], abnormal[sel], [default_t])[0][0],
                           "rows": [r[0] for r in rates(score[sel], abnormal[sel], ts)]}
        doc["by_class"] = by_class
    per_class = {}
    for i, c in enumerate(classes):
        pos = labels == i
        if not pos.any() or pos.all():
            continue
        ts = thresholds_for(probs[:, i], pos, grid_step=0.05)
        per_class[c] = {"n_positive": int(pos.sum()), "table": [[t, *r] for t, r in zip(ts, rates(probs[:, i], pos, ts))]}
    doc["per_class"] = per_class
    return doc
