"""``cxr-infer``: scan folders of chest X-rays, and inspect model files.

Only click is imported at module level; numpy, Pillow and onnxruntime load inside the commands,
so ``cxr-infer --help`` answers instantly. Other commands (e.g. ``bench``) register on ``cli``.

Exit status: 0 every file was read (rows the input check withheld included: the scan did its
job, and the summary says how many), 1 some files became error rows (output still complete),
2 usage or model errors (bad option, missing/invalid model, CUDA unavailable), 3 only with
``scan --strict``: every file was read but some rows show no prediction (input check), 130
interrupted (Ctrl-C, or the reader of stdout went away); finished rows are kept either way.
1 wins over 3.
"""

from __future__ import annotations

import io
import sys

import click

from . import __version__

from .cli_options import (batch_size_option, device_option, model_option, precision_option, sensitivity_option,
                          threads_option)
from .exit_status import EXIT_INTERRUPTED, EXIT_NOT_CHEST_XRAY, EXIT_OK, EXIT_SOME_ERRORS, EXIT_USAGE  # noqa: F401

FORMATS = ("table", "csv", "jsonl", "json")  # mirrors output.FORMATS without importing numpy


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(EXIT_USAGE)


def _load(ctx: click.Context, model_path, device, threads, precision):
    from .session import ModelLoadError, load_model

    if model_path is not None and precision is not None:
        raise click.UsageError("--precision picks one of the shipped models; it cannot be combined with --model")
    try:
        return load_model(model_path, device=device, threads=threads, precision=precision)
    except ModelLoadError as exc:
        _fail(ctx, str(exc))


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-infer")
def cli() -> None:
    """Classify chest X-rays with a self-describing ONNX model (CPU or CUDA), no PyTorch needed."""


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@model_option
@precision_option
@device_option
@batch_size_option
@threads_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decode+preprocess threads (default: 2 on CPU, min(4, CPUs) on CUDA).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format. Default: from --output's suffix (.csv/.jsonl/.json), "
                   "else table on a terminal and csv otherwise.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write results to FILE instead of stdout.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write the latency report as JSON to FILE.")
@sensitivity_option
@click.option("--heatmaps", "heatmaps_dir", type=click.Path(file_okay=False), default=None,
              help="Write one PNG per classified image into DIR: the X-ray with the predicted class's "
                   "activation map over it (needs a model with a 'cam' output).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write an offline review page FILE.html (thumbnails in FILE_files/ beside it).")
@click.option("--show-unfamiliar", is_flag=True, default=False,
              help="Show the prediction of rows the input check calls 'unfamiliar' (unlike the training X-rays; "
                   "possibly not a chest). Default: withheld like every flagged row.")
@click.option("--strict", is_flag=True, default=False,
              help="Exit 3 when the input check withheld the prediction of any row (for scripts that must "
                   "stop on them). Default: exit 0; the summary says how many were withheld.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Scan on a Dask cluster: its scheduler (tcp://HOST:PORT), or local:N for N local worker "
                   "processes. Same rows and order (docs/cluster.md; needs the cluster extra).")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="With --scheduler: files per cluster task (default 2000).")
@click.option("--resume", is_flag=True, default=False,
              help="With --scheduler and --output: skip the shards FILE already holds, append the rest.")
@click.pass_context
def scan(ctx, paths, model_path, precision, device, batch_size, threads, workers, fmt, output, report, sensitivity,
         heatmaps_dir=None, html_path=None, show_unfamiliar=False, strict=False, scheduler=None, shard_size=None,
         resume=False):
    """Classify every X-ray in PATHS (files, or folders scanned recursively in sorted order).

    One record per file: a prediction, or an error with its reason. A summary and the latency
    report go to stderr. Exit 0: every file read, including rows the input check withheld (the
    summary counts them); 1: some error rows; 2: usage/model error; 3: with --strict, some rows
    show no prediction (not a frontal chest X-ray, or unlike the training X-rays).
    """
    from .engine import ScanStats, default_threads, default_workers, iter_scan

    if threads is None:
        threads = default_threads(device, workers)
    # a cluster's workers open the model on --device; here it only tells the classes and the outputs
    model = _load(ctx, model_path, "cpu" if scheduler else device, threads, precision)
    from .discover import iter_inputs
    from .latency import build_report, format_report, write_report
    from .output import (Progress, format_for_output, make_writer, scan_summary_lines, shift_record,
                         summary_record)

    for note in model.notes:
        click.echo(note, err=True)
    from .triage import TriageUnavailable, default_policy, policy_for

    if sensitivity is None:
        policy, no_triage = default_policy(model.info)
        if policy is None:
            click.echo(f"note: triage unavailable, the triage column stays empty: {no_triage}", err=True)
    else:
        try:
            policy, no_triage = policy_for(model.info, sensitivity), None
        except TriageUnavailable as exc:
            _fail(ctx, f"--sensitivity {sensitivity:g}: {exc}")
    outputs = None
    if heatmaps_dir or html_path:
        if heatmaps_dir and not model.has_cam:
            from .session import cam_metadata

            why = (cam_metadata(model.info) or {}).get("reason")
            _fail(ctx, f"--heatmaps: {model.path} has no class-activation map output"
                       + (f" ({why})" if why else " (exported before heatmaps existed; re-export it with cxr-export)"))
        from .scan_outputs import ScanOutputs, scan_root

        try:
            outputs = ScanOutputs(model, heatmaps_dir=heatmaps_dir, html_path=html_path, root=scan_root(list(paths)))
        except OSError as exc:
            _fail(ctx, f"cannot create output folder: {exc}")
    fmt = fmt or format_for_output(output, sys.stdout.isatty())
    if scheduler or shard_size or resume:
        ctx.exit(_scan_on_cluster(ctx, scheduler, shard_size, resume, strict=strict, paths=paths, model=model, model_path=model_path,
                                  precision=precision, device=device, batch_size=batch_size,
                                  threads=ctx.params["threads"],  # as given: the default is each worker's
                                  workers=workers, policy=policy, no_triage=no_triage, fmt=fmt, output=output,
                                  report=report, outputs=outputs, heatmaps_dir=heatmaps_dir, html_path=html_path,
                                  show_unfamiliar=show_unfamiliar))
    workers = workers or default_workers(model.runs_on)
    if output:
        try:
            stream = open(output, "w", encoding="utf-8", errors="backslashreplace", newline="")
        except OSError as exc:
            _fail(ctx, f"cannot write {output}: {exc.strerror or exc}")
    else:
        stream = sys.stdout
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    stats = ScanStats()
    # Rows streaming to the same terminal are progress enough; a bar would interleave with them.
    progress = Progress(stats, enabled=sys.stderr.isatty() and not (stream is sys.stdout and sys.stdout.isatty()))
    writer = make_writer(fmt, stream, model.classes)
    broken_pipe = False
    try:
        for result in iter_scan(model, iter_inputs(paths), batch_size=batch_size, workers=workers, stats=stats,
                                triage=policy, heatmaps=bool(heatmaps_dir),
                                previews=outputs.preview_side if outputs else 0, show_unfamiliar=show_unfamiliar):
            writer.write(result)
            if outputs is not None:
                outputs.add(result)
            progress.update()
    except KeyboardInterrupt:
        stats.interrupted = True
    except BrokenPipeError:  # e.g. `cxr-infer scan DIR | head`: stop, still summarise on stderr
        stats.interrupted = broken_pipe = True
    finally:
        progress.close()
        try:
            writer.close()
            if output:
                stream.close()
        except BrokenPipeError:
            stats.interrupted = broken_pipe = True
    if broken_pipe:
        _silence_stdout()
    if stats.files == 0 and not stats.interrupted:
        click.echo("warning: no image files found in " + ", ".join(map(str, paths)), err=True)
    for line in scan_summary_lines(stats, model.classes, policy, no_triage):
        click.echo(line, err=True)
    rep = build_report(model, stats, batch_size=min(batch_size, model.max_batch or batch_size), workers=workers)
    click.echo(format_report(rep), err=True)
    if outputs is not None:
        _finish_outputs(ctx, outputs, stats, rep, heatmaps_dir, html_path)
    if report:
        rep["summary"] = summary_record(stats, model.classes, policy, no_triage)
        rep["shift"] = shift_record(stats)
        try:
            write_report(rep, report)
        except OSError as exc:
            click.echo(f"error: cannot write report {report}: {exc.strerror or exc}", err=True)
            ctx.exit(EXIT_USAGE)
    from .exit_status import scan_exit_status

    ctx.exit(scan_exit_status(interrupted=stats.interrupted, errors=stats.errors, withheld=stats.withheld,
                              strict=strict))


def _scan_on_cluster(ctx, scheduler, shard_size, resume, **scan) -> int:
    """``scan --scheduler``: the same scan on a Dask cluster (runtime/cluster.py)."""
    if not scheduler:
        _fail(ctx, "--shard-size and --resume belong to a cluster scan: give --scheduler too")
    from .cluster import DEFAULT_SHARD_SIZE, ClusterError, scan_command

    try:
        return scan_command(scheduler=scheduler, shard_size=shard_size or DEFAULT_SHARD_SIZE, resume=resume,
                            echo=lambda m: click.echo(m, err=True), **scan)
    except ClusterError as exc:
        _fail(ctx, str(exc))


def _finish_outputs(ctx, outputs, stats, rep, heatmaps_dir, html_path) -> None:
    """Write the review page once every drawing is done, and say what was written."""
    from .latency import format_report

    try:
        size = outputs.finish(stats, rep, format_report(rep))
    except OSError as exc:
        click.echo(f"error: cannot write the review page {html_path}: {exc.strerror or exc}", err=True)
        ctx.exit(EXIT_USAGE)
    if heatmaps_dir:
        click.echo(f"heatmaps: {outputs.written['heatmaps']} PNG files in {heatmaps_dir}", err=True)
    if html_path:
        click.echo(f"review page: {html_path} ({size / 1e6:.2f} MB; {outputs.written['thumbnails']} thumbnails "
                   f"in {outputs.files_dir})", err=True)
    if outputs.failures:
        click.echo(f"warning: {len(outputs.failures)} images could not be written; first: {outputs.failures[0]}",
                   err=True)


@cli.command()
@click.argument("model_path", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "model_option", type=click.Path(dir_okay=False), default=None,
              help="The model file, as in scan and bench (or give it as the argument).")
@precision_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.pass_context
def info(ctx, model_path, precision, as_json, model_option=None):
    """Show what a model file says about itself (default: the shipped model): classes, input,
    preprocessing, architecture, input check, training data, metrics, quantization, size and sha256."""
    import json

    if model_path and model_option and model_path != model_option:
        _fail(ctx, "give the model once: as the argument or with --model")
    model = _load(ctx, model_path or model_option, "cpu", 1, precision)
    from .modelinfo import describe_model, format_description

    d = describe_model(model)
    click.echo(json.dumps(d, indent=2) if as_json else format_description(d))


@cli.command()
@click.argument("data_dirs", nargs=-1, type=click.Path())
@click.option("--model", "model_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Model to compare (repeat; the first is the agreement reference). Default: shipped fp32 + int8.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write everything as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Scan batch size.")
@click.option("--threads", type=click.IntRange(min=0), default=None, help="onnxruntime intra-op threads.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decode threads (default: 2 on CPU, min(4, CPUs) on CUDA).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N images, spread over the classes.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Timed batch-1 inferences.")
@click.option("--split", type=click.Path(dir_okay=False), default=None,
              help="cxr-train split.json: bench only its --subset, each image under its source's folder "
                   "(DATA_DIRS, one per source, override where the data moved).")
@click.option("--subset", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--sensitivity", type=float, default=None,
              help="Triage point to measure (as in scan); default: each model's stored point.")
@click.option("--not-xray", "not_xray", multiple=True, type=click.Path(file_okay=False),
              help="Folder of images that are not chest X-rays (<kind>/... sub-folders; repeatable): the input "
                   "check's flagged share per kind, on the X-rays, and the AUROC of qc_score between them.")
@click.pass_context
def bench(ctx, data_dirs, model_paths, json_path, batch_size, threads, workers, device, limit, runs, split, subset,
          sensitivity, not_xray):
    """Accuracy and speed of models on labelled folders (<Class>/images/* or class folders): one
    table of size, accuracy, macro-F1, per-class sensitivity, latency, scan throughput, agreement,
    then accuracy and sensitivity by source (each DATA_DIR is a source); with --not-xray, the
    input check's flag rates and AUROC."""
    if not data_dirs and not split:
        raise click.UsageError("give at least one labelled DATA_DIR, or --split FILE")
    from .benchmarks.benchmark import bench_command

    ctx.exit(bench_command(list(data_dirs), list(model_paths) or None, json_path=json_path, batch_size=batch_size,
                           threads=threads, device=device, limit=limit, workers=workers, runs=runs,
                           split=split, subset=subset, sensitivity=sensitivity, not_xray=not_xray))


# Long-running ways in, each in its own module (click only at import): docs/dicom-node.md
from .node.commands import listen  # noqa: E402
from .watch import watch  # noqa: E402

cli.add_command(listen)
cli.add_command(watch)
from .site.site_cli import register as _register_site_commands  # noqa: E402  (shift-reference, validate, adapt)

_register_site_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``cxr-infer``)."""
    cli.main(args=argv, prog_name="cxr-infer")


if __name__ == "__main__":
    main()
