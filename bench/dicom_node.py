"""Speed of ``cxr-infer listen`` between a real modality and a real PACS, on this machine.

Not part of the test run. Starts Orthanc (its own config, loopback ports) and the node, then:

  latency     films sent one at a time with dcmtk's storescu: time from starting the C-STORE to
              the film's SR being listed by Orthanc's REST API (polled every 10 ms), p50/p90/max;
  throughput  a batch of films in one storescu association: films per second from the first
              C-STORE to the last SR stored in Orthanc.

Films are chest-like synthetic DX films (tests/dicom_films.py), or PNGs from --data converted to
DX. Needs orthanc, dcmtk and the dev extra (the test helpers it reuses import pytest).

    python bench/dicom_node.py [--model M.onnx] [--films 64] [--single 10] [--size 1024] [--data DIR] [--heatmap]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--films", type=int, default=64, help="films in the throughput batch")
    ap.add_argument("--single", type=int, default=10, help="films sent one at a time for latency")
    ap.add_argument("--size", type=int, default=1024, help="side of the synthetic films in pixels")
    ap.add_argument("--data", default=None, help="a folder of PNG X-rays to send instead (as DX films)")
    ap.add_argument("--heatmap", action="store_true", help="also send the heatmap Secondary Capture")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    from dicom_films import write_film
    from pacs import Orthanc, dcmtk, free_port
    from synthetic import chest_like

    work = Path(tempfile.mkdtemp(prefix="cxr-node-bench-"))
    total = args.films + args.single
    films = []
    if args.data:
        from PIL import Image

        pngs = sorted(Path(args.data).rglob("*.png"))[:total]
        for i, p in enumerate(pngs):
            px = np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16
            films.append(write_film(work / "films" / f"{i:05d}.dcm", px))
    else:
        rng = np.random.default_rng(0)
        for i in range(total):
            films.append(write_film(work / "films" / f"{i:05d}.dcm", chest_like(rng, args.size).astype(np.uint16) * 16))
    pacs = Orthanc(work / "orthanc")
    port = free_port()
    cmd = [sys.executable, "-m", "cxr.runtime.cli", "listen", "--port", str(port), "--aet", "CXR", "--send-to",
           pacs.address, "--state", str(work / "state")]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads is not None else []
    cmd += ["--heatmap"] if args.heatmap else []
    node = subprocess.Popen(cmd, stderr=open(work / "node-stderr.log", "wb"))
    storescu, echoscu = dcmtk("storescu"), dcmtk("echoscu")
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([echoscu, "-aec", "CXR", "127.0.0.1", str(port)], capture_output=True).returncode:
            if time.monotonic() > deadline or node.poll() is not None:
                raise SystemExit(f"the node did not start; see {work / 'node-stderr.log'}")
            time.sleep(0.2)

        def srs() -> int:
            return len(pacs.instances("SR"))

        def send(paths) -> None:
            subprocess.run([storescu, "-aec", "CXR", "127.0.0.1", str(port), *map(str, paths)], check=True,
                           capture_output=True)

        def wait_srs(n: int) -> float:
            deadline = time.monotonic() + 600
            while srs() < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {srs()} of {n} SRs arrived; see {work / 'state' / 'node.log'}")
                time.sleep(0.01)
            return time.perf_counter()

        latencies = []
        for i, film in enumerate(films[: args.single]):
            t0 = time.perf_counter()
            send([film])
            latencies.append(wait_srs(i + 1) - t0)
        t0 = time.perf_counter()
        send(films[args.single:])
        wall = wait_srs(len(films)) - t0
    finally:
        node.terminate()
        node.wait(timeout=60)
        pacs.stop()
    n = len(films) - args.single
    ms = sorted(1000 * x for x in latencies)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    print(f"\ncxr-infer listen -> Orthanc, {os.cpu_count()} CPUs ({cpu}); model {args.model or 'shipped default'}; "
          f"films {'from ' + args.data if args.data else f'synthetic {args.size}x{args.size} 16-bit'}"
          f"{'; with heatmap SC' if args.heatmap else ''}\n")
    print("| measure | value |\n|---|---|")
    if ms:
        print(f"| C-STORE to SR in PACS, one film at a time (n={len(ms)}) | p50 {statistics.median(ms):.0f} ms, "
              f"p90 {ms[min(len(ms) - 1, int(0.9 * len(ms)))]:.0f} ms, max {ms[-1]:.0f} ms |")
    print(f"| batch of {n} films in one association | {n / wall:.1f} films/s ({wall:.1f} s to the last SR) |")
    print(f"\n(state folder and logs: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
