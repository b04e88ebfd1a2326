"""Read any supported image file into one 8-bit grayscale PIL image.

Every failure becomes an ``ImageReadError`` with a reason a person can act on; callers turn
it into an error row instead of stopping a scan.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# Largest image we agree to decode. Chest X-ray detectors top out around 4300x4300 (18 MP);
# anything far beyond is a decompression bomb or not an X-ray.
MAX_PIXELS = 80_000_000


class ImageReadError(Exception):
    """A file could not be turned into an image; ``str(err)`` is the reason shown to users."""


def array_to_gray8(arr: np.ndarray) -> Image.Image:
    """Any-depth 2-D array -> 8-bit image by min-max stretch (16-bit PNG/TIFF, float, DICOM)."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ImageReadError(f"expected a 2-D image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return Image.fromarray(a, mode="L")
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2 and a.size:
        # 8/16-bit integers (16-bit PNG/TIFF): the same stretch through a lookup table, so a
        # 4k x 4k radiograph never needs a float64 copy (~128 MB per decode thread).
        lo, hi = int(a.min()), int(a.max())
        if hi <= lo:
            return Image.fromarray(np.zeros(a.shape, dtype=np.uint8), mode="L")
        levels = np.arange(hi - lo + 1, dtype=np.float64)
        lut = np.clip(levels * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(lut[a.astype(np.int32) - lo] if lo else lut[a], mode="L")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        raise ImageReadError("image has no finite pixel values")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        out = np.zeros(a.shape, dtype=np.uint8)
    else:
        out = np.clip((np.where(finite, a, lo) - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_gray8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'L'. Alpha is composited onto black; high bit depths are stretched."""
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("1", "P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode.startswith("I") or mode == "F":
        return array_to_gray8(np.asarray(img))
    return img.convert("L")


def describe_os_error(path: "str | os.PathLike[str]", exc: OSError) -> str:
    """A reason a person can act on for an OSError raised while opening ``path``."""
    p = os.fspath(path)
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(p):
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return f"broken symlink (target {target!r} does not exist)"
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot read file: {exc.strerror or exc}"


def is_dicom_file(path: "str | os.PathLike[str]") -> bool:
    """DICOM by suffix or by the 'DICM' marker at byte 128 (files often have no suffix)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _check_file(p: Path) -> None:
    """Fail early, with a precise reason, on what Pillow would report vaguely."""
    try:
        st = p.stat()
    except OSError as exc:
        raise ImageReadError(describe_os_error(p, exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError("is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError("not a regular file (device, socket or pipe)")
    if st.st_size == 0:
        raise ImageReadError("empty file (0 bytes)")


def load_image(path: "str | os.PathLike[str]") -> Image.Image:
    """Decode ``path`` into an 8-bit grayscale image with EXIF orientation applied.

    Raises ``ImageReadError`` for every failure (never another exception type for bad input).
    """
    p = Path(path)
    _check_file(p)
    if is_dicom_file(p):
        from .dicom import load_dicom  # optional dependency

        return load_dicom(p)
    return to_gray8(_decode(p))


def load_image_with_facts(path: "str | os.PathLike[str]") -> "tuple[Image.Image, ImageFacts]":
    """``load_image`` plus what the input check needs from before the grayscale conversion:
    size, colour (on a 64 px copy, only for colour sources) and, for DICOM, the header tags."""
    from .inputcheck import ImageFacts, colour_spread

    p = Path(path)
    _check_file(p)
    if is_dicom_file(p):
        from .dicom import read_dicom  # optional dependency

        img, header, spread = read_dicom(p)
        return img, ImageFacts(img.size[0], img.size[1], spread, header)
    im = _decode(p)
    return to_gray8(im), ImageFacts(im.size[0], im.size[1], colour_spread(im))


def _bomb_message(pixels: int) -> str:
    return f"decompression bomb refused: image is {pixels / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP limit"


def _decode(p: Path) -> Image.Image:
    """Pillow decode with EXIF orientation applied, in the file's own mode."""
    try:
        # catch_warnings is process-global (not per thread) before Python 3.14; if decode
        # threads race on it, the MAX_PIXELS check below still refuses the bomb.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise ImageReadError(f"image has no pixels ({w}x{h})")
                if w * h > MAX_PIXELS:
                    raise ImageReadError(_bomb_message(w * h))
                im.load()
                return ImageOps.exif_transpose(im) or im
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refused it before the size check above could: the same words, so that a film's
        # error does not depend on which decode thread held the warnings filter at the time.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageReadError(_bomb_message(int(found.group(1))) if found
                             else f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not a recognised image format") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ImageReadError(describe_os_error(p, exc)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(describe_os_error(p, exc)) from None
        msg = str(exc) or exc.__class__.__name__
        if "truncated" in msg.lower():
            raise ImageReadError(f"truncated image: {msg}") from None
        raise ImageReadError(f"corrupt image: {msg}") from None
    except MemoryError:
        raise ImageReadError("out of memory while decoding") from None
    except (ValueError, SyntaxError, TypeError, IndexError, KeyError, struct.error, EOFError) as exc:
        # Pillow's plugins raise these for malformed headers and chunks.
        raise ImageReadError(f"corrupt image: {exc or exc.__class__.__name__}") from None
