"""cxr-train: PyTorch training for chest X-ray classifiers (``pip install '.[train]'``)."""
