"""``cxr-infer bench --not-xray DIR``: how well the input check tells X-rays from other images.

For each model: the share of each kind of non-X-ray flagged (any QC verdict but ``ok`` and
``unchecked``), the share of the labelled X-rays flagged (per source, and per class within each
source), and the AUROC of ``qc_score`` between the two. The non-X-ray folders go
through the same scan engine as ``cxr-infer scan``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from ..inputcheck import FLAGGED, NO_DIAGNOSIS
from ..metrics import auroc


def qc_group_rates(results: Sequence[Any], groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per group: files, read, flagged share (of those read), and the count of each qc value."""
    out: dict[str, dict[str, Any]] = {}
    for res, g in zip(results, groups):
        e = out.setdefault(g, {"files": 0, "read": 0, "flagged": 0, "withheld": 0, "qc": {}})
        e["files"] += 1
        if not res.ok:
            continue
        e["read"] += 1
        e["qc"][res.qc] = e["qc"].get(res.qc, 0) + 1
        e["flagged"] += res.qc in FLAGGED
        e["withheld"] += res.prediction.diagnosis_withheld
    for e in out.values():
        e["flagged_share"] = e["flagged"] / e["read"] if e["read"] else None
        e["withheld_share"] = e["withheld"] / e["read"] if e["read"] else None
    return out


def _scores(results: Sequence[Any]) -> list[float]:
    """qc_score per read image; a header/pixel objection without a score ranks above every score."""
    return [np.inf if (r.qc_score is None and r.qc in NO_DIAGNOSIS) else r.qc_score
            for r in results if r.ok and (r.qc_score is not None or r.qc in NO_DIAGNOSIS)]


def bench_not_xray(model, xray_results: Sequence[Any], xray_groups: Sequence[tuple[str, str]],
                   folders: Sequence[str], *,
                   batch_size: int, workers: int | None,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Scan each not-X-ray folder with ``model`` and compare with the X-ray scan's results, whose
    (source, class) are ``xray_groups``."""
    from ..dataset import discover_labelled, is_candidate_image
    from ..engine import scan_files

    kinds: dict[str, list[str]] = {}
    for folder in folders:
        try:
            _, items = discover_labelled(folder)
            for it in items:
                kinds.setdefault(it.label, []).append(os.fspath(it.path))
        except ValueError:
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if is_candidate_image(f))
            kinds.setdefault(os.path.basename(os.path.normpath(folder)), []).extend(files)
    paths = [p for ps in kinds.values() for p in ps]
    groups = [k for k, ps in kinds.items() for _ in ps]
    log(f"  input check: scanning {len(paths)} non-X-ray images ({len(kinds)} kinds)")
    results, _ = scan_files(model, paths, batch_size=batch_size, workers=workers)
    per_kind = qc_group_rates(results, groups)
    read = [r for r in results if r.ok]
    flagged = sum(r.qc in FLAGGED for r in read)
    xr = qc_group_rates(xray_results, [s for s, _ in xray_groups])
    xr_class = qc_group_rates(xray_results, [f"{s} / {c}" for s, c in xray_groups])
    xr_read = [r for r in xray_results if r.ok]
    checked = any(r.qc_score is not None for r in [*read, *xr_read])
    return {
        "not_xray_folders": [os.fspath(f) for f in folders],
        "not_xray_per_kind": per_kind,
        "not_xray_flagged_share": flagged / len(read) if read else None,
        "not_xray_min_kind_share": min((e["flagged_share"] for e in per_kind.values()
                                        if e["flagged_share"] is not None), default=None),
        "xray_per_source": xr,
        "xray_per_source_class": xr_class,
        "xray_flagged_share": (sum(r.qc in FLAGGED for r in xr_read) / len(xr_read)) if xr_read else None,
        "auroc_qc_score": auroc(_scores(xray_results), _scores(results)) if checked else None,
        "model_has_check": checked,
    }


def format_not_xray(rows: Sequence[dict[str, Any]], table: Callable[..., str]) -> list[str]:
    """Text for the bench summary: one block per model."""
    out = []
    for r in rows:
        q = r.get("input_check")
        if not q or not (q["not_xray_folders"] or q["model_has_check"]):
            continue
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        body = [[f"not X-ray: {k}", str(e["read"]), pct(e["flagged_share"]), pct(e["withheld_share"]),
                 ", ".join(f"{n} {v}" for v, n in sorted(e["qc"].items()))] for k, e in q["not_xray_per_kind"].items()]
        for key in ("xray_per_source", "xray_per_source_class"):
            body += [[f"X-ray: {k}", str(e["read"]), pct(e["flagged_share"]), pct(e["withheld_share"]),
                      ", ".join(f"{n} {v}" for v, n in sorted(e["qc"].items()))] for k, e in q[key].items()]
        auc = q["auroc_qc_score"]
        out += ["", f"== input check: {r['name']} ({r['precision']})",
                table(["images", "n", "flagged %", "no diagnosis %", "qc"], body, {1, 2, 3}),
                f"not X-rays flagged: {pct(q['not_xray_flagged_share'])} % (lowest kind "
                f"{pct(q['not_xray_min_kind_share'])} %); X-rays flagged: {pct(q['xray_flagged_share'])} %; "
                f"AUROC of qc_score, X-rays vs not: {'-' if auc is None else f'{auc:.4f}'}"
                + ("" if q["model_has_check"] else " (this model has no input check: qc is unchecked, only the "
                                                     "header/pixel checks ran)")]
    return out
