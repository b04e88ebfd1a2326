"""Turn command-line paths into the stream of files a scan must answer for.

A folder is walked recursively in a deterministic order (names sorted; a folder's files before
its sub-folders), lazily, so a scan of 100k files starts at once and holds one folder listing
at a time. Symlinked folders are not followed (no loops, no double counting); symlinked
files are scanned, and a broken or looping link becomes an error entry. Things that live in
dataset folders but are not X-rays (``.xlsx``, ``.DS_Store``, ``masks/``) become skip entries
so the summary can count them. Paths named explicitly are never skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from .dataset import IGNORED_DIRS, is_candidate_image
from .imageio import describe_os_error, is_dicom_file


@dataclass(frozen=True)
class Entry:
    """One path the scan met: to scan (both None), to skip (``skip`` reason), or a known error."""

    path: str
    skip: str | None = None
    error: str | None = None


def _classify_name(full: str, name: str) -> str | None:
    """Skip reason for a regular file found while walking, or None to scan it."""
    if name.startswith("."):
        return "hidden file"
    if is_candidate_image(name):
        return None
    if not os.path.splitext(name)[1] and os.path.isfile(full) and is_dicom_file(full):  # isfile: never open a FIFO
        return None  # DICOM files often carry no suffix; the DICM marker says what they are
    return "non-image file"


def walk_folder(folder: str) -> Iterator[Entry]:
    """Entries under ``folder``, recursively, in sorted order, never following folder symlinks."""
    try:
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Entry(folder, error=f"cannot list folder: {describe_os_error(folder, exc)}")
        return
    subdirs: list[str] = []
    for child in children:
        name, full = child.name, child.path
        try:
            is_link = child.is_symlink()
            is_dir = child.is_dir(follow_symlinks=False)
        except OSError as exc:
            yield Entry(full, error=describe_os_error(full, exc))
            continue
        if is_dir:
            if name in IGNORED_DIRS or name.startswith("."):
                yield Entry(full, skip=f"ignored folder ({name}/)")
            else:
                subdirs.append(full)
            continue
        if is_link:
            try:
                os.stat(full)
            except OSError as exc:  # broken link or loop: the user should hear about it
                yield Entry(full, error=describe_os_error(full, exc))
                continue
            if os.path.isdir(full):
                yield Entry(full, skip="symlinked folder (not followed)")
                continue
        reason = _classify_name(full, name)
        yield Entry(full, skip=reason) if reason else Entry(full)
    for sub in subdirs:
        yield from walk_folder(sub)


def iter_inputs(paths: "Iterable[str | os.PathLike[str]]") -> Iterator[Entry]:
    """Entries for command-line paths: folders walked, files always scanned (never skipped)."""
    paths = [os.fspath(p) for p in paths]
    seen: set[str] | None = set() if len(paths) > 1 else None  # only overlapping args can repeat
    for p in paths:
        entries = walk_folder(p) if os.path.isdir(p) else iter([Entry(p)])
        for entry in entries:
            if seen is not None:
                key = os.path.abspath(entry.path)
                if key in seen:
                    continue
                seen.add(key)
            yield entry


def iter_files(paths: "Iterable[str | os.PathLike[str]]") -> Iterator[str]:
    """Just the paths a scan would read (for benchmarks and listings)."""
    for entry in iter_inputs(paths):
        if entry.skip is None and entry.error is None:
            yield entry.path
