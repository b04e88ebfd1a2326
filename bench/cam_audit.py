#!/usr/bin/env python
"""Where does the model look? Share of class-activation heat per image region, per source.

    python bench/cam_audit.py --model model-with-cam.onnx \\
        --split split.json --subset test \\
        --folder pediatric-normal=/work/shared/data/covid-radiography-pediatric-normal \\
        [--limit 300] [--examples docs/img --n-examples 4] [--json audit.json]

For each image the map of the *predicted* class (the one ``--heatmaps`` draws) is stretched to
its own min..max (as drawn) and upsampled to the model's input square; the heat is then summed
over four disjoint regions of that square (fractions of its side):

- ``corners``: the four 18 % squares, where burnt-in letters, side markers and labels sit;
- ``border``:  the rest of the outer 10 % band (collimator edges, film borders);
- ``chest``:   the central box x 12-88 %, y 10-78 % (both lungs and the mediastinum);
- ``other``:   what is left (shoulders, neck, upper abdomen).

A map spread evenly would give each region its share of the area, printed as the first row;
more than that is where the model looks. ``peak %`` counts the images whose hottest pixel lies
in each region. Rows: (source, true class). A source is the split item's ``source`` (a format-1
manifest has one, named after its data folder), with the subset; each ``--folder NAME=DIR`` (labelled ``<Class>/images/*`` or
class folders) is a source of its own. Letters cannot be told from the corners without OCR: the
corners stand in for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REGIONS = ("chest", "other", "border", "corners")
CHEST = (0.12, 0.88, 0.10, 0.78)  # x0, x1, y0, y1
BORDER, CORNER = 0.10, 0.18


def region_masks(side: int) -> dict[str, np.ndarray]:
    """Disjoint boolean masks over the model's input square; corners win over border, border
    over chest, chest over other."""
    c = (np.arange(side) + 0.5) / side
    x, y = np.meshgrid(c, c)
    corners = ((x < CORNER) | (x > 1 - CORNER)) & ((y < CORNER) | (y > 1 - CORNER))
    border = ~corners & ((x < BORDER) | (x > 1 - BORDER) | (y < BORDER) | (y > 1 - BORDER))
    chest = ~corners & ~border & (x >= CHEST[0]) & (x <= CHEST[1]) & (y >= CHEST[2]) & (y <= CHEST[3])
    other = ~(corners | border | chest)
    return {"chest": chest, "other": other, "border": border, "corners": corners}


def heat_shares(cam2d: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[dict[str, float], str]:
    """(share of the drawn heat per region, region of the hottest pixel) for one map."""
    from cxr.runtime.heatmap import _resize_f, normalize_map

    side = next(iter(masks.values())).shape[0]
    heat = np.clip(_resize_f(normalize_map(cam2d), side, side), 0, 1)
    total = float(heat.sum())
    shares = {r: (float(heat[m].sum()) / total if total > 0 else float(m.mean())) for r, m in masks.items()}
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    return shares, next(r for r, m in masks.items() if m[peak])


def _split_items(split: str, subset: str, data_roots: list[str]) -> list[tuple[str, str, str]]:
    """(path, label, source) of a split's subset; format-1 manifests are one source named after
    their root folder (``read_split_manifest``)."""
    from cxr.runtime.dataset import item_path, override_roots, read_split_manifest

    man = override_roots(read_split_manifest(split), data_roots or None)
    return [(str(item_path(man, it)), it["label"], f"{it['source']} ({subset})")
            for it in man["items"] if it["split"] == subset]


def _folder_items(name: str, root: str, classes: list[str]) -> list[tuple[str, str, str]]:
    from cxr.runtime.dataset import discover_labelled

    _, found = discover_labelled(root)
    return [(str(it.path), it.label, name) for it in found if it.label in classes]


def _limit(items, per_group: int | None, seed: int = 0):
    if not per_group:
        return items
    groups = defaultdict(list)
    for it in items:
        groups[(it[2], it[1])].append(it)
    rng = np.random.default_rng(seed)
    out = []
    for key in sorted(groups):
        g = groups[key]
        idx = sorted(rng.choice(len(g), min(per_group, len(g)), replace=False))
        out.extend(g[i] for i in idx)
    return out


def audit(model_path: str, items: list[tuple[str, str, str]], batch_size: int = 16):
    """Per-image records: source, label, prediction, shares, peak region, path."""
    from cxr.runtime import Classifier

    clf = Classifier.load(model_path, batch_size=batch_size)
    if not clf.has_heatmaps:
        raise SystemExit(f"{model_path} has no class-activation map output; export it with cxr-export (see docs/heatmaps.md)")
    masks = region_masks(clf.preprocessing.size)
    records = []
    for (path, label, source), r in zip(items, clf.classify_many([p for p, _, _ in items], heatmaps=True)):
        if not r.ok:
            continue
        k = clf.classes.index(r.prediction.label)
        shares, peak = heat_shares(r.heatmap[k], masks)
        records.append({"path": path, "source": source, "label": label, "pred": r.prediction.label,
                        "confidence": r.prediction.confidence, "shares": shares, "peak": peak})
    return clf, masks, records


def table(records: list[dict], masks: dict[str, np.ndarray]) -> str:
    area = {r: float(m.mean()) for r, m in masks.items()}
    head = (f"{'source':<44} {'class':<16} {'n':>5} {'acc %':>6}  " + " ".join(f"{r:>8}" for r in REGIONS)
            + "   peak% " + " ".join(f"{r[:6]:>6}" for r in REGIONS))
    lines = [head, "-" * len(head),
             f"{'(even spread = share of area)':<44} {'':<16} {'':>5} {'':>6}  "
             + " ".join(f"{100 * area[r]:>7.1f}%" for r in REGIONS)]
    groups = defaultdict(list)
    for rec in records:
        groups[(rec["source"], rec["label"])].append(rec)
    for (source, label), g in sorted(groups.items()):
        acc = 100 * np.mean([x["pred"] == x["label"] for x in g])
        mean = {r: 100 * np.mean([x["shares"][r] for x in g]) for r in REGIONS}
        peaks = {r: 100 * np.mean([x["peak"] == r for x in g]) for r in REGIONS}
        lines.append(f"{source[:44]:<44} {label[:16]:<16} {len(g):>5} {acc:>6.1f}  "
                     + " ".join(f"{mean[r]:>7.1f}%" for r in REGIONS)
                     + "         " + " ".join(f"{peaks[r]:>6.1f}" for r in REGIONS))
    return "\n".join(lines)


def write_examples(clf, records: list[dict], out_dir: str, n: int, side: int = 320) -> list[str]:
    """Small heatmap figures of *typical* maps: per (source, class) the image whose chest share is
    the group's median, taking sources in turn so ``n`` figures cover as many sources as they
    can. 256-colour PNGs (~35 kB) to keep the docs small."""
    from PIL import Image

    import cxr.runtime.heatmap as hm
    from cxr.runtime.imageio import load_image
    from cxr.runtime.safepaths import output_name_for

    os.makedirs(out_dir, exist_ok=True)
    by_source = defaultdict(list)
    groups = defaultdict(list)
    for rec in records:
        groups[(rec["source"], rec["label"])].append(rec)
    for (source, label), g in sorted(groups.items()):
        med = float(np.median([r["shares"]["chest"] for r in g]))
        by_source[source].append(min(g, key=lambda r: abs(r["shares"]["chest"] - med)))
    picks = []
    while len(picks) < n and any(by_source.values()):
        for source in sorted(by_source):
            if by_source[source] and len(picks) < n:
                picks.append(by_source[source].pop(0))
    written = []
    old = hm.FIGURE_SIDE
    hm.FIGURE_SIDE = side
    try:
        for rec in picks:
            pred, maps = clf.explain(rec["path"])
            fig = hm.render_heatmap(load_image(rec["path"]), maps[clf.classes.index(pred.label)], clf.preprocessing,
                                    pred.label, pred.confidence,
                                    caption=f"true {rec['label']}; {rec['source']}; "
                                            f"chest box {100 * rec['shares']['chest']:.0f}%")
            path = os.path.join(out_dir, "cam-" + output_name_for(rec["path"], None, ".png"))
            fig.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
            written.append(path)
    finally:
        hm.FIGURE_SIDE = old
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="ONNX model with a 'cam' output (cxr-export)")
    ap.add_argument("--split", help="cxr-train split.json")
    ap.add_argument("--subset", default="test", choices=["test", "val", "train"])
    ap.add_argument("--data-root", action="append", default=[], metavar="DIR",
                    help="where the split's sources live now (one per source, repeat; like cxr-export --data-root)")
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=DIR", help="labelled folder as a source")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per (source, class)")
    ap.add_argument("--examples", help="write example heatmap figures to this folder")
    ap.add_argument("--n-examples", type=int, default=4)
    ap.add_argument("--json", help="write per-image records and the table as JSON")
    args = ap.parse_args(argv)

    from cxr.runtime.session import load_model

    classes = load_model(args.model, warmup=False).classes
    items = _split_items(args.split, args.subset, args.data_root) if args.split else []
    for spec in args.folder:
        name, _, root = spec.partition("=")
        if not root:
            ap.error(f"--folder wants NAME=DIR, got {spec!r}")
        items += _folder_items(name, root, classes)
    items = _limit(items, args.limit)
    if not items:
        ap.error("no images: give --split and/or --folder")
    clf, masks, records = audit(args.model, items)
    text = table(records, masks)
    print(f"model {args.model} ({clf.model.info.precision}, {clf.model.info.arch}); map of the predicted class; "
          f"{len(records)} images")
    print(text)
    if args.examples:
        for p in write_examples(clf, records, args.examples, args.n_examples):
            print(f"example: {p} ({os.path.getsize(p) / 1e3:.0f} kB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "table": text, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
