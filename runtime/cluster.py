"""``cxr-infer scan --scheduler``: the same scan on a Dask cluster; only the transport differs.

The client discovers the files once (``discover.iter_inputs``, the local scan's order) and cuts
the stream into shards of ``--shard-size`` files. Each shard is one Dask task that runs the very
engine a local scan runs (``engine.iter_scan``) on a worker; only paths go out and result rows
come back (``ScanResult`` without pixels), never images. Each worker process keeps one
onnxruntime session in a cache keyed by model path and sha256, opened by the first shard it
runs, with as many intra-op threads as the worker has cores (its Dask ``nthreads``); its shards
run one after another, so those threads are never shared.

The client is the only writer. Shards finish in any order, and rows are appended in shard
order: a shard that finishes before an earlier one waits in memory, and submission never runs
more than ``AHEAD_PER_WORKER`` shards per worker past the oldest unwritten one, which bounds
that memory. Each appended shard is flushed and fsynced, then recorded in a ledger beside the
output (``FILE.shards.jsonl``: one header line, then one line per written shard with the byte
offset where its rows end). ``--resume`` checks the ledger against the command, cuts the output
back to the last recorded shard (rows of a shard cut off half-way are dropped, never doubled),
skips the shards it lists and appends the rest. Dask reruns the shards of a worker that dies;
since a shard is written once, by index, no file ever gets two rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from .discover import Entry, iter_inputs
from .engine import ScanStats, check_shift, iter_scan
from .site.shift import ShiftStats

# Files per shard. On 2 shared cores (Intel Xeon, docs/cluster.md) a shard costs about 20 ms of
# Dask round trip plus the shard's last batch, so 2,000 files of about 16 ms each keep that
# overhead under 0.1 % while a lost worker redoes at most half a minute of work.
DEFAULT_SHARD_SIZE = 2000
IN_FLIGHT_PER_WORKER = 2  # one shard running, one waiting on each worker: no idle gap between shards
AHEAD_PER_WORKER = 4  # shards that may finish ahead of the oldest unwritten one, per worker
LEDGER_FORMAT = "cxr-scan-shards/1"
LEDGER_SUFFIX = ".shards.jsonl"


class ClusterError(Exception):
    """The cluster scan cannot start or go on; ``str(err)`` says why and what to do."""


class WorkerCannotRead(Exception):
    """A worker does not see the files the client discovered (they must share a file system)."""


class WorkerModelError(Exception):
    """A worker cannot open the model the client opened (missing there, or a different file)."""


def import_distributed():
    """``distributed``, or a ClusterError naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f'--scheduler needs Dask ({exc}); install it with: pip install "cxr-infer[cluster]"') \
            from None
    return distributed


def parse_scheduler(spec: str) -> tuple[str, Any]:
    """``("local", N)`` for ``local:N``, else ``("address", spec)`` for a scheduler address."""
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            count = int(n) if n else (os.cpu_count() or 1)
        except ValueError:
            count = 0
        if count < 1:
            raise ClusterError(f"--scheduler {spec}: expected local:N with N >= 1 worker processes")
        return "local", count
    if "://" not in spec and ":" not in spec:
        raise ClusterError(f"--scheduler {spec}: expected a scheduler address (tcp://HOST:PORT) or local:N")
    return "address", spec


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class Shard:
    """Consecutive discovered entries: what a worker scans (absolute paths) and what the rows show."""

    index: int
    entries: list[Entry]  # absolute paths, so a worker with another working folder finds them
    shown: list[str]  # the paths as discovered, which the rows carry (as in a local scan)
    skips: Counter = field(default_factory=Counter)  # skipped entries that fell in this shard

    @property
    def files(self) -> int:
        return len(self.entries)

    @property
    def digest(self) -> str:
        """What --resume checks: the same paths, in the same order, in this shard."""
        h = hashlib.sha256()
        for p in self.shown:
            h.update(os.fsencode(p) + b"\0")
        return h.hexdigest()[:16]


def iter_shards(paths, size: int) -> Iterator[Shard]:
    """Shards of ``size`` files (skip entries ride along as counts), lazily, in discovery order."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    shard = Shard(0, [], [])
    for entry in iter_inputs(paths):
        if entry.skip is not None:
            shard.skips[entry.skip] += 1
            continue
        shard.entries.append(Entry(os.path.abspath(entry.path), error=entry.error))
        shard.shown.append(entry.path)
        if len(shard.entries) == size:
            yield shard
            shard = Shard(shard.index + 1, [], [])
    if shard.entries or shard.skips:
        yield shard


# ---------------------------------------------------------------------------------------------
# worker side


@dataclass(frozen=True)
class ModelSpec:
    """How a worker opens the client's model: the same file, checked by its sha256."""

    path: str | None  # None: the shipped model for ``precision``, as installed on the worker
    precision: str | None
    sha256: str
    device: str
    threads: int | None = None  # --threads / --workers; None: from the worker's cores
    decoders: int | None = None


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard needs besides its entries; small, sent with every task."""

    model: ModelSpec
    batch_size: int
    triage: Any  # triage.TriagePolicy or None
    show_unfamiliar: bool = False
    heatmaps_dir: str | None = None  # absolute; the workers draw into it (shared file system)
    html_path: str | None = None
    root: str | None = None


_CACHE: dict[tuple, tuple] = {}  # one entry: this process's (model, decode threads, facts)
_CACHE_LOCK = threading.Lock()
_SHARD_LOCK = threading.Lock()  # a worker runs one shard at a time: the session has its cores


def worker_cores() -> int:
    """The cores this Dask worker was given (its ``nthreads``); the CPUs it may use elsewhere."""
    try:
        from distributed import get_worker

        worker = get_worker()
        return max(1, int(getattr(getattr(worker, "state", worker), "nthreads", None) or worker.nthreads))
    except Exception:
        from .cpu import physical_cores

        return physical_cores()


def _where() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return f"{socket.gethostname()}:{os.getpid()}"


def worker_model(spec: ModelSpec):
    """(model, decode threads, facts) of this process, opened once per model file and reused."""
    key = (spec.path, spec.precision, spec.sha256, spec.device, spec.threads, spec.decoders)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        from .modelinfo import sha256_file
        from .session import ModelLoadError, load_model, resolve_model_path

        cores = worker_cores()
        # the local scan's defaults (engine.default_workers / default_threads), on the worker's cores
        decoders = spec.decoders or max(1, min(4 if spec.device == "cuda" else 2, cores))
        threads = spec.threads
        if threads is None and spec.device != "cuda":
            threads = cores - decoders if cores >= 8 else cores
        try:
            path = resolve_model_path(spec.path, spec.precision if spec.path is None else None)
        except ModelLoadError as exc:
            raise WorkerModelError(f"worker {_where()}: {exc}") from None
        if not path.is_file():
            raise WorkerModelError(f"worker {_where()} cannot read the model {path}: the workers must see the "
                                   "model file at the path the client opened (docs/cluster.md)")
        sha = sha256_file(path)
        if sha != spec.sha256:
            raise WorkerModelError(f"worker {_where()} has a different model at {path} (sha256 {sha[:12]}, the "
                                   f"client's is {spec.sha256[:12]}); install the same cxr-infer and model there")
        try:
            model = load_model(path, device=spec.device, threads=threads)
        except ModelLoadError as exc:
            raise WorkerModelError(f"worker {_where()}: {exc}") from None
        facts = {"worker": _where(), "host": socket.gethostname(), "pid": os.getpid(), "cores": cores,
                 "intra_op_threads": threads or "auto", "decode_workers": decoders,
                 "providers": list(model.providers),
                 "model_load_ms": model.load_ms, "session_create_ms": model.session_create_ms,
                 "first_inference_ms": model.first_inference_ms}
        _CACHE.clear()  # a new model replaces the old one: one session per worker
        _CACHE[key] = (model, decoders, facts)
        return _CACHE[key]


def check_visible(entries: list[Entry]) -> None:
    """Raise WorkerCannotRead when this worker sees none of the shard's files (another file system).

    One stat when the first file is there; a shard whose files are all gone fails whole, so a
    worker that lacks the share is never mistaken for a folder of missing files."""
    paths = [e.path for e in entries if e.error is None]
    for p in paths:
        if os.path.lexists(p):
            return
    if paths:
        raise WorkerCannotRead(f"worker {_where()} cannot read {paths[0]} (nor any of the {len(paths)} files of "
                               "its shard): every worker must see the scanned files at the same paths as the "
                               "machine that runs cxr-infer scan (docs/cluster.md)")


def scan_shard(job: ShardJob, entries: list[Entry]) -> dict:
    """One Dask task: scan ``entries`` with this worker's session; rows and stats, no pixels."""
    with _SHARD_LOCK:
        t0 = time.perf_counter()
        model, decoders, facts = worker_model(job.model)
        check_visible(entries)
        outputs = None
        if job.heatmaps_dir or job.html_path:
            from .scan_outputs import ScanOutputs

            outputs = ScanOutputs(model, heatmaps_dir=job.heatmaps_dir, html_path=job.html_path, root=job.root)
        stats = ScanStats()
        results = []
        for r in iter_scan(model, entries, batch_size=job.batch_size, workers=decoders, stats=stats,
                           triage=job.triage, heatmaps=bool(job.heatmaps_dir),
                           previews=outputs.preview_side if outputs else 0, show_unfamiliar=job.show_unfamiliar):
            if outputs is not None:
                outputs.add(r)
            # what the client does not read stays on the worker (the shift features are in the shard's stats)
            results.append(replace(r, heatmap=None, preview=None, features=None)
                           if r.preview is not None or r.heatmap is not None or r.features is not None else r)
        page = None
        if outputs is not None:
            outputs.drain()
            page = {"rows": outputs.rows, "written": outputs.written, "failures": outputs.failures}
        return {"results": results, "stats": stats, "page": page, "worker": facts,
                "busy_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# client side: the output file and its ledger


def merge_stats(into: ScanStats, part: ScanStats) -> None:
    """Add one shard's counts and timings to the scan's (``started``/``finished`` stay the client's)."""
    into.ok += part.ok
    into.errors += part.errors
    into.skipped += part.skipped
    into.withheld += part.withheld
    for name in ("by_class", "qc", "triage", "skip_reasons"):
        getattr(into, name).update(getattr(part, name))
    into.read_s += part.read_s
    into.preprocess_s += part.preprocess_s
    into.inference_s += part.inference_s
    into.batches += part.batches
    into.image_latency_s.extend(part.image_latency_s)
    into.shift_stats.merge(part.shift_stats)


class ShardedOutput:
    """The result file (or stdout) written shard by shard, in order, with its ledger.

    The format's writer writes into a buffer; each shard's text is then appended to the file,
    flushed and fsynced, and only then recorded in the ledger with the offset where it ends.
    """

    def __init__(self, fmt: str, classes: list[str], path: str | None, header: dict, resume: bool):
        from .output import make_writer

        self.fmt, self.path = fmt, path
        self.buf = io.StringIO()
        self.writer = make_writer(fmt, self.buf, classes)
        self.done: list[dict] = []  # ledger lines of the shards already in the file
        self.resumed = 0
        self.size = 0  # bytes of the result file that hold recorded rows
        head = self._take()
        if path is None:
            self.stream, self.ledger = sys.stdout, None
            if hasattr(self.stream, "reconfigure"):
                self.stream.reconfigure(errors="backslashreplace")
            self._emit(head)
            return
        self.ledger_path = path + LEDGER_SUFFIX
        if resume and fmt == "json":
            raise ClusterError("--resume cannot append to a JSON array; use --format csv or jsonl (or .csv/.jsonl)")
        if resume and os.path.exists(self.ledger_path):
            self._reopen(header)
        else:
            if resume and os.path.exists(path):
                raise ClusterError(f"--resume: {path} exists but has no ledger {self.ledger_path}; it was not "
                                   "written by a cluster scan (start afresh without --resume)")
            self.stream = open(path, "wb")
            self._emit(head)
            self.ledger = open(self.ledger_path, "w", encoding="utf-8")
            self._record({**header, "start": self.size})

    @property
    def next_index(self) -> int:
        return len(self.done)

    def _take(self) -> str:
        text = self.buf.getvalue()
        self.buf.seek(0)
        self.buf.truncate()
        return text

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.path is None:
            self.stream.write(text)
            self.stream.flush()
            return
        data = text.encode("utf-8", "backslashreplace")
        self.stream.write(data)
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.size += len(data)

    def _record(self, line: dict) -> None:
        self.ledger.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.ledger.flush()
        os.fsync(self.ledger.fileno())

    def _reopen(self, header: dict) -> None:
        with open(self.ledger_path, encoding="utf-8") as fh:
            lines = []
            for text in fh:
                try:
                    lines.append(json.loads(text))
                except ValueError:  # a line cut off by a crash: what follows it was never recorded
                    break
        if not lines or lines[0].get("format") != LEDGER_FORMAT:
            raise ClusterError(f"--resume: {self.ledger_path} is not a cxr scan ledger")
        first = lines[0]
        for key in ("paths", "shard_size", "model_sha256", "output_format", "columns", "options"):
            if first.get(key) != header.get(key):
                raise ClusterError(f"--resume: this scan's {key} ({header.get(key)}) differs from the one "
                                   f"{self.path} was started with ({first.get(key)}); resume it with the same "
                                   "command, or start afresh without --resume")
        end = first["start"]
        for i, line in enumerate(lines[1:]):
            if line.get("shard") != i:
                break
            self.done.append(line)
            end = line["end"]
        if not os.path.exists(self.path) or os.path.getsize(self.path) < end:
            raise ClusterError(f"--resume: {self.path} is shorter than its ledger says ({end} bytes); it was "
                               "changed after the scan wrote it: start afresh without --resume")
        self.stream = open(self.path, "r+b")
        self.stream.truncate(end)  # rows of a shard cut off before the ledger recorded it
        self.stream.seek(end)
        self.size = end
        self.resumed = len(self.done)
        self.ledger = open(self.ledger_path, "r+", encoding="utf-8")
        self.ledger.seek(0)
        keep = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [first, *self.done])
        self.ledger.write(keep)
        self.ledger.truncate()
        self.ledger.flush()

    def check_done(self, shard: Shard) -> None:
        """A shard the ledger lists must hold the same files now, or the resume would mix two scans."""
        line = self.done[shard.index]
        if line["digest"] != shard.digest or line["files"] != shard.files:
            raise ClusterError(f"--resume: the files of shard {shard.index} changed since {self.path} was written "
                               f"(from {shard.shown[0] if shard.shown else '?'}): start afresh without --resume")

    def write_shard(self, shard: Shard, results, stats: ScanStats) -> None:
        for r in results:
            self.writer.write(r)
        self._emit(self._take())
        if self.ledger is not None:
            line = {"shard": shard.index, "files": shard.files, "digest": shard.digest, "end": self.size,
                    "ok": stats.ok, "errors": stats.errors, "withheld": stats.withheld,
                    "skipped": sum(shard.skips.values()),
                    # the shift check's sufficient statistics, unrounded (JSON keeps a float exactly), so
                    # a resumed scan tests every film, exactly as an uninterrupted one
                    "shift": stats.shift_stats.to_json()}
            self._record(line)
            self.done.append(line)

    def close(self) -> None:
        self.writer.close()  # a JSON array's closing bracket (not recorded: JSON is never resumed)
        self._emit(self._take())
        if self.path is not None:
            self.stream.close()
            self.ledger.close()


# ---------------------------------------------------------------------------------------------
# client side: the run


@dataclass
class ClusterRun:
    """What the CLI reports after a cluster scan."""

    stats: ScanStats
    workers: dict[str, dict] = field(default_factory=dict)  # address -> facts and counts
    shards_done: int = 0  # this run
    shards_resumed: int = 0  # already in the output before this run
    earlier: dict = field(default_factory=lambda: {"files": 0, "ok": 0, "errors": 0, "withheld": 0})
    scheduler: str = ""
    start_s: float = 0.0  # connecting (or starting local:N) until a worker was there; not in wall_s
    failure: str | None = None  # why the scan stopped early, when it did


def start_client(spec: str):
    """(client, local cluster or None) for ``--scheduler``."""
    distributed = import_distributed()
    kind, value = parse_scheduler(spec)
    if kind == "local":
        cpus = os.cpu_count() or 1
        cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=max(1, cpus // value),
                                           processes=True, dashboard_address=None, silence_logs=40)
        return distributed.Client(cluster), cluster
    try:
        return distributed.Client(value, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"--scheduler {value}: cannot reach the Dask scheduler ({exc})") from None


def run_shards(client, job: ShardJob, shards: Iterator[Shard], out: ShardedOutput, run: ClusterRun,
               on_shard=None, outputs=None) -> None:
    """Submit shards, keep a bounded number in flight, append each in order as soon as it can be."""
    from distributed import as_completed

    pending: dict = {}  # future -> shard
    waiting: dict[int, tuple] = {}  # finished ahead of an earlier shard: index -> (shard, payload)
    source = iter(shards)
    held: list[Shard] = []  # the next shard to submit, taken from ``source`` but not yet sent
    next_write = resumed = out.next_index
    token = f"{os.getpid()}-{time.time_ns()}"

    def top_up(ac) -> None:
        n = max(1, len(client.nthreads()))  # workers now: a cluster that grows gets more in flight
        while len(pending) < IN_FLIGHT_PER_WORKER * n:
            if not held:
                shard = next(source, None)
                if shard is None:
                    return
                if shard.index < resumed:  # written by an earlier run
                    out.check_done(shard)
                    continue
                held.append(shard)
            if held[0].index >= next_write + AHEAD_PER_WORKER * n:
                return  # a slow earlier shard: do not pile up more finished rows in memory behind it
            shard = held.pop()
            fut = client.submit(scan_shard, job, shard.entries, key=f"cxr-shard-{shard.index}-{token}", pure=False)
            pending[fut] = shard
            ac.add(fut)

    ac = as_completed()
    try:
        top_up(ac)
        for fut in ac:
            shard = pending.pop(fut)
            try:
                payload = fut.result()
            except (WorkerCannotRead, WorkerModelError) as exc:
                run.failure = str(exc)
                break
            except Exception as exc:  # KilledWorker after repeated deaths, a scheduler gone, a bug
                run.failure = f"shard {shard.index} (from {shard.shown[0] if shard.shown else '?'}) failed: " \
                              f"{exc.__class__.__name__}: {exc}"
                break
            waiting[shard.index] = (shard, payload)
            while next_write in waiting:
                s, p = waiting.pop(next_write)
                _write(out, s, p, run, outputs)
                next_write += 1
                if on_shard is not None:
                    on_shard()
            top_up(ac)
    finally:
        if pending:
            client.cancel(list(pending))


def _write(out: ShardedOutput, shard: Shard, payload: dict, run: ClusterRun, outputs) -> None:
    results = payload["results"]
    if len(results) != shard.files:
        raise RuntimeError(f"shard {shard.index}: {len(results)} results for {shard.files} files")
    # the rows show each path as discovered (a local scan's row), not the absolute path scanned
    results = [r if r.path == shown else replace(r, path=shown) for r, shown in zip(results, shard.shown)]
    part: ScanStats = payload["stats"]
    for reason, n in shard.skips.items():
        part.skipped += n
        part.skip_reasons[reason] += n
    out.write_shard(shard, results, part)
    merge_stats(run.stats, part)
    run.shards_done += 1
    facts = payload["worker"]
    w = run.workers.setdefault(facts["worker"], {**facts, "shards": 0, "files": 0, "classified": 0, "busy_s": 0.0})
    w["shards"] += 1
    w["files"] += part.files
    w["classified"] += part.ok
    w["busy_s"] += payload["busy_s"]
    if outputs is not None and payload.get("page"):
        outputs.add_rows(payload["page"], shown=[_display(s) for s in shard.shown])


def _display(path: str) -> str:
    from .output import display_path

    return display_path(path)


def cluster_report(rep: dict, run: ClusterRun, shard_size: int) -> dict:
    """The local report plus the cluster: per-worker throughput, cold costs as the workers paid them."""
    workers = []
    for addr, w in sorted(run.workers.items()):
        workers.append({**w, "images_per_s": (w["classified"] / w["busy_s"]) if w["busy_s"] > 0 else None})
    if workers:
        for key in ("model_load_ms", "session_create_ms", "first_inference_ms"):
            rep[key] = max(w[key] or 0.0 for w in workers)  # the slowest worker's: the cluster waited for it
        for key in ("intra_op_threads", "decode_workers"):
            values = sorted({w[key] for w in workers}, key=str)  # per worker; one value when all agree
            rep[key] = values[0] if len(values) == 1 else values
        rep["providers"] = sorted({p for w in workers for p in w["providers"]})  # where the workers ran it
        rep["device"] = "cuda" if "CUDAExecutionProvider" in rep["providers"] else "cpu"
    rep["cluster"] = {
        "scheduler": run.scheduler, "start_s": run.start_s, "shard_size": shard_size, "shards_this_run": run.shards_done,
        "shards_resumed": run.shards_resumed, "workers": workers,
        "definition": "throughput_images_per_s: the cluster as a whole (classified / client wall time); "
                      "workers[].images_per_s: classified / the worker's busy time in shards",
    }
    return rep


def format_cluster_report(rep: dict) -> str:
    c = rep["cluster"]
    lines = [f"cluster  {c['scheduler']}: {len(c['workers'])} workers, {c['shards_this_run']} shards of up to "
             f"{c['shard_size']} files" + (f" ({c['shards_resumed']} done before, skipped)" if c["shards_resumed"]
                                           else "") + f"; {c['start_s']:.2f} s to connect/start, not in the wall time"]
    for w in c["workers"]:
        tput = w["images_per_s"]
        lines.append(f"  {w['worker']:<28} {w['shards']:>4} shards {w['files']:>8} files  "
                     f"{'-' if tput is None else f'{tput:.1f}'} img/s  (threads {w['intra_op_threads']}, "
                     f"decode {w['decode_workers']}, session {w['session_create_ms']:.0f} ms)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def scan_command(*, paths, scheduler: str, shard_size: int, resume: bool, model, model_path, precision, device,
                 batch_size, threads, workers, policy, no_triage, fmt, output, report, outputs, heatmaps_dir,
                 html_path, show_unfamiliar, echo, strict: bool = False) -> int:
    """``cxr-infer scan PATHS --scheduler ...``: rows, summary, report and page as a local scan
    gives them. Returns the exit status (the local scan's meanings)."""
    from .latency import build_report, format_report, write_report
    from .modelinfo import sha256_file
    from .exit_status import EXIT_USAGE, scan_exit_status
    from .output import Progress, columns, scan_summary_lines, shift_record, summary_record
    from .scan_outputs import scan_root

    if resume and not output:
        raise ClusterError("--resume needs --output FILE: the ledger that says which shards are done lives beside it")
    sha = sha256_file(model.path)
    spec = ModelSpec(path=None if model_path is None else os.path.abspath(model_path), precision=precision,
                     sha256=sha, device=device, threads=threads, decoders=workers)
    job = ShardJob(model=spec, batch_size=batch_size, triage=policy, show_unfamiliar=show_unfamiliar,
                   heatmaps_dir=os.path.abspath(heatmaps_dir) if heatmaps_dir else None,
                   html_path=os.path.abspath(html_path) if html_path else None, root=scan_root(list(paths)))
    header = {"format": LEDGER_FORMAT, "paths": [os.path.abspath(p) for p in paths], "shard_size": shard_size,
              "model_sha256": sha, "output_format": fmt, "columns": columns(model.classes),
              "options": {"show_unfamiliar": show_unfamiliar,
                          "triage_threshold": None if policy is None else policy.threshold}}
    out = ShardedOutput(fmt, model.classes, output, header, resume)  # ClusterError on a ledger that does not fit
    run = ClusterRun(stats=ScanStats(), scheduler=scheduler, shards_resumed=out.resumed)
    for line in out.done:
        for key in run.earlier:
            run.earlier[key] += line.get(key, 0) if key != "files" else line["files"]
        # the shift check is over the whole scan: the finished shards' statistics count too
        run.stats.shift_stats.merge(ShiftStats.from_json(line.get("shift")))
    client = cluster = None
    stats = run.stats
    t0 = time.perf_counter()
    try:
        client, cluster = start_client(scheduler)
        run.scheduler = client.scheduler.address if cluster is not None else scheduler
        if not client.nthreads():
            echo(f"waiting for a worker to join {run.scheduler} ...")
            client.wait_for_workers(1)
        run.start_s = time.perf_counter() - t0
        stats.started = time.perf_counter()
        progress = Progress(stats, enabled=sys.stderr.isatty() and not (output is None and sys.stdout.isatty()))
        try:
            run_shards(client, job, iter_shards(paths, shard_size), out, run, on_shard=progress.update,
                       outputs=outputs)
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            progress.close()
    finally:
        stats.finished = time.perf_counter()
        try:
            out.close()
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    if run.failure:
        stats.interrupted = True
        echo(f"error: {run.failure}")
    if run.shards_resumed:
        e = run.earlier
        echo(f"resumed: {run.shards_resumed} shards ({e['files']} files) were already in {output}; "
             "the counts below are this run's")
    if stats.files == 0 and not stats.interrupted and not run.shards_resumed:
        echo("warning: no image files found in " + ", ".join(map(str, paths)))
    check_shift(model, stats)
    for text in scan_summary_lines(stats, model.classes, policy, no_triage):
        echo(text)
    rep = build_report(model, stats, batch_size=min(batch_size, model.max_batch or batch_size),
                       workers=workers or 0)
    rep = cluster_report(rep, run, shard_size)
    echo(format_report(rep))
    echo(format_cluster_report(rep))
    status = 0
    if outputs is not None:
        status = _finish_page(outputs, stats, rep, format_report(rep), heatmaps_dir, html_path, echo)
    if report:
        rep["summary"] = summary_record(stats, model.classes, policy, no_triage)
        rep["summary"]["earlier_runs"] = run.earlier if run.shards_resumed else None
        rep["shift"] = shift_record(stats)
        try:
            write_report(rep, report)
        except OSError as exc:
            echo(f"error: cannot write report {report}: {exc.strerror or exc}")
            return EXIT_USAGE
    if status:
        return status
    if run.failure:  # stopped early: what is written stays, --resume goes on from there
        return EXIT_USAGE
    # as a local scan, counting the shards earlier runs wrote
    return scan_exit_status(interrupted=stats.interrupted, errors=stats.errors + run.earlier["errors"],
                            withheld=stats.withheld + run.earlier["withheld"], strict=strict)


def _finish_page(outputs, stats, rep, latency_text, heatmaps_dir, html_path, echo) -> int:
    try:
        size = outputs.finish(stats, rep, latency_text)
    except OSError as exc:
        echo(f"error: cannot write the review page {html_path}: {exc.strerror or exc}")
        return 2
    if heatmaps_dir:
        echo(f"heatmaps: {outputs.written['heatmaps']} PNG files in {heatmaps_dir} (drawn by the workers)")
    if html_path:
        echo(f"review page: {html_path} ({size / 1e6:.2f} MB; {outputs.written['thumbnails']} thumbnails "
             f"in {outputs.files_dir})")
    if outputs.failures:
        echo(f"warning: {len(outputs.failures)} images could not be written; first: {outputs.failures[0]}")
    return 0
