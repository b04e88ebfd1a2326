"""``cxr-infer scan --html report.html``: one offline review page for a whole scan.

How it stays usable for 10,000 images (docs/review-page.md has the measurements):

- Images are small JPEG thumbnails in a folder beside the page (``report_files/``), never
  base64 inside it, and the ``<img>`` tags carry ``loading="lazy"``.
- The rows are data, not markup: one JSON block, parsed once; the table shows one page of rows
  (100 by default) built from it, so sorting or filtering 10,000 rows re-renders 100 rows.
- Sort, filter and page live in the URL (``?sort=confidence&dir=desc&show=errors&class=COVID``
  or the same after ``#``), so a view can be bookmarked, and tested without clicks.

Safety: every string from outside (file names, error messages, DICOM-derived text, model
metadata) reaches the page only inside that JSON block, in which ``<``, ``>`` and ``&`` are
written as ``\\u003c``-style escapes so no ``</script>`` can end it; the script builds the DOM
with ``textContent`` and never assigns data to ``innerHTML``. A Content-Security-Policy allows
only this page's own script (by hash), no network at all, and images from the local folder.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
from typing import Any

def embed_json(data: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no tag, comment or entity can
    start in it, and non-ASCII (U+2028 included) is escaped."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def row_flags(result: Any) -> list[str]:
    """Why a classified row deserves a look beyond its label: the input check's verdict (issue
    11's ``qc``) or a triage decision to refer (issue 13's ``triage``), where the result has them;
    the same rules as ``triage.py`` (a flagged input is one whose ``qc`` is not a pass)."""
    from .triage import REFER, qc_flagged

    flags = []
    qc = getattr(result, "qc", None)
    if qc_flagged(qc):
        flags.append(f"input check: {qc}")
    if getattr(result, "triage", None) == REFER:
        flags.append("triage: refer")
    return flags


def page_row(index: int, result: Any, classes: list[str], display: str, images: dict[str, str]) -> dict:
    """The compact record one table row is drawn from (short keys keep 10,000 rows small)."""
    pred = getattr(result, "prediction", None)
    row: dict[str, Any] = {"i": index, "p": display}
    if pred is not None:
        # an input the check calls not_chest_xray / not_frontal shows no class (docs/input-check.md)
        row["l"] = "" if getattr(pred, "diagnosis_withheld", False) else pred.label
        row["c"] = round(float(pred.confidence), 4)
        row["pr"] = [round(float(pred.probabilities[c]), 4) for c in classes]
    else:
        row["e"] = str(getattr(result, "error", None) or "error")
    for attr, key in (("qc", "q"), ("qc_score", "qs"), ("triage", "t")):
        v = getattr(result, attr, None)
        if v is not None:
            row[key] = round(float(v), 4) if isinstance(v, float) else str(v)
    flags = row_flags(result)
    if flags:
        row["f"] = flags
    row.update({k: v for k, v in images.items() if v})
    return row


def model_summary(model: Any) -> dict:
    """What the page says about the model: from the file's own metadata."""
    info = model.info
    ex = info.extra
    training = ex.get("training_data") if isinstance(ex.get("training_data"), dict) else {}
    metrics = ex.get("metrics") if isinstance(ex.get("metrics"), dict) else {}
    test = ((metrics.get("training") or {}).get("test") or {}) if isinstance(metrics.get("training"), dict) else {}
    from .session import cam_metadata

    cam = cam_metadata(info) or {}
    acc = test.get("accuracy") if isinstance(test, dict) else None
    accuracy = f"{100 * acc:.2f}% on {test.get('n', '?')} test images" if isinstance(acc, (int, float)) else None
    export = metrics.get("export") if isinstance(metrics.get("export"), dict) else {}
    mine = export.get(f"onnx_{info.precision}")
    if accuracy is None and isinstance(mine, dict) and isinstance(mine.get("accuracy"), (int, float)):
        images = export.get("images") if isinstance(export.get("images"), dict) else {}
        accuracy = f"{100 * mine['accuracy']:.2f}% on {images.get('n', '?')} images at export ({images.get('source', '?')})"
    return {
        "name": os.path.basename(str(model.path)),
        "precision": info.precision,
        "arch": info.arch,
        "classes": list(info.classes),
        "input": f"{info.preprocess.channels}x{info.preprocess.size}x{info.preprocess.size}, {info.preprocess.resize}",
        "training_data": str(training.get("name") or training.get("root") or "not recorded"),
        "test_accuracy": accuracy or "not recorded",
        "intended_use": str(ex.get("intended_use") or ""),
        "heatmaps": (f"class-activation map from layer {cam.get('layer')}, grid {cam.get('grid')}"
                     if cam.get("available") else "none in this model"),
        "created": str(ex.get("created") or ""),
    }


def write_page(path: "str | os.PathLike[str]", *, rows: list[dict], classes: list[str], model: dict,
               summary: dict, latency: dict, latency_text: str, page_size: int = 100) -> int:
    """Write the page atomically (a reader never sees half of it); returns its size in bytes."""
    data = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes, "model": model, "summary": summary, "latency": latency,
        "latency_text": latency_text, "page_size": page_size, "rows": rows,
    }
    script = _SCRIPT
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    html = (_TEMPLATE.replace("@CSP_HASH@", digest).replace("@STYLE@", _STYLE)
            .replace("@DATA@", embed_json(data)).replace("@SCRIPT@", script))
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(html)
    os.replace(tmp, path)
    return os.path.getsize(path)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'sha256-@CSP_HASH@'; style-src 'unsafe-inline'; img-src 'self' file:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cxr-infer review</title>
<style>@STYLE@</style>
</head>
<body>
<header>
  <h1 id="title">Chest X-ray review</h1>
  <p id="use" class="use"></p>
</header>
<p id="shift" class="banner" role="alert" hidden></p>
<section class="top">
  <div class="box"><h2>Results</h2><table id="counts" class="counts"></table></div>
  <div class="box"><h2>Model</h2><table id="model" class="kv"></table></div>
  <div class="box"><h2>Speed</h2><pre id="latency"></pre></div>
</section>
<nav id="controls">
  <label>Sort <select id="sort">
    <option value="order">scan order</option>
    <option value="confidence-asc">confidence, lowest first</option>
    <option value="confidence-desc">confidence, highest first</option>
    <option value="class-asc">predicted class</option>
    <option value="path-asc">file name</option>
  </select></label>
  <label>Show <select id="show">
    <option value="all">all files</option>
    <option value="classified">classified</option>
    <option value="flagged">flagged</option>
    <option value="errors">errors</option>
  </select></label>
  <label>Class <select id="class"><option value="">any</option></select></label>
  <span class="pager"><button id="prev" type="button">&#8249; previous</button>
  <span id="range"></span>
  <button id="next" type="button">next &#8250;</button></span>
</nav>
<p id="heatnote" class="note" hidden>Heatmap: a class-activation map of the predicted class. Red marks
where the model found the strongest evidence for that label in this image, blue the weakest (scaled within
each image; the probability says how strong). It shows what the model looked at, not a lesion outline.
Click a heatmap for the full-size figure with its colour scale.</p>
<table id="rows" class="rows"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<p id="empty" class="empty" hidden>No file matches this filter.</p>
<script type="application/json" id="cxr-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_STYLE = """
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;background:#f4f5f7}
header{background:#1d2b3a;color:#fff;padding:10px 18px}
h1{font-size:21px;margin:0}
.use{margin:4px 0 0;font-size:13px;color:#d4dbe3;max-width:1100px}
.top{display:flex;flex-wrap:wrap;gap:12px;padding:12px 18px}
.box{background:#fff;border:1px solid #d8dce1;border-radius:6px;padding:8px 12px;min-width:240px}
.box h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#5a6572;margin:0 0 6px}
.kv td,.counts td{padding:1px 8px 1px 0;vertical-align:top;font-size:13px}
.kv td:first-child,.counts td:first-child{color:#5a6572}
.counts td:last-child{text-align:right;font-weight:600}
pre{margin:0;font-size:12px;white-space:pre-wrap}
nav{position:sticky;top:0;background:#fff;border-top:1px solid #d8dce1;border-bottom:1px solid #d8dce1;
 padding:8px 18px;display:flex;gap:18px;align-items:center;flex-wrap:wrap;z-index:2}
select,button{font:inherit;padding:2px 6px}
.pager{margin-left:auto}
.rows{border-collapse:collapse;margin:0 18px 30px;background:#fff}
.rows th{position:sticky;top:46px;background:#eef0f3;font-size:12px;text-align:left;padding:6px 8px;border-bottom:1px solid #cfd4da}
.rows td{border-bottom:1px solid #e3e6ea;padding:6px 8px;vertical-align:middle;font-size:14px}
.rows td.num{text-align:right;font-variant-numeric:tabular-nums}
.rows img{display:block;width:140px;height:140px;object-fit:contain;background:#000;border-radius:3px}
.label{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;color:#fff}
.err{background:#b42318}.flag{color:#b54708;font-weight:600}
.bar{height:6px;background:#e3e6ea;border-radius:3px;margin-top:4px;width:90px}
.bar>i{display:block;height:6px;border-radius:3px;background:#1d2b3a}
.top1{font-weight:700}
.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all;max-width:420px}
.errmsg{color:#b42318;font-size:13px;font-family:system-ui,sans-serif}
.fname{font-weight:600;font-size:13px}
.dir{color:#6b7580}
.note{margin:8px 18px;font-size:13px;color:#3b4450;max-width:1100px}
tr.errrow td{background:#fff6f5}
.empty{margin:18px}
.banner{margin:12px 18px 0;padding:10px 14px;background:#fff4e5;border:2px solid #b54708;border-radius:6px;
 color:#7a2e0e;font-weight:600;max-width:1100px}
"""

_SCRIPT = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("cxr-data").textContent);
  const CLASSES = D.classes;
  const PALETTE = ["#7a2e8e", "#1f6f43", "#a15c00", "#1d4e89", "#8a1c1c", "#3c5a14", "#5b3a8c", "#00626b"];
  const $ = (id) => document.getElementById(id);
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function kvRow(table, k, v) {
    const tr = el("tr");
    tr.appendChild(el("td", k));
    tr.appendChild(el("td", v));
    table.appendChild(tr);
  }
  function pct(x) { return (100 * x).toFixed(1) + "%"; }
  function colour(label) { const i = CLASSES.indexOf(label); return PALETTE[(i < 0 ? 0 : i) % PALETTE.length]; }

  // ---- top: summary, model, latency
  const S = D.summary, M = D.model;
  $("title").textContent = "Chest X-ray review: " + S.files + " files" + (S.interrupted ? " (scan interrupted)" : "");
  $("use").textContent = M.intended_use;
  const counts = $("counts");
  CLASSES.forEach((c) => kvRow(counts, c, S.by_class[c] || 0));
  kvRow(counts, "errors", S.errors);
  kvRow(counts, "withheld (input check)", S.withheld || 0);
  kvRow(counts, "triage: refer", S.refer || 0);
  kvRow(counts, "triage: routine", S.routine || 0);
  if (S.shift) kvRow(counts, "shift check", S.shift.detected ? "DETECTED" : (S.shift.p_value === null ? "not run" : "none found"));
  if (S.shift && S.shift.detected) { $("shift").textContent = S.shift.message; $("shift").hidden = false; }
  kvRow(counts, "skipped (not images)", S.skipped);
  const mt = $("model");
  [["file", M.name], ["precision", M.precision], ["architecture", M.arch], ["input", M.input],
   ["trained on", M.training_data], ["test accuracy", M.test_accuracy], ["heatmaps", M.heatmaps],
   ["made", M.created]].forEach(([k, v]) => { if (v) kvRow(mt, k, v); });
  $("latency").textContent = D.latency_text;

  // ---- state: from ?query or #hash, so a view is a URL
  const params = new URLSearchParams(location.search.slice(1) + "&" + location.hash.slice(1));
  const st = {
    sort: params.get("sort") || "order",
    dir: params.get("dir") || "",
    show: params.get("show") || "all",
    cls: params.get("class") || "",
    page: Math.max(0, parseInt(params.get("page") || "1", 10) - 1) || 0,
  };
  if (st.sort.indexOf("-") > 0) { const p = st.sort.split("-"); st.sort = p[0]; st.dir = p[1]; }
  if (!st.dir) st.dir = st.sort === "confidence" ? "desc" : "asc";
  const clsSel = $("class");
  CLASSES.forEach((c) => { const o = el("option", c); o.value = c; clsSel.appendChild(o); });

  function syncControls() {
    const key = st.sort === "order" ? "order" : st.sort + "-" + st.dir;
    $("sort").value = key;
    if ($("sort").value !== key) $("sort").value = "order";
    $("show").value = st.show;
    clsSel.value = st.cls;
  }
  function saveState() {
    const h = new URLSearchParams();
    if (st.sort !== "order") { h.set("sort", st.sort); h.set("dir", st.dir); }
    if (st.show !== "all") h.set("show", st.show);
    if (st.cls) h.set("class", st.cls);
    if (st.page) h.set("page", String(st.page + 1));
    history.replaceState(null, "", location.pathname + location.search + (h.toString() ? "#" + h.toString() : ""));
  }

  function view() {
    let rows = D.rows.filter((r) => {
      if (st.show === "errors" && !("e" in r)) return false;
      if (st.show === "classified" && "e" in r) return false;
      if (st.show === "flagged" && !r.f) return false;
      if (st.cls && r.l !== st.cls) return false;
      return true;
    });
    const sgn = st.dir === "desc" ? -1 : 1;
    const cmp = {
      order: (a, b) => a.i - b.i,
      // files without a confidence (errors) go last in either direction
      confidence: (a, b) => (("c" in b) - ("c" in a)) || ((a.c || 0) - (b.c || 0)) * sgn || a.i - b.i,
      "class": (a, b) => ((a.l || "\uffff") < (b.l || "\uffff") ? -1 : (a.l || "\uffff") > (b.l || "\uffff") ? 1 : 0) * sgn
        || (("c" in b ? b.c : -1) - ("c" in a ? a.c : -1)) || a.i - b.i,
      path: (a, b) => (a.p < b.p ? -1 : a.p > b.p ? 1 : 0) * sgn || a.i - b.i,
    }[st.sort] || ((a, b) => a.i - b.i);
    rows = rows.slice().sort(cmp);
    return rows;
  }

  // ---- table
  const head = $("head");
  const hasHeat = D.rows.some((r) => r.hm);
  const hasQc = D.rows.some((r) => "q" in r || "t" in r || r.f);
  $("heatnote").hidden = !hasHeat;
  ["#", "X-ray"].concat(hasHeat ? ["heatmap"] : [], ["prediction", "confidence"], CLASSES.map((c) => "p(" + c + ")"),
    hasQc ? ["input check / triage"] : [], ["file"]).forEach((h) => head.appendChild(el("th", h)));

  let loaded = 0, failed = 0;
  function img(src, alt, href) {
    const im = el("img");
    im.loading = "lazy";
    im.decoding = "async";
    im.alt = alt;
    im.addEventListener("load", () => { loaded++; document.body.dataset.imagesLoaded = String(loaded); });
    im.addEventListener("error", () => { failed++; document.body.dataset.imagesFailed = String(failed); });
    im.src = src;
    if (!href) return im;
    const a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener";
    a.appendChild(im);
    return a;
  }

  function renderRow(r) {
    const tr = el("tr", null, "e" in r ? "errrow" : "");
    tr.dataset.index = String(r.i);
    tr.appendChild(el("td", r.i + 1, "num"));
    const tdImg = el("td");
    if (r.th) tdImg.appendChild(img(r.th, "X-ray thumbnail", null));
    tr.appendChild(tdImg);
    if (hasHeat) {
      const td = el("td");
      if (r.hm) td.appendChild(img(r.hm, "heatmap for " + r.l, r.hf || null));
      tr.appendChild(td);
    }
    if ("e" in r) {
      tr.appendChild(el("td")).appendChild(el("span", "ERROR", "label err"));
      tr.appendChild(el("td"));
      CLASSES.forEach(() => tr.appendChild(el("td")));
    } else {
      const lab = el("span", r.l, "label");
      lab.style.background = colour(r.l);
      tr.appendChild(el("td")).appendChild(lab);
      const tdc = el("td", pct(r.c), "num");
      const bar = el("div", null, "bar"), fill = el("i");
      fill.style.width = Math.round(100 * r.c) + "%";
      bar.appendChild(fill);
      tdc.appendChild(bar);
      tr.appendChild(tdc);
      r.pr.forEach((p, k) => tr.appendChild(el("td", p.toFixed(3), CLASSES[k] === r.l ? "num top1" : "num")));
    }
    if (hasQc) {
      const td = el("td");
      if ("q" in r) td.appendChild(el("div", r.q + ("qs" in r ? " (" + r.qs + ")" : "")));
      if ("t" in r && (r.f || []).indexOf("triage: " + r.t) < 0) td.appendChild(el("div", "triage: " + r.t));
      (r.f || []).forEach((f) => td.appendChild(el("div", f, "flag")));
      tr.appendChild(td);
    }
    const tdp = el("td", null, "path");
    const cut = r.p.lastIndexOf("/") + 1;
    tdp.appendChild(el("div", r.p.slice(cut), "fname"));
    if (cut > 0) tdp.appendChild(el("div", r.p.slice(0, cut), "dir"));
    if ("e" in r) tdp.appendChild(el("div", r.e, "errmsg"));
    tr.appendChild(tdp);
    return tr;
  }

  function render() {
    const rows = view();
    const per = D.page_size;
    const pages = Math.max(1, Math.ceil(rows.length / per));
    st.page = Math.min(st.page, pages - 1);
    const start = st.page * per, end = Math.min(rows.length, start + per);
    const body = $("body");
    const frag = document.createDocumentFragment();
    for (let k = start; k < end; k++) frag.appendChild(renderRow(rows[k]));
    body.replaceChildren(frag);
    $("range").textContent = rows.length ? "rows " + (start + 1) + "\u2013" + end + " of " + rows.length
      + (rows.length !== D.rows.length ? " (filtered from " + D.rows.length + ")" : "") : "0 rows";
    $("prev").disabled = st.page === 0;
    $("next").disabled = st.page >= pages - 1;
    $("empty").hidden = rows.length > 0;
    document.body.dataset.rowsShown = String(end - start);
    document.body.dataset.rowsMatching = String(rows.length);
    syncControls();
    saveState();
  }

  $("sort").addEventListener("change", (ev) => {
    const v = ev.target.value;
    if (v === "order") { st.sort = "order"; st.dir = "asc"; } else { const p = v.split("-"); st.sort = p[0]; st.dir = p[1]; }
    st.page = 0; render();
  });
  $("show").addEventListener("change", (ev) => { st.show = ev.target.value; st.page = 0; render(); });
  clsSel.addEventListener("change", (ev) => { st.cls = ev.target.value; st.page = 0; render(); });
  $("prev").addEventListener("click", () => { st.page--; render(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", () => { st.page++; render(); window.scrollTo(0, 0); });
  render();
  document.body.dataset.ready = "1";
  document.body.dataset.readyMs = String(Math.round(performance.now()));
})();
"""
