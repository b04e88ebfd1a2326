"""``cxr-train``: train a chest X-ray classifier from a folder of images.

Works the same under ``torchrun --nproc_per_node=N cxr-train ...`` (DistributedDataParallel).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from cxr.runtime.preprocess import RESIZE_POLICIES, Preprocessing

from .models import ARCHS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(exists=True, file_okay=False), multiple=True,
              help="Labelled folder: <Class>/images/*.png or <Class>/*. Repeat it: each folder is a source, "
                   "the split is stratified by (source, class), every metric is reported by source.")
@click.option("--arch", type=click.Choice(ARCHS), default="mobilenet_v2")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Run directory (created).")
@click.option("--image-size", type=int, default=Preprocessing.size, help="Square input size in pixels.")
@click.option("--resize", type=click.Choice(RESIZE_POLICIES), default=Preprocessing.resize, help="How non-square images fit the input.")
@click.option("--epochs", type=int, default=30)
@click.option("--batch-size", type=int, default=32)
@click.option("--lr", type=float, default=1e-3, help="Peak AdamW learning rate (after warm-up).")
@click.option("--weight-decay", type=float, default=0.01)
@click.option("--warmup-epochs", type=float, default=1.0)
@click.option("--min-lr-ratio", type=click.FloatRange(0, 1), default=0.01,
              help="Cosine decay ends at this fraction of the peak; 1 keeps the rate constant (the study's Adam 1e-4).")
@click.option("--label-smoothing", type=float, default=0.05)
@click.option("--no-class-weights", is_flag=True, help="Plain cross-entropy (default weighs by inverse training frequency).")
@click.option("--balance", type=click.Choice(["class", "source-class"]), default="source-class",
              help="Loss weights by inverse frequency of each class, or of each (source, class) group "
                   "(the same thing with one source).")
@click.option("--select", type=click.Choice(["macro_f1", "mean_group_sensitivity", "min_group_sensitivity"]),
              default="macro_f1", help="Validation metric that picks best.pt and drives --patience; the group "
                                       "ones read the sensitivity of every (source, class) group.")
@click.option("--patience", type=int, default=8, help="Early stop after this many epochs without val macro-F1 gain (0: off).")
@click.option("--seed", type=int, default=0)
@click.option("--split-seed", type=int, help="Seed of the split --data makes (default: --seed); fix it to vary --seed over one test set.")
@click.option("--split", "split_file", type=click.Path(exists=True, dir_okay=False), help="Reuse a split.json so experiments share one test set.")
@click.option("--split-fractions", type=(float, float, float), default=(0.70, 0.15, 0.15), help="train val test")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local weights: a torchvision state dict (ImageNet; the RGB stem is folded to 1 channel, the head skipped) or a cxr-train checkpoint (head rows matched to the classes by name, new classes start fresh).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--threads", type=int, help="torch intra-op threads (default: all cores).")
@click.option("--workers", type=int, help="Decode threads for the one-time image cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Keep decoded uint8 images on disk between runs.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC memory layout (faster convolutions on CPU and on CUDA tensor cores).")
@click.option("--no-augment", is_flag=True, help="Disable all augmentation.")
@click.option("--no-robust-augment", is_flag=True, help="Keep only the study's flip/rotate/zoom augmentation.")
@click.option("--no-shift-eval", is_flag=True, help="Skip the acquisition-shift test (resize 299 + JPEG q75).")
@click.option("--limit-per-class", type=int, help="Use at most N training images per class (quick experiments).")
@click.option("--dataset-name", help="Name recorded in the checkpoint (default: the data folder's name).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pt (its config wins except --epochs, --threads, --workers and --device).")
@click.option("--test-only", is_flag=True,
              help="No training: test OUT/best.pt on the test split of --split (default OUT/split.json), "
                   "images under --data if given, and write the test report.")
def main(**kw) -> None:
    """Train ARCH on DATA and write checkpoint, split, metrics, plots and a test report to OUT."""
    from .engine import TrainConfig, run

    out = Path(kw["out"])
    if kw["test_only"]:
        _test_only(out, kw)
        return
    if kw["resume"]:
        cfg_file = out / "config.json"
        if not (out / "last.pt").is_file() or not cfg_file.is_file():
            raise click.UsageError(f"--resume: no last.pt/config.json in {out}")
        _refuse_unsafe_checkpoint(out / "last.pt", "cannot resume: ")  # now, not after decoding the data
        saved = json.loads(cfg_file.read_text())
        saved["epochs"] = kw["epochs"]
        for key in ("threads", "device", "workers"):  # where it runs, not what it learns: the command line wins
            if kw[key] is not None and (key != "device" or kw[key] != "auto"):
                saved[key] = kw[key]
        saved["out"] = str(out)  # the folder asked for, also when the run was moved or copied
        saved["split_fractions"] = tuple(saved["split_fractions"])
        cfg = TrainConfig(**saved)
    else:
        if not kw["data"] and not kw["split_file"]:
            raise click.UsageError("--data DIR (or --split FILE) is required")
        if (out / "last.pt").is_file():
            raise click.UsageError(f"{out} already holds a run; use --resume or another --out")
        cfg = TrainConfig(
            data=list(kw["data"]) or None, out=str(out), arch=kw["arch"], image_size=kw["image_size"], resize=kw["resize"],
            epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], weight_decay=kw["weight_decay"],
            warmup_epochs=kw["warmup_epochs"], min_lr_ratio=kw["min_lr_ratio"], label_smoothing=kw["label_smoothing"],
            class_weights=not kw["no_class_weights"], balance=kw["balance"], select=kw["select"],
            patience=kw["patience"], seed=kw["seed"],
            split_seed=kw["split_seed"],
            split=kw["split_file"], split_fractions=tuple(kw["split_fractions"]), weights=kw["weights"],
            device=kw["device"], threads=kw["threads"], workers=kw["workers"], cache_dir=kw["cache_dir"],
            augment=not kw["no_augment"], robust_augment=not kw["no_robust_augment"],
            shift_eval=not kw["no_shift_eval"], limit_per_class=kw["limit_per_class"],
            channels_last=kw["channels_last"], dataset_name=kw["dataset_name"], command=shlex.join(["cxr-train", *sys.argv[1:]]),
        )
    report = run(cfg)
    if report:
        print(json.dumps({k: report[k] for k in ("accuracy", "macro_f1") if k in report}), file=sys.stdout)


def _refuse_unsafe_checkpoint(path: Path, context: str) -> None:
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        raise SystemExit(f"error: {context}{exc}") from None


def _test_only(out: Path, kw: dict) -> None:
    import torch

    from .engine import finish, pick_device

    if not (out / "best.pt").is_file():
        raise click.UsageError(f"--test-only: no best.pt in {out}")
    manifest = Path(kw["split_file"]) if kw["split_file"] else out / "split.json"
    if not manifest.is_file():
        raise click.UsageError(f"--test-only: no split manifest {manifest} (give --split FILE)")
    device = pick_device(kw["device"])
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    report = finish(out, device, shift=not kw["no_shift_eval"],
                    workers=kw["workers"], cache_dir=Path(kw["cache_dir"]) if kw["cache_dir"] else None,
                    manifest_path=manifest, data_root=[Path(d) for d in kw["data"]] or None)
    print(json.dumps({k: report[k] for k in ("accuracy", "macro_f1")}), file=sys.stdout)


if __name__ == "__main__":
    main()
