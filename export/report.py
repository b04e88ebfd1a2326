"""The export report: one JSON beside the model, a compact summary for the model metadata, and
one table on the terminal (Ultralytics-benchmark style: format, size, accuracy, speed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxr.runtime.metrics import format_per_source

REPORT_FORMAT = "cxr-export-report/1"
COLUMNS = ("pytorch", "onnx_fp32", "onnx_int8")
LABELS = {"pytorch": "PyTorch", "onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8"}


def compact_metrics(m: dict | None) -> dict | None:
    """What goes into metadata: headline numbers and per-class sensitivity, not every count."""
    if not m:
        return None
    return {
        "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
        "sensitivity": {c: v["sensitivity"] for c, v in m["per_class"].items()},
        "specificity": {c: v["specificity"] for c, v in m["per_class"].items()},
        "confusion": m["confusion"],
        **({"by_source": m["by_source"]} if m.get("by_source") else {}),
    }


def metadata_summary(report: dict) -> dict:
    """Per-precision export metrics for ``cxr.metrics`` (the eval images, not training's test set)."""
    out = {"images": report.get("eval_images")}
    for key in COLUMNS:
        entry = report["models"].get(key)
        if entry:
            out[key] = {
                **(compact_metrics(entry.get("metrics")) or {}),
                "agreement_vs_pytorch": entry.get("agreement_vs_pytorch"),
                "agreement_vs_fp32": entry.get("agreement_vs_fp32"),
                "size_bytes": entry.get("size_bytes"),
                "latency_ms_p50_b1": (entry.get("speed") or {}).get("latency_ms_p50"),
                "throughput_ips_b32": (entry.get("speed") or {}).get("throughput_ips"),
            }
    out["measured_on"] = report.get("cpu")
    return out


def write_json(report: dict, path: "str | os.PathLike[str]") -> None:
    tmp = Path(str(path) + ".partial")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(x, pct: bool = False, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def table(report: dict) -> str:
    """Plain-text table; one row per format."""
    classes = report["checkpoint"]["classes"]
    short = [c[:10] for c in classes]
    head = (["format", "size MB", "acc %", "macroF1 %"] + [f"sens {s} %" for s in short]
            + ["agree %", "p50 ms b1", "img/s b32"])
    rows = []
    for key in COLUMNS:
        e = report["models"].get(key)
        if not e:
            continue
        m = e.get("metrics") or {}
        per = m.get("per_class") or {}
        agree = e.get("agreement_vs_fp32") if key == "onnx_int8" else e.get("agreement_vs_pytorch")
        sp = e.get("speed") or {}
        rows.append([LABELS[key], _fmt((e.get("size_bytes") or 0) / 1e6),
                     _fmt(m.get("accuracy"), True), _fmt(m.get("macro_f1"), True)]
                    + [_fmt((per.get(c) or {}).get("sensitivity"), True) for c in classes]
                    + [_fmt(agree, True), _fmt(sp.get("latency_ms_p50")), _fmt(sp.get("throughput_ips"), digits=1)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    ev = report.get("eval_images") or {}
    cpu = report.get("cpu") or {}
    par = report.get("parity") or {}
    out.append("")
    out.append(f"eval images: {ev.get('n')} from {ev.get('source')} ({ev.get('labelled')} labelled); "
               f"agree = top-1 agreement with PyTorch (int8: with fp32)")
    for key in COLUMNS:
        by = ((report["models"].get(key) or {}).get("metrics") or {}).get("by_source")
        if by:
            out.append("")
            out.append(format_per_source(by, classes, f"{LABELS[key]} by source:"))
    if par:
        out.append(f"fp32 parity: {'PASSED' if par.get('passed') else 'FAILED'} -- max |dp| {par['max_abs_diff']:.3g} "
                   f"(<= {par['tolerance_max_abs_diff']:g}), mean |dp| {par['mean_abs_diff']:.3g}, "
                   f"agreement {100 * par['top1_agreement']:.2f}%")
    q = report.get("int8")
    if q:
        if q.get("status") == "ok":
            v = q["chosen"]["metrics"]
            out.append(f"int8: {q['chosen']['scheme']} (of {len(q['candidates'])} candidates) -- on {v['n_val']} val images: "
                       f"accuracy drop {v['accuracy_drop_points']:.2f} points (<= {q['bound']['max_accuracy_drop_points']}), "
                       f"agreement {100 * v['top1_agreement']:.2f}% (>= {q['bound']['min_agreement_percent']}%); "
                       f"kept float: {', '.join(q['kept_float']) or 'none'}")
            if q.get("note"):
                out.append(f"int8 note: {q['note']}")
        else:
            out.append(f"int8: {q.get('status', '').upper()} -- {q.get('message', '')}")
    from .triage_step import report_lines

    out += report_lines(report)
    from .input_check_report import text_lines

    for key in ("input_check", "input_check_int8"):
        if report.get(key):
            out += text_lines(report[key])
    busy = ""
    if cpu.get("load_avg_1min") is not None and cpu.get("cores") and cpu["load_avg_1min"] > 0.5 * cpu["cores"]:
        busy = f"; machine busy (load {cpu['load_avg_1min']}): timings are pessimistic"
    out.append(f"measured on: {cpu.get('model')} ({cpu.get('cores')} cores, VNNI: {'yes' if cpu.get('vnni') else 'no'}){busy}")
    return "\n".join(out)


def int8_candidates_table(candidates: list[dict]) -> str:
    head = ["scheme", "acc %", "fp32 acc %", "drop pt", "agree %", "p50 ms", "img/s", "verdict"]
    rows = []
    for c in candidates:
        m = c.get("metrics")
        if not m:
            rows.append([c["scheme"]] + ["-"] * 6 + [c.get("reason", "")])
            continue
        rows.append([c["scheme"], _fmt(m["accuracy"], True), _fmt(m["fp32_accuracy"], True),
                     _fmt(m["accuracy_drop_points"]), _fmt(m["top1_agreement"], True),
                     _fmt(m["latency_ms_p50"]), _fmt(m["throughput_ips"], digits=1),
                     "within bound" if c["within_bound"] else c["reason"]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
