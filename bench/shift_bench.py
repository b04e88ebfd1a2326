"""Measure the folder-level shift check (cxr.runtime.site.shift): false alarms on random subsets of the
model's held-out in-source films, and alarms on folders of a source the model never saw.

    python bench/shift_bench.py --model M.onnx --split split.json --unseen ../shared/data/covid-radiography-lung-opacity \
        --subsets 1000 --size 100 --json shift-bench.json

Every film is scanned once with the runtime's scan engine (the scores a scan would see); the
subsets are then drawn from those scores, so a thousand subsets cost one scan. Nothing here
chooses a parameter of the check: alpha and the minimum are fixed in runtime/site/shift.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxr.runtime.site import shift
from cxr.runtime.dataset import discover_labelled
from cxr.runtime.session import load_model
from cxr.runtime.site.shift_reference import score_films, split_items, stderr_progress


def stats_of(films: list, idx) -> shift.ShiftStats:
    st = shift.ShiftStats()
    for i in idx:
        st.add(films[i][0], films[i][1])
    return st


def rate(ref, films: list, size: int, subsets: int, rng) -> dict:
    """Share of ``subsets`` random subsets of ``size`` films (without replacement) the check flags;
    ``films`` are (shift features, top-1 class)."""
    size = min(size, len(films))
    hits = [shift.check(ref, stats_of(films, rng.choice(len(films), size, replace=False))).detected
            for _ in range(subsets)]
    whole = shift.check(ref, stats_of(films, range(len(films))))
    return {"films": int(len(films)), "subset_size": size, "subsets": subsets, "flagged": float(np.mean(hits)),
            "whole_folder": {"detected": whole.detected, "p_value": whole.p_value, "statistic": whole.statistic,
                             "dof": whole.dof, "closest": whole.closest}}


def mixed(ref, a: list, b: list, size: int, subsets: int, rng) -> dict:
    """Folders of ``size`` / 2 films of each of two sources (a mix the validation split does not have)."""
    k = min(size // 2, len(a), len(b))
    films = a + b
    hits = []
    for _ in range(subsets):
        idx = np.r_[rng.choice(len(a), k, replace=False), len(a) + rng.choice(len(b), k, replace=False)]
        hits.append(shift.check(ref, stats_of(films, idx)).detected)
    return {"films": len(films), "subset_size": 2 * k, "subsets": subsets, "flagged": float(np.mean(hits)),
            "whole_folder": {"detected": None, "p_value": None, "statistic": None, "dof": None, "closest": None}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", required=True, help="the model's split.json (its test films are the in-source folders)")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--unseen", action="append", default=[], help="labelled folder of a source the model never saw")
    ap.add_argument("--subsets", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default=None, help="keep the scanned scores in this JSON file and reuse them")
    a = ap.parse_args(argv)
    model = load_model(a.model)
    ref = model.shift_reference
    if ref is None:
        sys.exit(f"{a.model} has no cxr.shift_reference: add it with cxr-infer shift-reference")
    rng = np.random.default_rng(a.seed)
    out = {"model": a.model, "alpha": ref.alpha, "min_films": ref.min_films, "in_source": {}, "unseen": {}}

    items = split_items(a.split, a.subset)
    labels = {}
    import json as _j
    doc = _j.loads(Path(a.split).read_text())
    for it in doc["items"]:
        if it.get("split") == a.subset:
            labels[(it["source"], it["path"])] = it["label"]
    cache = json.loads(Path(a.cache).read_text()) if a.cache and Path(a.cache).exists() else {}

    def scored_once(key, paths):
        if key not in cache:
            cache[key] = [(qc, None if f is None else [float(x) for x in f], c)
                          for qc, f, c in score_films(model, paths, stderr_progress(Path(key).name))]
            if a.cache:
                Path(a.cache).write_text(json.dumps(cache))
        return cache[key]

    scored = scored_once(f"{a.split}:{a.subset}", [p for p, _ in items])
    groups: dict[str, list] = defaultdict(list)
    test_items = [it for it in doc["items"] if it.get("split") == a.subset]
    for (qc, s, c), (_, src), it in zip(scored, items, test_items):
        if shift.eligible(qc, s):
            groups["pooled"].append((s, c))
            groups[f"source {src}"].append((s, c))
            groups[f"source {src} / {it['label']}"].append((s, c))
    for name, v in sorted(groups.items()):
        out["in_source"][name] = rate(ref, v, a.size, a.subsets, rng)
    srcs = sorted(k for k in groups if k.startswith("source ") and " / " not in k)
    for i, x in enumerate(srcs):
        for y in srcs[i + 1:]:
            out["in_source"][f"half {x[7:]} + half {y[7:]}"] = mixed(ref, groups[x], groups[y], a.size, a.subsets, rng)

    for folder in a.unseen:
        _, found = discover_labelled(folder)
        sc = scored_once(folder, [str(li.path) for li in found])
        by: dict[str, list] = defaultdict(list)
        for (qc, s, c), li in zip(sc, found):
            if shift.eligible(qc, s):
                by[Path(folder).name].append((s, c))
                by[f"{Path(folder).name} / {li.label}"].append((s, c))
        for name, v in sorted(by.items()):
            out["unseen"][name] = rate(ref, v, a.size, a.subsets, rng)

    print(f"shift check (alpha {ref.alpha}, minimum {ref.min_films} films, {ref.dim} features) on {a.model}")
    print(f"{'folder':<60} {'films':>6} {'subsets of':>10} {'flagged':>8}  whole folder")
    for kind in ("in_source", "unseen"):
        print(f"-- {'held-out in-source films (false alarms)' if kind == 'in_source' else 'unseen source (alarms)'}")
        for name, r in out[kind].items():
            w = r["whole_folder"]
            print(f"{name:<60} {r['films']:>6} {r['subset_size']:>10} {100 * r['flagged']:>7.1f}%  "
                  f"{'-' if w['detected'] is None else 'DETECTED' if w['detected'] else 'no'} "
                  f"(p {w['p_value']}, T {w['statistic']} on {w['dof']} vs {w['closest']})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
