"""Synthetic X-ray stand-ins, good and bad, written to a temp folder.

Each good image has a known mean brightness after decoding, so the tiny brightness model
(tests/tiny_model.py) gives a predictable label: DARK -> "COVID", MID -> "Normal",
BRIGHT -> "Viral Pneumonia". Each bad file comes with a fragment of the reason it must produce.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

DARK, MID, BRIGHT = "COVID", "Normal", "Viral Pneumonia"


def shaded(w: int, h: int, mean: float, amplitude: float = 12.0) -> np.ndarray:
    """uint8 (h, w) image with mean ``mean``: a smooth diagonal shading of +-``amplitude`` levels.

    Good stand-ins are not constant: the runtime's input check calls a constant image blank
    (``not_chest_xray``) and withholds its prediction; a smooth shading is not noise either."""
    yy, xx = np.mgrid[0:h, 0:w]
    wave = np.sin(2 * np.pi * (xx / max(w, 1) + yy / max(h, 1)))
    return np.clip(np.round(mean + amplitude * wave), 0, 255).astype(np.uint8)


def stripes16(h: int, w: int, bright_fraction: float) -> np.ndarray:
    """uint16 image: top ``bright_fraction`` of rows at 4000, the rest at 1000 (stretches to 0/255)."""
    a = np.full((h, w), 1000, dtype=np.uint16)
    a[: int(round(h * bright_fraction))] = 4000
    return a


def write_dicom(path: "str | Path", pixels: np.ndarray, photometric: str = "MONOCHROME2",
                suffix_ok: bool = True, **tags) -> Path:
    """A minimal valid DICOM (explicit VR little endian) holding uint16 ``pixels``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sc = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sc
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sc
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    path = Path(path)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def jpeg_with_orientation(path: "str | Path", orientation: int) -> Path:
    """A 60x40 (w x h) JPEG, white left third, with EXIF Orientation ``orientation``."""
    a = np.zeros((40, 60), dtype=np.uint8)
    a[:, :20] = 255
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return Path(path)


def write_good_images(root: Path) -> dict[str, str]:
    """Every readable kind -> {relative path: expected label}."""
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, str] = {}

    def save(rel, img, label, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **kw)
        exp[rel] = label

    save("gray8_dark.png", Image.fromarray(shaded(64, 64, 20)), DARK)
    save("gray8_bright.png", Image.fromarray(shaded(64, 64, 235)), BRIGHT)
    save("gray16_dark.png", Image.fromarray(stripes16(64, 64, 0.1)), DARK)  # I;16 PNG
    save("rgb_bright.png", Image.fromarray(np.repeat(shaded(64, 48, 240)[..., None], 3, axis=2)), BRIGHT)
    # Nearly transparent white: composited on black it is dark. Ignoring alpha would say BRIGHT.
    rgba = np.full((64, 48, 4), 255, np.uint8)
    rgba[..., 3] = shaded(48, 64, 20)
    save("rgba_transparent_white.png", Image.fromarray(rgba, "RGBA"), DARK)
    pal = Image.fromarray(shaded(64, 64, 128, 100), "L").convert("P")  # indices 28..228
    pal.putpalette([v for i in range(256) for v in [100 + i * 56 // 255] * 3])  # grays 100..156
    save("palette_mid.png", pal, MID)
    save("mid.jpg", Image.fromarray(shaded(64, 64, 128)), MID, quality=95)
    save("bright.bmp", Image.fromarray(shaded(64, 64, 235)), BRIGHT)
    save("tiff16_mid.tif", Image.fromarray(stripes16(64, 64, 0.5)), MID)
    save("nonsquare_mid.png", Image.fromarray(shaded(150, 60, 128)), MID)  # 2.5:1, squashed
    save("sub/dir/large_dark.png", Image.fromarray(shaded(3000, 2500, 15)), DARK)
    jpeg_with_orientation(root / "exif_rotated.jpg", 6)
    exp["exif_rotated.jpg"] = MID  # 1/3 white -> mean ~85, nearer mid-grey than black
    write_dicom(root / "dicom_m2.dcm", stripes16(64, 64, 0.1))
    exp["dicom_m2.dcm"] = DARK
    write_dicom(root / "dicom_m1.dcm", stripes16(64, 64, 0.1), photometric="MONOCHROME1")
    exp["dicom_m1.dcm"] = BRIGHT  # same pixels, inverted
    write_dicom(root / "IM00001", stripes16(64, 64, 0.1))  # no suffix, DICM marker
    exp["IM00001"] = DARK
    return exp


def _png_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def write_bad_files(root: Path) -> dict[str, str]:
    """Every bad kind -> {relative path: fragment of the expected error}."""
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, str] = {}
    noise = (np.random.RandomState(0).rand(200, 300) * 255).astype(np.uint8)
    png = _png_bytes(Image.fromarray(noise))
    (root / "empty.png").write_bytes(b"")
    exp["empty.png"] = "empty file"
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    exp["truncated.png"] = "truncated"
    jb = io.BytesIO()
    Image.fromarray(noise).save(jb, "JPEG")
    (root / "corrupt.jpg").write_bytes(jb.getvalue()[:200] + bytes(range(256)) * 8)
    exp["corrupt.jpg"] = "corrupt"
    (root / "text.png").write_text("this is not an image\n")
    exp["text.png"] = "not a recognised image format"
    Image.new("1", (10000, 10000)).save(root / "bomb.png")  # 100 MP, 12 kB on disk
    exp["bomb.png"] = "decompression bomb"
    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    exp["broken_link.png"] = "broken symlink"
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    exp["loop_a.png"] = "symlink loop"
    exp["loop_b.png"] = "symlink loop"
    write_dicom(root / "no_pixels.dcm", None)
    exp["no_pixels.dcm"] = "no pixel data"
    return exp


def write_skippable(root: Path) -> dict[str, str]:
    """Dataset-folder clutter that a folder scan must skip -> {relative path: skip reason}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "README").write_text("no suffix, not DICOM\n")
    (root / "masks").mkdir()
    Image.new("L", (8, 8), 255).save(root / "masks" / "mask1.png")  # must not be scanned
    return {"metadata.xlsx": "non-image file", ".DS_Store": "hidden file", "README": "non-image file",
            "masks": "ignored folder (masks/)"}


def chest_like(rng: "np.random.Generator", size: int = 224) -> np.ndarray:
    """uint8 (size, size) stand-in with a frontal chest film's coarse layout: dark air around a
    bright body, two dark lung fields either side of a bright mediastinum, bright below the
    diaphragm; position, size and levels jitter a little, plus noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    img = np.full((size, size), 25.0 + rng.normal(0, 5))
    img[((x - cx) / 0.42) ** 2 + ((y - cy) / 0.55) ** 2 < 1] = 150 + rng.normal(0, 10)
    for side in (-1, 1):
        lung = ((x - cx - side * 0.17) / 0.12) ** 2 + ((y - cy + 0.08) / 0.25) ** 2 < 1
        img[lung] = 60 + rng.normal(0, 8)
    img[(y > cy + 0.22) & (np.abs(x - cx) < 0.4)] = 185 + rng.normal(0, 8)
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)
