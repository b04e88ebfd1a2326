"""``cxr-export CHECKPOINT --out FILE.onnx [--int8]``: checkpoint -> proven ONNX model(s).

Files appear under their final names only once they are proven: the fp32 model is written as
``FILE.onnx.partial`` and renamed after parity passes; the int8 model likewise after its
scheme is within the bound. Exit status: 0 done, 1 bad input, 3 fp32 parity failed,
4 int8 refused (the fp32 model, which passed, stays).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from cxr.runtime.cpu import cpu_info
from cxr.runtime.metadata import ModelInfo
from cxr.runtime.modelinfo import sha256_file
from cxr.runtime.preprocess import Preprocessing

from cxr.runtime.inputcheck import SCORE_OUTPUT

from . import cam as cam_mod, input_check as input_check_mod, onnx_export, parity as parity_mod, quantize
from .data import (ExportInputError, find_manifest, folder_items, load_checkpoint, load_images, log,
                   read_manifest, stratified_subset)
from .evaluate import (agreement, classification_metrics, measure_speed, ort_runner, ort_session,
                       run_batched, torch_runner)
from .report import REPORT_FORMAT, int8_candidates_table, metadata_summary, table, write_json
from .triage_step import TriageStep

EXIT_INPUT, EXIT_PARITY, EXIT_INT8 = 1, 3, 4

DEFAULT_INTENDED_USE = (
    "Research and triage aid for frontal chest X-rays: it sorts images into the classes {classes} so "
    "a qualified reader can prioritise them. It is not a diagnosis and not a medical device; it always "
    "answers with one of these classes, even for an image showing another condition or no chest X-ray."
)


def _int8_path(out: Path) -> Path:
    return out.with_name(out.name[:-5] + ".int8.onnx") if out.name.endswith(".onnx") else Path(str(out) + ".int8.onnx")


def _sibling(model: Path, suffix: str) -> Path:
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(stem + suffix)


def _producer() -> str:
    import onnx
    import onnxruntime
    import torch

    try:
        from importlib.metadata import version

        own = version("cxr-infer")
    except Exception:
        own = "unknown"
    return f"cxr-export {own} (torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"


def _command_line(ctx: click.Context, checkpoint: Path, out: Path, overrides: dict | None = None) -> str:
    """The options the user actually gave, so the card can say how to reproduce the file.

    ``--train-command`` is left out: its text is the card's training step, printed just above.
    """
    parts = ["cxr-export", str(checkpoint), "--out", str(out)]
    for param in ctx.command.params:
        name = param.name
        if name in ("checkpoint", "out", "train_command") or not isinstance(param, click.Option):
            continue
        value = (overrides or {}).get(name, ctx.params.get(name))
        given = name in (overrides or {}) or ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        if not given:
            continue
        flag = param.opts[0]
        if param.is_flag:
            if param.secondary_opts and not value:
                parts.append(param.secondary_opts[0])
            elif value:
                parts.append(flag)
        elif param.multiple:
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _train_command(ckpt: dict, override: str | None) -> str | None:
    if override:
        return override
    cfg = ckpt.get("config") or {}
    for key in ("command", "cmdline", "argv"):
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, str):
            return v
        if isinstance(v, (list, tuple)):
            return shlex.join(str(a) for a in v)
    return None


def _seal(partial: Path, dest: Path, info: ModelInfo, check, man=None) -> None:
    """Embed the metadata, add the shift check's reference (from ``man``'s validation films, for a
    model with an input check), check the finished file, then move it to ``dest`` in one rename: a
    model file exists under its final name only once everything about it has passed."""
    onnx_export.write_metadata(partial, info.to_props())
    if man is not None and "input_check" in info.extra and man.split("val"):
        from cxr.runtime.site.shift_reference import add_reference

        log("shift check: adding its reference from the validation films")
        items = [(str(p), man.source_of.get(p, "") or "all") for p, _ in man.split("val")]
        try:
            done = add_reference(partial, partial, str(man.path), items=items, progress=False)
        except ValueError as exc:
            log(f"shift check: no reference in {dest.name} ({exc}); scans will say the check did not run")
            done = None
        if done:
            log(f"shift check: reference from {done['films']} validation films ("
                + ", ".join(f"{k} {n}" for k, n in done["sources"].items())
                + f"); output shift_features ({done['dim']} columns); every other output bit-identical on "
                  f"{done['parity']['films']} films")
    check(partial)
    os.replace(partial, dest)


def _announce(path: Path, card: bool, detail: str = "") -> None:
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB){detail}")
    if card:
        from .card import write_model_card

        log(f"wrote {write_model_card(path)}")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="fp32 model to write (FILE.onnx); int8 goes to FILE.int8.onnx, report to FILE.report.json.")
@click.option("--int8", "do_int8", is_flag=True, help="Also write a statically quantized int8 model.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Split manifest [default: split.json beside the checkpoint].")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Resolve manifest items against this folder instead of their source's recorded root "
                   "(repeat: one per source, named like it or in the manifest's order).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Parity/eval images instead of the manifest's test split: class folders or any image folder.")
@click.option("--parity-limit", default=256, type=click.IntRange(min=0),
              help="At most this many eval images (stratified by (source, class), proportions kept); 0 = all.")
@click.option("--parity-atol", default=1e-4, type=click.FloatRange(min=0),
              help="Largest allowed |p_torch - p_onnx| for fp32.")
@click.option("--parity-min-agreement", default=100.0, type=click.FloatRange(0, 100),
              help="Required fp32 top-1 agreement with PyTorch, percent.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo",
              help="torch.onnx exporter (torchscript is deprecated upstream; fallback only).")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 18 dynamo, 17 torchscript].")
@click.option("--int8-scheme", default="auto",
              help="auto, or SCHEME[,SCHEME...] like u8s8-minmax, s8s8-percentile, u8s8-minmax-rr "
                   "(activation+weight type, calibration minmax|percentile|entropy, -rr = reduce_range).")
@click.option("--calib-count", default=200, type=click.IntRange(min=1),
              help="Training-split images used for calibration (equal per (source, class) group).")
@click.option("--val-limit", default=1000, type=click.IntRange(min=0),
              help="Validation images that judge int8 candidates (stratified); 0 = all.")
@click.option("--int8-max-drop", default=0.5, type=float,
              help="Largest accepted accuracy drop vs fp32 on validation images, percentage points.")
@click.option("--int8-min-agreement", default=99.0, type=click.FloatRange(0, 100),
              help="Required int8 top-1 agreement with fp32 on validation images, percent.")
@click.option("--keep-float", multiple=True, type=click.Choice(quantize.KEEP_FLOAT_CHOICES),
              help="Keep this layer in float in the int8 model (repeatable).")
@click.option("--keep-float-node", multiple=True, help="Keep this ONNX node (by name) in float (repeatable).")
@click.option("--bench/--no-bench", default=True, help="Measure latency and throughput.")
@click.option("--bench-runs", default=50, type=click.IntRange(min=1), help="Timed batch-1 runs per model.")
@click.option("--card/--no-card", default=True, help="Write FILE.card.md (and FILE.int8.card.md).")
@click.option("--intended-use", default=None, help="Intended-use statement for the metadata and card.")
@click.option("--train-command", default=None, help="The cxr-train command that made the checkpoint (for the card).")
@click.option("--seed", default=0, type=int, help="Seed for the stratified image subsets.")
@click.option("--calibrate/--no-calibrate", default=True,
              help="Fit a temperature on the validation split and bake it into the graph; record "
                   "refer/routine operating points (docs/triage.md).")
@click.option("--calibration-limit", default=0, type=click.IntRange(min=0),
              help="Validation images for the temperature and operating points (stratified); 0 = all.")
@click.option("--triage-target", default=0.98, type=click.FloatRange(0, 1, min_open=True),
              help="Default operating point: the highest threshold keeping validation sensitivity to "
                   "abnormal films at least this.")
@click.option("--cam/--no-cam", "with_cam", default=True,
              help="Add the class-activation map output 'cam' where the architecture allows (docs/heatmaps.md).")
@click.option("--cam-tolerance", default=1e-3, type=click.FloatRange(min=0),
              help="Largest allowed fp32 |cam_torch - cam_onnx| as a fraction of each map's range.")
@click.option("--int8-cam-tolerance", default=0.2, type=click.FloatRange(min=0),
              help="Largest allowed 95th percentile over maps of the worst int8 |cam_int8 - cam_fp32| as a "
                   "fraction of the map's range; over it, int8 is refused.")
@click.option("--input-check/--no-input-check", "input_check", default=True,
              help="Add the qc_score output, fitted on the training split, thresholds from the validation split.")
@click.option("--qc-components", default=64, type=click.IntRange(min=1),
              help="Input check: principal components kept per depth.")
@click.option("--qc-train-limit", default=0, type=click.IntRange(min=0),
              help="Input check: at most this many training images for the fit (stratified); 0 = all.")
@click.option("--qc-val-limit", default=0, type=click.IntRange(min=0),
              help="Input check: at most this many validation images for the thresholds (stratified); 0 = all.")
@click.option("--qc-atol", default=1e-3, type=click.FloatRange(min=0),
              help="fp32 qc_score parity: largest allowed |s_torch - s_onnx| is qc-atol + qc-rtol x |s_torch|.")
@click.option("--qc-rtol", default=1e-3, type=click.FloatRange(min=0), help="See --qc-atol.")
@click.option("--qc-int8-min-spearman", default=0.9, type=click.FloatRange(min=-1, max=1),
              help="int8 qc_score: its rank correlation with the fp32 score on the validation images must reach "
                   "this, or no int8 file is written (int8's own thresholds cannot repair a reordered score).")
@click.option("--ood-dir", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of images that are not chest X-rays (<kind>/...): the report gives the input check's "
                   "flag rate per kind and AUROC on it; never used to choose anything (repeatable).")
@click.pass_context
def main(ctx: click.Context, **opts) -> None:
    """Export a cxr-train CHECKPOINT to ONNX with a parity proof, optionally also int8."""
    try:
        code = run_export(ctx, **opts)
    except ExportInputError as exc:
        click.echo(f"cxr-export: error: {exc}", err=True)
        code = EXIT_INPUT
    except parity_mod.ParityError as exc:
        click.echo(f"cxr-export: {exc}\ncxr-export: no model written.", err=True)
        if opts["out"].exists():
            click.echo(f"cxr-export: {opts['out']} is from an earlier run and was left as it was.", err=True)
        code = EXIT_PARITY
    except quantize.QuantizationRefused as exc:
        click.echo(f"cxr-export: int8 REFUSED: {exc}", err=True)
        code = EXIT_INT8
    ctx.exit(code)


def run_export(ctx: click.Context, checkpoint: Path, out: Path, do_int8: bool, manifest: Path | None,
               data_root: tuple[Path, ...], images: Path | None, parity_limit: int, parity_atol: float,
               parity_min_agreement: float, exporter: str, opset: int | None, int8_scheme: str,
               calib_count: int, val_limit: int, int8_max_drop: float, int8_min_agreement: float,
               keep_float: tuple[str, ...], keep_float_node: tuple[str, ...], bench: bool, bench_runs: int,
               card: bool, intended_use: str | None, train_command: str | None, seed: int,
               calibrate: bool = True, calibration_limit: int = 0, triage_target: float = 0.98,
               with_cam: bool = True, cam_tolerance: float = 1e-3, int8_cam_tolerance: float = 0.2,
               input_check: bool = False, qc_components: int = 64, qc_train_limit: int = 0, qc_val_limit: int = 0,
               qc_atol: float = 1e-3, qc_rtol: float = 1e-3, ood_dir: tuple[Path, ...] = (),
               qc_int8_min_spearman: float = 0.9) -> int:
    t_start = time.perf_counter()
    if not out.name.endswith(".onnx"):
        raise ExportInputError(f"--out must end in .onnx, got {out}")
    schemes = []
    if do_int8:
        try:
            schemes = quantize.parse_schemes(int8_scheme)
        except ValueError as exc:
            raise ExportInputError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- inputs
    ckpt = load_checkpoint(checkpoint)
    classes = list(ckpt["classes"])
    pp = Preprocessing.from_dict(ckpt["preprocess"])
    ckpt_sha = sha256_file(checkpoint)
    from .data import build_from_checkpoint

    model = build_from_checkpoint(ckpt)
    cam_support = cam_mod.cam_support(ckpt["arch"]) if with_cam else cam_mod.CamSupport(False, reason="--no-cam")
    log(f"checkpoint {checkpoint}: {ckpt['arch']}, classes {classes}, input {pp.channels}x{pp.size}x{pp.size}")

    man = None
    man_path = manifest or find_manifest(checkpoint, ckpt)
    if man_path is not None:
        man = read_manifest(man_path, list(data_root) or None)
        expected = (ckpt.get("training_data") or {}).get("manifest_sha256")
        tested_on = (ckpt.get("test_metrics") or {}).get("manifest_sha256")
        if tested_on == man.sha256 and expected != man.sha256:
            log(f"{man_path} is the manifest the checkpoint was tested on (cxr-train --test-only), "
                "not the one it was trained with")
        elif expected and expected != man.sha256:
            log(f"WARNING: {man_path} sha256 {man.sha256[:12]} differs from the checkpoint's manifest_sha256 "
                f"{expected[:12]}: this may not be the split the model was trained on")
        if man.classes and list(man.classes) != classes:
            log(f"WARNING: manifest classes {man.classes} differ from checkpoint classes {classes}")
    if images is None and man is None:
        raise ExportInputError(f"no split.json beside {checkpoint}; pass --manifest or --images for parity")
    if do_int8 and man is None:
        raise ExportInputError("--int8 calibrates on the training split and judges on the validation split: "
                               "it needs the run's split manifest (--manifest)")

    if images is not None:
        items, labelled = folder_items(images, classes)
        source = f"--images {images}"
    else:
        items, labelled = man.split("test"), True
        source = f"test split of {man.path}"
        if not items:
            raise ExportInputError(f"{man.path} has no test items; pass --images")
    if labelled:
        items = stratified_subset(items, parity_limit, seed, key=man.group if images is None else None)
    elif parity_limit and len(items) > parity_limit:
        idx = np.sort(np.random.default_rng(seed).choice(len(items), parity_limit, replace=False))
        items = [items[i] for i in idx]
    log(f"loading {len(items)} eval images ({source})")
    ev = load_images(source, items, classes, pp, None if images is not None else man.source_of)
    step = TriageStep.prepare(model, man, classes, pp, seed, calibration_limit, triage_target) if calibrate else None
    temperature = step.temperature if step else None
    fitted = qc = None
    if input_check:
        fitted, qc = _fit_input_check(model, ckpt, man, pp, qc_components, qc_train_limit, qc_val_limit, seed,
                                      ood_dir, qc_atol, qc_rtol, exporter, opset, qc_int8_min_spearman)

    # ---------------------------------------------------------------- fp32 export + parity
    partial = Path(str(out) + ".partial")
    int8_out = _int8_path(out)
    for stale in (partial, Path(str(int8_out) + ".partial")):
        stale.unlink(missing_ok=True)
    report: dict = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "producer": _producer(),
        "checkpoint": {"path": str(checkpoint), "sha256": ckpt_sha, "arch": ckpt["arch"], "classes": classes,
                       "epoch": ckpt.get("epoch"), "size_bytes": checkpoint.stat().st_size},
        "manifest": None if man is None else {"path": str(man.path), "sha256": man.sha256, "root": str(man.root),
                                              "sizes": man.sizes()},
        "cpu": cpu_info(),
        "eval_images": ev.summary(),
        "models": {},
    }
    try:
        log(f"exporting fp32 ONNX ({exporter})")
        t0 = time.perf_counter()
        wrapped = None if fitted is None else input_check_mod.wrap_with_score(fitted.taps, fitted.head)
        export_info = onnx_export.export_fp32(model, (pp.channels, pp.size, pp.size), partial, exporter, opset,
                                              temperature=temperature,
                                              cam_arch=ckpt["arch"] if cam_support.available else None,
                                              score=None if wrapped is None else (SCORE_OUTPUT, wrapped))
        log(f"exported in {time.perf_counter() - t0:.1f}s: opset {export_info['opset']}; checker and shape inference passed")
        import onnx

        export_info["io"] = onnx_export.io_signature(onnx.load(str(partial)))
        report["export"] = export_info

        log("parity: running PyTorch and onnxruntime on the eval images")
        torch_run = torch_runner(model, temperature)
        sess = ort_session(partial)
        onnx_run = ort_runner(sess)
        p_torch = run_batched(torch_run, ev.x)
        p_onnx = run_batched(onnx_run, ev.x)
        par = parity_mod.compare(p_torch, p_onnx, source, parity_atol, parity_min_agreement / 100.0, temperature)
        report["parity"] = par.to_dict()
        parity_mod.require(par)
        log("fp32 parity passed: " + par.describe())
        cam_meta = cam_mod.cam_metadata(cam_support)
        if cam_support.available:
            t_cam = run_batched(cam_mod.torch_cam_runner(cam_mod.with_softmax_and_cam(model, ckpt["arch"], temperature)), ev.x)
            o_cam = run_batched(cam_mod.ort_cam_runner(sess), ev.x)
            cpar = parity_mod.compare_cam(t_cam, o_cam, source, cam_tolerance, "fp32 ONNX vs PyTorch")
            report["parity_cam"] = cpar.to_dict()
            parity_mod.require_cam(cpar)
            log("fp32 " + cpar.describe())
            cam_meta = cam_mod.cam_metadata(cam_support, o_cam.shape[2:], {"fp32_vs_pytorch": cpar.to_dict()})
        else:
            log(f"no class-activation map for {ckpt['arch']}: {cam_support.reason}")
        report["cam"] = cam_meta
        qc_meta = None
        if qc is not None:
            qc_meta, report["input_check"] = qc.prove_fp32(wrapped, sess, ev.x, source)
            wrapped.remove_hooks()

        for key, probs, run in (("pytorch", p_torch, torch_run), ("onnx_fp32", p_onnx, onnx_run)):
            entry = {"metrics": classification_metrics(ev.y, probs.argmax(1), classes, ev.sources) if ev.labelled else None,
                     "agreement_vs_pytorch": round(agreement(p_torch, probs), 6)}
            if bench:
                log(f"timing {key}")
                entry["speed"] = measure_speed(run, ev.x[:32], runs=bench_runs)
            report["models"][key] = entry
        report["models"]["pytorch"]["size_bytes"] = checkpoint.stat().st_size
        report["models"]["pytorch"]["agreement_vs_pytorch"] = None
        if step:
            report.update(step.fp32(model, onnx_run, ev, _sibling(out, ".reliability.png")))
        del sess

        train_data = dict(ckpt.get("training_data") or {})
        if man is not None:
            train_data.setdefault("split_sizes", man.sizes())
            train_data["manifest_sha256_export"] = man.sha256
        reproduce = {"train": _train_command(ckpt, train_command),
                     "export": _command_line(ctx, checkpoint, out),
                     "train_config": ckpt.get("config")}
        base_extra = {
            "checkpoint_sha256": ckpt_sha,
            "training_data": train_data,
            "created": report["created"],
            "producer": report["producer"],
            "intended_use": intended_use or DEFAULT_INTENDED_USE.format(classes=", ".join(classes)) + (
                "" if fitted is None else " Its input check (qc) flags images unlike its training X-rays, and "
                "withholds the class for images that are not frontal chest X-rays."),
            "export": json.dumps({k: v for k, v in export_info.items() if k != "io"}, sort_keys=True),
        }
        training_metrics = {"test": ckpt.get("test_metrics"), "val": ckpt.get("val_metrics"), "epoch": ckpt.get("epoch")}
        report["models"]["onnx_fp32"]["path"] = str(out)
        report["models"]["onnx_fp32"]["size_bytes"] = partial.stat().st_size  # graph + weights, before metadata
        fp32_extra = {
            **base_extra,
            "metrics": {"training": training_metrics, "export": metadata_summary(report)},
            "parity": report["parity"],
            "reproduce": json.dumps(reproduce, sort_keys=True, default=str),
            **(step.fp32_metadata() if step else {}),
            "cam": cam_meta,
        }
        if qc_meta is not None:
            fp32_extra["input_check"] = qc_meta
        info = ModelInfo(classes=classes, preprocess=pp, arch=ckpt["arch"], precision="fp32",
                         input_name=onnx_export.INPUT_NAME, output=onnx_export.OUTPUT_NAME, extra=fp32_extra)
        _seal(partial, out, info, onnx_export.check_onnx, man)
    finally:
        partial.unlink(missing_ok=True)
    _announce(out, card)

    # ---------------------------------------------------------------- int8
    refused = None
    if do_int8:
        refused = _export_int8(ctx, report, out, int8_out, man, classes, pp, ev, p_torch, p_onnx, schemes,
                               calib_count, val_limit, int8_max_drop, int8_min_agreement, keep_float,
                               keep_float_node, bench, bench_runs, seed, checkpoint, base_extra,
                               training_metrics, reproduce, card, step, int8_cam_tolerance, qc)

    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report_path = _sibling(out, ".report.json")
    write_json(report, report_path)
    click.echo(table(report))
    log(f"report: {report_path} ({report['seconds']:.0f}s total)")
    if refused:
        raise quantize.QuantizationRefused(refused)
    return 0


def _export_int8(ctx, report, out, int8_out, man, classes, pp, ev, p_torch, p_onnx, schemes, calib_count,
                 val_limit, max_drop, min_agreement, keep_float, keep_float_node, bench, bench_runs, seed,
                 checkpoint, base_extra, training_metrics, reproduce, card, step=None,
                 int8_cam_tolerance=0.2, qc=None) -> str | None:
    """Search/build the int8 model; returns a refusal message, or None once FILE.int8.onnx exists."""
    train_items, val_items = man.split("train"), man.split("val")
    if not train_items or not val_items:
        raise ExportInputError(f"{man.path} needs train and val items for int8 (has {man.sizes()})")
    calib_items = stratified_subset(train_items, calib_count, seed, balanced=True, key=man.group)
    val_items = stratified_subset(val_items, val_limit, seed, key=man.group)
    log(f"int8: loading {len(calib_items)} calibration images (train split) and {len(val_items)} validation images")
    calib = load_images("calibration (train split)", calib_items, classes, pp, man.source_of)
    val = load_images("validation split", val_items, classes, pp, man.source_of)
    bound = {"max_accuracy_drop_points": max_drop, "min_agreement_percent": min_agreement}
    q: dict = {"bound": bound, "calibration": {"source_split": "train", "count": len(calib),
                                                 "selection": "equal per (source, class)", "seed": seed},
               "validation": val.summary()}
    report["int8"] = q
    with tempfile.TemporaryDirectory(prefix="cxr-export-int8-") as work:
        fp32_val = run_batched(ort_runner(ort_session(out)), val.x)
        t0 = time.perf_counter()
        try:
            builder = quantize.Int8Builder(out, work, calib.x, onnx_export.INPUT_NAME, list(keep_float), list(keep_float_node),
                                           float_outputs=[SCORE_OUTPUT] if qc is not None else [])
        except ValueError as exc:
            raise ExportInputError(str(exc)) from None
        q["kept_float"] = builder.keep_float
        log(f"int8: measuring {len(schemes)} scheme(s) on {len(val)} validation images against fp32")
        chosen, results = quantize.search(builder, schemes, val.x, val.y, fp32_val, classes, max_drop,
                                          min_agreement / 100.0, speed_runs=min(bench_runs, 30))
        q["search_seconds"] = round(time.perf_counter() - t0, 1)
        q["calibration"]["seconds_per_method"] = builder.calibration_seconds
        q["candidates"] = [{k: v for k, v in r.items() if k != "path"} for r in results]
        click.echo(int8_candidates_table(results), err=True)
        if chosen is None:
            return _refuse_int8(q, int8_out, f"none of {', '.join(s.name for s in schemes)} stayed within the bound "
                                             f"(accuracy drop <= {max_drop} points, agreement >= {min_agreement}%); "
                                             f"no int8 model written; {out.name} (fp32, parity passed) stays")
        scheme = quantize.Scheme.parse(chosen["scheme"])
        q["status"] = "ok"
        q["chosen"] = {k: v for k, v in chosen.items() if k != "path"}
        q["scheme"] = scheme.to_dict()
        partial = Path(str(int8_out) + ".partial")
        try:
            quantize.finalize(chosen["path"], partial)
            size_bytes = partial.stat().st_size  # graph + weights, before metadata
            sess = ort_session(partial)
            run = ort_runner(sess)
            p8 = run_batched(run, ev.x)
            entry = {"metrics": classification_metrics(ev.y, p8.argmax(1), classes, ev.sources) if ev.labelled else None,
                     "agreement_vs_fp32": round(agreement(p_onnx, p8), 6),
                     "agreement_vs_pytorch": round(agreement(p_torch, p8), 6),
                     "max_abs_diff_vs_fp32": float(np.abs(p8 - p_onnx).max()), "path": str(int8_out),
                     "size_bytes": size_bytes}
            cam_meta = report["cam"]
            if cam_meta.get("available"):
                o_cam8 = run_batched(cam_mod.ort_cam_runner(sess), ev.x)
                o_cam32 = run_batched(cam_mod.ort_cam_runner(ort_session(out)), ev.x)
                cpar8 = parity_mod.compare_cam(o_cam32, o_cam8, ev.name, int8_cam_tolerance, "int8 vs fp32 ONNX",
                                               criterion="p95")
                entry["cam_vs_fp32"] = cpar8.to_dict()
                log("int8 " + cpar8.describe())
                if not cpar8.passed:
                    del sess
                    return _refuse_int8(q, int8_out, f"{scheme.name} keeps the probabilities within the bound but not "
                                                     f"the class-activation maps ({cpar8.describe()}); no int8 model "
                                                     f"written; {out.name} (fp32, parity passed) stays. Try another "
                                                     f"--int8-scheme, or --int8-cam-tolerance")
                cam_meta = {**cam_meta, "parity": {**cam_meta.get("parity", {}), "int8_vs_fp32": cpar8.to_dict()}}
            if bench:
                log("timing onnx_int8")
                entry["speed"] = measure_speed(run, ev.x[:32], runs=bench_runs)
            report["models"]["onnx_int8"] = entry
            qc_meta = None
            if qc is not None:
                qc_meta, report["input_check_int8"] = qc.measure_int8(sess, ev.x, ev.name)
                why = qc.int8_refusal(qc_meta)
                if why:
                    del sess
                    return _refuse_int8(q, int8_out, f"{scheme.name} keeps the probabilities within the bound but not "
                                                     f"the input check ({why}); no int8 model written; {out.name} "
                                                     f"(fp32, parity passed) stays. Try another --int8-scheme, or "
                                                     f"--qc-int8-min-spearman")
            fp32_speed = report["models"]["onnx_fp32"].get("speed")
            if bench and fp32_speed:
                entry["speedup_vs_fp32_b1"] = round(fp32_speed["latency_ms_p50"] / entry["speed"]["latency_ms_p50"], 3)
                if entry["speedup_vs_fp32_b1"] < 1.0:
                    note = (f"int8 is not faster than fp32 on this CPU at batch 1 ({entry['speedup_vs_fp32_b1']:.2f}x; "
                            f"VNNI: {'yes' if report['cpu']['vnni'] else 'no'}); its gain here is size only")
                    q["note"] = note
                    log("NOTE: " + note)
            del sess
            quant_meta = {
                **q["scheme"],
                "calibration": {k: v for k, v in q["calibration"].items() if k != "seconds_per_method"},
                "nodes_kept_float": builder.keep_float,
                "validation": {"n": chosen["metrics"]["n_val"], "accuracy": chosen["metrics"]["accuracy"],
                               "fp32_accuracy": chosen["metrics"]["fp32_accuracy"],
                               "macro_f1": chosen["metrics"]["macro_f1"],
                               "accuracy_drop_points": chosen["metrics"]["accuracy_drop_points"],
                               "top1_agreement": chosen["metrics"]["top1_agreement"]},
                "eval": {"n": len(ev), "source": ev.name, "top1_agreement_vs_fp32": entry["agreement_vs_fp32"],
                         "max_abs_diff_vs_fp32": entry["max_abs_diff_vs_fp32"]},
                "bound": bound,
                "candidates": {r["scheme"]: (r.get("metrics") or {}).get("latency_ms_p50") for r in results},
                "measured_on": report["cpu"],
            }
            rep = dict(reproduce)
            rep["export"] = _command_line(ctx, checkpoint, out, {"do_int8": True, "int8_scheme": scheme.name})
            extra = {
                **base_extra,
                "metrics": {"training": training_metrics, "export": metadata_summary(report)},
                "parity": {"fp32": report["parity"], "int8_vs_fp32": quant_meta["eval"]},
                "quantization": quant_meta,
                "reproduce": json.dumps(rep, sort_keys=True, default=str),
                **(step.int8(run, p8, ev, report) if step else {}),
                "cam": cam_meta,
            }
            if qc_meta is not None:
                extra["input_check"] = qc_meta
            info = ModelInfo(classes=classes, preprocess=pp, arch=report["checkpoint"]["arch"], precision="int8",
                             input_name=onnx_export.INPUT_NAME, output=onnx_export.OUTPUT_NAME, extra=extra)
            import onnx

            # QDQ graphs get the plain checker; the fp32 check's strict shape inference is for fp32
            _seal(partial, int8_out, info, lambda p: onnx.checker.check_model(str(p)), man)
        finally:
            partial.unlink(missing_ok=True)
    _announce(int8_out, card, f", scheme {scheme.name}")
    return None


def _refuse_int8(q: dict, int8_out: Path, message: str) -> str:
    """Record an int8 refusal in the report entry ``q`` and remove an older int8 file (and its
    card), which must not sit beside the new fp32 model; returns the message to raise with."""
    if int8_out.exists():
        int8_out.unlink()
        _sibling(int8_out, ".card.md").unlink(missing_ok=True)
    q["status"] = "refused"
    q["message"] = message
    return message


def _fit_input_check(model, ckpt, man, pp, components, train_limit, val_limit, seed, ood_dirs, atol, rtol,
                     exporter, opset, int8_min_spearman=0.9):
    """(fitted check, its export steps), or (None, None) when there is no training split to fit on."""
    from .input_check_report import CheckExport

    if man is None or not man.split("train"):
        log("input check: SKIPPED -- it is fitted on the training split, and there is no split manifest with "
            "train items (--manifest); this model gets no qc_score and scans with qc = unchecked")
        return None, None
    train_items = stratified_subset(man.split("train"), train_limit, seed, key=man.group)
    log(f"input check: pooling {len(train_items)} training images at several depths")
    try:
        fitted = input_check_mod.fit(model, pp, train_items, components, exporter=exporter, opset=opset)
    except ValueError as exc:
        raise ExportInputError(f"input check: {exc} (or pass --no-input-check)") from None
    log(f"input check: fitted {len(fitted.depths)} depths on {fitted.n_train} images in {fitted.seconds:.0f}s "
        f"({', '.join(f'{t.name} {t.dim}' for t in fitted.taps)})")
    default_source = (ckpt.get("training_data") or {}).get("name") or Path(str(man.root)).name or "all"
    return fitted, CheckExport(fitted, pp, man, default_source, val_limit, seed, ood_dirs, atol, rtol,
                               int8_min_spearman)


if __name__ == "__main__":  # pragma: no cover
    main()
