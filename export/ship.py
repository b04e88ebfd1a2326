"""Copy an exported fp32/int8 pair into ``models/`` and write the manifest the runtime reads.

The default precision follows the export's own measurements: int8 when ``cxr-export`` wrote an
int8 model (it only does so when the measured accuracy drop is within its bound) **and** that
model was not slower than fp32 where it was measured; else fp32. An int8 model that is
accurate enough but slower (s8s8 kernels on a CPU without VNNI, for example) still ships, for
``--precision int8``, but would make every default scan slower for no gain in accuracy.
The reason is recorded in ``manifest.json``.

    python -m cxr.export.ship exports/cxr-mnv2-224.onnx --to models/
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

MAX_MODELS_MB = 40.0


def _siblings(onnx_path: Path) -> dict[str, Path]:
    stem = onnx_path.name[: -len(".onnx")]
    d = onnx_path.parent
    return {
        "fp32": onnx_path,
        "int8": d / f"{stem}.int8.onnx",
        "report": d / f"{stem}.report.json",
        "card": d / f"{stem}.card.md",
        "int8_card": d / f"{stem}.int8.card.md",
    }


def ship(onnx_path: Path, to: Path) -> dict:
    files = _siblings(onnx_path)
    if not files["fp32"].is_file():
        raise click.UsageError(f"{onnx_path} does not exist")
    if not files["report"].is_file():
        raise click.UsageError(f"{files['report']} is missing: ship only what cxr-export finished")
    report = json.loads(files["report"].read_text())
    if not report.get("parity", {}).get("passed", True):
        raise click.UsageError("the export report says fp32 parity did not pass")
    int8_status = (report.get("int8") or {}).get("status")
    has_int8 = files["int8"].is_file() and int8_status == "ok"
    to.mkdir(parents=True, exist_ok=True)
    copied = {}
    for key, src in files.items():
        if src.is_file() and (key not in ("int8", "int8_card") or has_int8):
            shutil.copy2(src, to / src.name)
            copied[key] = src.name
    speed = {k: ((report.get("models") or {}).get(k) or {}).get("speed") or {} for k in ("onnx_fp32", "onnx_int8")}
    ips32, ips8 = speed["onnx_fp32"].get("throughput_ips"), speed["onnx_int8"].get("throughput_ips")
    int8_default = has_int8 and not (ips32 and ips8 and ips8 < ips32)
    bound = json.dumps((report.get("int8") or {}).get("bound", {}))
    cpu = (report.get("cpu") or {}).get("model", "the export machine")
    if int8_default:
        reason = f"int8 within the export bound {bound}"
    elif has_int8:
        reason = (f"int8 is within the export bound {bound} but slower than fp32 on {cpu} "
                  f"({ips8} vs {ips32} images/s at batch {speed['onnx_fp32'].get('throughput_batch')}); "
                  "it ships for --precision int8")
    else:
        reason = f"no int8 model within the export bound (int8 status: {int8_status or 'not built'})"
    manifest = {
        "default_precision": "int8" if int8_default else "fp32",
        "reason": reason,
        "models": {"fp32": copied["fp32"], **({"int8": copied["int8"]} if has_int8 else {})},
        "cards": {k: v for k, v in copied.items() if k in ("card", "int8_card")},
        "report": copied.get("report"),
    }
    (to / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f.stat().st_size for f in to.iterdir() if f.is_file()) / 1e6
    if total > MAX_MODELS_MB:
        print(f"warning: {to} holds {total:.1f} MB, over the {MAX_MODELS_MB:.0f} MB budget", file=sys.stderr)
    return manifest


@click.command()
@click.argument("onnx_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True)
def main(onnx_path: Path, to: Path) -> None:
    """Ship ONNX_PATH (and its .int8.onnx, report and cards) into the models folder."""
    manifest = ship(onnx_path, to)
    click.echo(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
