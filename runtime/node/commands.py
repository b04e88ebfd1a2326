"""``cxr-infer listen``: the click command (click only at import; the rest loads when it runs)."""

from __future__ import annotations

import sys

import click

from ..cli_options import engine_options
from ..exit_status import EXIT_USAGE


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _logger(state):
    import logging

    log = logging.getLogger("cxr.node")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(state.log_file, encoding="utf-8")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # pydicom's warnings about odd values: into the log, with a time stamp
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = False
    for handler in log.handlers:
        warnings_log.addHandler(handler)
    return log


def print_status(state_dir: str) -> None:
    """What the state folder holds: films waiting, results queued or refused, films done."""
    import os

    from .state import INCOMING, OUTBOX, REJECTED, StateFolder

    if not os.path.isdir(state_dir):
        _fail(f"no state folder at {state_dir}")
    state = StateFolder(state_dir)
    done = 0
    if os.path.exists(state.ledger):
        with open(state.ledger, "rb") as fh:
            done = sum(1 for _ in fh)
    queued = state.listing(OUTBOX, ".dcm")
    status = state.read_status()
    click.echo(f"state folder      {state.root}")
    click.echo(f"node running      {'yes' if state.is_locked() else 'no'}")
    click.echo(f"films waiting     {len(state.listing(INCOMING, '.dcm'))} (received, not yet classified)")
    click.echo(f"films done        {done} (rows in {state.results_csv})")
    click.echo(f"results queued    {len(queued)} (waiting for {status.get('destination', 'the destination')})")
    for path in queued[:10]:
        click.echo(f"  {os.path.basename(path)}")
    click.echo(f"results refused   {len(state.listing(REJECTED))} (in {os.path.join(state.root, REJECTED)})")
    if status:
        click.echo(f"last send         {status.get('updated')}: " + (f"failed: {status['last_error']}, retry in "
                                                                      f"{status.get('retry_in_s'):.0f} s"
                                                                      if status.get("last_error") else "ok"))


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TCP port to listen on.")
@click.option("--aet", default="CXR_INFER", show_default=True, help="This node's AE title.")
@click.option("--send-to", "send_to", default=None, metavar="AET@HOST:PORT",
              help="Where the results go by C-STORE (the PACS), e.g. ORTHANC@127.0.0.1:4242.")
@click.option("--state", "state_dir", required=True, type=click.Path(file_okay=False),
              help="State folder: received films, queued results, results.csv, ledger, log.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; default: this machine only).")
@click.option("--allow", multiple=True, metavar="AET",
              help="Calling AE titles accepted (repeat); default: any.")
@click.option("--heatmap", is_flag=True, help="Also send a Secondary Capture with the heatmap burnt in "
                                               "(needs a model with a 'cam' output).")
@engine_options
@click.option("--status", "show_status", is_flag=True,
              help="Print what the state folder holds (waiting films, queued results) and exit.")
def listen(port, aet, send_to, state_dir, bind, allow, heatmap, model_path, precision, device, threads, batch_size,
           sensitivity, show_status):
    """A DICOM node: take CR/DX films by C-STORE, classify each with the scan engine and send a
    TID 1500 Structured Report into its study (to --send-to). Runs until SIGTERM or Ctrl-C;
    problems go to the log (stderr and STATE/node.log). docs/dicom-node.md."""
    if show_status:
        print_status(state_dir)
        return
    if port is None or not send_to:
        raise click.UsageError("listen needs --port and --send-to (or --status)")
    from . import require_extra

    try:
        require_extra()
    except ImportError as exc:
        _fail(str(exc))
    from .sender import Destination

    try:
        dest = Destination.parse(send_to)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--send-to") from None
    if not 0 < len(aet) <= 16:
        raise click.BadParameter("an AE title has 1 to 16 characters", param_hint="--aet")
    run_node(state_dir=state_dir, port=port, aet=aet, dest=dest, bind=bind, allow=tuple(a.strip() for a in allow),
             heatmap=heatmap, model_path=model_path, precision=precision, device=device, threads=threads,
             batch_size=batch_size, sensitivity=sensitivity)


def run_node(*, state_dir, port, aet, dest, bind, allow, heatmap, model_path, precision, device, threads,
             batch_size, sensitivity) -> None:
    import os
    import signal

    from .. import __version__
    from ..engine import default_threads
    from ..modelinfo import sha256_file
    from ..rowlog import RowLog
    from ..session import ModelLoadError, load_model
    from ..triage import TriageUnavailable, default_policy, policy_for
    from .sender import Sender
    from .server import Node
    from .sr import Algorithm
    from .state import INCOMING, OUTBOX, StateFolder

    try:
        model = load_model(model_path, device=device, threads=threads if threads is not None
                           else default_threads(device, 1), precision=precision)
    except ModelLoadError as exc:
        _fail(str(exc))
    if heatmap and not model.has_cam:
        _fail(f"--heatmap: {model.path} has no class-activation map output (docs/heatmaps.md)")
    try:
        policy = default_policy(model.info)[0] if sensitivity is None else policy_for(model.info, sensitivity)
    except TriageUnavailable as exc:
        _fail(f"--sensitivity {sensitivity:g}: {exc}")
    try:
        state = StateFolder(state_dir)
        state.lock()
    except BlockingIOError:
        _fail(f"another cxr-infer listen is using the state folder {state_dir}")
    except OSError as exc:
        _fail(f"cannot use the state folder {state_dir}: {exc.strerror or exc}")
    state.clear_tmp()
    log = _logger(state)
    for note in model.notes:
        log.info("%s", note)
    rowlog = RowLog(state.results_csv, state.ledger, model.classes)
    algorithm = Algorithm(name=os.path.basename(str(model.path)), version=f"{model.info.precision}; cxr-infer "
                          f"{__version__}", sha256=sha256_file(model.path), arch=model.info.arch)
    node = Node(state, model, policy, rowlog, algorithm, aet=aet, allow=allow, heatmap=heatmap,
                batch_size=batch_size)
    node.sender = Sender(state, dest, aet, node.stop)

    def on_signal(signum, _frame):
        log.info("%s: stopping after the film and the send in progress", signal.Signals(signum).name)
        node.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start(bind, port)
    except OSError as exc:
        _fail(f"cannot listen on {bind}:{port}: {exc.strerror or exc}")
    log.info("listening as %s on %s:%d (calling AE titles: %s); results to %s; model %s (sha256 %s); "
             "%d film(s) waiting from before, %d result(s) queued, %d done", aet, bind, port,
             ", ".join(allow) or "any", dest, algorithm.name, algorithm.sha256[:12],
             len(state.listing(INCOMING, ".dcm")), len(state.listing(OUTBOX, ".dcm")), len(rowlog.done))
    try:
        while not node.stop.wait(0.5):
            pass
    finally:
        node.shutdown()
        rowlog.close()
        log.info("stopped: %d film(s) waiting, %d result(s) queued; a restart goes on from there",
                 len(state.listing(INCOMING, ".dcm")), len(state.listing(OUTBOX, ".dcm")))
