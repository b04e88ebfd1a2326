"""Shared fixtures: a tiny ONNX classifier and synthetic image folders (see tiny_model.py,
synthetic.py). Nothing here needs a network, a GPU or torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers importable from any rootdir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 3-class brightness classifier with the cxr metadata contract (32x32, dynamic batch)."""
    pytest.importorskip("onnx", reason="building the test model needs onnx (pip install '.[dev]')")
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def classifier(tiny_model_path):
    from cxr.runtime import Classifier

    return Classifier.load(tiny_model_path, batch_size=4, workers=2)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The shared real X-ray folder (env CXR_DATA), or skip saying why."""
    root = Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "covid-radiography-3class"))
    if not root.is_dir():
        pytest.skip(f"real X-ray data not found at {root} (set CXR_DATA to the covid-radiography-3class folder)")
    return root


