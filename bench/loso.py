"""Leave-one-source-out: train without a source, then scan that source as a new hospital would.

For every source folder given, one run trains on all the others (same recipe, same seed, so the
other sources keep their split image for image), exports fp32 with calibration, triage points and
the input check fitted on those sources only, and scans the **whole** left-out folder with
``cxr-infer bench`` (it never saw any of it). One reference run trains on every source and is
scanned on each source's held-out test split, so every row has an in-source figure beside the
out-of-source one. Each step is skipped when its output exists, so the script resumes.

    python bench/loso.py ../shared/data/covid-radiography-3class ../shared/data/covid-radiography-lung-opacity \\
        ../shared/data/covid-radiography-pediatric-normal ../shared/data/normal-other-sources --out runs/loso
    python bench/loso.py ... --out runs/loso --summary-only     # the table from what is done

The default configuration is the cheap one this 2-core CPU affords (MobileNetV3-Small at 128 px,
6 epochs from scratch, one thread): a stand-in for the shipped recipe, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ALL = "all-sources"


def run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "a") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if r.returncode not in (0, 3):  # 3: the input check withheld some films, the report is complete
        raise SystemExit(f"error: {cmd[0]} failed with exit {r.returncode}; see {log}")


def one_run(name: str, train_dirs: list[Path], out: Path, args) -> Path:
    """Train + export one configuration; returns the fp32 model path."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    log = d / "log.txt"
    if not (d / "best.pt").is_file() or not (d / "test_report.json").is_file():
        cmd = ["cxr-train", *sum((["--data", str(p)] for p in train_dirs), []), "--out", str(d),
               "--arch", args.arch, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
               "--warmup-epochs", "0.3", "--patience", "0", "--select", "mean_group_sensitivity",
               "--threads", str(args.threads), "--no-shift-eval", "--dataset-name", f"loso-{name}"]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
        if (d / "last.pt").is_file():
            cmd.append("--resume")
        run(cmd, log)
    model = d / "model.onnx"
    if not model.is_file():
        run(["cxr-export", str(d / "best.pt"), "--out", str(model), "--no-bench", "--no-card",
             "--parity-limit", "128"], log)
    return model


def bench(model: Path, dirs: list[Path], json_out: Path, log: Path, split: Path | None = None) -> dict:
    if not json_out.is_file():
        cmd = ["cxr-infer", "bench", *map(str, dirs), "--model", str(model), "--json", str(json_out),
               "--runs", "10", "--threads", str(args_threads), "--workers", "1"]
        if split is not None:
            cmd += ["--split", str(split)]
        run(cmd, log)
    return json.loads(json_out.read_text())


args_threads = 1


def main(argv=None) -> int:
    global args_threads
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", type=Path, help="one folder per source")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="mobilenet_v3_small")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir")
    ap.add_argument("--only", action="append", help="run only this held-out source (repeatable; 'all-sources' for the reference)")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    args_threads = args.threads
    sources = [p.resolve() for p in args.sources]
    names = [p.name for p in sources]
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(n, [s for s in sources if s.name != n]) for n in names] + [(ALL, sources)]
    if not args.summary_only:
        for name, train_dirs in plan:
            if args.only and name not in args.only:
                continue
            model = one_run(name, train_dirs, args.out, args)
            d = args.out / name
            if name == ALL:
                bench(model, sources, d / "bench-test.json", d / "log.txt", split=d / "split.json")
            else:
                held = next(s for s in sources if s.name == name)
                bench(model, [held], d / "bench-heldout.json", d / "log.txt")
    from loso_summary import summarise  # noqa: E402  (beside this file)
    print(summarise(args.out, names))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
