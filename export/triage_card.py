"""The model card's "Calibration and triage" section, from ``cxr.calibration`` and
``cxr.operating_points`` alone (like the rest of the card)."""

from __future__ import annotations

from cxr.runtime.triage import compact_rows


def _p(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def probability_note(extra: dict) -> str:
    """The "what the probabilities mean" bullet of the limits section."""
    cal = extra.get("calibration")
    if isinstance(cal, dict):
        return (f"- Probabilities are temperature-scaled (T = {cal.get('temperature')}, fitted on the "
                f"{cal.get('fitted_on')}): calibrated on data like the training data, not clinical risk "
                "elsewhere. The refer/routine operating points below were validated on that split only.")
    return "- Probabilities are softmax scores, not calibrated clinical risk; no operating threshold was validated."


def card_lines(extra: dict) -> list[str]:
    cal = extra.get("calibration")
    op = extra.get("operating_points")
    L = ["", "## Calibration and triage", ""]
    if not isinstance(cal, dict):
        L.append("No calibration recorded (exported with `--no-calibrate` or without a validation split): "
                 "the probabilities are the raw softmax.")
    else:
        L.append(f"Temperature scaling: the graph computes softmax(logits / {cal.get('temperature')}), T fitted by "
                 f"minimising the NLL on {cal.get('n')} images of the {cal.get('fitted_on')}. T > 0 cannot change "
                 "the top-1 class, so accuracy is unchanged. ECE: top-1 confidence in 15 equal-width bins, "
                 "support-weighted mean |accuracy - confidence|.")
        L += ["", "| images | n | ECE before | ECE after |", "|---|---|---|---|",
              f"| {cal.get('fitted_on')} (fitted on) | {cal.get('n')} | {cal.get('ece_before')} | {cal.get('ece_after')} |"]
        for s, v in (cal.get("by_source") or {}).items():
            L.append(f"| - source {s} | {v.get('n')} | {v.get('ece_before')} | {v.get('ece_after')} |")
        ev = cal.get("eval")
        if ev:
            L.append(f"| {ev.get('images')} (held out) | {ev.get('n')} | {ev.get('ece_before')} | {ev.get('ece_after')} |")
            for s, v in (ev.get("by_source") or {}).items():
                L.append(f"| - source {s} | {v.get('n')} | {v.get('ece_before')} | {v.get('ece_after')} |")
        for key, label in (("onnx_int8_ece_val", "this int8 model, validation"),
                           ("onnx_int8_ece_eval", "this int8 model, held-out eval images")):
            if cal.get(key) is not None:
                L.append(f"| {label} | | | {cal[key]} |")
    L.append("")
    if not isinstance(op, dict):
        L.append("No operating points recorded: `cxr-infer` leaves the triage column empty for this model.")
        return L
    if not op.get("available"):
        L.append(f"Triage unavailable: {op.get('reason')}.")
        return L
    d = op.get("default") or {}
    L.append(f"Refer/routine: `cxr-infer` refers a film when {op.get('score')} >= threshold. Measured on this "
             f"file's own calibrated outputs for {op.get('n')} images of the {op.get('fitted_on')} "
             f"({op.get('n_abnormal')} abnormal = any class but {op.get('normal_class')}). Default: the highest "
             f"threshold keeping sensitivity >= {d.get('target_sensitivity')}: **{d.get('threshold')}** "
             f"(sensitivity {_p(d.get('sensitivity'))} %, specificity {_p(d.get('specificity'))} %, "
             f"{_p(d.get('referred'))} % referred); `--sensitivity S` picks another row.")
    L += ["", "| threshold | sensitivity % | specificity % | referred % |", "|---|---|---|---|"]
    for t, se, sp, ref in (r[:4] for r in compact_rows(op)):
        mark = " (default)" if t == d.get("threshold") else ""
        L.append(f"| {t:.6g}{mark} | {_p(se)} | {_p(sp)} | {_p(ref)} |")
    src = op.get("by_source") or {}
    if src:
        L += ["", "At the default threshold, per source:", "",
              "| source | n | abnormal | sensitivity % | specificity % | referred % |", "|---|---|---|---|---|---|"]
        for s, v in src.items():
            se, sp, ref = (v.get("default") or [None] * 3)[:3]
            L.append(f"| {s} | {v.get('n')} | {v.get('n_abnormal')} | {_p(se)} | {_p(sp)} | {_p(ref)} |")
    return L
