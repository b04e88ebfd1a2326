"""Native-resolution films (2,000-3,000 px, 12/16-bit, DICOM) reach the network as the 224 px
8-bit training films did: the resize is antialiased, a deep bit depth becomes the same 8-bit
film, and a DICOM's window and MONOCHROME1 inversion are applied before the resize.

The training films are 8-bit exports that span nearly the whole grey range (of 200 Normal films
of the 3-class folder, the median darkest pixel is 0 and the median brightest 248), so a deep
film is stretched to its own range, and so is the reference here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr.runtime.imageio import load_image
from cxr.runtime.preprocess import Preprocessing, resize_to_uint8
from synthetic import write_dicom

PP = Preprocessing(size=224)


def _export8(f: np.ndarray) -> np.ndarray:
    """An 8-bit export of the film, as the training films are: stretched to the full range."""
    return np.round(255 * (f - f.min()) / (f.max() - f.min())).astype(np.uint8)


def _film(px: int) -> np.ndarray:
    """A smooth chest-like film (bright mediastinum, darker lungs) in [0, 1] at ``px`` pixels."""
    yy, xx = np.mgrid[0:px, 0:px] / px
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
        np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    return np.clip(0.85 - 0.6 * lungs + 0.1 * yy, 0, 1)


def test_a_fine_pattern_is_averaged_not_aliased():
    # one-pixel stripes at 2,400 px: a plain subsample would keep a pattern of full-contrast
    # bands (aliasing); an antialiased resize turns them into flat mid grey
    a = np.zeros((2400, 2400), np.uint8)
    a[:, ::2] = 255
    out = resize_to_uint8(Image.fromarray(a), PP).astype(np.float64)
    assert abs(out.mean() - 127.5) < 3
    assert out.std() < 3, "stripes survived the resize: it aliases"


@pytest.mark.parametrize("px", [2000, 3000])
def test_a_12_bit_native_film_becomes_the_224_px_8_bit_film(tmp_path, px):
    f = _film(px)
    ref = resize_to_uint8(Image.fromarray(_export8(f)), PP)
    # 12 bits in a 16-bit PNG, spanning the range as a detector's output does
    path = tmp_path / "film16.png"
    Image.fromarray((f * 4095).round().astype(np.uint16)).save(path)
    got = resize_to_uint8(load_image(path), PP)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 6, (diff.mean(), diff.max())


def test_a_windowed_monochrome1_dicom_is_windowed_and_inverted_before_the_resize(tmp_path):
    pytest.importorskip("pydicom")
    f = _film(2048)
    ref = resize_to_uint8(Image.fromarray(_export8(f)), PP)
    # MONOCHROME1 stores bone dark; the window spans the film's values, as a modality sets it
    stored = (4095 - (200 + f * 3600)).round().astype(np.uint16)
    lo, hi = int(stored.min()), int(stored.max())
    window = dict(WindowCenter=(lo + hi) / 2 + 0.5, WindowWidth=hi - lo + 1, BodyPartExamined="CHEST", ViewPosition="PA")
    body = slice(8, None)  # rows below the band added next (40 of 2,048 px is about 4 rows here)
    for band in (False, True):
        px = stored.copy()
        if band:  # padding outside the window: clipped on display, it must not re-scale the film
            px[:40, :] = 0
        path = write_dicom(tmp_path / f"film{band}.dcm", px, photometric="MONOCHROME1", **window)
        got = resize_to_uint8(load_image(path), PP)
        diff = np.abs(got[body].astype(int) - ref[body].astype(int))
        assert diff.mean() < 1.5 and diff.max() <= 6, (band, diff.mean(), diff.max())
