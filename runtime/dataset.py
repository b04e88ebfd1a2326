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

SPLIT_FORMAT = "cxr-split/2"  # cxr-train's split.json, see docs/contracts.md
# Older manifests still read: format 1 had one ``root`` and no per-item source.
READABLE_SPLIT_FORMATS = ("cxr-split/1", SPLIT_FORMAT)

# Folders inside a class folder that hold something other than the class's X-rays.
IGNORED_DIRS = frozenset({"masks", "mask", "__MACOSX", ".git"})


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    source: str = ""  # the folder (or manifest source) it came from; metrics are reported by it


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

    Returns it in the current shape (format 2): ``sources`` (name -> root, in order) and a
    ``source`` on every item. A format-1 manifest (one ``root``) becomes a single source named
    after its root folder. Raises ValueError saying what is wrong.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read split manifest {p}: {exc}") from None
    got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    if got not in READABLE_SPLIT_FORMATS:
        raise ValueError(f"{p} is not a cxr-train split manifest (format {got!r}, expected one of "
                         f"{', '.join(READABLE_SPLIT_FORMATS)})")
    if not isinstance(doc.get("items"), list) or not isinstance(doc.get("classes"), list):
        raise ValueError(f"{p}: split manifest without 'items' and 'classes' lists")
    if got == "cxr-split/1":
        root = str(doc.get("root", ""))
        name = Path(root).name or "data"
        doc = {**doc, "format": SPLIT_FORMAT, "upgraded_from": got,
               "sources": [{"name": name, "root": root}],
               "items": [{**it, "source": name} for it in doc["items"] if isinstance(it, dict)]}
        doc.pop("root", None)
    sources = doc.get("sources")
    if not isinstance(sources, list) or not sources or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("root"), str) for s in sources):
        raise ValueError(f"{p}: split manifest 'sources' must be a list of {{name, root}}")
    names = {s["name"] for s in sources}
    for it in doc["items"]:
        if not isinstance(it, dict) or it.get("source") not in names or not isinstance(it.get("path"), str):
            raise ValueError(f"{p}: manifest item {it!r} has no path or names no listed source")
    return doc


def source_roots(manifest: dict) -> dict[str, Path]:
    """Source name -> its image root, in the manifest's order."""
    return {s["name"]: Path(s["root"]) for s in manifest["sources"]}


def item_path(manifest: dict, item: dict, roots: "dict[str, Path] | None" = None) -> Path:
    rel = Path(item["path"])
    if rel.is_absolute():
        return rel
    return (roots or source_roots(manifest))[item["source"]] / rel


def override_roots(manifest: dict, roots: "list[str | os.PathLike[str]] | None") -> dict:
    """Point a manifest at data that moved: one folder per source, in the manifest's order, or
    matched by folder name. Returns a new dict; raises ValueError when they cannot be matched."""
    if not roots:
        return manifest
    roots = [Path(r).resolve() for r in roots]
    names = [s["name"] for s in manifest["sources"]]
    by_name = {r.name: r for r in roots}
    if all(n in by_name for n in names):
        new = {n: by_name[n] for n in names}
    elif len(roots) == len(names):
        new = dict(zip(names, roots))
    else:
        raise ValueError(f"the manifest has {len(names)} sources ({', '.join(names)}); give one data folder "
                         f"per source, in that order or named like them (got {len(roots)})")
    return {**manifest, "sources": [{**s, "root": str(new[s["name"]])} for s in manifest["sources"]]}


def source_name(root: "str | os.PathLike[str]", taken: "set[str] | frozenset[str]" = frozenset()) -> str:
    """A source is named after its folder; a repeated name gets ``-2``, ``-3`` ..."""
    base = Path(root).resolve().name or "data"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name
