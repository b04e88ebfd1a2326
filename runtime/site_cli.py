"""``cxr-infer`` commands for a new site: ``shift-reference``, ``validate`` and ``adapt`` (docs/site.md).

Registered on the main group by ``register``; like cli.py, only click is imported at module
level so ``cxr-infer --help`` stays instant.
"""

from __future__ import annotations

import click

from .exit_status import EXIT_USAGE


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(EXIT_USAGE)


@click.command("shift-reference")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", "split_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The model's cxr-train split.json: its validation films are the reference.")
@click.option("--subset", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which split's films make the reference (never test: it is what the check is measured on).")
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(file_okay=False),
              help="Where a source's images live now (one per source, in the manifest's order or named like it).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the model with the reference here (default: MODEL_PATH itself; only its metadata changes).")
@click.pass_context
def shift_reference_command(ctx, model_path, split_path, subset, data_roots, out_path):
    """Add the folder-level shift check's reference (cxr.shift_reference) to MODEL_PATH: the model's own
    qc_score on its validation films, per source, computed with onnxruntime (no torch). Needs the onnx
    package (pip install 'cxr-infer[site]')."""
    from .model_edit import ModelEditError
    from .session import ModelLoadError
    from .shift_reference import add_reference

    try:
        done = add_reference(model_path, out_path or model_path, split_path, subset, data_roots)
    except (ModelEditError, ModelLoadError, ValueError, OSError) as exc:
        _fail(ctx, str(exc))
    click.echo(f"wrote {done['out']}: cxr.shift_reference from {done['films']} films ("
               + ", ".join(f"{k} {n}" for k, n in done["sources"].items())
               + (f"; {done['unreadable']} unreadable" if done["unreadable"] else "")
               + f"); graph unchanged (sha256 {done['graph_sha256'][:16]})", err=True)


@click.command("validate")
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="ONNX model made by cxr-export (or cxr-infer adapt). Default: the shipped model.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default=None, help="Which shipped model. Not with --model.")
@click.option("--sensitivity", type=float, default=None,
              help="Measure the point chosen for this validation sensitivity instead of the stored default.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write everything as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Write a Markdown report FILE.md with the operating-curve picture FILE.roc.png beside it.")
@click.pass_context
def validate_command(ctx, dirs, model_path, precision, sensitivity, report_path, md_path):
    """Measure a model on a site's labelled films before first use: DIRS hold class folders (Normal is
    normal; a folder named after a model class is that class; any other folder is abnormal, e.g.
    Effusion/). Prints each class's sensitivity and specificity and the refer/routine triage with
    95 % intervals, next to the model's own validation figures, the ECE, the share flagged, the shift
    check and a verdict. Exit 0 once measured (the verdict is in the output), 2 for bad folders."""
    import json
    import sys

    from .session import ModelLoadError, load_model
    from .shift_reference import stderr_progress
    from .triage import TriageUnavailable, default_policy, find_normal_class, policy_for
    from .validate import ValidateError, collect, format_text, measure, scan_items, write_markdown

    if model_path is not None and precision is not None:
        raise click.UsageError("--precision picks one of the shipped models; it cannot be combined with --model")
    try:
        model = load_model(model_path, precision=precision)
    except ModelLoadError as exc:
        _fail(ctx, str(exc))
    try:
        items, kinds = collect(dirs, model.classes, find_normal_class(model.classes))
        policy = default_policy(model.info)[0] if sensitivity is None else policy_for(model.info, sensitivity)
    except (ValidateError, TriageUnavailable) as exc:
        _fail(ctx, str(exc))
    results, stats = scan_items(model, items, policy, stderr_progress("validate") if sys.stderr.isatty() else None)
    rep = measure(model, items, kinds, policy, results, stats)
    click.echo(format_text(rep), err=True)
    try:
        if report_path:
            with open(report_path, "w", encoding="utf-8") as fh:
                json.dump(rep, fh, indent=2, default=str)
            click.echo(f"report: {report_path}", err=True)
        if md_path:
            click.echo(f"markdown: {write_markdown(rep, md_path)}", err=True)
    except OSError as exc:
        _fail(ctx, f"cannot write the report: {exc.strerror or exc}")


def register(cli: click.Group) -> None:
    cli.add_command(shift_reference_command)
    cli.add_command(validate_command)
