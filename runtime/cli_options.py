"""The click options every command that runs the model shares (scan, watch, listen, validate, ...).

One definition each, so ``--help`` says the same thing everywhere. click only: imported at start-up.
"""

from __future__ import annotations

import click

model_option = click.option(
    "--model", "model_path", type=click.Path(dir_okay=False), default=None,
    help="ONNX model made by cxr-export (or cxr-infer adapt). Default: the shipped model.")
precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "int8"]), default=None,
    help="Which shipped model to use (default: the manifest's choice). Not with --model.")
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
    help="cpu, cuda (error if unavailable) or auto (CUDA when present).")
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per inference call.")
threads_option = click.option(
    "--threads", type=click.IntRange(min=0), default=None,
    help="onnxruntime intra-op threads (default: one per physical core; from 8 cores up, the cores the decode "
         "workers leave; 0: onnxruntime's choice).")
sensitivity_option = click.option(
    "--sensitivity", type=float, default=None,
    help="Triage at the highest threshold whose validation sensitivity to abnormal films reaches this fraction "
         "(e.g. 0.99). Default: the model's stored point (0.98 at export).")


def engine_options(command):
    """--model, --precision, --device, --threads, --batch-size and --sensitivity, in that order in --help."""
    for option in (sensitivity_option, batch_size_option, threads_option, device_option, precision_option,
                   model_option):
        command = option(command)
    return command
