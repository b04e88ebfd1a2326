"""Human-readable model card, generated from the ONNX file's metadata alone.

The card is derived, never edited by hand: the file is the source of truth (DESIGN.md), so a
card can always be regenerated for a shipped model with ``write_model_card(path)`` or
``python -m cxr.export.card MODEL.onnx``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx

from cxr.runtime.metadata import decode_props

from .triage_card import card_lines, probability_note

DATABASE_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
CITATIONS = [
    "M. E. H. Chowdhury et al., \"Can AI help in screening viral and COVID-19 pneumonia?\", "
    "IEEE Access 8, 132665-132676 (2020).",
    "T. Rahman et al., \"Exploring the effect of image enhancement techniques on COVID-19 detection "
    "using chest X-ray images\", Computers in Biology and Medicine 132, 104319 (2021).",
]
DEGRAVE = ("A. J. DeGrave, J. D. Janizek, S.-I. Lee, \"AI for radiographic COVID-19 detection selects "
           "shortcuts over signal\", Nature Machine Intelligence 3, 610-619 (2021).")


def _json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _is_covid_radiography(classes: list[str], training: dict) -> bool:
    srcs = " ".join(f"{s.get('name', '')} {s.get('root', '')}" for s in training.get("sources") or [])
    name = f"{training.get('name', '')} {training.get('root', '')} {srcs}".lower()
    return ("covid" in name and "radiography" in name) or (
        set(classes) <= set(DATABASE_CLASSES) and "COVID" in classes)


def _metrics_rows(classes: list[str], rows: list[tuple[str, dict]]) -> list[str]:
    head = ["", "n", "accuracy %", "macro-F1 %"] + [f"sensitivity {c} %" for c in classes]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows:
        sens = m.get("sensitivity") or {c: (v or {}).get("sensitivity") for c, v in (m.get("per_class") or {}).items()}
        out.append("| " + " | ".join([label, str(m.get("n", "-")), _pct(m.get("accuracy")), _pct(m.get("macro_f1"))]
                                     + [_pct(sens.get(c)) for c in classes]) + " |")
    return out


def _by_source_rows(classes: list[str], label: str, by: dict) -> list[str]:
    """One row per source: n, accuracy and each class's sensitivity within it ('-': absent there)."""
    out = []
    for src, r in by.items():
        cells = [f"{label}: {src}" if label else src, str(r.get("n", "-")), _pct(r.get("accuracy"))]
        for c in classes:
            v = (r.get("per_class") or {}).get(c)
            cells.append(f"{_pct(v['sensitivity'])} (n={v['n']})" if v else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _by_source_table(classes: list[str], rows: list[tuple[str, dict]]) -> list[str]:
    head = ["source", "n", "accuracy %"] + [f"sensitivity {c} %" for c in classes]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by in rows:
        out += _by_source_rows(classes, label, by)
    return out


def model_card(raw_props: dict[str, str], name: str = "model") -> str:
    """Markdown text of the card for a model with these ``metadata_props``."""
    info = decode_props(raw_props)
    x = info.extra
    classes = info.classes
    pp = info.preprocess
    training = _json(x.get("training_data")) or {}
    metrics = _json(x.get("metrics")) or {}
    parity = _json(x.get("parity")) or {}
    quant = _json(x.get("quantization")) or {}
    reproduce = _json(x.get("reproduce")) or {}
    export = _json(x.get("export")) or {}
    db = _is_covid_radiography(classes, training)

    L = [f"# Model card: {name}", ""]
    L += ["| | |", "|---|---|",
          f"| architecture | {info.arch} |",
          f"| precision | {info.precision} |",
          f"| classes (output order) | {', '.join(classes)} |",
          f"| input | `{info.input_name or 'image'}` float32 [N, {pp.channels}, {pp.size}, {pp.size}] |",
          f"| output | `{info.output}` (softmax probabilities, one per class) |",
          f"| preprocessing | grayscale, resize `{pp.resize}` ({pp.interpolation}) to {pp.size}x{pp.size}, "
          f"(x/255 - {pp.mean}) / {pp.std} |",
          f"| created | {x.get('created', '-')} |",
          f"| producer | {x.get('producer', '-')} |"]
    if export:
        L.append(f"| ONNX export | {export.get('exporter', '-')} exporter, opset {export.get('opset', '-')} |")
    L.append(f"| checkpoint sha256 | `{x.get('checkpoint_sha256', '-')}` |")
    L += ["", "## Intended use and limits", "", x.get("intended_use", "Research use only; not a diagnosis."), ""]
    L += ["- A research and triage aid, **not a diagnosis**: every output needs review by a qualified reader.",
          f"- It knows exactly {len(classes)} classes ({', '.join(classes)}) and always answers with one of "
          + ("them; findings outside these classes (other diseases, devices) are not detected. Images that are "
             "not frontal chest X-rays are flagged by the input check below and shown without a class."
             if x.get("input_check") else
             "them; findings outside these classes (other diseases, devices, non-chest images) are not detected."),
          probability_note(x)]
    if db:
        if "Lung_Opacity" not in classes:
            L.append("- The training data had no Lung_Opacity images (the database's fourth class): "
                     "non-COVID lung opacities will be forced into one of the classes above.")
        L.append("- Source bias: each class of the COVID-19 Radiography Database comes largely from different "
                 "sources (Viral Pneumonia and part of Normal are paediatric images), so a model can learn the "
                 "source instead of the disease (DeGrave et al. 2021). Expect lower accuracy on X-rays from other "
                 "hospitals than the numbers below; validate locally before any use.")
    else:
        L.append("- Accuracy was measured on held-out images from the training database only; "
                 "validate on local data before any use.")

    L += ["", "## Training data", ""]
    if training:
        sources = training.get("sources") or []
        where = ", ".join(f"`{s.get('name')}`" for s in sources) if sources else f"`{training.get('root', '-')}`"
        L.append(f"- dataset: {training.get('name', '-')} (sources: {where})")
        scc = training.get("source_class_counts") or {}
        if scc:
            L.append("- images per (source, class), train/val/test:")
            for src, per in scc.items():
                cells = []
                for c in classes:
                    n = [per.get(sp, {}).get(c, 0) for sp in ("train", "val", "test")]
                    if any(n):
                        cells.append(f"{c} {n[0]}/{n[1]}/{n[2]}")
                L.append(f"  - {src}: " + (", ".join(cells) or "none"))
        missing = training.get("missing_combinations")
        if missing:
            L.append("- **never seen in training** (class, source): "
                     + "; ".join(f"{m['class']} from {m['source']}" for m in missing)
                     + ". The model has no evidence for these combinations: for example, a class that only "
                       "one source contributes may be recognised partly by that source's look.")
        if training.get("class_counts"):
            L.append("- images per class: " + ", ".join(f"{k} {v}" for k, v in training["class_counts"].items()))
        if training.get("split_sizes"):
            L.append("- split: " + ", ".join(f"{k} {v}" for k, v in training["split_sizes"].items())
                     + " (test images never used for choosing anything)")
        sha = training.get("manifest_sha256") or training.get("manifest_sha256_export")
        if sha:
            L.append(f"- split manifest: `{training.get('manifest', 'split.json')}` sha256 `{sha}`")
    else:
        L.append("- not recorded in this file")

    L += ["", "## Metrics", ""]
    tm = (metrics.get("training") or {}).get("test")
    if tm:
        L.append("Held-out test split, measured by cxr-train (PyTorch):")
        L.append("")
        if isinstance(tm, dict) and "accuracy" in tm:
            L += _metrics_rows(classes, [("PyTorch (training)", tm)])
            if tm.get("by_source"):
                L += ["", "By source (an accuracy pooled over sources can hide one the model fails on):", ""]
                L += _by_source_table(classes, [("", tm["by_source"])])
        else:
            L += ["```", json.dumps(tm, indent=1, default=str)[:3000], "```"]
        L.append("")
    ex = metrics.get("export") or {}
    rows = [(label, ex[key]) for key, label in (("pytorch", "PyTorch"), ("onnx_fp32", "ONNX fp32"),
                                                ("onnx_int8", "ONNX int8")) if ex.get(key)]
    if rows:
        imgs = ex.get("images") or {}
        L.append(f"Export check on {imgs.get('n', '?')} images ({imgs.get('source', '?')}), same images for every row:")
        L.append("")
        if any(r.get("accuracy") is not None for _, r in rows):
            L += _metrics_rows(classes, rows)
            L.append("")
            by_rows = [(label, r["by_source"]) for label, r in rows if r.get("by_source")]
            if by_rows:
                L += ["By source, same images:", ""]
                L += _by_source_table(classes, by_rows)
                L.append("")
        L += ["| | size MB | latency p50 batch 1 ms | throughput batch 32 img/s |", "|---|---|---|---|"]
        for label, r in rows:
            size = r.get("size_bytes")
            L.append(f"| {label} | {'-' if size is None else f'{size / 1e6:.2f}'} | "
                     f"{r.get('latency_ms_p50_b1') or '-'} | {r.get('throughput_ips_b32') or '-'} |")
        cpu = ex.get("measured_on") or {}
        if cpu:
            L.append("")
            L.append(f"Speed measured on {cpu.get('model')} ({cpu.get('cores')} cores, "
                     f"VNNI {'yes' if cpu.get('vnni') else 'no'}); expect different numbers elsewhere.")
    if not tm and not rows:
        L.append("No metrics recorded in this file.")

    L += card_lines(x)

    L += ["", "## Export checks", ""]
    fp32_par = parity.get("fp32", parity) if isinstance(parity, dict) else {}
    if fp32_par.get("max_abs_diff") is not None:
        L.append(f"- fp32 ONNX vs PyTorch on {fp32_par.get('n_images')} real images ({fp32_par.get('source')}): "
                 f"max |Δp| {fp32_par['max_abs_diff']:.2g} (tolerance {fp32_par.get('tolerance_max_abs_diff')}), "
                 f"mean |Δp| {fp32_par.get('mean_abs_diff', 0):.2g}, top-1 agreement {_pct(fp32_par.get('top1_agreement'))}%.")
    if quant:
        val = quant.get("validation") or {}
        cal = quant.get("calibration") or {}
        kept = quant.get("nodes_kept_float") or {}
        L.append(f"- int8: onnxruntime static quantization, {quant.get('format', 'QDQ')}, scheme `{quant.get('name')}` "
                 f"(activations {quant.get('activation_type')}, weights {quant.get('weight_type')} per-channel, "
                 f"reduce_range {quant.get('reduce_range')}, calibration {quant.get('calibration_method')} on "
                 f"{cal.get('count')} {cal.get('source_split', 'train')}-split images).")
        L.append(f"- int8 vs fp32 on {val.get('n')} validation images: accuracy {_pct(val.get('accuracy'))}% vs "
                 f"{_pct(val.get('fp32_accuracy'))}% (drop {val.get('accuracy_drop_points')} points), top-1 agreement "
                 f"{_pct(val.get('top1_agreement'))}%; bound: drop <= {(quant.get('bound') or {}).get('max_accuracy_drop_points')} "
                 f"points, agreement >= {(quant.get('bound') or {}).get('min_agreement_percent')}%.")
        L.append(f"- nodes kept in float: {', '.join(f'{k} ({v})' for k, v in kept.items()) or 'none'}.")
    cam = x.get("cam")
    cam = cam if isinstance(cam, dict) else {}
    if cam.get("available"):
        cp = cam.get("parity") or {}
        f32, i8 = cp.get("fp32_vs_pytorch") or {}, cp.get("int8_vs_fp32") or {}
        line = (f"- heatmaps: output `{cam.get('output')}` [N, K, {', '.join(map(str, cam.get('grid') or []))}], "
                f"class-activation maps from layer `{cam.get('layer')}`")
        if f32:
            line += f"; fp32 vs PyTorch worst cell {f32.get('max_rel_diff', 0):.2g} of the map's range"
        if i8:
            line += (f"; int8 vs fp32 p95 worst cell {i8.get('p95_rel_diff', 0):.2g} of the range, hottest cell "
                     f"the same in {_pct(i8.get('peak_agreement'))}% of maps")
        L.append(line + " (docs/heatmaps.md).")
    elif cam:
        L.append(f"- heatmaps: none ({cam.get('reason')}).")

    from .input_check_report import card_lines as input_check_lines

    L += input_check_lines(x.get("input_check"))

    L += ["", "## Reproduce", ""]
    cmds = [c for c in (reproduce.get("train"), reproduce.get("export")) if c] if isinstance(reproduce, dict) else []
    if cmds:
        L += ["```sh", *cmds, "```"]
    else:
        L.append("Commands not recorded in this file.")
    if isinstance(reproduce, dict) and reproduce.get("train_config") and not reproduce.get("train"):
        L += ["", "Training configuration (from the checkpoint):", "", "```json",
              json.dumps(reproduce["train_config"], indent=1, sort_keys=True, default=str), "```"]

    refs = (CITATIONS + [DEGRAVE]) if db else []
    if refs:
        L += ["", "## References", ""]
        if db:
            L.append("Cite both database papers when reporting results of this model:")
            L.append("")
        L += [f"- {r}" for r in refs]
    return "\n".join(L) + "\n"


def write_model_card(onnx_path: "str | os.PathLike[str]", out: "str | os.PathLike[str] | None" = None) -> Path:
    """Write ``MODEL.card.md`` (or ``out``) beside the model; returns its path."""
    p = Path(onnx_path)
    model = onnx.load(str(p), load_external_data=False)
    props = {m.key: m.value for m in model.metadata_props}
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    dest = Path(out) if out else p.with_name(stem + ".card.md")
    dest.write_text(model_card(props, name=p.name))
    return dest


if __name__ == "__main__":  # pragma: no cover
    for arg in sys.argv[1:]:
        print(write_model_card(arg))
