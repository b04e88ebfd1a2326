"""``cxr-infer validate DIR...``: a local acceptance test on a site's labelled films.

A model's figures hold on its validation split; at a new hospital they move (issue 19: 54 to 71 %
of normal films referred, against 0 to 8 % in-source). Before first use a site measures them on
its own labelled films, with intervals, side by side with what the model promised.

Folder names are the truth: ``Normal`` (any case) is normal; a folder named like one of the
model's classes is that class; **any other name is abnormal** for triage (``Effusion/``,
``Other_abnormal/``): it should be referred, though no class of the model is right for it.
Folders are found as everywhere (``<Class>/images/*`` or ``<Class>/*``), in every DIR.

Intervals are 95 % Wilson score intervals (good coverage for small n and rates near 0 or 1,
where the plain normal interval fails); the AUROC's is Hanley and McNeil's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..dataset import LabelledImage, discover_labelled
from ..metrics import auroc, expected_calibration_error

Z95 = 1.959963984540054
FORMAT = "cxr-validate/1"


class ValidateError(ValueError):
    """The folders cannot make a site test; the message says what is missing."""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "value": (k / n) if n else None, "ci95": [lo, hi]}


def auroc_ci(neg, pos) -> dict:
    """AUROC with Hanley-McNeil's 95 % interval."""
    a = auroc(neg, pos)
    if a is None:
        return {"value": None, "ci95": [None, None]}
    n1, n2 = len(pos), len(neg)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)))
    return {"value": a, "ci95": [max(0.0, a - Z95 * se), min(1.0, a + Z95 * se)], "n_abnormal": n1, "n_normal": n2}


def collect(dirs: Sequence["str | os.PathLike[str]"], model_classes: Sequence[str], normal: str | None):
    """Labelled films of every DIR, each with its truth: (items, kinds) where kind is "normal",
    a model class, or "abnormal" (a folder no class of the model is named after)."""
    if not dirs:
        raise ValidateError("give at least one folder of labelled films (<Class>/images/* or <Class>/*)")
    items: list[LabelledImage] = []
    for d in dirs:
        try:
            _, found = discover_labelled(d)
        except ValueError as exc:
            raise ValidateError(str(exc)) from None
        items += [LabelledImage(it.path, it.label, Path(d).name) for it in found]
    by_lower = {c.lower(): c for c in model_classes}
    kinds = []
    for it in items:
        name = it.label.strip().lower()
        kinds.append("normal" if name == "normal" else by_lower.get(name, "abnormal"))
    folders = sorted({it.label for it in items})
    if len(folders) < 2:
        raise ValidateError(f"only one class folder ({folders[0]}) in {', '.join(map(str, dirs))}: a site test needs "
                            "normal films (a Normal folder) and abnormal films (any other folder)")
    if "normal" not in kinds:
        raise ValidateError(f"no Normal folder among {folders}: specificity and the refer/routine triage need normal films")
    if all(k == "normal" for k in kinds):
        raise ValidateError(f"no abnormal films among {folders}: sensitivity needs at least one folder other than Normal")
    if normal is not None:
        kinds = [normal if k == "normal" else k for k in kinds]
    return items, kinds


def scan_items(model, items, policy, progress: Callable[[int, int], None] | None = None):
    """(results in order, ScanStats) through the scan engine."""
    from ..engine import ScanStats, iter_scan

    stats = ScanStats()
    out = []
    for r in iter_scan(model, [str(it.path) for it in items], stats=stats, triage=policy):
        out.append(r)
        if progress:
            progress(len(out), len(items))
    return out, stats


def roc_points(neg: np.ndarray, pos: np.ndarray) -> list[list[float]]:
    """[false-positive rate, sensitivity] at every distinct score, refer when score >= t."""
    ts = np.unique(np.r_[neg, pos])[::-1]
    pts = [[0.0, 0.0]]
    for t in ts:
        pts.append([float((neg >= t).mean()), float((pos >= t).mean())])
    pts.append([1.0, 1.0])
    return pts


def measure(model, items: Sequence[LabelledImage], kinds: Sequence[str], policy, results, stats) -> dict:
    """Everything the report shows, from the scan's results."""
    from ..triage import REFER, find_normal_class, operating_points, qc_flagged

    classes = list(model.classes)
    normal = find_normal_class(classes)
    ok = [i for i, r in enumerate(results) if r.ok]
    probs = np.array([[results[i].prediction.probabilities[c] for c in classes] for i in ok]) if ok else np.zeros((0, len(classes)))
    top1 = np.array([classes.index(results[i].prediction.label) for i in ok], int)
    kind = np.array([kinds[i] for i in ok], dtype=object)
    is_normal = np.array([k == normal or k == "normal" for k in kind], bool)
    films = {}
    for it, k in zip(items, kinds):
        films.setdefault(it.label, {"n": 0, "counts_as": "normal" if k in ("normal", normal) else
                                    (k if k != "abnormal" else "abnormal (no class of the model)")})["n"] += 1
    per_class = {}
    for j, c in enumerate(classes):
        pos = kind == c
        if not pos.any():
            continue
        neg = ~pos
        per_class[c] = {"sensitivity": rate(int((top1[pos] == j).sum()), int(pos.sum())),
                        "specificity": rate(int((top1[neg] != j).sum()), int(neg.sum()))}
    known = np.array([k in classes for k in kind], bool)
    ece = expected_calibration_error(np.array([classes.index(k) for k in kind[known]]), probs[known]) if known.any() else None
    triage: dict[str, Any] = {"available": policy is not None}
    score = 1.0 - probs[:, classes.index(normal)] if normal in classes and len(probs) else None
    if policy is not None:
        refer = np.array([results[i].triage == REFER for i in ok], bool)
        triage.update({
            "threshold": policy.threshold, "asked_sensitivity": policy.asked,
            "sensitivity": rate(int(refer[~is_normal].sum()), int((~is_normal).sum())),
            "specificity": rate(int((~refer[is_normal]).sum()), int(is_normal.sum())),
            "referred": rate(int(refer.sum()), len(refer)),
            "validation": {"sensitivity": policy.sensitivity, "specificity": policy.specificity,
                           "referred": policy.referred, "fitted_on": policy.fitted_on}})
    curve = None
    if score is not None:
        triage["auroc"] = auroc_ci(score[is_normal], score[~is_normal])
        curve = roc_points(score[is_normal], score[~is_normal])
    flagged = sum(1 for i in ok if qc_flagged(results[i].qc))
    op = operating_points(model.info) if _has_table(model) else None
    model_curve = [[1 - r[2], r[1]] for r in sorted(op["table"], key=lambda r: -r[0])
                   if r[1] is not None and r[2] is not None] if op else None
    cal = model.info.extra.get("calibration") if isinstance(model.info.extra.get("calibration"), dict) else {}
    model_side = {"triage_validation": triage.get("validation"),
                  "auroc_validation": _trapezoid(model_curve) if model_curve else None,
                  "ece_validation": cal.get("ece_after"), "ece_eval": (cal.get("eval") or {}).get("ece_after"),
                  "per_class_test": _model_per_class(model.info.extra)}
    rep = {"format": FORMAT, "precision": model.info.precision, "films": films,
           "n": len(items), "classified": len(ok), "errors": len(items) - len(ok),
           "per_class": per_class, "triage": triage, "ece": ece, "ece_on": int(known.sum()),
           "flagged_by_input_check": rate(flagged, len(ok)), "withheld": rate(stats.withheld, len(ok)),
           "shift": None if stats.shift is None else stats.shift.to_dict(),
           "model": {"file": str(model.path), **model_side}, "curve": curve, "model_curve": model_curve}
    rep["verdict"] = verdict(rep)
    return rep


def _has_table(model) -> bool:
    from ..triage import TriageUnavailable, operating_points

    try:
        op = operating_points(model.info)
    except TriageUnavailable:
        return False
    return bool(op and op.get("available", True) and op.get("table"))


def _trapezoid(curve) -> float:
    pts = sorted([[0.0, 0.0], *curve, [1.0, 1.0]])
    return float(sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts[:-1], pts[1:])))


def _model_per_class(extra) -> dict | None:
    m = extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {}
    test = ((m.get("training") or {}).get("test") or {}) if isinstance(m.get("training"), dict) else {}
    pc = test.get("per_class") if isinstance(test, dict) else None
    if not isinstance(pc, dict):
        return None
    return {c: {"sensitivity": v.get("sensitivity"), "specificity": v.get("specificity"), "n": v.get("support")}
            for c, v in pc.items() if isinstance(v, dict)}


def verdict(rep: dict) -> dict:
    """A plain verdict, from fixed rules: the site's 95 % interval against what validation promised.
    Sensitivity clearly below the promise (the whole interval under it) means the model misses
    abnormal films here: not ready. Specificity clearly below means more referrals (safe, slower)."""
    t = rep["triage"]
    notes = []
    shifted = bool((rep.get("shift") or {}).get("detected"))
    if not t.get("available"):
        status, text = "no_triage", "the model has no refer/routine point: only the class figures were measured"
    else:
        se, sp, v = t["sensitivity"], t["specificity"], t["validation"]
        se_low = v.get("sensitivity") is not None and se["ci95"][1] is not None and se["ci95"][1] < v["sensitivity"]
        sp_low = v.get("specificity") is not None and sp["ci95"][1] is not None and sp["ci95"][1] < v["specificity"]
        wide = (se["ci95"][1] - se["ci95"][0]) > 0.2 if se["n"] else True
        if se_low:
            status = "not_ready"
            text = (f"NOT READY: at its stored point the model refers {_p(se['value'])} of this site's abnormal films "
                    f"(95 % CI {_p(se['ci95'][0])}-{_p(se['ci95'][1])}), below the {_p(v['sensitivity'])} it reached on "
                    "validation; do not use it as is here: adapt it (cxr-infer adapt) and validate again on other films")
        elif sp_low:
            status = "more_referrals"
            text = (f"USABLE WITH MORE REFERRALS: sensitivity {_p(se['value'])} is consistent with validation's "
                    f"{_p(v['sensitivity'])}, but only {_p(sp['value'])} of normal films stay routine (validation "
                    f"{_p(v['specificity'])}); cxr-infer adapt can fit a site point")
        else:
            status = "consistent"
            text = (f"CONSISTENT with the model's validation: sensitivity {_p(se['value'])} "
                    f"({_p(se['ci95'][0])}-{_p(se['ci95'][1])}), specificity {_p(sp['value'])}")
        if wide:
            notes.append("the sensitivity interval is wider than 20 points: label more abnormal films for a firm verdict")
    if shifted:
        notes.append("the shift check found these films unlike the training films")
    return {"status": status, "text": text + ("" if not notes else " (" + "; ".join(notes) + ")")}


def _p(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def rate_text(r: dict) -> str:
    """A rate as the reports print it: value (95 % interval; k/n)."""
    lo, hi = r["ci95"]
    return "-" if r["value"] is None else f"{_p(r['value'])} ({_p(lo)}-{_p(hi)}; {r['k']}/{r['n']})"


def format_text(rep: dict) -> str:
    """The report for stderr (and the Markdown file's body)."""
    L = [f"site validation of {rep['model']['file']} on {rep['n']} films ({rep['classified']} classified, {rep['errors']} errors)",
         "  folders: " + ", ".join(f"{k} {v['n']} ({v['counts_as']})" for k, v in rep["films"].items())]
    mc = rep["model"].get("per_class_test") or {}
    for c, v in rep["per_class"].items():
        m = mc.get(c) or {}
        L.append(f"  {c}: sensitivity {rate_text(v['sensitivity'])}  [model's test split {_p(m.get('sensitivity'))}]; "
                 f"specificity {rate_text(v['specificity'])}  [{_p(m.get('specificity'))}]")
    t = rep["triage"]
    if t.get("available"):
        v = t["validation"]
        L.append(f"  triage at the stored point (refer when P(not Normal) >= {t['threshold']:.4g}; "
                 f"[validation ...] is the model's own figure, on the {v.get('fitted_on') or 'validation split'}):")
        L.append(f"    abnormal referred (sensitivity) {rate_text(t['sensitivity'])}  [validation {_p(v['sensitivity'])}]")
        L.append(f"    normal routine (specificity)    {rate_text(t['specificity'])}  [validation {_p(v['specificity'])}]")
        L.append(f"    referred                        {rate_text(t['referred'])}  [validation {_p(v['referred'])}]")
    a = t.get("auroc") or {}
    if a.get("value") is not None:
        L.append(f"  AUROC of P(not Normal), normal vs abnormal: {a['value']:.3f} ({a['ci95'][0]:.3f}-{a['ci95'][1]:.3f})"
                 + (f"  [validation {rep['model']['auroc_validation']:.3f}]" if rep["model"].get("auroc_validation") else ""))
    if rep["ece"] is not None:
        L.append(f"  ECE on the {rep['ece_on']} films of the model's classes: {rep['ece']:.4f}  [validation "
                 f"{rep['model'].get('ece_validation')}]")
    L.append(f"  input check flagged {rate_text(rep['flagged_by_input_check'])}; withheld {rate_text(rep['withheld'])}")
    if rep.get("shift"):
        L.append("  " + rep["shift"]["message"])
    L.append("verdict: " + rep["verdict"]["text"])
    return "\n".join(L)


def draw_curves(path: "str | os.PathLike[str]", site, model_curve, site_point=None, model_point=None,
                title: str = "operating curve: site vs model's validation", model_label: str = "validation") -> None:
    """A small ROC figure (Pillow only: matplotlib is no part of the runtime)."""
    from PIL import Image, ImageDraw

    W, H, M = 560, 520, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    side = min(W - 2 * M, H - 2 * M - 20)
    x0, y0 = M, H - M

    def xy(fpr, tpr):
        return x0 + fpr * side, y0 - tpr * side

    d.rectangle([x0, y0 - side, x0 + side, y0], outline="black")
    for k in range(1, 5):
        g = k / 5
        d.line([xy(g, 0), xy(g, 1)], fill=(225, 225, 225))
        d.line([xy(0, g), xy(1, g)], fill=(225, 225, 225))
        d.text((xy(g, 0)[0] - 8, y0 + 6), f"{g:.1f}", fill="black")
        d.text((x0 - 28, xy(0, g)[1] - 6), f"{g:.1f}", fill="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(190, 190, 190))
    for curve, colour in ((model_curve, (120, 120, 120)), (site, (29, 78, 137))):
        if curve:
            pts = sorted([(0.0, 0.0), *map(tuple, curve), (1.0, 1.0)])
            d.line([xy(*p) for p in pts], fill=colour, width=3 if colour[0] == 29 else 2)
    for pt, colour in ((model_point, (120, 120, 120)), (site_point, (180, 35, 24))):
        if pt is not None:
            cx, cy = xy(*pt)
            d.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline=colour, width=3)
    d.text((M, 14), title, fill="black")
    d.text((x0 + side / 2 - 90, y0 + 24), "1 - specificity (normal films referred)", fill="black")
    d.text((6, y0 - side - 18), "sensitivity (abnormal films referred)", fill="black")
    ly = y0 - 70
    for label, colour in (("this site", (29, 78, 137)), (f"model, on its {model_label}", (120, 120, 120)),
                          ("stored point, at this site", (180, 35, 24)), (f"stored point, {model_label}", (120, 120, 120))):
        d.line([(x0 + side - 190, ly), (x0 + side - 165, ly)], fill=colour, width=3)
        d.text((x0 + side - 160, ly - 6), label, fill="black")
        ly += 16
    im.save(path, format="PNG")


def write_markdown(rep: dict, md_path: "str | os.PathLike[str]") -> Path:
    """The report as Markdown with its picture (``FILE.roc.png`` beside it)."""
    md_path = Path(md_path)
    png = md_path.with_name(md_path.stem + ".roc.png")
    t = rep["triage"]
    site_pt = [1 - t["specificity"]["value"], t["sensitivity"]["value"]] if t.get("available") and \
        t["specificity"]["value"] is not None else None
    v = t.get("validation") or {}
    model_pt = [1 - v["specificity"], v["sensitivity"]] if v.get("specificity") is not None and \
        v.get("sensitivity") is not None else None
    own = v.get("fitted_on") or "validation split"
    short = "fit films" if own.startswith("site") else "validation"  # a site model's own figures are its fit films'
    draw_curves(png, rep.get("curve"), rep.get("model_curve"), site_pt, model_pt,
                title=f"operating curve: this site vs the model's own ({own})", model_label=short)
    body = format_text(rep)
    md_path.write_text(f"# Site validation\n\n**{rep['verdict']['text']}**\n\n![site operating curve against the "
                       f"model's]({png.name})\n\n```\n{body}\n```\n\nIntervals: 95 % Wilson (rates), Hanley-McNeil "
                       "(AUROC). Folders named Normal are normal; a folder named after a model class is that class; "
                       "any other folder counts as abnormal for triage.\n", encoding="utf-8")
    return md_path
