"""The leave-one-source-out table, from the ``cxr-infer bench`` JSON files bench/loso.py wrote.

    python bench/loso_summary.py runs/loso        # Markdown on stdout

One row per left-out source: what the model trained without it does on the whole folder (it saw
none of it), beside what the model trained on every source does on that source's held-out test
split. Triage figures count every folder not named Normal as abnormal, classes the model has
no name for included.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALL = "all-sources"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _row(bench: dict, source: str | None) -> dict:
    m = bench["models"][0] if "models" in bench else bench["rows"][0]
    t = m.get("triage") or {}
    real = (t.get("realised_by_source") or {}).get(source) if source else None
    real = real or t.get("realised") or {}
    by_src = m.get("by_source") or {}
    acc = (by_src.get(source) or {}).get("accuracy") if source and source in by_src else m.get("accuracy")
    qc = (m.get("input_check") or {}).get("xray_per_source") or {}
    q = qc.get(source) if source and source in qc else (next(iter(qc.values())) if len(qc) == 1 else None)
    return {"n": real.get("n"), "n_abnormal": real.get("n_abnormal"), "n_normal": real.get("n_normal"),
            "sensitivity": real.get("sensitivity"), "specificity": real.get("specificity"), "accuracy": acc,
            "flagged": (q or {}).get("flagged_share"), "classes": m.get("classes"),
            "by_class": t.get("realised_by_class") or {}, "unknown": m.get("unknown_labels") or {}}


def summarise(out: Path, names: list[str] | None = None) -> str:
    out = Path(out)
    if names is None:
        names = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != ALL)
    ref_file = out / ALL / "bench-test.json"
    ref = json.loads(ref_file.read_text()) if ref_file.is_file() else None
    lines = ["| left out | its films | trained on classes | abnormal referred | normals routine | accuracy (known classes) "
             "| flagged by the input check | same source in training (test split): abnormal referred / normals routine / accuracy |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    notes = []
    for name in names:
        f = out / name / "bench-heldout.json"
        if not f.is_file():
            lines.append(f"| {name} | not run yet | | | | | | |")
            continue
        r = _row(json.loads(f.read_text()), None)
        inside = "-"
        if ref is not None:
            q = _row(ref, name)
            inside = f"{_pct(q['sensitivity'])} / {_pct(q['specificity'])} / {_pct(q['accuracy'])}"
        films = f"{r['n']} ({r['n_abnormal']} abnormal)"
        lines.append(f"| {name} | {films} | {', '.join(r['classes'] or [])} | {_pct(r['sensitivity'])} | "
                     f"{_pct(r['specificity'])} | {_pct(r['accuracy'])} | {_pct(r['flagged'])} | {inside} |")
        for c, x in r["by_class"].items():
            notes.append(f"- without {name}: {c} films referred {_pct(x['sensitivity'])} of {x['n_abnormal']}"
                         + (" (a class the model has no name for)" if c in r["unknown"] else ""))
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1])))
