"""Classification metrics in plain numpy, shared by training, export and the benchmark.

Sensitivity is per-class recall (one-vs-rest); specificity is the true-negative rate of the
same one-vs-rest split. AUC is one-vs-rest, computed from ranks (Mann-Whitney U), so it
needs no sklearn. ECE uses equal-width confidence bins.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def auroc(negatives, positives) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U, from
    average ranks); None when either side is empty. Non-finite scores rank as the highest."""
    neg = np.asarray(negatives, np.float64).reshape(-1)
    pos = np.asarray(positives, np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        return None
    s = np.concatenate([neg, pos])
    s = np.where(np.isfinite(s), s, np.inf)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, np.float64)
    sorted_s = s[order]
    # average rank per run of equal values
    starts = np.r_[0, np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class; None where a class has no positives or no negatives."""
    y_true = np.asarray(y_true)
    return [auroc(probs[y_true != c, c], probs[y_true == c, c]) for c in range(probs.shape[1])]


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_report(y_true, y_pred, classes: list[str], probs: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1 and per-class precision/sensitivity/specificity/F1 (+AUC, ECE with probs)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    n = cm.sum()
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    tn = n - support - predicted + tp
    specificity = _safe_div(tn, n - support)
    present = support > 0
    report = {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            c: {
                "support": int(support[i]),
                "precision": float(precision[i]),
                "sensitivity": float(recall[i]),
                "specificity": float(specificity[i]),
                "f1": float(f1[i]),
            }
            for i, c in enumerate(classes)
        },
    }
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        aucs = roc_auc_ovr(y_true, probs)
        for c, a in zip(classes, aucs):
            report["per_class"][c]["roc_auc"] = a
        valid = [a for a in aucs if a is not None]
        report["macro_roc_auc"] = float(np.mean(valid)) if valid else None
        report["ece"] = expected_calibration_error(y_true, probs)
    return report


def per_source_report(y_true, y_pred, sources, classes: list[str]) -> dict[str, dict]:
    """Accuracy and each present class's sensitivity within every source.

    An accuracy over a pool of sources can hide a source the model fails on (a class that
    comes from one hospital teaches the hospital), so every report carries this table.
    Sources keep their first-seen order; ``-1`` labels (unknown class) are left out.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    sources = np.asarray(list(sources), dtype=object)
    out: dict[str, dict] = {}
    for src in dict.fromkeys(sources.tolist()):
        sel = (sources == src) & (y_true >= 0)
        n = int(sel.sum())
        if n == 0:
            continue
        t, p = y_true[sel], y_pred[sel]
        sens = {}
        for i, c in enumerate(classes):
            m = t == i
            if m.any():
                sens[c] = {"n": int(m.sum()), "sensitivity": float((p[m] == i).mean())}
        out[str(src)] = {"n": n, "accuracy": float((t == p).mean()), "per_class": sens}
    return out


def format_per_source(table: dict[str, dict], classes: list[str], title: str = "by source") -> str:
    """A plain-text table: source, n, accuracy, then each class's sensitivity (n) or '-'."""
    head = ["source", "n", "accuracy"] + [f"sens {c}" for c in classes]
    rows = []
    for src, r in table.items():
        cells = [src, str(r["n"]), f"{100 * r['accuracy']:.2f} %"]
        for c in classes:
            v = r["per_class"].get(c)
            cells.append(f"{v['sensitivity']:.3f} ({v['n']})" if v else "-")
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def golden_section_min(f, a: float, b: float, tol: float = 1e-6) -> float:
    """The minimiser of a unimodal ``f`` on [a, b] by golden-section search, to within ``tol``."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2
