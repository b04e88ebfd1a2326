"""``cxr-infer`` commands for a new site: ``shift-reference``, ``validate`` and ``adapt`` (docs/site.md).

Registered on the main group by ``register``; like runtime/cli.py, only click is imported at module
level so ``cxr-infer --help`` stays instant.
"""

from __future__ import annotations

import click

from ..cli_options import precision_option
from ..exit_status import EXIT_USAGE


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
              help="Write the model with the reference here (default: MODEL_PATH itself).")
@click.pass_context
def shift_reference_command(ctx, model_path, split_path, subset, data_roots, out_path):
    """Add the folder-level shift check's reference (cxr.shift_reference) to MODEL_PATH: the mean and
    covariance of its validation films' input-check features, per source and predicted class, and the
    graph output (shift_features) scans read them from; computed with onnxruntime (no torch). Needs
    the onnx package (pip install 'cxr-infer[site]')."""
    from ..model_edit import ModelEditError
    from ..session import ModelLoadError
    from .shift_reference import add_reference

    try:
        done = add_reference(model_path, out_path or model_path, split_path, subset, data_roots)
    except (ModelEditError, ModelLoadError, ValueError, OSError) as exc:
        _fail(ctx, str(exc))
    click.echo(f"wrote {done['out']}: cxr.shift_reference from {done['films']} films ("
               + ", ".join(f"{k} {n}" for k, n in done["sources"].items())
               + (f"; {done['unreadable']} unreadable" if done["unreadable"] else "")
               + f"); added output shift_features ({done['dim']} columns); every other output bit-identical on "
               f"{done['parity']['films']} films", err=True)


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

    from ..session import ModelLoadError, load_model
    from .shift_reference import stderr_progress
    from ..triage import TriageUnavailable, default_policy, find_normal_class, policy_for
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


@click.command("adapt")
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The site model to write (a new file; the base model is never modified). Its card goes beside it.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="The base model (cxr-export's, or an earlier site model). Default: the shipped model.")
@precision_option
@click.option("--sensitivity", type=click.FloatRange(0.5, 1.0, max_open=True), default=0.98, show_default=True,
              help="The sensitivity to abnormal films the site's refer threshold must give.")
@click.option("--holdout", type=click.FloatRange(0.0, 0.9, max_open=True), default=0.0, show_default=True,
              help="Keep this share of each class folder out of every fit and measure the result on it "
                   "(seeded; stored in the provenance). 0: report the fit films' figures only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --holdout and the cross-validation folds.")
@click.option("--no-head", "no_head", is_flag=True,
              help="Fit threshold, temperature and input check only; do not try the head refit (d).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the provenance (everything measured) as JSON.")
@click.pass_context
def adapt_command(ctx, dirs, out_path, model_path, precision, sensitivity, holdout, seed, no_head, report_path):
    """Fit a site model from a site's labelled films (DIRS hold class folders, as validate reads them):
    (a) the refer threshold for --sensitivity, (b) the temperature, (c) the input check's centre, so the
    site's films stop reading as unfamiliar or shifted, and (d) the Normal row of the last layer, adopted
    only if cross-validation shows it beats the shipped head. Writes a new model with its provenance
    (cxr.adaptation) and a card; needs at least 30 normal and 30 abnormal films and the onnx package
    (pip install 'cxr-infer[site]'). No torch."""
    import json
    import sys

    from .adapt import AdaptError, adapt, format_text
    from ..model_edit import ModelEditError
    from ..session import ModelLoadError, resolve_model_path
    from .shift_reference import stderr_progress
    from .validate import ValidateError

    try:  # resolve_model_path refuses --precision with --model
        base = resolve_model_path(model_path, precision)
        prov = adapt(base, dirs, out_path, sensitivity=sensitivity, holdout=holdout, seed=seed,
                     refit_head_too=not no_head,
                     progress=stderr_progress("adapt") if sys.stderr.isatty() else None)
    except (AdaptError, ValidateError, ModelEditError, ModelLoadError) as exc:
        _fail(ctx, str(exc))
    click.echo(format_text(prov), err=True)
    click.echo(f"wrote {out_path} and its card {prov['card']}", err=True)
    if report_path:
        try:
            with open(report_path, "w", encoding="utf-8") as fh:
                json.dump(prov, fh, indent=2, default=str)
        except OSError as exc:
            _fail(ctx, f"cannot write the report: {exc.strerror or exc}")
        click.echo(f"report: {report_path}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(shift_reference_command)
    cli.add_command(validate_command)
    cli.add_command(adapt_command)
