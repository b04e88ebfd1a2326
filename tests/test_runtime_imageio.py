"""Reading every supported format into 8-bit grayscale, and every bad file into a clear reason."""

from __future__ import annotations

import builtins
import os
import sys

import numpy as np
import pytest
from PIL import Image

from cxr.runtime.imageio import ImageReadError, is_dicom_file, load_image
from synthetic import jpeg_with_orientation, stripes16, write_bad_files, write_dicom

pydicom = pytest.importorskip("pydicom")


def test_16bit_png_is_stretched_to_full_range(tmp_path):
    Image.fromarray(stripes16(20, 10, 0.5)).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    a = np.asarray(img)
    assert img.mode == "L" and img.size == (10, 20)
    assert a[0, 0] == 255 and a[-1, 0] == 0  # 4000 -> 255, 1000 -> 0


def test_rgba_alpha_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = np.asarray(load_image(tmp_path / "a.png"))
    assert (a[:2] == 255).all() and (a[2:] == 0).all()


def test_palette_image_uses_palette_colours(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 200, 200] + [0, 0, 0] * 254)
    p.save(tmp_path / "p.png")
    assert (np.asarray(load_image(tmp_path / "p.png")) == 200).all()


@pytest.mark.parametrize("orientation,size", [(1, (60, 40)), (6, (40, 60)), (8, (40, 60)), (3, (60, 40))])
def test_exif_orientation_applied(tmp_path, orientation, size):
    p = jpeg_with_orientation(tmp_path / "o.jpg", orientation)
    a = np.asarray(load_image(p)).astype(int)
    assert (a.shape[1], a.shape[0]) == size
    # The white band starts on the left; after the EXIF transform it sits on a known side.
    side = {1: a[:, :5], 3: a[:, -5:], 6: a[:5, :], 8: a[-5:, :]}[orientation]
    assert side.mean() > 200


def test_tiff_16bit_and_bmp(tmp_path):
    Image.fromarray(stripes16(8, 8, 0.25)).save(tmp_path / "a.tif")
    Image.new("RGB", (5, 7), (10, 20, 30)).save(tmp_path / "b.bmp")
    a = np.asarray(load_image(tmp_path / "a.tif"))
    assert a.max() == 255 and a.min() == 0 and (a[:2] == 255).all()
    b = load_image(tmp_path / "b.bmp")
    assert b.mode == "L" and b.size == (5, 7)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = stripes16(16, 16, 0.25)
    m2 = np.asarray(load_image(write_dicom(tmp_path / "m2.dcm", px)))
    m1 = np.asarray(load_image(write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1")))
    assert m2[0, 0] == 255 and m2[-1, 0] == 0
    assert (m1 == 255 - m2).all()


def test_dicom_rescale_and_window_are_applied(tmp_path):
    # Three stored levels; the window (centre 2000, width 1000 after rescale) keeps only the
    # middle one mid-grey and clips the others to black/white.
    px = np.zeros((3, 6), np.uint16)
    px[0], px[1], px[2] = 100, 1000, 3000
    p = write_dicom(tmp_path / "w.dcm", px, RescaleSlope=2, RescaleIntercept=0,
                    WindowCenter=2000, WindowWidth=1000)
    a = np.asarray(load_image(p)).astype(int)
    assert a[0].max() == 0 and a[2].min() == 255  # 200 and 6000 clipped out of [1500, 2500]
    assert abs(a[1].mean() - 128) <= 2  # 2000 is the window centre


def test_dicom_without_suffix_detected_by_marker(tmp_path):
    p = write_dicom(tmp_path / "IM0001", stripes16(8, 8, 0.5))
    assert is_dicom_file(p)
    assert load_image(p).size == (8, 8)


def test_dicom_without_pydicom_says_which_extra(tmp_path, monkeypatch):
    p = write_dicom(tmp_path / "x.dcm", stripes16(8, 8, 0.5))
    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(ImageReadError, match=r'pip install "cxr-infer\[dicom\]"'):
        load_image(p)


def test_every_bad_kind_gives_its_reason(tmp_path):
    expected = write_bad_files(tmp_path)
    for rel, fragment in expected.items():
        with pytest.raises(ImageReadError) as err:
            load_image(tmp_path / rel)
        assert fragment in str(err.value), (rel, str(err.value))


@pytest.mark.parametrize("side", [10000, 14000])  # 100 MP: Pillow only warns; 196 MP: Pillow refuses itself
def test_a_bomb_gets_the_same_words_whether_or_not_the_warning_is_an_error(tmp_path, monkeypatch, side):
    import warnings

    import cxr.runtime.imageio as imageio

    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    with pytest.raises(ImageReadError) as own:
        load_image(path)
    # Another decode thread leaving its catch_warnings can undo the "error" filter (it is
    # process-global): the warning then stays a warning and the size check answers instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(imageio.warnings, "simplefilter", lambda *a, **k: None)
        with pytest.raises(ImageReadError) as raced:
            load_image(path)
    assert str(own.value) == str(raced.value) == (
        f"decompression bomb refused: image is {side * side / 1e6:.0f} MP, over the 80 MP limit")


def test_folder_and_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop reads; simulate the OS refusing."""
    p = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(p)
    real_open = Image.open

    def refuse(fp, *a, **k):
        if os.fspath(fp) == os.fspath(p):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageReadError, match="permission denied"):
        load_image(p)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root (or Windows) can read a chmod 000 file; covered by the simulated test")
def test_permission_denied_real(tmp_path):
    p = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(p)
    p.chmod(0)
    try:
        with pytest.raises(ImageReadError, match="permission denied"):
            load_image(p)
    finally:
        p.chmod(0o644)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int8])
def test_integer_stretch_matches_float_formula(dtype):
    from cxr.runtime.imageio import array_to_gray8

    info = np.iinfo(dtype)
    a = np.random.RandomState(1).randint(max(info.min, -3000), min(info.max, 9000), size=(37, 53)).astype(dtype)
    f = a.astype(np.float64)
    lo, hi = f.min(), f.max()
    want = np.clip((f - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    assert (np.asarray(array_to_gray8(a)) == want).all()
    assert (np.asarray(array_to_gray8(np.full((3, 3), 7, dtype))) == 0).all()


def test_normalize_is_the_documented_arithmetic_for_images_and_batches():
    from cxr.runtime.preprocess import Preprocessing, normalize

    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8)
    before = batch.copy()
    for pp in (Preprocessing(size=16, mean=0.5, std=0.25), Preprocessing(size=16, mean=0.485, std=0.229, channels=3)):
        want = (batch.astype(np.float32) * np.float32(1 / 255) - np.float32(pp.mean)) / np.float32(pp.std)
        got = normalize(batch, pp)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        assert got.shape == (4, pp.channels, 16, 16)
        for c in range(pp.channels):
            assert np.array_equal(got[:, c], want)  # bit-identical, not merely close
        single = normalize(batch[0], pp)
        assert single.shape == (pp.channels, 16, 16) and np.array_equal(single, got[0])
    assert np.array_equal(batch, before)  # the input is never written
