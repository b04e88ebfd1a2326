#!/usr/bin/env python
"""How heavy is a review page, and how fast does it open? Size on disk, then headless Chromium.

    python bench/review_page_load.py report.html [--runs 3] [--query "?sort=confidence&dir=asc"]

Prints the page's size, its thumbnail folder's size and file count, and per run: the time from
navigation start until the page's script had parsed the data and drawn the first page of rows
(``data-ready-ms``, from ``performance.now()``), and the whole browser process wall time
(start-up, load, 3 s of virtual time for lazy images, DOM dump).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def open_once(chromium: str, url: str) -> tuple[float | None, float, str]:
    with tempfile.TemporaryDirectory() as prof:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={prof}", "--virtual-time-budget=3000", "--window-size=1400,1000",
               "--dump-dom", url]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
    m = re.search(r'data-ready-ms="(\d+)"', out.stdout)
    shown = re.search(r'data-rows-shown="(\d+)"', out.stdout)
    return (float(m.group(1)) if m else None), wall, shown.group(1) if shown else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--query", default="")
    ap.add_argument("--chromium", default=os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    page = Path(args.page).resolve()
    stem = page.name[:-5] if page.name.endswith(".html") else page.name
    n, size = folder_size(page.with_name(stem + "_files"))
    rows = page.read_text(encoding="utf-8").count('"i":')
    print(f"page {page.name}: {page.stat().st_size / 1e6:.2f} MB for {rows} rows "
          f"({page.stat().st_size / max(rows, 1):.0f} bytes/row); thumbnails: {n} files, {size / 1e6:.1f} MB "
          f"({size / max(n, 1) / 1e3:.1f} kB each)")
    if not os.path.isfile(args.chromium):
        print("no chromium: load time not measured", file=sys.stderr)
        return 1
    ready, walls = [], []
    for i in range(args.runs):
        r, w, shown = open_once(args.chromium, page.as_uri() + args.query)
        print(f"run {i + 1}: script ready {r:.0f} ms after navigation start, rows drawn {shown}; "
              f"browser process {w:.1f} s")
        if r is not None:
            ready.append(r)
        walls.append(w)
    if ready:
        print(f"median: ready {statistics.median(ready):.0f} ms, browser process {statistics.median(walls):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
