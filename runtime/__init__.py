"""cxr-infer runtime: classify chest X-rays with a self-describing ONNX model.

Imports numpy, Pillow, onnxruntime and click only (pydicom with the ``dicom`` extra) -- never torch.

The public API (``Classifier``, ``Prediction``, ``ScanResult``, ``ScanStats``, ``load_model``,
``ModelLoadError``, ``ImageReadError``) is imported lazily, so ``import cxr.runtime`` -- and
``cxr-infer --help`` -- stay fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Classifier": "api",
    "Prediction": "engine",
    "ScanResult": "engine",
    "ScanStats": "engine",
    "iter_scan": "engine",
    "scan_files": "engine",
    "load_model": "session",
    "ModelLoadError": "session",
    "ImageReadError": "imageio",
    "load_image": "imageio",
    "TriageUnavailable": "triage",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
