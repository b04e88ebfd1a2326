"""Triage in ``cxr-infer bench``: the realised sensitivity and specificity of the refer decision
on a labelled folder, next to what the model's operating point promised on validation.

The truth is the *folder* class: a film is abnormal unless its folder is named Normal
(case-insensitively), so classes the model does not know (e.g. Lung_Opacity for a 3-class
model) count as abnormal films that should be referred, which is what a clinic needs.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..triage import TriagePolicy, TriageUnavailable, default_policy, policy_for, realised

__all__ = ["TriageUnavailable", "bench_triage", "bench_triage_policy", "format_bench_triage"]


def bench_triage_policy(model, sensitivity: float | None) -> tuple[TriagePolicy | None, str | None]:
    """The point to bench: ``sensitivity``'s (raises TriageUnavailable) or the stored default."""
    if sensitivity is None:
        return default_policy(model.info)
    return policy_for(model.info, sensitivity), None


def bench_triage(policy: TriagePolicy | None, reason: str | None, items: Sequence, results: Sequence) -> dict[str, Any]:
    """{threshold, validation: {...}, realised: {...}} for one model's scan of ``items``."""
    if policy is None:
        return {"available": False, "reason": reason}
    truth = [it.label.strip().lower() != "normal" for it in items]
    decisions = [r.triage for r in results]
    sources = [getattr(it, "source", "") or "" for it in items]
    by_source = {s: realised([t for t, x in zip(truth, sources) if x == s],
                             [d for d, x in zip(decisions, sources) if x == s])
                 for s in sorted(set(sources)) if s}
    return {
        "available": True, "threshold": policy.threshold, "asked_sensitivity": policy.asked,
        "normal_class": policy.normal_class,
        "validation": {"sensitivity": policy.sensitivity, "specificity": policy.specificity,
                       "referred": policy.referred},
        "realised": realised(truth, decisions),
        "realised_by_source": by_source if len(by_source) > 1 else {},
        # every abnormal folder class, the model's or not (Lung_Opacity for a 3-class model)
        "realised_by_class": {c: realised([True] * sum(1 for it in items if it.label == c),
                                          [d for it, d in zip(items, decisions) if it.label == c])
                              for c in sorted({it.label for it in items if it.label.strip().lower() != "normal"})},
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_bench_triage(t: dict | None) -> str:
    if not t:
        return "triage: not measured"
    if not t.get("available"):
        return f"triage: unavailable ({t.get('reason')})"
    v, r = t["validation"], t["realised"]
    how = "default point" if t.get("asked_sensitivity") is None else f"--sensitivity {t['asked_sensitivity']:g}"
    lines = [f"triage (refer when P(not {t['normal_class']}) >= {t['threshold']:.4g}, {how}): here sensitivity "
             f"{_pct(r['sensitivity'])} ({r['n_abnormal']} abnormal), specificity {_pct(r['specificity'])} "
             f"({r['n_normal']} normal), referred {_pct(r['referred'])}; on validation {_pct(v['sensitivity'])}, "
             f"{_pct(v['specificity'])}, {_pct(v['referred'])}"]
    for c, x in (t.get("realised_by_class") or {}).items():
        lines.append(f"  class {c}: referred {_pct(x['sensitivity'])} of {x['n_abnormal']}")
    for s, x in (t.get("realised_by_source") or {}).items():
        lines.append(f"  source {s}: sensitivity {_pct(x['sensitivity'])} ({x['n_abnormal']} abnormal), "
                     f"specificity {_pct(x['specificity'])} ({x['n_normal']} normal), referred {_pct(x['referred'])}")
    return "\n".join(lines)
