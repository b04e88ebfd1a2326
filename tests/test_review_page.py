"""``cxr-infer scan --html``: the offline review page, as written and as a browser shows it.

The browser half opens the page in headless Chromium (Debian's ``chromium`` package; ``.ci/run``
installs it) and reads the DOM after the page's script ran (``--dump-dom``). Sort and filter
come from the URL (``?sort=confidence&dir=asc``), so no clicks are needed. A screenshot is kept
under pytest's tmp dir, and copied to ``$CXR_SCREENSHOT_DIR`` when that is set.
"""

from __future__ import annotations

import csv
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime.cli import cli
from cxr.runtime.review_page import embed_json
from synthetic import shaded, write_bad_files
from tiny_cam_model import build_tiny_cam_model

XSS_ALERT = "<img src=x onerror=alert(1)>.png"
XSS_MARK = "<img src=x onerror=document.body.setAttribute('data-pwned','1')>.png"
BREAKOUT = "</script><script>document.body.setAttribute('data-pwned','2')</script><b>bold</b>"


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A scan of patterned films, hostile names and bad files with --heatmaps and --html."""
    base = tmp_path_factory.mktemp("review")
    model = build_tiny_cam_model(base / "cam.onnx", size=32, grid=4, intended_use=BREAKOUT)
    src = base / "films"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, level in enumerate((15, 60, 120, 128, 190, 240, 250, 100)):
        # smooth shading with mild noise: white noise alone is what the input check calls noise-like
        a = np.clip(shaded(220, 180, level, 20) + rng.normal(0, 3, (180, 220)), 0, 255).astype(np.uint8)
        a[40:90, 30:100] = 255 - level  # a patch of the opposite brightness: where the map must glow
        Image.fromarray(a).save(src / f"film{i}.png")
    Image.fromarray(shaded(64, 64, 240)).save(src / XSS_ALERT)  # not blank: a blank image gets no class
    Image.fromarray(shaded(64, 64, 20)).save(src / XSS_MARK)
    bad = write_bad_files(src / "bad")
    page = base / "out" / "report.html"
    res = CliRunner().invoke(cli, ["scan", str(src), "--model", str(model), "--format", "csv",
                                   "--heatmaps", str(base / "out" / "heatmaps"), "--html", str(page)])
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    return res, page, rows, len(bad)


def _data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="cxr-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def test_page_written_with_one_row_per_file(scanned):
    res, page, rows, n_bad = scanned
    assert res.exit_code == 1  # error rows, as without --html
    assert f"review page: {page}" in res.stderr
    d = _data(page)
    assert len(d["rows"]) == len(rows) == 10 + n_bad
    assert [r["p"] for r in d["rows"]] == [r["path"] for r in rows]  # scan order = stdout order
    by_path = {r["path"]: r for r in rows}
    for r in d["rows"]:
        c = by_path[r["p"]]
        if c["status"] == "ok":
            assert r["l"] == c["prediction"] and abs(r["c"] - float(c["confidence"])) < 1e-4
            assert len(r["pr"]) == 3 and r["th"] and r["hm"] and r["hf"].startswith("heatmaps/")
            assert (page.parent / r["th"]).is_file() and (page.parent / r["hf"]).is_file()
        else:
            assert r["e"] == c["error"] and "th" not in r
    s = d["summary"]
    assert s["files"] == len(rows) and s["errors"] == n_bad and sum(s["by_class"].values()) == 10
    assert d["model"]["name"] == "cam.onnx" and "grid [4, 4]" in d["model"]["heatmaps"]
    assert d["latency"]["images_classified"] == 10 and "warm per-image" in d["latency_text"]
    thumbs = list((page.parent / "report_files").iterdir())
    assert len(thumbs) == 20 and all(t.suffix == ".jpg" and t.stat().st_size < 20_000 for t in thumbs)


def test_outside_strings_cannot_become_markup(scanned):
    _, page, _, _ = scanned
    raw = page.read_text(encoding="utf-8")
    assert raw.count("</script>") == 2  # the data block's end and the code's end, nothing more
    assert "<img src=x" not in raw and "<b>bold</b>" not in raw
    assert "innerHTML" not in raw and "insertAdjacentHTML" not in raw and "document.write" not in raw
    assert "http://" not in raw and "https://" not in raw  # nothing to fetch: works offline
    d = _data(page)
    assert d["model"]["intended_use"] == BREAKOUT and XSS_ALERT in {os.path.basename(r["p"]) for r in d["rows"]}
    assert embed_json({"a": "</script>&\u2028"}) == '{"a":"\\u003c/script\\u003e\\u0026\\u2028"}'


def test_result_fields_of_later_issues_show_when_present():
    from cxr.runtime.engine import Prediction, ScanResult
    from cxr.runtime.review_page import page_row

    class WithQc(ScanResult):
        qc, qc_score, triage = "out_of_distribution", 0.93, "refer"

    pred = Prediction("COVID", 0.9, {"COVID": 0.9, "Normal": 0.1})
    plain = page_row(0, ScanResult("a.png", pred), ["COVID", "Normal"], "a.png", {})
    assert plain["q"] == "unchecked" and "f" not in plain  # a model without an input check
    row = page_row(1, WithQc("b.png", pred), ["COVID", "Normal"], "b.png", {})
    assert row["q"] == "out_of_distribution" and row["qs"] == 0.93 and row["t"] == "refer"
    assert row["f"] == ["input check: out_of_distribution", "triage: refer"]


# --------------------------------------------------------------------------- in a browser

def _chromium() -> str:
    for cand in (os.environ.get("CXR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    pytest.skip("no Chromium found (apt-get install chromium, or set CXR_CHROMIUM): the review page "
                "was not checked in a browser")


def _browser(tmp: Path, url: str, *extra: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--window-size=1400,3000",
           *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class _Rows(html.parser.HTMLParser):
    """The body's attributes and the table rows (data-index and cell texts) of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.body: dict = {}
        self.rows: list[tuple[int, list[str]]] = []
        self.imgs: list[dict] = []
        self._cell: list[str] | None = None
        self._cells: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "tr" and "data-index" in a:
            self.rows.append((int(a["data-index"]), []))
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _dom(tmp: Path, page: Path, query: str = "") -> _Rows:
    p = _Rows()
    p.feed(_browser(tmp, page.as_uri() + query, "--dump-dom"))
    assert p.body.get("data-ready") == "1", "the page's script did not finish"
    return p


def test_browser_shows_rows_images_and_names_as_text(scanned, tmp_path):
    _, page, rows, _ = scanned
    raw = _browser(tmp_path, page.as_uri(), "--dump-dom")
    dom = _Rows()
    dom.feed(raw)
    assert dom.body.get("data-ready") == "1"
    assert len(dom.rows) == len(rows) == int(dom.body["data-rows-shown"])
    # every thumbnail and heatmap on the page loaded from the folder beside it
    assert len(dom.imgs) == 20 and all(i.get("loading") == "lazy" for i in dom.imgs)
    assert dom.body.get("data-images-loaded") == "20" and "data-images-failed" not in dom.body
    # the hostile names are text in the file column; no element came out of them, no script ran
    files = [cells[-1] for _, cells in dom.rows]
    assert any(f.startswith(XSS_ALERT) for f in files) and any(f.startswith(XSS_MARK) for f in files)
    assert "data-pwned" not in dom.body and all(i.get("src") != "x" for i in dom.imgs)
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in raw
    assert BREAKOUT.replace("<", "&lt;").replace(">", "&gt;") in raw  # metadata shown as text
    assert "<title>cxr-infer review</title>" in raw


def test_browser_sorts_and_filters_from_the_url(scanned, tmp_path):
    _, page, rows, n_bad = scanned
    conf = {i: float(r["confidence"]) for i, r in enumerate(rows) if r["status"] == "ok"}
    dom = _dom(tmp_path, page, "?sort=confidence&dir=asc")
    order = [i for i, _ in dom.rows]
    assert order[:len(conf)] == sorted(conf, key=lambda i: (conf[i], i))  # lowest confidence first
    assert all(rows[i]["status"] == "error" for i in order[len(conf):])  # no confidence: last
    dom = _dom(tmp_path, page, "#sort=class&dir=asc")
    labels = [rows[i]["prediction"] or "\uffff" for i, _ in dom.rows]
    assert labels == sorted(labels)
    dom = _dom(tmp_path, page, "?show=errors")
    assert len(dom.rows) == n_bad and all(rows[i]["status"] == "error" for i, _ in dom.rows)
    assert all("ERROR" in cells[3] for _, cells in dom.rows)  # X-ray, heatmap, then the verdict
    want = [i for i, r in enumerate(rows) if r["prediction"] == "COVID"]
    dom = _dom(tmp_path, page, "?class=COVID&sort=confidence&dir=desc")
    assert sorted(i for i, _ in dom.rows) == want and want


def test_browser_screenshot(scanned, tmp_path):
    _, page, _, _ = scanned
    shot = tmp_path / "review-page.png"
    _browser(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1400,1100")
    img = Image.open(shot)
    assert img.size == (1400, 1100)
    assert len(img.convert("RGB").resize((140, 110)).getcolors(140 * 110)) > 50  # a rendered page, not blank
    dest = os.environ.get("CXR_SCREENSHOT_DIR")
    if dest:
        os.makedirs(dest, exist_ok=True)
        shutil.copy(shot, os.path.join(dest, shot.name))
