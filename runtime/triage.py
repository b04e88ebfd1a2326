"""Refer/routine triage from the operating points stored in the model file.

``cxr-export`` measures, on the validation split, what each threshold on
``score = 1 - P(Normal)`` does: sensitivity to abnormal films (any class but Normal),
specificity, share of films referred (``cxr.operating_points``, see
``cxr.export.operating_points``). Here the runtime picks one point -- the stored default, or
the highest threshold whose validation sensitivity reaches ``--sensitivity`` -- and labels
every classified film ``refer`` (a reader should see it first) or ``routine``.

Rules that hold whatever the threshold:
- an error row has no triage (``None``);
- a film the input check flagged (a ``qc`` value other than ``ok``/``unchecked``/``None``) is
  always ``refer``: the model's opinion of an image unlike its training data is no reason to
  let it wait;
- a model without the table (older exports) or without a class named Normal has no triage:
  the field stays empty and the CLI says why once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from .inputcheck import OK, UNCHECKED

FORMAT = "cxr-operating-points/1"
COLUMNS = ("threshold", "sensitivity", "specificity", "referred")
REFER, ROUTINE = "refer", "routine"
# verdicts that pass; anything else, an unknown value included, is flagged and referred
QC_PASS = (OK, UNCHECKED, None, "")


class TriageUnavailable(Exception):
    """The model cannot triage (no table, no Normal class) or the asked point does not exist."""


def find_normal_class(classes: Sequence[str]) -> str | None:
    """The class whose name is "normal", case-insensitively (class names are data)."""
    for c in classes:
        if c.strip().lower() == "normal":
            return c
    return None


def operating_points(info) -> dict | None:
    """The ``cxr.operating_points`` of a ``ModelInfo`` (parsed by the metadata reader, which
    refuses a model whose value is not JSON); None when absent."""
    raw = info.extra.get("operating_points")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TriageUnavailable("metadata cxr.operating_points is not a JSON object")
    return raw


@dataclass(frozen=True)
class TriagePolicy:
    """One operating point: refer when ``1 - P(normal_class) >= threshold``."""

    threshold: float
    normal_class: str
    normal_index: int
    sensitivity: float | None  # on validation, at this threshold
    specificity: float | None
    referred: float | None
    asked: float | None = None  # the --sensitivity that chose it; None = the stored default
    fitted_on: str = "validation split"

    def decide(self, probabilities, qc: str | None = None) -> str:
        """``refer``/``routine`` for one image's probabilities (sequence in class order, or a
        {class: p} dict); a flagged input is always ``refer``."""
        if qc_flagged(qc):
            return REFER
        p = probabilities[self.normal_class] if isinstance(probabilities, dict) else probabilities[self.normal_index]
        return REFER if 1.0 - float(p) >= self.threshold else ROUTINE

    def describe(self) -> str:
        how = "default point" if self.asked is None else f"--sensitivity {self.asked:g}"
        return (f"refer when P(not {self.normal_class}) >= {self.threshold:.6g} ({how}; on the {self.fitted_on}: "
                f"sensitivity {_pct(self.sensitivity)}, specificity {_pct(self.specificity)}, "
                f"referred {_pct(self.referred)})")


def qc_flagged(qc: str | None) -> bool:
    return qc not in QC_PASS


def _check_table(op: dict) -> list[list[float]]:
    table = op.get("table")
    if not isinstance(table, list) or not table:
        raise TriageUnavailable("the model's operating-point table is empty")
    return table


def source_rows(op: dict, table: list[list[float]]) -> list[list]:
    """The per-source rows a point must also satisfy: those of every source with abnormal films
    when the model's default was chosen in every source (``default.rule``), else none."""
    if (op.get("default") or {}).get("rule") != "every source":
        return []
    out = []
    for v in (op.get("by_source") or {}).values():
        rows = v.get("rows") if isinstance(v, dict) else None
        if not v.get("n_abnormal"):
            continue
        if not isinstance(rows, list) or len(rows) != len(table):
            raise TriageUnavailable("the model's per-source operating points do not match its table")
        out.append(rows)
    return out


def pick_threshold(table: list[list[float]], sensitivity: float, sources: "list[list] | None" = None) -> list[float]:
    """The row with the highest threshold whose sensitivity is >= ``sensitivity``, overall and in
    each of ``sources`` (per-source rows aligned with ``table``)."""
    def holds(i: int, r: list) -> bool:
        if r[1] is None or r[1] < sensitivity - 1e-12:
            return False
        return all(rows[i][0] is None or rows[i][0] >= sensitivity - 1e-12 for rows in sources or [])

    ok = [r for i, r in enumerate(table) if holds(i, r)]
    if not ok:
        best = max((r for r in table if r[1] is not None), key=lambda r: (r[1], r[0]), default=None)
        have = "" if best is None else f"; the most it reached is {_pct(best[1])} at threshold {best[0]:g}"
        raise TriageUnavailable(f"sensitivity {sensitivity:g} is not attainable on the model's validation table{have}")
    return max(ok, key=lambda r: r[0])


def policy_for(info, sensitivity: float | None = None) -> TriagePolicy:
    """The triage policy of a model (``ModelInfo``): the stored default, or the point for
    ``sensitivity``. Raises ``TriageUnavailable`` saying why there is none."""
    if sensitivity is not None and not 0.0 < sensitivity <= 1.0:
        raise TriageUnavailable(f"sensitivity must be a fraction in (0, 1], e.g. 0.99; got {sensitivity:g}")
    op = operating_points(info)
    if op is None:
        raise TriageUnavailable("the model has no operating-point table (cxr.operating_points); "
                                "re-export it with a current cxr-export")
    if not op.get("available", True):
        raise TriageUnavailable(op.get("reason") or "the model has no refer/routine operating points")
    normal = op.get("normal_class") or find_normal_class(info.classes)
    if normal is None or normal not in info.classes:
        raise TriageUnavailable(f"no class named Normal among {info.classes}: no refer/routine decision")
    fitted_on = op.get("fitted_on", "validation split")
    if sensitivity is None:
        d = op.get("default") or {}
        if "threshold" not in d:
            raise TriageUnavailable("the model's operating points have no default threshold")
        return TriagePolicy(float(d["threshold"]), normal, info.classes.index(normal), d.get("sensitivity"),
                            d.get("specificity"), d.get("referred"), None, fitted_on)
    table = _check_table(op)
    t, se, sp, ref = pick_threshold(table, sensitivity, source_rows(op, table))[:4]
    return TriagePolicy(float(t), normal, info.classes.index(normal), se, sp, ref, sensitivity, fitted_on)


def default_policy(info) -> tuple[TriagePolicy | None, str | None]:
    """(policy, None), or (None, why there is no triage) -- never raises."""
    try:
        return policy_for(info), None
    except TriageUnavailable as exc:
        return None, str(exc)


def apply(result, policy: TriagePolicy | None):
    """``result`` (a ScanResult) with its prediction's ``triage`` set; error rows unchanged.

    The one place a scan's refer/routine decision is made: a prediction the input check flagged
    (``prediction.qc``) is referred, even by a model without operating points -- a human must look
    at it either way; otherwise the policy's threshold decides.
    """
    pred = result.prediction
    if pred is None:
        return result
    if policy is None:
        decision = REFER if qc_flagged(pred.qc) else None
    else:
        decision = policy.decide(pred.probabilities, pred.qc)
    if decision == getattr(pred, "triage", None):
        return result
    return dataclasses.replace(result, prediction=dataclasses.replace(pred, triage=decision))


def summary_line(policy: TriagePolicy | None, counts: dict[str, int], reason: str | None = None) -> str:
    """What the chosen point did to this scan and what it meant on validation."""
    if policy is None:
        return f"triage: unavailable ({reason or 'no operating points'})"
    refer, routine = counts.get(REFER, 0), counts.get(ROUTINE, 0)
    n = refer + routine
    share = f"{100 * refer / n:.0f} %" if n else "-"
    return (f"triage: refer {share} of films ({refer}/{n}); on the {policy.fitted_on} this point caught "
            f"{_pct1(policy.sensitivity)} of abnormal films at {_pct1(policy.specificity)} specificity "
            f"(refer when P(not {policy.normal_class}) >= {policy.threshold:.4g}"
            + ("" if policy.asked is None else f", chosen for sensitivity >= {policy.asked:g}") + ")")


def realised(truth_abnormal: Sequence[bool], decisions: Sequence[str | None]) -> dict[str, Any]:
    """Sensitivity, specificity and share referred of ``decisions`` against the truth."""
    pairs = [(a, d) for a, d in zip(truth_abnormal, decisions) if d is not None]
    n_abn = sum(1 for a, _ in pairs if a)
    n_norm = len(pairs) - n_abn
    tp = sum(1 for a, d in pairs if a and d == REFER)
    fp = sum(1 for a, d in pairs if not a and d == REFER)
    return {"n": len(pairs), "n_abnormal": n_abn, "n_normal": n_norm,
            "sensitivity": tp / n_abn if n_abn else None, "specificity": 1 - fp / n_norm if n_norm else None,
            "referred": (tp + fp) / len(pairs) if pairs else None}


def compact_rows(op: dict) -> list[list[float]]:
    """At most 12 rows of the table: both ends, the highest threshold reaching each common
    sensitivity (50 % to 100 %), and the default threshold's row."""
    table = op.get("table") or []
    if not table:
        return []
    try:
        sources = source_rows(op, table)
    except TriageUnavailable:
        sources = []
    wanted = {max(r[0] for r in table), min(r[0] for r in table)}
    for s in (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0):
        try:
            wanted.add(pick_threshold(table, s, sources)[0])
        except TriageUnavailable:
            pass
    d = (op.get("default") or {}).get("threshold")
    if d is not None:
        wanted.add(d)
    return sorted((r for r in table if r[0] in wanted), key=lambda r: -r[0])


def format_table(op: dict | None, reason: str | None = None) -> str:
    """The compact operating-point view of ``cxr-infer info``."""
    if op is None or not op.get("available", True):
        why = reason or (op or {}).get("reason") or "no operating points recorded (older export)"
        return f"triage         unavailable: {why}"
    d = op.get("default") or {}
    lines = [f"triage         refer when {op.get('score', '1 - P(Normal)')} >= threshold; measured on the "
             f"{op.get('fitted_on', 'validation split')} ({op.get('n')} films, {op.get('n_abnormal')} abnormal)",
             f"  {'threshold':>10}  {'sensitivity':>11}  {'specificity':>11}  {'referred':>8}"]
    for t, se, sp, ref in (r[:4] for r in compact_rows(op)):
        mark = "  <- default" if t == d.get("threshold") else ""
        lines.append(f"  {t:>10.6g}  {_pct(se):>11}  {_pct(sp):>11}  {_pct(ref):>8}{mark}")
    if d:
        where = " in every source" if d.get("rule") == "every source" else ""
        lines.append(f"  default: highest threshold with sensitivity >= {d.get('target_sensitivity')} on the "
                     f"{op.get('fitted_on', 'validation split')}{where}; "
                     f"--sensitivity S picks another" + (" (also held in every source)" if where else ""))
    for c, v in (op.get("by_class") or {}).items():
        lines.append(f"  class {c} ({v.get('n')} films) at the default: referred {_pct(v.get('default'))}")
    for s, v in (op.get("by_source") or {}).items():
        se, sp, ref = (v.get("default") or [None] * 3)[:3]
        lines.append(f"  source {s} ({v.get('n')} films) at the default: sensitivity {_pct(se)}, "
                     f"specificity {_pct(sp)}, referred {_pct(ref)}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct1(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"
