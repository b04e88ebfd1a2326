"""``cxr-infer watch DIR -o results.csv``: classify each file that lands in a shared folder, once.

Polling (``os.scandir`` every ``--interval`` seconds), not inotify: it needs no dependency and
works on the network shares films land on, where change notification often does not. A file is
classified once it has kept its size and modification time for ``--settle`` seconds, so a film
still being copied is never read half-written. Rows go through ``rowlog.RowLog``: a ledger beside
the results (``results.csv.ledger.jsonl``) keyed by path + size + mtime says what is done, so a
restart resumes where it stopped and never classifies a file twice; a file replaced by a new
one (another size or mtime) is classified again, as a new film. Ctrl-C or SIGTERM stops after the
row in progress. Only click is imported here at module level.
"""

from __future__ import annotations

import sys

import click

from .cli_options import engine_options
from .exit_status import EXIT_OK, EXIT_USAGE
LEDGER_SUFFIX = ".ledger.jsonl"


def file_key(path: str, size: int, mtime_ns: int) -> str:
    import hashlib
    import os

    ident = os.fsencode(os.path.abspath(path)) + b"\0" + f"{size}\0{mtime_ns}".encode()
    return hashlib.sha256(ident).hexdigest()[:32]


class Settler:
    """Which files have stopped changing: (size, mtime) unchanged for ``settle`` seconds."""

    def __init__(self, settle: float):
        self.settle = settle
        self.seen: dict[str, tuple[int, int, float]] = {}

    def ready(self, path: str, size: int, mtime_ns: int, now: float) -> bool:
        prev = self.seen.get(path)
        if prev is None or prev[:2] != (size, mtime_ns):
            self.seen[path] = (size, mtime_ns, now)
            return self.settle <= 0
        return now - prev[2] >= self.settle

    def forget(self, path: str) -> None:
        self.seen.pop(path, None)


def poll(folder: str, excluded: list[str], settler: Settler, done: dict, now: float):
    """(path, key, size, mtime_ns, error) of every file under ``folder`` that is ready and not done."""
    import os

    from .discover import walk_folder

    out = []
    present = set()
    for entry in walk_folder(folder):
        full = os.path.abspath(entry.path)
        if entry.skip is not None or any(full == d or full.startswith(d + os.sep) for d in excluded):
            continue
        present.add(entry.path)
        if entry.error is not None:  # a broken link: one error row, until it changes
            size, mtime = -1, 0
        else:
            try:
                st = os.stat(entry.path)
            except OSError:
                continue  # gone between the listing and now
            size, mtime = st.st_size, st.st_mtime_ns
        key = file_key(entry.path, size, mtime)
        if key in done:
            settler.forget(entry.path)
            continue
        if settler.ready(entry.path, size, mtime, now):
            out.append((entry.path, key, size, mtime, entry.error))
    for gone in set(settler.seen) - present:
        settler.forget(gone)
    return out


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Results file (.csv, or .jsonl), appended to; the ledger FILE.ledger.jsonl sits beside it.")
@click.option("--heatmaps", "heatmaps_dir", type=click.Path(file_okay=False), default=None,
              help="One heatmap PNG per classified image into DIR, as in scan.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="A review page of the files classified since the watch started, rewritten after each batch.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between looks at the folder.")
@click.option("--settle", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds a file must keep its size and mtime before it is read.")
@click.option("--once", is_flag=True, help="Classify what is there (once it has settled) and exit.")
@engine_options
@click.option("--show-unfamiliar", is_flag=True, help="As in scan: show the class of 'unfamiliar' rows.")
def watch(folder, output, heatmaps_dir, html_path, interval, settle, once, model_path, precision, device, threads,
          batch_size, sensitivity, show_unfamiliar):
    """Watch FOLDER (sub-folders too) and classify each X-ray that lands in it, once it has stopped
    growing; rows are appended to --output as scan writes them. A restart goes on where it
    stopped, never classifying a file twice. Each file gets a line on stderr: its class, "withheld
    (<verdict>)" or the error, so problems show in the log. Stop with Ctrl-C or SIGTERM (exit 0)."""
    if output.lower().endswith(".json"):
        raise click.BadParameter("a JSON array cannot be appended to; use .csv or .jsonl", param_hint="--output")
    sys.exit(run_watch(folder, output, heatmaps_dir=heatmaps_dir, html_path=html_path, interval=interval,
                       settle=settle, once=once, model_path=model_path, precision=precision, device=device,
                       threads=threads, batch_size=batch_size, sensitivity=sensitivity,
                       show_unfamiliar=show_unfamiliar))


def _fail(message: str) -> int:
    click.echo(f"error: {message}", err=True)
    return EXIT_USAGE


def run_watch(folder, output, *, heatmaps_dir, html_path, interval, settle, once, model_path, precision, device,
              threads, batch_size, sensitivity, show_unfamiliar) -> int:
    import os
    import signal
    import threading
    import time

    from .engine import ScanStats, default_threads, iter_scan
    from .latency import build_report, format_report
    from .output import display_path
    from .rowlog import RowLog
    from .session import ModelLoadError, load_model
    from .triage import TriageUnavailable, default_policy, policy_for

    try:
        model = load_model(model_path, device=device, threads=threads if threads is not None
                           else default_threads(device, 1), precision=precision)
    except ModelLoadError as exc:
        return _fail(str(exc))
    if heatmaps_dir and not model.has_cam:
        return _fail(f"--heatmaps: {model.path} has no class-activation map output (docs/heatmaps.md)")
    try:
        policy = default_policy(model.info)[0] if sensitivity is None else policy_for(model.info, sensitivity)
    except TriageUnavailable as exc:
        return _fail(f"--sensitivity {sensitivity:g}: {exc}")
    try:
        rows = RowLog(output, output + LEDGER_SUFFIX, model.classes)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot use {output}: {exc}")
    outputs = None
    if heatmaps_dir or html_path:
        from .scan_outputs import ScanOutputs

        outputs = ScanOutputs(model, heatmaps_dir=heatmaps_dir, html_path=html_path, root=os.path.abspath(folder))
    # what the watch writes never counts as a film that landed
    excluded = [os.path.abspath(p) for p in (heatmaps_dir, outputs.files_dir if outputs else None) if p]
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stats = ScanStats()
    settler = Settler(settle)
    click.echo(f"watching {folder} (every {interval:g} s, settled after {settle:g} s); {len(rows.done)} file(s) "
               f"done before; rows to {output}", err=True)
    try:
        while not stop.is_set():
            ready = poll(folder, excluded, settler, rows.done, time.monotonic())
            if ready:
                keys = {path: (key, size, mtime) for path, key, size, mtime, _err in ready}
                results = iter_scan(model, ready_entries(ready), batch_size=batch_size, stats=stats, triage=policy,
                                    heatmaps=bool(heatmaps_dir),
                                    previews=outputs.preview_side if outputs else 0, show_unfamiliar=show_unfamiliar)
                try:
                    for result in results:
                        key, size, mtime = keys[result.path]
                        rows.append(key, result, path=display_path(result.path), size=size, mtime_ns=mtime)
                        settler.forget(result.path)
                        if outputs is not None:
                            outputs.add(result)
                        what = ((result.prediction.label if not result.prediction.diagnosis_withheld
                                 else f"withheld ({result.prediction.qc})") if result.ok else f"error: {result.error}")
                        click.echo(f"{display_path(result.path)}: {what}", err=True)
                        if stop.is_set():
                            break
                finally:
                    results.close()
                if outputs is not None and html_path:
                    rep = build_report(model, stats, batch_size=batch_size, workers=1)
                    outputs.write_page(stats, rep, format_report(rep))
                continue
            if once and not settler.seen:
                break
            stop.wait(interval)
    finally:
        rows.close()
        if outputs is not None:
            rep = build_report(model, stats, batch_size=batch_size, workers=1)
            outputs.finish(stats, rep, format_report(rep))
    click.echo(f"watch stopped: {stats.ok} classified ({stats.withheld} withheld by the input check), "
               f"{stats.errors} errors this run; {len(rows.done)} done in all", err=True)
    return EXIT_OK


def ready_entries(ready):
    from .discover import Entry

    return [Entry(path, error=err) for path, _key, _size, _mtime, err in ready]
