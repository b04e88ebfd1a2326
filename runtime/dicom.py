"""DICOM -> 8-bit grayscale, the way a radiologist's viewer would show it.

Order follows the DICOM display pipeline: stored values -> modality LUT / rescale slope and
intercept -> window centre/width mapped onto 0..255 as a viewer does (or a VOI LUT, then a
stretch to 8 bits; no window at all: the film's own range stretched) -> invert MONOCHROME1 (where
high values mean dark) so every image reaches the model with bone bright, as in the PNGs it
was trained on. pydicom is the optional ``dicom`` extra; without it a DICOM file becomes an
error row that says what to install.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .imageio import ImageReadError, array_to_gray8

INSTALL_HINT = 'DICOM support needs pydicom: pip install "cxr-infer[dicom]"'


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(INSTALL_HINT) from None
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return pydicom, apply_modality_lut, apply_voi_lut


def load_dicom(path: "str | os.PathLike[str]") -> Image.Image:
    """Read a DICOM file into a PIL "L" image; every failure is an ``ImageReadError``."""
    return read_dicom(path)[0]


def header_tags(ds) -> dict[str, str]:
    """The input check's header tags (Modality, BodyPartExamined, ViewPosition), upper-case and
    stripped; blank or unreadable tags are left out, so the pixels decide for them."""
    from .inputcheck import DICOM_TAGS

    out = {}
    for tag in DICOM_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # a malformed element must not make the image unreadable
            continue
        text = str(value).strip().upper() if value is not None else ""
        if text:
            out[tag] = text
    return out


def read_dicom(path: "str | os.PathLike[str]") -> tuple[Image.Image, dict[str, str], float | None]:
    """``load_dicom`` plus the header tags and, for colour pixel data (a photo saved as DICOM),
    the colour spread of ``inputcheck.colour_spread``; every failure is an ``ImageReadError``."""
    pydicom, apply_modality_lut, apply_voi_lut = _pydicom()
    try:
        ds = pydicom.dcmread(os.fspath(path), force=True)
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageReadError(f"corrupt DICOM: {exc or exc.__class__.__name__}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError("DICOM file has no pixel data (a report, structured document or not DICOM)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        arr = ds.pixel_array
    except Exception as exc:
        msg = str(exc) or exc.__class__.__name__
        if "handler" in msg.lower() or "decoder" in msg.lower() or "plugin" in msg.lower():
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(ts, "name", ts)
            raise ImageReadError(
                f"DICOM pixel data is compressed ({name}) and no decoder is installed: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
            ) from None
        raise ImageReadError(f"corrupt DICOM pixel data: {msg}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: the first frame is the image a viewer opens on
    header = header_tags(ds)
    if samples > 1 or arr.ndim == 3:
        spread = None
        if photometric.startswith("YBR"):
            arr = arr[..., 0]  # the Y (luma) plane is the grayscale image
        else:
            spread = _rgb_spread(arr)
            arr = arr.astype(np.float64).mean(axis=-1)
        return array_to_gray8(arr), header, spread
    try:
        arr = apply_modality_lut(arr, ds)
        shown = _linear_window(arr, ds)
        if shown is None:
            arr = apply_voi_lut(arr, ds)
    except Exception as exc:
        raise ImageReadError(f"invalid DICOM LUT/windowing: {exc or exc.__class__.__name__}") from None
    img = Image.fromarray(shown, mode="L") if shown is not None else array_to_gray8(np.asarray(arr))
    if photometric == "MONOCHROME1":
        img = Image.fromarray(255 - np.asarray(img, dtype=np.uint8), mode="L")
    return img, header, None


def _first(value) -> float:
    """A multi-valued window (several presets): the first, the one viewers open on."""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        value = value[0]
    return float(value)


def _linear_window(arr: np.ndarray, ds) -> "np.ndarray | None":
    """The window as a viewer shows it: centre/width mapped linearly onto 0..255 (PS3.3
    C.11.2.1.2.1), values outside clipped. The window, not the film's own extremes, sets the grey
    scale: a min-max stretch after windowing would make a film's look depend on whether a few
    pixels (a marker, padding) fall outside the window. None when there is no plain linear
    window (a VOI LUT sequence or a SIGMOID function go through pydicom and the stretch)."""
    if "VOILUTSequence" in ds or "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    if str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() not in ("", "LINEAR"):
        return None
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if not (np.isfinite(c) and np.isfinite(w)) or w < 1:
        raise ValueError(f"window width {w} is not a width (PS3.3 requires >= 1)")
    a = np.asarray(arr, dtype=np.float64)
    if w == 1:
        y = (a > c - 0.5).astype(np.float64)
    else:
        y = np.clip((a - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def _rgb_spread(arr: np.ndarray) -> float | None:
    """Colour spread of an RGB pixel array, on the same 64 px copy as for other formats."""
    from .inputcheck import colour_spread

    if arr.ndim != 3 or arr.shape[-1] < 3:
        return None
    a = np.asarray(arr[..., :3])
    if a.dtype != np.uint8:
        hi = float(a.max()) if a.size else 0.0
        a = np.clip(a.astype(np.float64) * (255.0 / hi if hi > 255 else 1.0), 0, 255).astype(np.uint8)
    return colour_spread(Image.fromarray(np.ascontiguousarray(a), mode="RGB"))
