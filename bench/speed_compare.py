"""End-to-end speed of the study's PyTorch pipeline against cxr-infer fp32 and int8, on one folder.

Not part of the test run. Every variant runs in its own fresh process, so time-to-first-result
includes interpreter start, imports and model load, and peak RSS is that process's alone:

  (a) study   PyTorch eager fp32: an ImageFolder-like dataset over the files, torchvision
              Grayscale -> Resize -> ToTensor -> Normalize, a DataLoader (batch 32, 2 workers);
              the cxr-train checkpoint's own architecture, weights, input size and normalisation.
  (b) fp32    ``cxr-infer scan DIR --model FP32.onnx`` (the console script, JSON lines on stdout).
  (c) int8    the same with the int8 model.

Then int8 again on a quarter of the images, to show peak RSS does not grow with the folder; the
images/s each ONNX model sustains alone on preprocessed images (no decode: the ceiling no scan of
that model can pass on this machine, and so the most any pipeline could gain over the study); and
the installed size of the runtime's dependencies against torch + torchvision's. Ends with a
markdown table (with the CPU it ran on) for the README.

    python bench/speed_compare.py --checkpoint RUN/best.pt --fp32 m.onnx --int8 m.int8.onnx \\
        [--data DIR] [--limit N] [--threads N] [--json OUT.json]

Internal: ``--child torch`` runs variant (a) inside the child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("CXR_DATA") or str(HERE.parent.parent / "shared" / "data" / "covid-radiography-3class")
STUDY_BATCH, STUDY_WORKERS = 32, 2
RUNTIME_DISTS = ("numpy", "pillow", "onnxruntime", "click")
STUDY_DISTS = ("torch", "torchvision")


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # same clock in parent and child


# ---------------------------------------------------------------------------------------------
# (a) the study's way, run inside the child process


def child_torch(args: argparse.Namespace) -> int:
    t_start = float(os.environ.get("CXR_T0", _now()))
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from cxr.runtime.discover import iter_files
    from cxr.train.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_imported = _now()
    from cxr.train.checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)  # data only: a checkpoint never runs code
    model = build_model(ck["arch"], **ck["model_kwargs"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    pp = ck["preprocess"]
    size = int(pp["size"])
    resize = ([transforms.Resize(size), transforms.CenterCrop(size)] if pp.get("resize") == "center_crop"
              else [transforms.Resize((size, size))])
    tf = transforms.Compose([transforms.Grayscale(num_output_channels=int(pp.get("channels", 1))), *resize,
                             transforms.ToTensor(), transforms.Normalize([pp["mean"]] * int(pp.get("channels", 1)),
                                                                         [pp["std"]] * int(pp.get("channels", 1)))])

    class FolderDataset(Dataset):  # what torchvision.datasets.ImageFolder does, over the same files
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with open(self.paths[i], "rb") as fh:
                img = Image.open(fh).convert("RGB")  # ImageFolder's default loader
            return tf(img), i

    paths = list(iter_files([args.root]))
    loader = DataLoader(FolderDataset(paths), batch_size=STUDY_BATCH, shuffle=False, num_workers=STUDY_WORKERS)
    classes = ck["classes"]
    preds: dict[str, str] = {}
    t_loaded = _now()
    first = None
    with torch.no_grad():
        for x, idx in loader:
            p = torch.softmax(model(x), dim=1).argmax(dim=1)
            for i, k in zip(idx.tolist(), p.tolist()):
                preds[paths[i]] = classes[k]
            if first is None:
                first = _now()
                print("first", flush=True)
    t_end = _now()
    with open(args.preds, "w", encoding="utf-8") as fh:
        json.dump(preds, fh)
    print(json.dumps({
        "images": len(preds), "import_s": t_imported - t_start, "load_s": t_loaded - t_imported,
        "scan_s": t_end - t_loaded, "images_per_s": len(preds) / (t_end - t_loaded) if preds else None,
        "vm_hwm_mb": _vm_hwm_mb(), "torch": torch.__version__, "arch": ck["arch"], "input_size": size,
    }), flush=True)
    return 0


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# running a child and measuring it from the outside


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class TreeSampler(threading.Thread):
    """Peak PSS of a process plus its children (DataLoader workers share pages: PSS, not RSS)."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(p) for p in _descendants(self.pid)))


def run_child(cmd: list[str], env: dict, stderr_path: Path, first_marker) -> dict:
    """Run ``cmd``; time from just before the spawn to the first result line and to exit; stdout
    lines returned for parsing.

    Peak RSS is the child's own VmHWM, which it writes to ``$CXR_HWM_FILE`` as it exits. wait4's
    ru_maxrss is only the fallback: Linux carries the high-water mark of the address space a
    child had before exec into it, and that was a copy of this (parent) process, so ru_maxrss
    never reads below the parent's RSS at the time of the spawn.
    """
    t0 = _now()
    hwm_file = stderr_path.with_suffix(".hwm")
    hwm_file.unlink(missing_ok=True)
    env = {**env, "CXR_T0": repr(t0), "CXR_HWM_FILE": str(hwm_file)}
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        first = None
        lines = []
        for line in proc.stdout:
            if first is None and first_marker(line):
                first = _now() - t0
            lines.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = _now() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    try:
        peak, source = int(hwm_file.read_text()) / 1024, "VmHWM"
    except (OSError, ValueError):
        peak, source = usage.ru_maxrss / 1024, "ru_maxrss (includes the parent's RSS at spawn)"
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "first_result_s": first,
            "peak_rss_mb": peak, "peak_rss_source": source, "tree_peak_pss_mb": sampler.peak_mb or None,
            "lines": lines}


def write_hwm() -> None:
    """At exit: this process's VmHWM (kB) to $CXR_HWM_FILE, for ``run_child``."""
    path = os.environ.get("CXR_HWM_FILE")
    hwm = _vm_hwm_mb()
    if path and hwm is not None:
        Path(path).write_text(str(int(hwm * 1024)))


# ``cxr-infer`` exactly as its console script runs it, plus an exit hook like ``write_hwm``
# (self-contained, so the child imports nothing from this script)
CXR_INFER = """\
import atexit, os, sys
def _hwm():
    path = os.environ.get("CXR_HWM_FILE")
    if path:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                open(path, "w").write(line.split()[1])
atexit.register(_hwm)
sys.argv[0] = "cxr-infer"
from cxr.runtime.cli import main
main()
"""


def cxr_infer_cmd() -> list[str]:
    return [sys.executable, "-c", CXR_INFER]


def run_cxr_infer(model: str, root: str, threads: int | None, work: Path, tag: str) -> dict:
    report = work / f"{tag}.report.json"
    cmd = [*cxr_infer_cmd(), "scan", root, "--model", model, "--format", "jsonl", "--report", str(report)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = run_child(cmd, dict(os.environ), work / f"{tag}.stderr", lambda line: line.startswith("{"))
    preds = {}
    for line in r.pop("lines"):
        if line.startswith("{"):
            rec = json.loads(line)
            preds[rec["path"]] = rec["prediction"]
    rep = json.loads(report.read_text()) if report.is_file() else {}
    r.update(images=rep.get("images_classified"), errors=rep.get("errors"),
             images_per_s=rep.get("throughput_images_per_s"), scan_s=rep.get("wall_s"),
             model_load_ms=rep.get("model_load_ms"), preds=preds)
    if r["rc"] not in (0, 1):
        raise SystemExit(f"{tag}: cxr-infer exited {r['rc']}:\n{(work / f'{tag}.stderr').read_text()[-2000:]}")
    return r


def run_study(checkpoint: str, root: str, threads: int | None, work: Path) -> dict:
    preds_file = work / "study.preds.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "torch", "--checkpoint", checkpoint,
           "--root", root, "--preds", str(preds_file)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = run_child(cmd, dict(os.environ), work / "study.stderr", lambda line: line.startswith("first"))
    lines = r.pop("lines")
    if r["rc"] != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"study pipeline failed (exit {r['rc']}):\n{(work / 'study.stderr').read_text()[-2000:]}")
    r.update(json.loads(lines[-1]))
    r["preds"] = json.loads(preds_file.read_text())
    return r


# ---------------------------------------------------------------------------------------------
# inputs, sizes, report


def choose_files(data: str, limit: int | None) -> tuple[list[tuple[str, str | None]], bool]:
    """(path, folder label) pairs a scan of ``data`` reads; ``limit`` spread over the classes."""
    from cxr.runtime.benchmarks.benchmark import select_items
    from cxr.runtime.dataset import discover_labelled
    from cxr.runtime.discover import iter_files

    try:
        _, items = discover_labelled(data)
        labelled = True
    except ValueError:
        items, labelled = [], False
    if labelled:
        items = select_items(items, limit)
        return [(os.fspath(it.path), it.label) for it in items], True
    files = list(iter_files([data]))
    return [(p, None) for p in (files[:limit] if limit else files)], False


def link_farm(files: list[tuple[str, str | None]], root: Path) -> str:
    """A folder of symlinks (class folders kept) so every variant scans exactly these files."""
    for i, (p, label) in enumerate(files):
        d = root / (label or "unlabelled")
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(p), d / f"{i:06d}_{os.path.basename(p)}")
    return str(root)


def labels_by_path(root: str) -> dict[str, str]:
    from cxr.runtime.dataset import discover_labelled

    try:
        _, items = discover_labelled(root)
    except ValueError:
        return {}
    return {os.path.normpath(os.fspath(it.path)): it.label for it in items}


def dist_size_mb(name: str) -> float | None:
    import importlib.metadata as md

    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    total = 0
    for f in dist.files or []:
        try:
            total += f.locate().stat().st_size
        except OSError:
            pass
    return total / 1e6


def dependency_closure(names) -> list[str]:
    """``names`` plus everything they require (extras off, markers for this machine)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        n = canonicalize_name(todo.pop())
        if n in seen:
            continue
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        seen[n] = dist.metadata["Name"]
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return sorted(seen.values(), key=str.lower)


def install_sizes() -> dict:
    def total(names):
        sizes = {n: dist_size_mb(n) for n in names}
        return {"packages": {n: round(s, 1) for n, s in sizes.items() if s is not None},
                "total_mb": round(sum(s for s in sizes.values() if s), 1)}

    out = {"runtime": total(RUNTIME_DISTS), "study": total(STUDY_DISTS)}
    try:
        rt = dependency_closure(RUNTIME_DISTS)
        st = dependency_closure(STUDY_DISTS)
        out["runtime_with_deps"] = total(rt)
        out["study_with_deps"] = total(st)
    except ImportError:  # no ``packaging``: direct packages only
        pass
    return out


def model_alone_ips(model_path: str, paths: list[str], threads: int | None, batch: int = 16) -> float | None:
    """Images/s the ONNX model sustains alone on preprocessed images (cxr-infer bench's timing)."""
    from cxr.runtime.benchmarks.benchmark import sample_inputs, time_batched
    from cxr.runtime.session import load_model

    model = load_model(model_path, threads=threads)
    samples = sample_inputs(model, paths)
    return None if samples is None else time_batched(model, samples, batch, runs=400)["images_per_s"]


def agreement(a: dict, b: dict) -> float | None:
    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    return sum(a[k] == b[k] for k in keys) / len(keys) if keys else None


def accuracy(preds: dict, labels: dict) -> float | None:
    pairs = [(p, labels.get(os.path.normpath(k))) for k, p in preds.items()]
    pairs = [(p, t) for p, t in pairs if p is not None and t is not None]
    return sum(p == t for p, t in pairs) / len(pairs) if pairs else None


def _f(v, fmt=".1f", none="-"):
    return none if v is None else format(v, fmt)


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def markdown(res: dict) -> str:
    study = res["variants"][0]
    rows = ["| pipeline | images/s | vs study | model alone, no decode (img/s) | first result (s) | peak RSS (MB) | "
            "peak PSS, all processes (MB) | total wall (s) | agreement with study | accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in res["variants"]:
        ratio = v.get("ratio_vs_study")
        if ratio is None and v["images_per_s"] and study["images_per_s"]:
            ratio = v["images_per_s"] / study["images_per_s"]
        alone = v.get("model_alone_images_per_s")
        alone_txt = "-" if alone is None else f"{alone:.0f} ({alone / study['images_per_s']:.1f}x study)"
        rows.append(f"| {v['name']} | {_f(v['images_per_s'])} | {_f(ratio, '.1f')}x | {alone_txt} | "
                    f"{_f(v['first_result_s'], '.2f')} | "
                    f"{_f(v['peak_rss_mb'], '.0f')} | {_f(v.get('tree_peak_pss_mb'), '.0f')} | {_f(v['wall_s'], '.1f')} | "
                    f"{_pct(v['agreement_with_study'])} | {_pct(v['accuracy'])} |")
    sz = res["install_mb"]
    lines = [
        f"Measured on {res['cpu']} ({res['cpu_count']} CPUs), {res['images']} images of {res['data_name']} "
        f"({res['arch']} at {res['input_size']} px; study batch {STUDY_BATCH} with {STUDY_WORKERS} DataLoader "
        f"workers, cxr-infer batch 16; threads {res['threads'] or 'default'}).",
        "",
        *rows,
        "",
    ]
    n_rounds = len(study.get("rounds") or [])
    if n_rounds > 1:
        fp32, int8 = res["variants"][1], res["variants"][2]
        per = [f"{a['images_per_s'] / b['images_per_s']:.2f}x" for a, b in zip(int8["rounds"], fp32["rounds"])
               if a.get("images_per_s") and b.get("images_per_s")]
        lines += [f"Medians of {n_rounds} rounds (study, fp32, int8 back to back in each); \"vs study\" is the median "
                  f"of per-round ratios. int8 vs study per round: "
                  + ", ".join(f"{x:.1f}x" for x in int8["ratio_vs_study_runs"] if x is not None)
                  + f"; int8 vs fp32 per round: {', '.join(per)}.", ""]
    if res.get("flatness"):
        fl = res["flatness"]
        lines.append(f"Peak RSS of cxr-infer int8 as the folder grows: {fl['small_images']} images "
                     f"{fl['small_rss_mb']:.0f} MB, {fl['large_images']} images {fl['large_rss_mb']:.0f} MB.")
    rt, st = sz["runtime"], sz["study"]
    s = (f"Installed size: runtime deps ({', '.join(rt['packages'])}) {rt['total_mb']:.0f} MB"
         + (f" ({sz['runtime_with_deps']['total_mb']:.0f} MB with their own dependencies)" if "runtime_with_deps" in sz else "")
         + f"; {' + '.join(st['packages'])} {st['total_mb']:.0f} MB"
         + (f" ({sz['study_with_deps']['total_mb']:.0f} MB with their dependencies, CUDA libraries included)"
            if "study_with_deps" in sz else "") + ".")
    lines.append(s)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per variant from ``rounds`` of (study, fp32, int8) runs made back to back.

    Speeds and times are medians over the rounds; each ratio is the median of the per-round
    ratios, so a pipeline is compared with the study run minutes from it, not with a study run
    from a quieter or busier moment of a shared machine. Peak memory is the largest seen.
    """
    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    merged = []
    for i in range(len(rounds[0])):
        runs = [r[i] for r in rounds]
        v = dict(runs[0])
        for key in ("images_per_s", "first_result_s", "wall_s"):
            v[key] = med([r.get(key) for r in runs])
        for key in ("peak_rss_mb", "tree_peak_pss_mb"):
            vals = [r.get(key) for r in runs if r.get(key) is not None]
            v[key] = max(vals) if vals else None
        v["ratio_vs_study_runs"] = [r[i]["images_per_s"] / r[0]["images_per_s"]
                                    if r[i].get("images_per_s") and r[0].get("images_per_s") else None for r in rounds]
        v["ratio_vs_study"] = med(v["ratio_vs_study_runs"])
        v["rounds"] = [{k: r.get(k) for k in ("images_per_s", "first_result_s", "peak_rss_mb", "wall_s")} for r in runs]
        merged.append(v)
    return merged


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="Folder of X-rays (default: $CXR_DATA or %(default)s).")
    ap.add_argument("--checkpoint", help="cxr-train checkpoint (best.pt) the ONNX models were exported from.")
    ap.add_argument("--fp32", help="fp32 .onnx exported from --checkpoint.")
    ap.add_argument("--int8", help="int8 .onnx exported from --checkpoint.")
    ap.add_argument("--limit", type=int, default=None, help="At most N images (spread over the classes).")
    ap.add_argument("--threads", type=int, default=None, help="Intra-op threads for torch and onnxruntime alike.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Run the three pipelines this many times, interleaved; report medians (shared machines are noisy).")
    ap.add_argument("--no-flat", action="store_true", help="Skip the RSS-flatness run (int8 on a quarter of the images).")
    ap.add_argument("--json", dest="json_out", help="Write all measurements to this file.")
    ap.add_argument("--child", choices=["torch"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--preds", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "torch":
        import atexit
        atexit.register(write_hwm)
        return child_torch(args)
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    missing = [o for o in ("checkpoint", "fp32", "int8") if not getattr(args, o)]
    if missing:
        print("error: need " + ", ".join(f"--{o}" for o in missing), file=sys.stderr)
        return 2
    for f in (args.checkpoint, args.fp32, args.int8):
        if not Path(f).is_file():
            print(f"error: not a file: {f}", file=sys.stderr)
            return 2
    if not Path(args.data).is_dir():
        print(f"error: data folder not found: {args.data} (pass --data or set CXR_DATA)", file=sys.stderr)
        return 2
    from cxr.runtime.benchmarks.benchmark import warm_file_cache
    from cxr.runtime.cpu import cpu_info
    from cxr.runtime.session import load_model

    info = load_model(args.fp32, threads=1, warmup=False).info
    work = Path(tempfile.mkdtemp(prefix="cxr-speed-"))
    try:
        files, labelled = choose_files(args.data, args.limit)
        if not files:
            print(f"error: no images in {args.data}", file=sys.stderr)
            return 2
        root = link_farm(files, work / "all") if args.limit else os.path.abspath(args.data)
        labels = labels_by_path(root) if labelled else {}
        print(f"{len(files)} images from {args.data}; warming the file cache", file=sys.stderr)
        warm_file_cache([p for p, _ in files])

        rounds: list[list[dict]] = []
        for k in range(args.repeat):
            tag_round = f" (round {k + 1}/{args.repeat})" if args.repeat > 1 else ""
            print(f"(a) study: PyTorch eager fp32 + torchvision + DataLoader{tag_round} ...", file=sys.stderr)
            study = run_study(args.checkpoint, root, args.threads, work)
            study["name"] = "study: PyTorch eager fp32, DataLoader b32"
            this = [study]
            for tag, model, name in (("fp32", args.fp32, "cxr-infer fp32 (ONNX)"), ("int8", args.int8, "cxr-infer int8 (ONNX)")):
                print(f"({'b' if tag == 'fp32' else 'c'}) {name}{tag_round} ...", file=sys.stderr)
                r = run_cxr_infer(model, root, args.threads, work, tag)
                r["name"] = name
                this.append(r)
            rounds.append(this)
        variants = merge_rounds(rounds)
        study = variants[0]
        for v in variants:
            v["agreement_with_study"] = agreement(study["preds"], v["preds"])
            v["accuracy"] = accuracy(v["preds"], labels)
            v["images"] = v.get("images") if v.get("images") is not None else len(v["preds"])
        counts = {v["name"]: len(v["preds"]) for v in variants}
        if len(set(counts.values())) != 1:
            print(f"warning: the variants classified different numbers of images: {counts}", file=sys.stderr)

        print("model alone (preprocessed images, no decode) ...", file=sys.stderr)
        for v, model in ((variants[1], args.fp32), (variants[2], args.int8)):
            v["model_alone_images_per_s"] = model_alone_ips(model, [p for p, _ in files], args.threads)

        flat = None
        if not args.no_flat and len(files) >= 8:
            small = files[:: 4]  # a quarter, spread like the full set
            print(f"RSS flatness: int8 on {len(small)} images ...", file=sys.stderr)
            r = run_cxr_infer(args.int8, link_farm(small, work / "quarter"), args.threads, work, "int8-quarter")
            flat = {"small_images": len(r["preds"]), "small_rss_mb": r["peak_rss_mb"],
                    "large_images": len(variants[2]["preds"]), "large_rss_mb": variants[2]["peak_rss_mb"]}

        res = {
            "cpu": cpu_info()["model"] or "unknown CPU", "cpu_count": os.cpu_count(), "data": os.path.abspath(args.data),
            "data_name": Path(args.data).name, "images": len(files), "threads": args.threads,
            "arch": info.arch, "input_size": info.preprocess.size,
            "models": {"checkpoint": args.checkpoint, "fp32": args.fp32, "int8": args.int8},
            "variants": [{k: v for k, v in x.items() if k != "preds"} for x in variants],
            "flatness": flat, "install_mb": install_sizes(),
        }
        table = markdown({**res, "variants": variants})
        print(table)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump({**res, "markdown": table}, fh, indent=2)
                fh.write("\n")
            print(f"wrote {args.json_out}", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
