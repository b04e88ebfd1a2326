"""Files a scan writes beside its results: ``--heatmaps DIR`` PNGs and the ``--html`` review page.

Images are drawn in a small thread pool while the scan goes on, so the result rows still stream
to stdout in input order as each batch finishes; at most ``MAX_PENDING`` drawings wait at once,
which bounds memory on any number of files. Every file named after an input goes through
``safepaths`` (a flat, unique name; nothing lands outside its folder, whatever the input path
holds). A drawing that cannot be written (full disk, a planted symlink) is counted and reported
on stderr; it does not turn a classified image into an error row.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from . import safepaths
from .heatmap import overlay, render_heatmap

PREVIEW_SIDE = 512   # decoded image kept per file for drawing (heatmap PNG width at most)
THUMB_SIDE = 160     # review-page thumbnails
THUMB_QUALITY = 80
MAX_PENDING = 64
# zlib level 3 encodes a 512 px figure in ~40 ms instead of ~130 ms at the default 6, for files
# 12 % larger (230 vs 206 kB, measured on a 224 px X-ray drawn at 512 px)
PNG_LEVEL = 3


def scan_root(paths: "list[str]") -> str | None:
    """The folder the output names are made relative to: the common folder of the scanned paths."""
    dirs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    try:
        return os.path.commonpath(dirs) if dirs else None
    except ValueError:  # different drives
        return None


def _url(rel_path: str) -> str:
    return urllib.parse.quote(rel_path.replace(os.sep, "/"))


class ScanOutputs:
    """Collects what ``--heatmaps`` and ``--html`` need from each result, then writes them."""

    def __init__(self, model: Any, *, heatmaps_dir: str | None = None, html_path: str | None = None,
                 root: str | None = None, workers: int | None = None):
        self.model = model
        self.classes = list(model.classes)
        self.pp = model.info.preprocess
        self.heatmaps_dir = heatmaps_dir
        self.html_path = html_path
        self.root = root
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.written = {"heatmaps": 0, "thumbnails": 0}
        self._lock = threading.Lock()
        self._pending: deque[tuple[dict, Future]] = deque()
        # Pillow's resize and zlib and numpy's arithmetic release the GIL: two drawing threads
        # keep up with the scan better than one where two cores are free for it
        workers = workers or min(2, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cxr-draw")
        if heatmaps_dir:
            os.makedirs(heatmaps_dir, exist_ok=True)
        self.files_dir = None
        if html_path:
            page_dir = os.path.dirname(os.path.abspath(html_path))
            stem = os.path.basename(html_path)
            stem = stem[:-5] if stem.lower().endswith(".html") else stem
            self.files_dir = os.path.join(page_dir, stem + "_files")
            os.makedirs(self.files_dir, exist_ok=True)
            self.page_dir = page_dir

    @property
    def preview_side(self) -> int:
        return PREVIEW_SIDE if self.heatmaps_dir else THUMB_SIDE

    def add(self, result: Any) -> None:
        """Record one result (any order of calls = the page's scan order) and queue its drawings."""
        from .output import display_path
        from .review_page import page_row

        row = page_row(len(self.rows), result, self.classes, display_path(result.path), {})
        self.rows.append(row)
        if getattr(result, "preview", None) is None:
            return
        self._pending.append((row, self._pool.submit(self._draw, result)))
        while len(self._pending) > MAX_PENDING:
            self._collect_one()

    def _collect_one(self) -> None:
        row, fut = self._pending.popleft()
        images, errors = fut.result()
        row.update({k: v for k, v in images.items() if v})
        self.failures.extend(errors)

    def _save(self, folder: str, name: str, image, **kw) -> None:
        with safepaths.open_output(folder, name, "wb") as fh:
            image.save(fh, **kw)

    def _draw(self, result: Any) -> tuple[dict, list[str]]:
        """Runs in the drawing pool: heatmap PNG and/or the page's thumbnails."""
        images: dict[str, str] = {}
        errors: list[str] = []
        pred, preview, cam = result.prediction, result.preview, result.heatmap
        k = self.classes.index(pred.label) if pred is not None else None
        try:
            if self.heatmaps_dir and cam is not None and k is not None:
                name = safepaths.output_name_for(result.path, self.root, ".heatmap.png")
                fig = render_heatmap(preview, cam[k], self.pp, pred.label, pred.confidence)
                self._save(self.heatmaps_dir, name, fig, format="PNG", compress_level=PNG_LEVEL)
                with self._lock:
                    self.written["heatmaps"] += 1
                if self.files_dir:
                    images["hf"] = self._page_link(os.path.join(self.heatmaps_dir, name))
            if self.files_dir:
                thumb = preview.copy()
                thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
                name = safepaths.output_name_for(result.path, self.root, ".xray.jpg")
                self._save(self.files_dir, name, thumb.convert("L"), format="JPEG", quality=THUMB_QUALITY)
                images["th"] = self._page_link(os.path.join(self.files_dir, name))
                if cam is not None and k is not None:
                    name = safepaths.output_name_for(result.path, self.root, ".heat.jpg")
                    self._save(self.files_dir, name, overlay(thumb, cam[k], self.pp), format="JPEG",
                               quality=THUMB_QUALITY)
                    images["hm"] = self._page_link(os.path.join(self.files_dir, name))
                with self._lock:
                    self.written["thumbnails"] += 1
        except (OSError, ValueError) as exc:  # UnsafePathError is a ValueError
            errors.append(f"{exc}")
        return images, errors

    def _page_link(self, target: str) -> str:
        try:
            return _url(os.path.relpath(os.path.abspath(target), self.page_dir))
        except ValueError:  # another drive: an absolute file URL
            return "file://" + urllib.parse.quote(os.path.abspath(target).replace(os.sep, "/"))

    def drain(self) -> None:
        """Wait for every drawing queued so far (a cluster worker, at the end of its shard)."""
        try:
            while self._pending:
                self._collect_one()
        finally:
            self._pool.shutdown(wait=True)

    def add_rows(self, part: dict, shown: "list[str]") -> None:
        """Take the page rows and drawing counts a cluster worker made for one shard (``drain``ed
        there), numbered on in scan order, each showing its path as discovered."""
        for row, path in zip(part["rows"], shown):
            self.rows.append({**row, "i": len(self.rows), "p": path})
        for key, n in part["written"].items():
            self.written[key] += n
        self.failures.extend(part["failures"])

    def finish(self, stats: Any, latency: dict, latency_text: str) -> int | None:
        """Wait for every drawing, then write the page (if asked). Returns the page's size."""
        self.drain()
        return self.write_page(stats, latency, latency_text)

    def write_page(self, stats: Any, latency: dict, latency_text: str) -> int | None:
        """Write the page with every row so far, once their drawings are done (``watch`` rewrites
        it after each batch); returns its size, or None without ``--html``."""
        while self._pending:
            self._collect_one()
        if not self.html_path:
            return None
        from .review_page import model_summary, write_page

        summary = {"files": stats.files, "classified": stats.ok, "errors": stats.errors,
                   "skipped": stats.skipped, "interrupted": bool(stats.interrupted),
                   "by_class": {c: stats.by_class.get(c, 0) for c in self.classes},
                   # what the CLI summary counts: rows withheld by the input check, then triage
                   # (a withheld row is also referred, so the three are not to be added up)
                   "withheld": stats.withheld, "refer": stats.triage.get("refer", 0),
                   "routine": stats.triage.get("routine", 0),
                   "shift": None if getattr(stats, "shift", None) is None else stats.shift.to_dict()}
        return write_page(self.html_path, rows=self.rows, classes=self.classes, model=model_summary(self.model),
                          summary=summary, latency=latency, latency_text=latency_text)
