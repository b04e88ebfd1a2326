"""Pack a split's images as one small zip of JPEGs at the training size, to move to a GPU machine.

A training machine reached over a link with a size limit (the shared GPU machines here take 64 MiB
per call) cannot receive the 199 MB of PNGs. Training decodes every image to ``size`` px grayscale
anyway, so this writes exactly that (the runtime's own ``resize_to_uint8``), JPEG-encoded:
quality 80 is ~44 dB PSNR, far below what the training augmentation already does to images, and
the test split can be packed at low quality because the model is judged afterwards on the
original files (``cxr.train.engine.finish`` with the original ``split.json``).

    python tools/pack_split.py RUN/split.json packed/ --size 224 --quality 80 --test-quality 40
    # on the GPU machine:
    python -m zipfile -e packed/data.zip /tmp/d
    cxr-train --data /tmp/d/data/SOURCE1 --data /tmp/d/data/SOURCE2 --split packed/split.json ...

The packed ``split.json`` lists the same images in the same splits and sources, with ``.jpg``
paths; each source is packed under ``data/<source>/``, so give one ``--data`` per source (named
like the source, or in the manifest's order).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from cxr.runtime.dataset import item_path, override_roots, read_split_manifest, source_roots
from cxr.runtime.imageio import load_image
from cxr.runtime.preprocess import Preprocessing, resize_to_uint8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", type=Path, help="split.json written by cxr-train")
    ap.add_argument("out", type=Path, help="folder for data.zip and split.json")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality of train and val images")
    ap.add_argument("--test-quality", type=int, default=40, help="JPEG quality of test images")
    ap.add_argument("--data-root", type=Path, action="append",
                    help="resolve a source's items here instead of its recorded root (repeat: one per source)")
    args = ap.parse_args(argv)

    manifest = override_roots(read_split_manifest(args.split), args.data_root)
    roots = source_roots(manifest)
    pp = Preprocessing(size=args.size)

    def encode(row: dict) -> tuple[str, bytes]:
        pixels = resize_to_uint8(load_image(item_path(manifest, row, roots)), pp)
        buf = io.BytesIO()
        quality = args.test_quality if row["split"] == "test" else args.quality
        Image.fromarray(pixels, mode="L").save(buf, "JPEG", quality=quality)
        return Path(row["path"]).with_suffix(".jpg").as_posix(), buf.getvalue()

    for src in manifest["sources"]:
        src["root"] = f"data/{src['name']}"

    args.out.mkdir(parents=True, exist_ok=True)
    rows = manifest["items"]
    total = 0
    with ThreadPoolExecutor(4) as pool, zipfile.ZipFile(args.out / "data.zip", "w", zipfile.ZIP_STORED) as zf:
        for i, (row, (rel, data)) in enumerate(zip(rows, pool.map(encode, rows)), 1):
            zf.writestr(f"data/{row['source']}/{rel}", data)
            row["path"] = rel
            total += len(data)
            if i % 2000 == 0:
                print(f"[pack] {i}/{len(rows)}", file=sys.stderr)
    (args.out / "split.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    print(f"[pack] {len(rows)} images, {total / 2**20:.1f} MiB of JPEG -> {args.out / 'data.zip'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
