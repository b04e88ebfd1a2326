#!/usr/bin/env python
"""How does the input check and the classifier react when real films are altered the way other
machines, exports and mistakes alter them?

    python bench/input_check_robustness.py --split RUN/split.json [--subset test] \\
        [--model models/cxr-mnv2-224.int8.onnx] [--limit 0] [--json out.json]

Every image of the split subset is classified as it is, then after each alteration below (done
in memory with Pillow and numpy, as a PACS export or a different machine might): JPEG at quality
40, gamma 0.7 and 1.4, contrast x0.7 and x1.3 about the mean, histogram equalisation, resizing to
1024 and to 128 px, rotation by 7 degrees, a black border of 10 %, a crop to 85 %, inversion (a
MONOCHROME1 film exported without its inversion), a left-right flip and an upside-down film;
and native-resolution films as users bring them: the film upsampled to 2,500 px and stored as a
12-bit array (as a 16-bit PNG or TIFF holds it), and the same as a 12-bit MONOCHROME1 DICOM with
a VOI window, read back through the runtime's DICOM path (needs pydicom). They check that a large
film reaches the network as the 224 px training films did (antialiased resampling, bit depth,
windowing, inversion); they cannot show how another machine's detector looks.

Per alteration: the share the input check flags (and calls ``not_chest_xray``), the top-1
accuracy on all images and on the rows that show a class (what a reader would see), and the share
whose class is the same as for the unaltered image. Wanted: acquisition-like alterations flagged
about as rarely as the originals (the check must not refuse another hospital's ordinary films),
and mistakes -- inverted or upside-down films -- flagged, or at least not classified confidently.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


def _gamma(im: Image.Image, g: float) -> Image.Image:
    a = np.asarray(im, np.float32) / 255.0
    return Image.fromarray((255.0 * a ** g).clip(0, 255).astype(np.uint8))


def _contrast(im: Image.Image, f: float) -> Image.Image:
    a = np.asarray(im, np.float32)
    return Image.fromarray((a.mean() + f * (a - a.mean())).clip(0, 255).astype(np.uint8))


NATIVE_PX = 2500


def _native12(im: Image.Image) -> np.ndarray:
    """The film at 2,500 px as 12-bit values with a detector-like offset (300..3800 of 0..4095)."""
    big = np.asarray(im.resize((NATIVE_PX, NATIVE_PX), Image.BICUBIC), np.float32)
    return (300.0 + big * (3500.0 / 255.0)).round().astype(np.uint16)


def _native_dicom(im: Image.Image) -> str:
    """_native12 written as a 12-bit MONOCHROME1 DX DICOM with a window over its range; a path,
    so the runtime reads it as it reads a user's file (modality LUT, VOI window, inversion)."""
    import tempfile

    from dicom_films import write_film  # tests/dicom_films.py: the DX film the node's tests send

    fd, path = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    write_film(path, 4095 - _native12(im),  # MONOCHROME1: high values are dark
               PhotometricInterpretation="MONOCHROME1", WindowCenter=2050, WindowWidth=3500)
    return path


def _has_pydicom() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


ALTERATIONS: dict[str, Callable[[Image.Image], "Image.Image | np.ndarray | str"]] = {
    "original": lambda im: im,
    "JPEG quality 40": lambda im: _jpeg(im, 40),
    "gamma 0.7": lambda im: _gamma(im, 0.7),
    "gamma 1.4": lambda im: _gamma(im, 1.4),
    "contrast x0.7": lambda im: _contrast(im, 0.7),
    "contrast x1.3": lambda im: _contrast(im, 1.3),
    "histogram equalised": ImageOps.equalize,
    "resized to 1024 px": lambda im: im.resize((1024, 1024), Image.BICUBIC),
    "resized to 128 px": lambda im: im.resize((128, 128), Image.BILINEAR),
    "rotated 7 degrees": lambda im: im.rotate(7, resample=Image.BILINEAR),
    "black border 10 %": lambda im: ImageOps.expand(im, border=max(1, im.size[0] // 10), fill=0),
    "cropped to 85 %": lambda im: ImageOps.crop(im, border=int(im.size[0] * 0.075)),
    "inverted": ImageOps.invert,
    "flipped left-right": ImageOps.mirror,
    "upside down": lambda im: im.rotate(180),
    "native 2,500 px, 12-bit": _native12,
    "native 2,500 px, 12-bit DICOM MONOCHROME1": _native_dicom,
}


def _classify(clf, x):
    """A path (the DICOM alteration) is classified from the file, then removed."""
    if not isinstance(x, str):
        return clf.classify(x)
    try:
        return clf.classify(x)
    finally:
        os.unlink(x)


def measure(clf, images: list[Image.Image], labels: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    reference = None
    for name, alter in ALTERATIONS.items():
        if alter is _native_dicom and not _has_pydicom():
            print(f"skipped {name!r}: needs pydicom (pip install \".[dicom]\")", file=sys.stderr)
            continue
        preds = [_classify(clf, alter(im)) for im in images]
        if reference is None:
            reference = [p.label for p in preds]
        shown = [p.label == y for p, y in zip(preds, labels) if not p.diagnosis_withheld]
        out[name] = {
            "n": len(preds),
            "flagged": float(np.mean([p.qc != "ok" for p in preds])),
            "not_chest_xray": float(np.mean([p.qc == "not_chest_xray" for p in preds])),
            "accuracy": float(np.mean([p.label == y for p, y in zip(preds, labels)])),
            "accuracy_shown": float(np.mean(shown)) if shown else None,
            "same_class_as_original": float(np.mean([p.label == r for p, r in zip(preds, reference)])),
        }
    return out


def table(rows: dict[str, dict]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = ["| alteration | flagged | not_chest_xray | top-1 accuracy | on rows shown | same class as original |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {pct(r['flagged'])} | {pct(r['not_chest_xray'])} | {pct(r['accuracy'])} | "
                     f"{pct(r['accuracy_shown'])} | {pct(r['same_class_as_original'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cxr.runtime import Classifier
    from cxr.runtime.dataset import item_path, override_roots, read_split_manifest

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, help="cxr-train split.json")
    ap.add_argument("--subset", default="test", choices=("train", "val", "test"))
    ap.add_argument("--data-root", action="append", default=[], help="where the split's sources live now (repeat)")
    ap.add_argument("--model", default=None, help="default: the shipped model")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images (evenly spaced); 0 = all")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    man = override_roots(read_split_manifest(args.split), args.data_root or None)
    items = [it for it in man["items"] if it["split"] == args.subset]
    if args.limit and len(items) > args.limit:
        items = [items[i] for i in np.linspace(0, len(items) - 1, args.limit).round().astype(int)]
    if not items:
        ap.error(f"{args.split} has no {args.subset} items")
    clf = Classifier.load(args.model)
    images = [Image.open(item_path(man, it)).convert("L") for it in items]
    rows = measure(clf, images, [it["label"] for it in items])
    print(f"{len(items)} {args.subset} images of {args.split}, model {clf.model.path.name}")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
