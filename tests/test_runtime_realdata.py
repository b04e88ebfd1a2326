"""The runtime on real X-rays from the shared folder (skipped, saying why, when it is absent)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from cxr.runtime import ScanStats
from cxr.runtime.dataset import discover_labelled
from cxr.runtime.imageio import load_image

pytestmark = pytest.mark.realdata


def _few_per_class(root: Path, n: int = 3) -> list[Path]:
    classes, items = discover_labelled(root)
    picked = []
    for c in classes:
        picked += list(itertools.islice((it.path for it in items if it.label == c), n))
    return picked


def test_real_images_decode_to_gray8(real_data_root):
    for path in _few_per_class(real_data_root):
        img = load_image(path)
        a = np.asarray(img)
        assert img.mode == "L" and min(img.size) >= 64
        assert a.std() > 5  # an actual radiograph, not a blank


def test_real_images_scan_ok(classifier, real_data_root):
    files = _few_per_class(real_data_root)
    stats = ScanStats()
    results = list(classifier.scan(files, stats=stats))
    assert [r.path for r in results] == [str(f) for f in files]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert stats.ok == len(files) and stats.errors == 0
