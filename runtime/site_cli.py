"""``cxr-infer`` commands for a new site: ``shift-reference``, ``validate`` and ``adapt`` (docs/site.md).

Registered on the main group by ``register``; like cli.py, only click is imported at module
level so ``cxr-infer --help`` stays instant.
"""

from __future__ import annotations

import click

EXIT_USAGE = 2


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


def register(cli: click.Group) -> None:
    cli.add_command(shift_reference_command)
