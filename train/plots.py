"""Curves and confusion-matrix PNGs, drawn from the recorded metrics (never typed-in numbers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy, macro-F1; and, when the run recorded them, the validation sensitivity of
    every (source, class) group, since a pooled curve can rise while one source falls."""
    epochs = [h["epoch"] for h in history]
    groups = list(dict.fromkeys(g for h in history for g in (h["val"].get("group_sensitivity") or {})))
    panels = 4 if len(groups) > 1 else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8 if panels == 3 else 4.6))
    for ax, key, title in zip(axes, ("loss", "accuracy", "macro_f1"), ("loss", "accuracy", "macro-F1")):
        ax.plot(epochs, [h["train"][key] for h in history], "o-", label="train")
        ax.plot(epochs, [h["val"][key] for h in history], "s-", label="val")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if panels == 4:
        ax = axes[3]
        for g in groups:
            pts = [(h["epoch"], h["val"]["group_sensitivity"][g]) for h in history
                   if g in (h["val"].get("group_sensitivity") or {})]
            ax.plot(*zip(*pts), "o-", label=g, markersize=4)
        ax.set_title("val sensitivity by (source, class)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str = "test confusion matrix") -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
