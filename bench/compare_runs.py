"""Print a markdown table comparing cxr-train run dirs from their test reports.

Usage: python bench/compare_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    rows = []
    classes: list[str] = []
    for d in argv:
        rep_file = Path(d) / "test_report.json"
        if not rep_file.is_file():
            print(f"skip {d}: no test_report.json", file=sys.stderr)
            continue
        rep = json.loads(rep_file.read_text())
        classes = classes or rep["classes"]
        rows.append(rep)
    if not rows:
        return 1
    head = ["arch", "px", "epochs", "test acc", "macro-F1"] + [f"sens {c}" for c in classes] + [
        "shift acc drop (pts)", "params (M)", "s/epoch"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in sorted(rows, key=lambda r: -r["macro_f1"]):
        shift = r.get("acquisition_shift", {}).get("accuracy_drop_points")
        cells = [r["arch"], str(r["image_size"]), str(r.get("epochs_run", "?")), f"{100 * r['accuracy']:.2f}%",
                 f"{r['macro_f1']:.4f}"] + [f"{r['per_class'][c]['sensitivity']:.3f}" for c in classes] + [
                 "-" if shift is None else f"{shift:.2f}", f"{r['parameters'] / 1e6:.2f}",
                 "-" if r.get("mean_epoch_seconds") is None else f"{r['mean_epoch_seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
