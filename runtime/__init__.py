"""cxr-infer runtime: classify chest X-rays with a self-describing ONNX model.

Imports numpy, Pillow, onnxruntime and click only (pydicom with the ``dicom`` extra) -- never torch.
"""

__version__ = "0.1.0"
