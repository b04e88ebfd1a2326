"""Find labelled X-rays in a folder: the database layout or plain class folders.

``<root>/<Class>/images/*.png`` (COVID-19 Radiography Database; ``masks/`` and metadata
files beside it are ignored) or ``<root>/<Class>/**/<image>``. Classes are whatever folders
are found -- 3, 4 or more -- sorted by name so their order is deterministic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES

SPLIT_FORMAT = "cxr-split/1"  # cxr-train's split.json, see docs/contracts.md

# Folders inside a class folder that hold something other than the class's X-rays.
IGNORED_DIRS = frozenset({"masks", "mask", "__MACOSX", ".git"})


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str


def is_candidate_image(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES


def _images_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_candidate_image(name):
                found.append(Path(dirpath) / name)
    return found


def discover_labelled(root: "str | os.PathLike[str]") -> tuple[list[str], list[LabelledImage]]:
    """Return (classes, images) for a labelled folder; raises ValueError if it holds none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    classes: list[str] = []
    items: list[LabelledImage] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.name.startswith(".") or entry.name in IGNORED_DIRS:
            continue
        images_dir = entry / "images"
        files = _images_under(images_dir if images_dir.is_dir() else entry)
        if not files:
            continue
        classes.append(entry.name)
        items.extend(LabelledImage(f, entry.name) for f in files)
    if not classes:
        raise ValueError(
            f"no labelled images in {root}: expected <Class>/images/*.png or <Class>/*.png class folders"
        )
    return classes, items


def read_split_manifest(path: "str | os.PathLike[str]") -> dict:
    """Parse a cxr-train ``split.json``; the one reader that training, export and bench share.

    Raises ValueError saying what is wrong (unreadable, not JSON, not a split manifest).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read split manifest {p}: {exc}") from None
    got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    if got != SPLIT_FORMAT:
        raise ValueError(f"{p} is not a cxr-train split manifest (format {got!r}, expected {SPLIT_FORMAT!r})")
    return doc
