"""One deterministic, stratified train/val/test split, written once and reused.

Every experiment is compared on the same test images because the split is a file
(``split.json``), not a random call repeated per run.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from cxr.runtime.dataset import SPLIT_FORMAT as FORMAT
from cxr.runtime.dataset import (LabelledImage, discover_labelled, item_path, override_roots, read_split_manifest,
                                 source_name, source_roots)
SPLITS = ("train", "val", "test")


def make_split(roots: "Path | str | list", fractions=(0.70, 0.15, 0.15), seed: int = 0) -> dict:
    """Stratified by (source, class): within each group, a seeded shuffle cut by ``fractions``.

    Each root is a *source*. A group's shuffle is seeded by the seed and the class only, so a
    source's split does not depend on which other sources join it: adding a folder never moves
    an image of another folder between train and test (and the one-source split is the one that
    format-1 manifests recorded). The classes are the union of the class folders found.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    if isinstance(roots, (str, Path)):
        roots = [roots]
    sources: list[dict] = []
    groups: dict[tuple[str, str], list[LabelledImage]] = {}
    all_classes: set[str] = set()
    for root in roots:
        root = Path(root).resolve()
        if any(Path(s["root"]) == root for s in sources):
            raise ValueError(f"{root} is given twice")
        name = source_name(root, {s["name"] for s in sources})
        sources.append({"name": name, "root": str(root)})
        classes, items = discover_labelled(root)
        all_classes.update(classes)
        for it in items:
            groups.setdefault((name, it.label), []).append(it)
    rows = []
    for (src, c), group in groups.items():
        root = Path(next(s["root"] for s in sources if s["name"] == src))
        group = sorted(group, key=lambda it: str(it.path))
        rng = random.Random(f"{seed}:{c}")
        rng.shuffle(group)
        n = len(group)
        n_train = round(n * fractions[0])
        n_val = round(n * fractions[1])
        if n >= 3 and fractions[1] > 0 and n_val == 0:
            n_val = 1
        if n >= 3 and fractions[2] > 0 and n - n_train - n_val <= 0:
            n_train -= 1
        for i, it in enumerate(group):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rows.append({"path": it.path.relative_to(root).as_posix(), "label": c, "split": split, "source": src})
    order = {s["name"]: i for i, s in enumerate(sources)}
    rows.sort(key=lambda r: (order[r["source"]], r["path"]))
    return {
        "format": FORMAT,
        "sources": sources,
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "classes": sorted(all_classes),
        "items": rows,
    }


def save_manifest(manifest: dict, path: Path) -> str:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(path: Path, root_override: "Path | list | None" = None) -> dict:
    """Load a split file (either format); ``root_override`` points its sources at data that moved."""
    manifest = read_split_manifest(path)
    if root_override:
        overrides = root_override if isinstance(root_override, (list, tuple)) else [root_override]
        try:
            manifest = override_roots(manifest, list(overrides))
        except ValueError as exc:
            raise SystemExit(f"error: {path}: {exc}") from None
    return manifest


def split_rows(manifest: dict, split: str) -> list[dict]:
    return [r for r in manifest["items"] if r["split"] == split]


def split_items(manifest: dict, split: str) -> list[tuple[Path, int]]:
    """(absolute path, class index) for one split, in manifest order."""
    roots = source_roots(manifest)
    index = {c: i for i, c in enumerate(manifest["classes"])}
    return [(item_path(manifest, r, roots), index[r["label"]]) for r in split_rows(manifest, split)]


def sources_by_path(manifest: dict) -> dict[Path, str]:
    """Absolute image path -> its source, for every item (the keys of ``split_items``)."""
    roots = source_roots(manifest)
    return {item_path(manifest, r, roots): r["source"] for r in manifest["items"]}


def split_counts(manifest: dict) -> dict:
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in manifest["classes"]} for s in SPLITS}
    for r in manifest["items"]:
        counts[r["split"]][r["label"]] += 1
    return counts


def source_class_counts(manifest: dict) -> dict[str, dict[str, dict[str, int]]]:
    """source -> split -> class -> count (zeros included, so what is missing shows)."""
    out = {s["name"]: {sp: {c: 0 for c in manifest["classes"]} for sp in SPLITS} for s in manifest["sources"]}
    for r in manifest["items"]:
        out[r["source"]][r["split"]][r["label"]] += 1
    return out


def missing_combinations(manifest: dict) -> list[dict]:
    """(class, source) pairs with no training image: what the model never saw."""
    counts = source_class_counts(manifest)
    return [{"source": s, "class": c} for s, per in counts.items() for c in manifest["classes"]
            if per["train"][c] == 0]
