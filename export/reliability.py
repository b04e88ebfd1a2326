"""Reliability diagram (before vs after temperature scaling) as a PNG beside the export report.

One panel per state: for each of the 15 confidence bins of the ECE, the accuracy of the top-1
class (bars) against the diagonal a calibrated model would follow, with the bin's share of
images underneath, so an empty bin is not mistaken for a bad one.
"""

from __future__ import annotations

import os

import numpy as np


def plot(before: dict, after: dict, ece_before: float | None, ece_after: float | None, title: str,
         path: "str | os.PathLike[str]") -> str:
    """Write the diagram for two ``temperature.reliability_bins`` results; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, (name, bins, e) in enumerate((("before (raw softmax)", before, ece_before),
                                           ("after (temperature scaled)", after, ece_after))):
        edges = np.asarray(bins["edges"])
        centre, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        acc = np.asarray(bins["accuracy"], dtype=float)
        conf = np.asarray(bins["confidence"], dtype=float)
        count = np.asarray(bins["count"], dtype=float)
        ax = axes[0, col]
        ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--", label="calibrated")
        ax.bar(centre, np.nan_to_num(acc), width=width * 0.95, color="tab:blue", alpha=0.75, label="accuracy")
        ax.scatter(conf, acc, color="tab:red", s=12, zorder=3, label="bin (mean confidence, accuracy)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {'-' if e is None else f'{e:.3f}'}", fontsize=10)
        if col == 0:
            ax.set_ylabel("accuracy of top-1 class")
            ax.legend(loc="upper left", fontsize=8)
        share = count / max(count.sum(), 1)
        axes[1, col].bar(centre, share, width=width * 0.95, color="0.4")
        axes[1, col].set_xlabel("top-1 confidence (15 equal-width bins)")
        if col == 0:
            axes[1, col].set_ylabel("share")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
