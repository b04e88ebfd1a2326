"""Checkpoint, split manifest and image sets for export.

Export reads the checkpoint and ``split.json`` itself (formats in docs/contracts.md) instead
of importing training code, so a model can be exported wherever the runtime and torch are
installed. Images go through the runtime's own ``load_image`` + ``preprocess``: parity is
only a proof if it is measured on the exact path serving will take.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.runtime.dataset import (discover_labelled, is_candidate_image, item_path, override_roots, read_split_manifest,
                                 source_roots)
from cxr.runtime.imageio import ImageReadError, load_image
from cxr.runtime.modelinfo import sha256_file
from cxr.runtime.preprocess import Preprocessing, preprocess

CHECKPOINT_FORMAT = "cxr-checkpoint/1"
SPLITS = ("train", "val", "test")


class ExportInputError(Exception):
    """Input the user can fix (wrong path, wrong format); shown without a traceback."""


def log(msg: str) -> None:
    print(f"[cxr-export] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checkpoint

def load_checkpoint(path: "str | os.PathLike[str]") -> dict:
    """Load and validate a ``cxr-checkpoint/1`` dict, as data only (``cxr.train.checkpoint``:
    a pickle that would run code is refused, never unpickled)."""
    from cxr.train.checkpoint import CheckpointError
    from cxr.train.checkpoint import load_checkpoint as load_data_only

    p = Path(path)
    try:
        ckpt = load_data_only(p)
    except CheckpointError as exc:
        raise ExportInputError(str(exc)) from None
    for key in ("arch", "classes", "preprocess", "state_dict", "model_kwargs"):
        if key not in ckpt:
            raise ExportInputError(f"checkpoint {p} lacks {key!r}")
    n = ckpt["model_kwargs"].get("num_classes")
    if n is not None and n != len(ckpt["classes"]):
        raise ExportInputError(f"checkpoint has {len(ckpt['classes'])} classes but model_kwargs.num_classes={n}")
    return ckpt


def build_from_checkpoint(ckpt: dict):
    from cxr.train.models import build_model

    model = build_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# --------------------------------------------------------------------------- manifest

@dataclass
class Manifest:
    path: Path
    root: Path
    classes: list[str]
    items: list[tuple[Path, str, str]]  # (absolute path, label, split)
    sha256: str
    raw_root: str = ""
    seed: int | None = None
    sources: dict = field(default_factory=dict)  # source name -> root
    source_of: dict = field(default_factory=dict)  # absolute path -> source name

    def group(self, item: tuple) -> tuple[str, str]:
        """(source, class) of an item: what parity sampling and calibration stratify by."""
        return (self.source_of.get(item[0], ""), item[1])

    def split(self, name: str) -> list[tuple[Path, str]]:
        return [(p, lab) for p, lab, s in self.items if s == name]

    def sizes(self) -> dict[str, int]:
        return {s: sum(1 for *_, sp in self.items if sp == s) for s in SPLITS}


def find_manifest(checkpoint: Path, ckpt: dict) -> Path | None:
    name = (ckpt.get("training_data") or {}).get("manifest") or "split.json"
    cand = Path(name) if Path(name).is_absolute() else checkpoint.parent / name
    if cand.is_file():
        return cand
    fallback = checkpoint.parent / "split.json"
    return fallback if fallback.is_file() else None


def read_manifest(path: "str | os.PathLike[str]", data_root: "str | os.PathLike[str] | list | None" = None) -> Manifest:
    """Parse ``split.json`` (either format); item paths resolve against their source's root, or
    ``data_root`` (one folder per source) if the data moved."""
    p = Path(path)
    try:
        doc = read_split_manifest(p)
        if data_root:
            doc = override_roots(doc, data_root if isinstance(data_root, (list, tuple)) else [data_root])
    except ValueError as exc:
        raise ExportInputError(str(exc)) from None
    roots = source_roots(doc)
    for name, root in roots.items():
        if not root.is_dir():
            hint = "" if data_root else " (use --data-root if the data moved)"
            raise ExportInputError(f"data root of source {name!r} in the split manifest is not a folder: {root}{hint}")
    items, source_of = [], {}
    for it in doc.get("items", []):
        split = it.get("split")
        if split not in SPLITS:
            raise ExportInputError(f"manifest item {it!r} has no valid split")
        path = item_path(doc, it, roots)
        items.append((path, it["label"], split))
        source_of[path] = it["source"]
    first = next(iter(roots.values()))
    return Manifest(p, first, list(doc.get("classes", [])), items, sha256_file(p),
                    " + ".join(str(r) for r in roots.values()), doc.get("seed"), roots, source_of)


# --------------------------------------------------------------------------- image sets

@dataclass
class ImageSet:
    """Preprocessed images with labels as class indices (-1: unlabelled or unknown class)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    paths: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one per image; the set's name when unknown

    @property
    def labelled(self) -> bool:
        return bool((self.y >= 0).any())

    def __len__(self) -> int:
        return len(self.x)

    def summary(self) -> dict:
        return {"source": self.name, "n": len(self), "labelled": int((self.y >= 0).sum()),
                "skipped_unreadable": len(self.skipped)}


def stratified_subset(items: list[tuple[Path, str]], limit: int, seed: int = 0,
                      balanced: bool = False, key=None) -> list[tuple[Path, str]]:
    """Deterministic subset of at most ``limit`` items that keeps every class represented.

    ``balanced=False`` keeps class proportions (an unbiased accuracy estimate);
    ``balanced=True`` takes equal numbers per class (calibration should see rare classes'
    activation ranges too). ``key`` (default: the class) names the groups, e.g.
    ``Manifest.group`` for (source, class). ``limit <= 0`` keeps everything.
    """
    key = key or (lambda it: it[1])
    if limit <= 0 or len(items) <= limit:
        return list(items)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[tuple[Path, str]]] = {}
    for it in sorted(items, key=lambda t: str(t[0])):
        by_class.setdefault(key(it), []).append(it)
    for lst in by_class.values():
        rng.shuffle(lst)
    labels = sorted(by_class)
    if balanced:
        quota = {c: 0 for c in labels}
        remaining = limit
        while remaining > 0:
            open_ = [c for c in labels if quota[c] < len(by_class[c])]
            if not open_:
                break
            for c in open_:
                if remaining == 0:
                    break
                quota[c] += 1
                remaining -= 1
    else:
        total = len(items)
        quota = {c: max(1, int(round(limit * len(by_class[c]) / total))) for c in labels}
        while sum(quota.values()) > limit:
            quota[max(quota, key=quota.get)] -= 1
        while sum(quota.values()) < limit:
            c = max(labels, key=lambda c: len(by_class[c]) - quota[c])
            quota[c] += 1
    out = [it for c in labels for it in by_class[c][:quota[c]]]
    return sorted(out, key=lambda t: str(t[0]))


def load_images(name: str, items: list[tuple[Path, str | None]], classes: list[str],
                pp: Preprocessing, source_of: dict | None = None) -> ImageSet:
    """Load through the runtime's loader and preprocessing; unreadable files are skipped and counted."""
    index = {c: i for i, c in enumerate(classes)}
    xs, ys, paths, skipped = [], [], [], []
    for i, (path, label) in enumerate(items):
        try:
            xs.append(preprocess(load_image(path), pp))
        except (ImageReadError, ValueError) as exc:
            skipped.append((str(path), str(exc)))
            continue
        ys.append(index.get(label, -1) if label is not None else -1)
        paths.append(Path(path))
        if len(items) > 200 and (i + 1) % 500 == 0:
            log(f"  {name}: loaded {i + 1}/{len(items)} images")
    if skipped:
        log(f"  {name}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0][0]}: {skipped[0][1]}")
    if not xs:
        raise ExportInputError(f"no readable images in {name}")
    srcs = [(source_of or {}).get(p, name) for p in paths]
    return ImageSet(name, np.stack(xs).astype(np.float32), np.asarray(ys, np.int64), paths, skipped, srcs)


def folder_items(folder: "str | os.PathLike[str]", classes: list[str]) -> tuple[list[tuple[Path, str | None]], bool]:
    """Items of ``--images DIR``: a labelled folder if its class folders match the model's
    classes, otherwise every image under it, unlabelled (parity needs no labels)."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportInputError(f"--images {root} is not a folder")
    try:
        found, labelled = discover_labelled(root)
        if set(found) & set(classes):
            return [(li.path, li.label) for li in labelled], True
    except ValueError:
        pass
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_candidate_image(f))
    if not paths:
        raise ExportInputError(f"no images under {root}")
    return [(p, None) for p in paths], False
