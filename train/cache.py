"""Decode every image once, with the runtime's own loader and preprocessing, into uint8.

Epochs on a 2-core CPU should be spent on the model, not on PNG decoding, so the whole
split lives in memory as an (N, S, S) uint8 array (8.7k images at 224 px = 440 MB; at 128 px,
143 MB). The optional disk cache is keyed by the files' bytes (sha256, in order) and the
preprocessing policy, so a changed, moved-in or reordered image or a new policy never reuses
stale pixels; hashing costs a fraction of decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr.runtime.imageio import load_image
from cxr.runtime.preprocess import Preprocessing, resize_to_uint8


def _decode(path: Path, pp: Preprocessing) -> np.ndarray:
    return resize_to_uint8(load_image(path), pp)


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).digest()


def cache_key(paths: list[Path], pp: Preprocessing, workers: int = 4) -> str:
    h = hashlib.sha256(json.dumps(pp.to_dict(), sort_keys=True).encode())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for digest in pool.map(_file_digest, paths):
            h.update(digest)
    return h.hexdigest()[:32]


def decode_all(paths: list[Path], pp: Preprocessing, workers: int | None = None,
               cache_dir: Path | None = None, label: str = "images") -> np.ndarray:
    """(N, size, size) uint8 for ``paths``, from the disk cache when it matches."""
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / f"{cache_key(paths, pp)}.npy"
        if cached.is_file():
            arr = np.load(cached)
            if arr.shape == (len(paths), pp.size, pp.size):
                print(f"[cache] {label}: {len(paths)} images from {cached}", file=sys.stderr)
                return arr
    out = np.empty((len(paths), pp.size, pp.size), dtype=np.uint8)
    t0 = time.perf_counter()
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode(p, pp), paths)):
            out[i] = arr
            if (i + 1) % 2000 == 0:
                print(f"[cache] {label}: decoded {i + 1}/{len(paths)}", file=sys.stderr)
    print(f"[cache] {label}: decoded {len(paths)} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if cache_dir is not None:
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, cached)
    return out
