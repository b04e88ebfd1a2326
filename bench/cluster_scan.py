"""A cluster scan (``cxr-infer scan --scheduler``) against a local scan of the same files.

Not part of the test run. For each number of files, the first N files of DATA (in the scan's
own order, as symlinks in a temporary folder) are scanned once locally and then on a local Dask
cluster of W worker processes (the machine's cores split between them) for each shard size.
The cluster is started once per W, before its runs, and kept warm across them, as a long-lived
cluster would be: the per-run figures hold no cluster start-up (printed apart), and each worker
opens its session once, in its first run. Every run is a fresh ``cxr-infer`` process; its whole
wall time and the scan's own ``wall_s`` (from ``--report``) are both printed. Every cluster run's
CSV is compared with the local one, byte for byte.

The configurations run in rounds (each once per round, the local scan first), and each cluster
run is divided by the local run of its round: on a shared machine whose load drifts, the paired
ratio means more than either time. The cost of a shard is the least-squares slope of the scan's
wall time over the number of shards (same files, same workers, shard sizes varied): what cutting
the scan into Dask tasks costs per task. With one worker that holds every core the cluster does
what the local scan does plus the transport; with several workers on two cores nothing can be
gained, only the same cores split.

    python bench/cluster_scan.py DATA [--model M.onnx] [--files 1000,4000] [--shard-sizes 100,500,2000]
        [--workers 1,2] [--repeat 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _subset(data: list[str], n: int, root: Path) -> Path:
    """A folder of symlinks to the first ``n`` files (zero-padded names keep their order)."""
    folder = root / f"files-{n}"
    folder.mkdir()
    for i, src in enumerate(data[:n]):
        os.symlink(os.path.abspath(src), folder / f"{i:07d}{os.path.splitext(src)[1].lower()}")
    return folder


def _scan(args: list[str], out: Path, report: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "cxr.runtime.cli", "scan", *args, "-o", str(out), "--report", str(report)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.decode()[-3000:]}")
    return wall, json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a folder of images (scanned recursively, as cxr-infer scan does)")
    ap.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--files", type=_ints, default=[1000, 4000])
    ap.add_argument("--shard-sizes", type=_ints, default=[100, 500, 2000])
    ap.add_argument("--workers", type=_ints, default=[1, 2], help="worker processes of the local Dask cluster")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (medians are printed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import distributed

    from cxr.runtime.cpu import cpu_info
    from cxr.runtime.discover import iter_files

    data = list(iter_files([a.data]))
    sizes = [n for n in a.files if n <= len(data)]
    if not sizes:
        raise SystemExit(f"{a.data} holds {len(data)} images, fewer than any of --files")
    model = ["--model", a.model] if a.model else []
    cpu_start = cpu_info()
    cores = os.cpu_count() or 1
    configs = []  # (files, workers or None for local, shard size)
    for n in sizes:
        configs.append((n, None, None))
        configs += [(n, w, s) for w in a.workers for s in a.shard_sizes if s <= n or s == a.shard_sizes[0]]
    runs: dict[tuple, list] = {c: [] for c in configs}
    clusters, starts = {}, {}
    with tempfile.TemporaryDirectory(prefix="cxr-cluster-bench-") as tmp:
        tmp = Path(tmp)
        folders = {n: _subset(data, n, tmp) for n in sizes}
        try:
            for w in a.workers:  # started once and kept warm, as a long-lived cluster is
                t0 = time.perf_counter()
                clusters[w] = distributed.LocalCluster(n_workers=w, threads_per_worker=max(1, cores // w),
                                                       processes=True, dashboard_address=None, silence_logs=40)
                distributed.Client(clusters[w]).close()
                starts[w] = time.perf_counter() - t0
            # rounds: every configuration once per round, the local scan first, so a machine whose
            # load drifts (a shared one) moves all of a round's figures together
            for _ in range(a.repeat):
                for c in configs:
                    n, w, s = c
                    out = tmp / f"run-{n}-{w}-{s}.csv"
                    extra = [] if w is None else ["--scheduler", clusters[w].scheduler_address, "--shard-size", str(s)]
                    wall, rep = _scan([str(folders[n]), *model, *extra], out, tmp / "rep.json")
                    same = w is None or out.read_bytes() == (tmp / f"run-{n}-None-None.csv").read_bytes()
                    runs[c].append({"process_s": wall, "scan_s": rep["wall_s"],
                                    "shards": rep.get("cluster", {}).get("shards_this_run"), "same": same})
        finally:
            for cl in clusters.values():
                cl.close()
    rows = []
    for c in configs:
        n, w, s = c
        rs, loc = runs[c], runs[(n, None, None)]
        rows.append({"files": n, "workers": w, "shard_size": s, "shards": rs[0]["shards"],
                     "process_s": statistics.median(r["process_s"] for r in rs),
                     "scan_s": statistics.median(r["scan_s"] for r in rs),
                     "ratio_to_local": statistics.median(r["scan_s"] / lr["scan_s"] for r, lr in zip(rs, loc)),
                     "rows_identical": all(r["same"] for r in rs)})
    for r in rows:
        r["images_per_s"] = r["files"] / r["scan_s"]
    # per-shard cost: the slope of scan time over the number of shards, same files and workers
    slopes = {}
    for n in sizes:
        for w in a.workers:
            pts = [(r["shards"], r["scan_s"]) for r in rows if r["files"] == n and r["workers"] == w]
            if len({x for x, _ in pts}) >= 2:
                mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
                slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
                slopes[(n, w)] = slope * 1e3
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores (avx512 {cpu['avx512']}, vnni {cpu['vnni']}); "
          f"load average {cpu_start['load_avg_1min']} at the start, {cpu['load_avg_1min']} at the end; "
          f"medians of {a.repeat} rounds")
    print("| files | scan | shard size | shards | process s | scan s | img/s | scan / local (paired) | rows = local |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "local" if r["workers"] is None else f"cluster, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        print(f"| {r['files']} | {mode} | {r['shard_size'] or '-'} | {r['shards'] or '-'} | {r['process_s']:.2f} "
              f"| {r['scan_s']:.2f} | {r['images_per_s']:.0f} | {r['ratio_to_local']:.3f} | "
              f"{'-' if r['workers'] is None else ('yes' if r['rows_identical'] else 'NO')} |")
    for (n, w), ms in sorted(slopes.items()):
        print(f"per-shard cost, {n} files, {w} worker(s): {ms:.1f} ms per shard (least-squares slope of scan s "
              "over shards)")
    print("cluster start-up (LocalCluster + first client, not in the figures above): "
          + ", ".join(f"{w} workers {s:.2f} s" for w, s in sorted(starts.items())))
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu, "rows": rows, "runs": {str(k): v for k, v in runs.items()},
                                            "per_shard_ms": {f"{n} files, {w} workers": v
                                                             for (n, w), v in slopes.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
