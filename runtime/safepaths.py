"""File names derived from input paths, and joins that cannot leave the output folder.

Input paths come from outside: a scanned folder may hold ``..``-looking names, symlinks, names
that are not UTF-8, names a spreadsheet or a shell would misread, or names longer than a file
system allows. Anything the runtime writes *named after an input* (heatmaps, per-image files)
goes through ``output_name_for`` (a plain, unique file name with no folder part) and
``safe_join`` / ``open_output`` (refuse whatever would land outside the output folder).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata

__all__ = ["UnsafePathError", "output_name_for", "safe_join", "open_output"]

SLUG_MAX = 80  # characters of readable name; the hash keeps names unique, so the slug may be cut
HASH_CHARS = 12  # hex digits of sha256 (48 bits): collisions need ~16 million inputs to be likely
SUFFIX_MAX = 32
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = re.compile(r"[A-Za-z0-9._-]*")


class UnsafePathError(ValueError):
    """A path would leave the output folder, or a name/suffix is not a plain file name."""


def _slug(text: str) -> str:
    """ASCII letters, digits, ``._-`` only; accents folded (``Ärztin`` -> ``Arztin``)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _UNSAFE.sub("_", folded)
    slug = re.sub(r"_{2,}", "_", slug).strip("._-")  # no hidden files, no option-like names
    return slug[:SLUG_MAX].rstrip("._-")


def _readable_parts(input_path: str, root: str | None) -> list[str]:
    """Path components worth showing: relative to ``root`` when inside it, else the base name."""
    norm = os.path.normpath(input_path)
    if root is not None:
        rel = os.path.relpath(os.path.abspath(norm), os.path.abspath(root))
        if rel != os.curdir and not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            norm = rel
        else:
            norm = os.path.basename(norm)
    else:
        norm = os.path.basename(norm)
    return [p for p in norm.split(os.sep) if p not in ("", os.curdir, os.pardir)]


def output_name_for(
    input_path: "str | bytes | os.PathLike[str]", root: "str | os.PathLike[str] | None" = None,
    suffix: str = "",
) -> str:
    """A safe, unique, relative file name (no folder part) for a file derived from ``input_path``.

    The name is a readable ASCII slug of the path (relative to ``root`` when the input lies in
    it, else the base name, image extension dropped) plus a short sha256 of the full absolute
    input path, then ``suffix`` (e.g. ``".cam.png"``). Two different inputs never share a name;
    the same input always gets the same one. Non-UTF-8 names are hashed by their raw bytes.
    """
    if not _SUFFIX.fullmatch(suffix) or len(suffix) > SUFFIX_MAX or suffix.endswith("."):
        raise UnsafePathError(f"suffix {suffix!r} must be at most {SUFFIX_MAX} of A-Z a-z 0-9 . _ -, "
                              "not ending in '.' (Windows drops it)")
    path = os.fsdecode(input_path)  # bytes -> str with surrogate escapes; round-trips exactly
    if not path or "\x00" in path:
        raise UnsafePathError("input path is empty or holds a NUL byte")
    digest = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:HASH_CHARS]
    parts = _readable_parts(path, os.fsdecode(root) if root is not None else None)
    if parts:
        stem, _ext = os.path.splitext(parts[-1])
        parts[-1] = stem or parts[-1]
    slug = _slug("_".join(parts))
    # Surrogate escapes (undecodable bytes) are not ASCII: _slug turns them into "_" with the rest.
    return f"{slug}-{digest}{suffix}" if slug else f"{digest}{suffix}"


def safe_join(out_dir: "str | os.PathLike[str]", name: "str | os.PathLike[str]") -> str:
    """``out_dir/name``, or UnsafePathError when it would resolve outside ``out_dir``.

    ``name`` must be relative and free of ``..`` components; the joined path is resolved
    (symlinks included, as far as they exist) and must stay under the resolved ``out_dir``, so
    a symlink planted in the output folder cannot redirect a write elsewhere.
    """
    name = os.fsdecode(name)
    if not name or "\x00" in name:
        raise UnsafePathError("output name is empty or holds a NUL byte")
    if os.path.isabs(name) or (os.altsep and name.startswith(os.altsep)):
        raise UnsafePathError(f"output name {name!r} is an absolute path")
    parts = re.split(r"[\\/]", name)
    if any(p == os.pardir for p in parts):
        raise UnsafePathError(f"output name {name!r} climbs out with '..'")
    base = os.path.realpath(os.fsdecode(out_dir))
    target = os.path.join(os.fsdecode(out_dir), name)
    resolved = os.path.realpath(target)
    if resolved == base or os.path.commonpath([base, resolved]) != base:
        raise UnsafePathError(f"output {target!r} resolves to {resolved!r}, outside {base!r}")
    return target


def open_output(out_dir: "str | os.PathLike[str]", name: "str | os.PathLike[str]", mode: str = "wb"):
    """Open ``safe_join(out_dir, name)`` for writing without following a symlink at the target
    (closes the gap between the check and the open when someone plants a link meanwhile)."""
    if mode not in ("wb", "w"):
        raise ValueError("open_output writes only: mode 'wb' or 'w'")
    target = safe_join(out_dir, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as exc:
        if os.path.islink(target):
            raise UnsafePathError(f"output {target!r} is a symbolic link; refusing to write through it") from None
        raise exc
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""}))
