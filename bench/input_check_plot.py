#!/usr/bin/env python
"""Where do images fall on the input check's score? One row of dots per group, the thresholds drawn.

    python bench/input_check_plot.py --model models/cxr-mnv2-224.int8.onnx \\
        --split RUN/split.json --subset test --not-xray ../shared/data/not-chest-xray \\
        --out docs/img/input-check-scores.png [--json scores.json]

Rows: the split subset's X-rays per source, then each kind (sub-folder) of every ``--not-xray``
folder. Each image is a dot at its ``qc_score`` (symmetric-log axis: X-rays sit near 0, CT slices
and photos at tens), coloured by its verdict; the model's ``unfamiliar`` and ``not_chest_xray``
thresholds are the dashed lines, and each row says what share was flagged. Images stopped by the
DICOM-header, pixel or orientation checks are drawn at their score too, with a ring. Scored with the runtime
(``Classifier.classify_many``), exactly as a scan scores them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

COLOURS = {"ok": "#2b8a3e", "unfamiliar": "#e8590c", "not_chest_xray": "#c92a2a", "not_frontal": "#862e9c",
           "misoriented": "#1971c2", "unchecked": "#868e96"}
OTHER = "#000000"  # a verdict this script does not know yet


def split_groups(split: str, subset: str, data_roots: list[str]) -> dict[str, list[str]]:
    from cxr.runtime.dataset import item_path, override_roots, read_split_manifest

    man = override_roots(read_split_manifest(split), data_roots or None)
    groups: dict[str, list[str]] = {}
    for it in man["items"]:
        if it["split"] == subset:
            groups.setdefault(f"X-ray: {it['source']} ({subset})", []).append(str(item_path(man, it)))
    return groups


def kind_groups(folder: str) -> dict[str, list[str]]:
    from cxr.runtime.dataset import is_candidate_image

    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: --not-xray {folder}: not a folder")
    kinds = sorted(p for p in root.iterdir() if p.is_dir()) or [root]
    return {f"not X-ray: {k.name}": sorted(str(p) for p in k.rglob("*") if p.is_file() and is_candidate_image(p.name))
            for k in kinds}


def score(model: str, groups: dict[str, list[str]]) -> dict[str, list[dict]]:
    from cxr.runtime import Classifier

    clf = Classifier.load(model)
    if clf.model.input_check is None:
        raise SystemExit(f"error: {model} has no input check (qc_score); re-export it with cxr-export")
    check = clf.model.input_check
    out = {}
    for name, paths in groups.items():
        rows = []
        for r in clf.classify_many(paths):
            if r.ok and r.prediction.qc_score is not None:
                # "early": the header or pixel checks decided, not the score
                rows.append({"path": r.path, "qc": r.prediction.qc, "score": r.prediction.qc_score,
                             "early": check.verdict(r.prediction.qc_score).qc != r.prediction.qc})
        out[name] = rows
        print(f"{name}: {len(rows)} scored", file=sys.stderr)
    thresholds = {"unfamiliar": check.unfamiliar, "not_chest_xray": check.not_chest_xray}
    return {"groups": out, "thresholds": thresholds, "model": str(model)}


def plot(data: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(k, v) for k, v in data["groups"].items() if v]
    th = data["thresholds"]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(groups) + 2.4))
    rng = np.random.default_rng(0)
    for row, (name, rows) in enumerate(groups):
        s = np.array([r["score"] for r in rows])
        y = row + rng.uniform(-0.28, 0.28, len(s))
        for qc in dict.fromkeys([*COLOURS, *(r["qc"] for r in rows)]):
            m = np.array([r["qc"] == qc for r in rows])
            if m.any():
                ax.scatter(s[m], y[m], s=7, c=COLOURS.get(qc, OTHER), alpha=0.6, linewidths=0,
                           label=qc if qc not in ax.get_legend_handles_labels()[1] else None)
        early = np.array([r["early"] for r in rows])
        if early.any():
            ax.scatter(s[early], y[early], s=22, facecolors="none", edgecolors="k", linewidths=0.5)
        flagged = np.mean([r["qc"] != "ok" for r in rows])
        ax.text(1.005, row, f"{100 * flagged:.1f} % flagged (n={len(rows)})", transform=ax.get_yaxis_transform(),
                va="center", fontsize=8)
    top = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for key, style, dy in (("unfamiliar", "--", 1.005), ("not_chest_xray", ":", 1.035)):
        ax.axvline(th[key], color="k", ls=style, lw=1)
        ax.text(th[key], dy, f"{key} > {th[key]:.2f}", transform=top, fontsize=8, ha="center", va="bottom")
    ax.set_xscale("symlog", linthresh=2.0)
    lo = min(min(r["score"] for r in rows) for _, rows in groups)
    hi = max(max(r["score"] for r in rows) for _, rows in groups)
    ticks = [t for t in (-5, -2, -1, 0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500) if lo - 1 <= t <= hi * 1.5 + 1]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_yticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("qc_score (higher = less like the training X-rays; linear within ±2, logarithmic beyond)")
    ax.set_title(f"Input check: {Path(data['model']).name}", fontsize=10, pad=28)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(labels), fontsize=8,
              markerscale=2, frameon=False, title="verdict (ringed: decided by the header, pixel or orientation checks)",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", help="cxr-train split.json: its --subset's X-rays, one row per source")
    ap.add_argument("--subset", default="test", choices=("train", "val", "test"))
    ap.add_argument("--data-root", action="append", default=[], help="where the split's sources live now (repeat)")
    ap.add_argument("--not-xray", action="append", default=[], help="folder of non-X-rays, one row per sub-folder")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--json", help="also write every score here")
    args = ap.parse_args(argv)
    groups: dict[str, list[str]] = {}
    if args.split:
        groups.update(split_groups(args.split, args.subset, args.data_root))
    for folder in args.not_xray:
        groups.update(kind_groups(folder))
    if not groups:
        ap.error("no images: give --split and/or --not-xray")
    data = score(args.model, groups)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    plot(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
