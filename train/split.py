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
from cxr.runtime.dataset import LabelledImage, discover_labelled, read_split_manifest
SPLITS = ("train", "val", "test")


def make_split(root: Path, fractions=(0.70, 0.15, 0.15), seed: int = 0) -> dict:
    """Stratified split: within each class, a seeded shuffle cut by ``fractions``."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    root = Path(root).resolve()
    classes, items = discover_labelled(root)
    by_class: dict[str, list[LabelledImage]] = {c: [] for c in classes}
    for it in items:
        by_class[it.label].append(it)
    rows = []
    for c in classes:
        group = sorted(by_class[c], key=lambda it: str(it.path))
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
            rows.append({"path": it.path.relative_to(root).as_posix(), "label": c, "split": split})
    rows.sort(key=lambda r: r["path"])
    return {
        "format": FORMAT,
        "root": str(root),
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "classes": classes,
        "items": rows,
    }


def save_manifest(manifest: dict, path: Path) -> str:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(path: Path, root_override: Path | None = None) -> dict:
    """Load a split file; ``root_override`` points it at data that moved."""
    manifest = read_split_manifest(path)
    if root_override is not None:
        manifest["root"] = str(Path(root_override).resolve())
    return manifest


def split_items(manifest: dict, split: str) -> list[tuple[Path, int]]:
    """(absolute path, class index) for one split, in manifest order."""
    root = Path(manifest["root"])
    index = {c: i for i, c in enumerate(manifest["classes"])}
    return [(root / r["path"], index[r["label"]]) for r in manifest["items"] if r["split"] == split]


def split_counts(manifest: dict) -> dict:
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in manifest["classes"]} for s in SPLITS}
    for r in manifest["items"]:
        counts[r["split"]][r["label"]] += 1
    return counts
