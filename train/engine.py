"""The training loop: one readable function, every knob in ``TrainConfig``.

Split once (or reuse ``--split``), decode once into uint8, augment on tensors, AdamW with
linear warm-up then cosine decay, class weights from the training split, best checkpoint by
validation macro-F1, early stopping, resumable, and the test split touched exactly once at
the end -- it chooses nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr.runtime.metrics import classification_report, format_per_source, per_source_report
from cxr.runtime.modelinfo import sha256_file
from cxr.runtime.preprocess import Preprocessing

from . import distributed as D
from .augment import AugmentConfig, augment_batch, normalize_tensor
from .cache import decode_all
from .checkpoint import CheckpointError, load_checkpoint, to_plain
from .evaluate import predict_probs, test_report
from .models import build_model, count_parameters, load_pretrained
from .split import (load_manifest, make_split, missing_combinations, save_manifest, source_class_counts, split_counts,
                    sources_by_path, split_items)

CHECKPOINT_FORMAT = "cxr-checkpoint/1"
PROGRESS_EVERY_S = 60.0  # a step-progress line on stderr at most this often within an epoch


@dataclass
class TrainConfig:
    data: "str | list[str] | None" = None  # one folder per source
    out: str = "runs/exp"
    arch: str = "mobilenet_v2"
    # the preprocessing knobs default to the runtime's own defaults (one source)
    image_size: int = Preprocessing.size
    resize: str = Preprocessing.resize
    interpolation: str = Preprocessing.interpolation
    mean: float = Preprocessing.mean
    std: float = Preprocessing.std
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.05
    class_weights: bool = True
    # loss weights by inverse frequency of "class" or of each (source, class) group; the latter is
    # the class weighting when there is one source, and stops the largest source of a class from
    # defining that class
    balance: str = "class"
    # validation metric that picks best.pt: macro_f1, or the mean / minimum sensitivity over the
    # (source, class) groups of the validation split (every group counts, whatever its size)
    select: str = "macro_f1"
    patience: int = 8
    seed: int = 0
    split_seed: int | None = None  # None: --seed; set it to vary training seeds over one split
    split: str | None = None
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    weights: str | None = None
    device: str = "auto"
    threads: int | None = None
    workers: int | None = None
    cache_dir: str | None = None
    augment: bool = True
    robust_augment: bool = True
    shift_eval: bool = True
    limit_per_class: int | None = None
    amp: bool = True
    # NHWC activations: 1.3-1.4x faster MobileNet training on CPU (oneDNN), and the layout
    # tensor cores want under AMP; numerically the same model
    channels_last: bool = True
    dataset_name: str | None = None
    command: str | None = None
    augment_cfg: dict = field(default_factory=dict)


def _log(msg: str, info: D.DistInfo) -> None:
    if info.main:
        print(msg, file=sys.stderr, flush=True)


def pick_device(name: str, info: D.DistInfo | None = None) -> torch.device:
    """--device auto|cpu|cuda -> the torch device (this rank's GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
        return torch.device("cuda", info.local_rank if info else 0)
    return torch.device("cpu")


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def class_weight_vector(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse frequency, mean 1 over the present classes: n / (K * n_c)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _limit(items, limit: int | None, seed: int):
    if not limit:
        return items
    rng = random.Random(seed)
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    out = []
    for k in sorted(by):
        group = by[k][:]
        rng.shuffle(group)
        out.extend(group[:limit])
    return sorted(out, key=lambda t: str(t[0]))


def _prepare_split(cfg: TrainConfig, out: Path, info: D.DistInfo) -> dict:
    manifest_path = out / "split.json"
    data = data_folders(cfg.data)
    if cfg.split:
        manifest = load_manifest(Path(cfg.split), data)
    elif manifest_path.is_file():
        manifest = load_manifest(manifest_path, data)
    else:
        if not data:
            raise SystemExit("error: --data is required (or --split FILE)")
        manifest = make_split(data, tuple(cfg.split_fractions),
                              cfg.seed if cfg.split_seed is None else cfg.split_seed)
    if info.main:
        save_manifest(manifest, manifest_path)
    return manifest


def data_folders(data) -> list[Path]:
    """--data as a list of folders (a config.json of an older run holds one string)."""
    if not data:
        return []
    return [Path(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)]


def group_weight_vector(groups: np.ndarray) -> torch.Tensor:
    """Per-sample loss weights, inverse frequency of each group, mean 1 over the samples' groups."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    w = len(groups) / (len(counts) * counts[inverse].astype(np.float64))
    return torch.tensor(w, dtype=torch.float32)


def group_sensitivity(y_true: np.ndarray, y_pred: np.ndarray, sources: list[str], classes: list[str]) -> dict:
    """Sensitivity of every (source, class) group present: what --select source-class reads."""
    table = per_source_report(y_true, y_pred, sources, classes)
    return {f"{s}/{c}": v["sensitivity"] for s, r in table.items() for c, v in r["per_class"].items()}


def selection_score(select: str, val: dict, groups: dict) -> float:
    if select == "macro_f1":
        return float(val["macro_f1"])
    if select == "mean_group_sensitivity":
        return float(np.mean(list(groups.values())))
    if select == "min_group_sensitivity":
        return float(min(groups.values()))
    raise ValueError(f"unknown --select {select!r}")


def run(cfg: TrainConfig) -> dict:
    """Train, validate each epoch, test once; returns the test report (rank 0) or {}."""
    info = D.setup(pick_device(cfg.device).type)
    try:
        return _run(cfg, info)
    finally:
        D.cleanup(info)


def _run(cfg: TrainConfig, info: D.DistInfo) -> dict:
    device = pick_device(cfg.device, info)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif info.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // info.world))
    out = Path(cfg.out)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(info)

    manifest = _prepare_split(cfg, out, info)
    D.barrier(info)
    manifest_sha = sha256_file(out / "split.json")
    classes = manifest["classes"]
    k = len(classes)
    pp = Preprocessing(size=cfg.image_size, resize=cfg.resize, interpolation=cfg.interpolation,
                       mean=cfg.mean, std=cfg.std)
    src_of = sources_by_path(manifest)
    train_items = _limit(split_items(manifest, "train"), cfg.limit_per_class, cfg.seed)
    val_items = _limit(split_items(manifest, "val"), cfg.limit_per_class and max(2, cfg.limit_per_class // 4), cfg.seed)
    val_sources = [src_of[p] for p, _ in val_items]
    if not train_items or not val_items:
        raise SystemExit("error: the split has no training or no validation images")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    x_train = torch.from_numpy(decode_all([p for p, _ in train_items], pp, cfg.workers, cache_dir, "train"))
    y_train = torch.tensor([y for _, y in train_items], dtype=torch.int64)
    x_val = decode_all([p for p, _ in val_items], pp, cfg.workers, cache_dir, "val")
    y_val = np.array([y for _, y in val_items], dtype=np.int64)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes=k, in_channels=pp.channels, input_size=pp.size)
    pretrained = load_pretrained(model, cfg.arch, cfg.weights, classes) if cfg.weights else None
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    n_params = count_parameters(model)

    if cfg.balance not in ("class", "source-class"):
        raise SystemExit(f"error: --balance must be class or source-class, not {cfg.balance!r}")
    weights = class_weight_vector(y_train.numpy(), k) if cfg.class_weights else None
    sample_w = None
    if cfg.class_weights and cfg.balance == "source-class":
        groups = [f"{src_of[p]}/{classes[y]}" for p, y in train_items]
        sample_w = group_weight_vector(np.array(groups))
        weights = None
    criterion = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                          label_smoothing=cfg.label_smoothing,
                                          reduction="mean" if sample_w is None else "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = len(train_items) // info.world
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, cfg.min_lr_ratio))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict] = []
    best_f1, bad_epochs, start_epoch = -1.0, 0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.is_file():
        try:
            state = load_checkpoint(last_path, map_location=device)  # data only, never code
        except CheckpointError as exc:
            raise SystemExit(f"error: cannot resume: {exc}") from None
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_f1, bad_epochs = state["history"], state["best_val_macro_f1"], state["bad_epochs"]
        start_epoch = state["epoch"]
        _log(f"[resume] from {last_path} at epoch {start_epoch}", info)

    counts = split_counts(manifest)
    training_data = {
        "name": cfg.dataset_name or " + ".join(s["name"] for s in manifest["sources"]),
        "sources": manifest["sources"],
        "source_class_counts": source_class_counts(manifest),
        "missing_combinations": missing_combinations(manifest),
        "classes": classes,
        "class_counts": {c: sum(counts[s][c] for s in counts) for c in classes},
        "split_sizes": {s: sum(v.values()) for s, v in counts.items()},
        "split_counts": counts,
        "manifest": "split.json",
        "manifest_sha256": manifest_sha,
        "seed": manifest["seed"],
        "used_train": len(train_items),
        "used_val": len(val_items),
    }
    cfg_dict = asdict(cfg)
    if info.main:
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        _log(f"[train] {cfg.arch} ({n_params / 1e6:.2f} M params) on {device}, {k} classes {classes}, "
             f"{len(train_items)} train / {len(val_items)} val images at {pp.size}px, world={info.world}", info)
        if weights is not None:
            _log("[train] class weights " + ", ".join(f"{c}={w:.3f}" for c, w in zip(classes, weights.tolist())), info)
        if sample_w is not None:
            weight_of = dict(zip(groups, sample_w.tolist()))
            n_of = Counter(groups)
            _log("[train] (source, class) weights "
                 + ", ".join(f"{g}={w:.2f} (n={n_of[g]})" for g, w in weight_of.items()), info)

    def checkpoint(epoch: int, val_metrics: dict, extra: dict | None = None) -> dict:
        ck = {
            "format": CHECKPOINT_FORMAT,
            "arch": cfg.arch,
            "classes": classes,
            "preprocess": pp.to_dict(),
            "state_dict": {k_: v.detach().cpu() for k_, v in model.state_dict().items()},
            "model_kwargs": {"num_classes": k, "in_channels": pp.channels, "input_size": pp.size},
            "epoch": epoch,
            "val_metrics": val_metrics,
            "training_data": training_data,
            "config": cfg_dict,
            "parameters": n_params,
            "pretrained": pretrained,
        }
        if extra:
            ck.update(extra)
        return to_plain(ck)  # loadable with weights_only=True

    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    aug_cfg = AugmentConfig(robust=cfg.robust_augment, **cfg.augment_cfg)
    n_train = len(train_items)
    usable = per_rank * info.world

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch * 10 + info.rank)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + info.rank)
        aug_rng = random.Random(cfg.seed * 7919 + epoch * 31 + info.rank)
        perm = torch.randperm(n_train, generator=gen)[:usable][info.rank::info.world]
        net.train()
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        cm = torch.zeros(k, k, dtype=torch.int64, device=device)
        next_note = t0 + PROGRESS_EVERY_S
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) == 0:
                continue
            xb_u8 = x_train[idx]
            if cfg.augment:
                x01 = augment_batch(xb_u8, aug_cfg, aug_gen, aug_rng)
            else:
                x01 = xb_u8.unsqueeze(1).float() / 255.0
            xb = normalize_tensor(x01, pp).to(device, non_blocking=True, memory_format=fmt)
            yb = y_train[idx].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = net(xb)
                loss = criterion(logits.float(), yb)
                if sample_w is not None:
                    wb = sample_w[idx].to(device)
                    loss = (loss * wb).sum() / wb.sum()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double() * len(idx)
            pred = logits.detach().argmax(1)
            cm += torch.bincount(yb * k + pred, minlength=k * k).view(k, k)
            now = time.perf_counter()
            if info.main and now >= next_note and step + 1 < steps_per_epoch:
                next_note = now + PROGRESS_EVERY_S
                rate = (step + 1) / (now - t0)
                _log(f"  epoch {epoch + 1}: step {step + 1}/{steps_per_epoch}  "
                     f"loss {float(loss_sum.item()) / max(1, int(cm.sum())):.4f}  "
                     f"{rate * cfg.batch_size * info.world:.0f} img/s  "
                     f"epoch ETA {(steps_per_epoch - step - 1) / rate:.0f}s", info)
        D.all_reduce_sum(loss_sum, info)
        D.all_reduce_sum(cm, info)
        train_time = time.perf_counter() - t0
        stop = False
        if info.main:
            cm_np = cm.cpu().numpy()
            n_seen = int(cm_np.sum())
            y_t = np.repeat(np.arange(k), cm_np.sum(1))
            y_p = np.concatenate([np.repeat(np.arange(k), cm_np[i]) for i in range(k)])
            tr = classification_report(y_t, y_p, classes)
            probs = predict_probs(model, x_val, pp, device)
            val = classification_report(y_val, probs.argmax(1), classes, probs)
            groups_val = group_sensitivity(y_val, probs.argmax(1), val_sources, classes)
            score = selection_score(cfg.select, val, groups_val)
            val_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                        torch.from_numpy(y_val)).item())
            rec = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - t0,
                "train_seconds": train_time,
                "train": {"loss": float(loss_sum.item()) / max(1, n_seen), "accuracy": tr["accuracy"],
                          "macro_f1": tr["macro_f1"]},
                "val": {"loss": val_loss, "accuracy": val["accuracy"], "macro_f1": val["macro_f1"],
                        "sensitivity": {c: v["sensitivity"] for c, v in val["per_class"].items()},
                        "group_sensitivity": groups_val, "selection": {cfg.select: score}},
            }
            history.append(rec)
            improved = score > best_f1
            if improved:
                best_f1, bad_epochs = score, 0
                torch.save(checkpoint(epoch + 1, val), best_path)
            else:
                bad_epochs += 1
            _log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train']['loss']:.4f}  "
                 f"train acc {tr['accuracy']:.4f}  val loss {val_loss:.4f}  val acc {val['accuracy']:.4f}  "
                 f"val macro-F1 {val['macro_f1']:.4f}  min group sens {min(groups_val.values()):.3f}"
                 f"{' *' if improved else ''}  "
                 f"lr {rec['lr']:.2e}  {rec['epoch_seconds']:.0f}s", info)
            state = checkpoint(epoch + 1, val, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "best_val_macro_f1": best_f1, "bad_epochs": bad_epochs})
            torch.save(state, last_path.with_suffix(".tmp"))
            os.replace(last_path.with_suffix(".tmp"), last_path)
            (out / "metrics.json").write_text(json.dumps(history, indent=1))
            try:
                from .plots import plot_curves
                plot_curves(history, out / "curves.png")
            except Exception as exc:  # plotting must never kill a long run
                _log(f"[warn] could not draw curves: {exc}", info)
            stop = cfg.patience > 0 and bad_epochs >= cfg.patience
            if stop:
                _log(f"[train] early stop: no val {cfg.select} gain for {cfg.patience} epochs", info)
        if D.broadcast_flag(stop, info, device):
            break

    if not info.main:
        return {}
    return finish(out, device, cfg.shift_eval, cfg.limit_per_class, cfg.seed, cfg.workers, cache_dir)


def finish(out: Path, device: torch.device, shift: bool = True, limit: int | None = None, seed: int = 0,
           workers: int | None = None, cache_dir: Path | None = None, manifest_path: Path | None = None,
           data_root: "Path | list[Path] | None" = None) -> dict:
    """Evaluate best.pt once on the test split; write the report, confusion PNG, and update best.pt.

    ``manifest_path`` (default: the run's ``split.json``) and ``data_root`` let a checkpoint trained
    elsewhere, e.g. on a packed copy of the images, be judged on the original files of its split.
    """
    best_path = out / "best.pt"
    if not best_path.is_file():
        raise SystemExit(f"error: no best.pt in {out}")
    try:
        ck = load_checkpoint(best_path)  # data only, never code
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    pp = Preprocessing.from_dict(ck["preprocess"])
    manifest_path = Path(manifest_path) if manifest_path else out / "split.json"
    manifest = load_manifest(manifest_path, data_root)
    if manifest["classes"] != ck["classes"]:
        raise SystemExit(f"error: {manifest_path} has classes {manifest['classes']}, the checkpoint {ck['classes']}")
    src_of = sources_by_path(manifest)
    test_items = _limit(split_items(manifest, "test"), limit and max(2, limit // 4), seed)
    test_sources = [src_of[p] for p, _ in test_items]
    paths = [p for p, _ in test_items]
    x_test = decode_all(paths, pp, workers, cache_dir, "test")
    y_test = np.array([y for _, y in test_items], dtype=np.int64)
    model = build_model(ck["arch"], **ck["model_kwargs"])
    model.load_state_dict(ck["state_dict"])
    model.to(device)
    t0 = time.perf_counter()
    report = test_report(model, x_test, y_test, paths, ck["classes"], pp, device, shift=shift, sources=test_sources)
    report.update({
        "split": "test",
        "checkpoint_epoch": ck["epoch"],
        "arch": ck["arch"],
        "parameters": ck["parameters"],
        "image_size": pp.size,
        "eval_seconds": time.perf_counter() - t0,
        "manifest": str(manifest_path.resolve()),
        "manifest_sha256": sha256_file(manifest_path),
        "sources": manifest["sources"],
        "missing_combinations": missing_combinations(manifest),
        "caveat": ("Research use only, never a diagnosis. Split by image (no patient ids); each class of the "
                   "COVID-19 Radiography Database comes from different sources, so a model can learn the "
                   "source instead of the disease (DeGrave et al., Nat Mach Intell 2021)."),
    })
    history_file = out / "metrics.json"
    if history_file.is_file():
        hist = json.loads(history_file.read_text())
        secs = [h["train_seconds"] for h in hist]
        report["epochs_run"] = len(hist)
        report["mean_epoch_seconds"] = float(np.mean(secs)) if secs else None
    (out / "test_report.json").write_text(json.dumps(report, indent=2))
    ck["test_metrics"] = report
    torch.save(to_plain(ck), best_path.with_suffix(".tmp"))
    os.replace(best_path.with_suffix(".tmp"), best_path)
    try:
        from .plots import plot_confusion
        plot_confusion(report["confusion_matrix"], ck["classes"], out / "confusion_matrix.png")
    except Exception as exc:  # pragma: no cover
        print(f"[warn] could not draw confusion matrix: {exc}", file=sys.stderr)
    pc = report["per_class"]
    print(f"[test] {ck['arch']} epoch {ck['epoch']}: accuracy {report['accuracy']:.4f}  macro-F1 "
          f"{report['macro_f1']:.4f}  " + "  ".join(f"sens[{c}] {v['sensitivity']:.3f}" for c, v in pc.items()),
          file=sys.stderr)
    print(format_per_source(report["by_source"], ck["classes"], "[test] by source:"), file=sys.stderr)
    if "acquisition_shift" in report:
        s = report["acquisition_shift"]
        print(f"[test] acquisition shift ({s['pipeline']}): accuracy {s['accuracy']:.4f} "
              f"(drop {s['accuracy_drop_points']:.2f} points), macro-F1 {s['macro_f1']:.4f}", file=sys.stderr)
    return report
