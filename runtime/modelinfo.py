"""What a model file says about itself, for ``cxr-infer info`` and model cards.

Built from the same ``metadata_props`` the runtime serves with, so the card cannot drift
from the model it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .session import Model, cam_metadata
from .terminal_text import printable


def sha256_file(path: "str | os.PathLike[str]", chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_model(model: Model) -> dict[str, Any]:
    """A JSON-ready description of a loaded model (file, I/O, preprocessing, provenance, metrics)."""
    info = model.info
    path = Path(model.path)
    inp = next(i for i in model.session.get_inputs() if i.name == model.input_name)
    out = next(o for o in model.session.get_outputs() if o.name == model.output_name)
    extra = dict(info.extra)
    d: dict[str, Any] = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "classes": list(info.classes),
        "input": {"name": inp.name, "shape": [d if isinstance(d, int) else str(d) for d in inp.shape],
                  "type": inp.type},
        "output": {"name": out.name, "shape": [d if isinstance(d, int) else str(d) for d in out.shape],
                   "type": out.type},
        "preprocess": info.preprocess.to_dict(),
        "arch": info.arch,
        "precision": info.precision,
    }
    for key in ("training_data", "metrics", "quantization", "parity", "intended_use",
                "checkpoint_sha256", "created", "producer"):
        d[key] = extra.pop(key, None)
    d.update(_triage_description(info, extra))
    extra.pop("cam", None)
    d["heatmaps"] = cam_metadata(info)
    d["input_check"] = _input_check_summary(model)
    d["adaptation"] = extra.pop("adaptation", None)
    ref = extra.pop("shift_reference", None)
    d["shift_reference"] = None if not isinstance(ref, dict) else {
        "fitted_on": ref.get("fitted_on"), "precision": ref.get("precision"),
        "films": {k: (v or {}).get("n") for k, v in (ref.get("sources") or {}).items()}}
    d["other_metadata"] = extra
    return d


def _input_check_summary(model: Model) -> dict[str, Any] | None:
    """What the runtime will check with this model (the full entry stays under other_metadata)."""
    check = model.input_check
    if check is None:
        return None
    ori = check.orientation
    return {"score_output": check.output, "unfamiliar_above": check.unfamiliar,
            "not_chest_xray_above": check.not_chest_xray,
            "orientation_margin": None if ori is None else ori.margin}


def _triage_description(info, extra: dict) -> dict[str, Any]:
    """``calibration`` and ``operating_points`` (parsed, popped from ``extra``) and the triage
    policy the runtime would apply, or why there is none."""
    from .triage import TriageUnavailable, default_policy, operating_points

    out: dict[str, Any] = {}
    out["calibration"] = extra.pop("calibration", None)
    try:
        out["operating_points"] = operating_points(info)
    except TriageUnavailable as exc:
        out["operating_points"] = None
        out["triage_unavailable"] = str(exc)
    extra.pop("operating_points", None)
    policy, why = default_policy(info)
    out["triage"] = policy.describe() if policy else None
    out.setdefault("triage_unavailable", why)
    return out


def _adaptation_lines(ad: dict) -> list[str]:
    """What ``cxr-infer adapt`` did to this file, from its ``cxr.adaptation`` provenance."""
    base = ad.get("base_model") or {}
    r = ad.get("refitted") or {}
    head, temp, qc = r.get("head") or {}, r.get("temperature") or {}, r.get("input_check") or {}
    ev = ad.get("evaluation") or {}
    out = [f"adaptation     site model made {ad.get('created')} by cxr-infer adapt from {base.get('file')} "
           f"(sha256 {str(base.get('sha256'))[:16]}) on {ad.get('fit_films')} site films "
           f"({ad.get('held_out_films')} held out): "
           + ", ".join(f"{k} {v.get('fit')}" for k, v in (ad.get("films") or {}).items()),
           f"  refitted: threshold (sensitivity {(r.get('threshold') or {}).get('asked_sensitivity')}), temperature "
           f"{_g(temp.get('before'))} -> {_g(temp.get('after'))}, input check {'yes' if qc.get('refitted') else 'no'}, "
           f"head {'yes' if head.get('adopted') else 'no'} ({head.get('why')})"]
    if ev:
        ap = ev.get("adapted_point") or {}
        out.append(f"  on {ev.get('on')} ({ev.get('n')}): AUROC {_g(ev.get('auroc_shipped'))} -> "
                   f"{_g(ev.get('auroc_adapted'))}; at the site point sensitivity "
                   f"{_g((ap.get('sensitivity') or {}).get('value'))}, specificity {_g((ap.get('specificity') or {}).get('value'))}")
    return out


def _g(x) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.4g}"


def _fmt(value: Any, indent: str) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, sort_keys=True)
        return "\n".join(indent + line for line in text.splitlines())
    return indent + str(value)


def format_description(d: dict[str, Any]) -> str:
    """Human-readable ``info`` output: one line per scalar, indented JSON for structures."""
    size_mb = d["size_bytes"] / 1e6
    inp, out = d["input"], d["output"]
    lines = [
        f"file           {printable(d['file'])}",
        f"size           {d['size_bytes']} bytes ({size_mb:.2f} MB)",
        f"sha256         {d['sha256']}",
        f"arch           {printable(str(d['arch']))}",
        f"precision      {printable(str(d['precision']))}",
        f"classes        {', '.join(d['classes'])}",
        f"input          {inp['name']} {inp['type']} {inp['shape']}",
        f"output         {out['name']} {out['type']} {out['shape']}",
        "preprocess     " + ", ".join(f"{k}={v}" for k, v in d["preprocess"].items()),
    ]
    cam = d.get("heatmaps")
    if isinstance(cam, dict):
        text = (f"yes: output {cam.get('output')!r}, grid {cam.get('grid')}, layer {cam.get('layer')} "
                "(scan --heatmaps DIR)" if cam.get("available") else f"no: {cam.get('reason')}")
        lines.append("heatmaps       " + printable(text))  # from the model file: no terminal escapes
    qc = d.get("input_check")
    lines.append("input check    " + (
        f"qc_score from output {printable(str(qc['score_output']))!r}: unfamiliar above {qc['unfamiliar_above']:.4g}, "
        f"not_chest_xray above {qc['not_chest_xray_above']:.4g}; "
        + ("orientation check, margin " + f"{qc['orientation_margin']:.3g}" if qc["orientation_margin"] is not None
           else "no orientation check (exported before it)")
        if qc else "none in this model (exported before it): header and pixel checks only, qc = unchecked"))
    for key in ("intended_use", "created", "producer", "checkpoint_sha256"):
        if d.get(key):
            lines.append(f"{key:<14} {printable(str(d[key]))}")  # from the model file: no terminal escapes
    from .triage import format_table

    cal = d.get("calibration")
    if isinstance(cal, dict):
        lines.append(printable(f"calibration    temperature {cal.get('temperature')} fitted on the {cal.get('fitted_on')} "
                               f"({cal.get('n')} films): ECE {cal.get('ece_before')} -> {cal.get('ece_after')} "
                               f"({(cal.get('bins') or {}).get('count', 15)} equal-width bins)"))
    else:
        lines.append("calibration    none recorded: probabilities are the raw softmax")
    ref = d.get("shift_reference")
    lines.append(printable("shift check    " + (
        f"reference from the {ref.get('fitted_on')}: " + ", ".join(f"{k} {v}" for k, v in (ref.get("films") or {}).items())
        if ref else "no reference in this model: scans say the check was not run (cxr-infer shift-reference adds one)")))
    ad = d.get("adaptation")
    if isinstance(ad, dict):
        lines += [printable(x) for x in _adaptation_lines(ad)]
    # source and class names come from the model file: no terminal escapes
    lines += [printable(x) for x in format_table(d.get("operating_points"), d.get("triage_unavailable")).splitlines()]
    for key in ("training_data", "metrics", "quantization", "parity", "other_metadata"):
        value = d.get(key)
        if value in (None, {}, []):
            lines.append(f"{key:<14} (not recorded)" if key != "other_metadata" else "")
            continue
        lines.append(f"{key}:")
        lines.append(_fmt(value, "  "))
    return "\n".join(line for line in lines if line != "")
