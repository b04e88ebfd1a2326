"""``cxr-infer adapt DIR... --out SITE.onnx``: a site model, fitted on the workstation, no torch.

A model's figures move at a new hospital (docs/loso.md: most of its normals referred, a
shifted ``qc_score`` and no warning). From the site's labelled films (folders as ``validate``
reads them) this fits, in order:

(d) the **head**: the Normal row of the last layer refitted on the penultimate features by
    ridge-penalised logistic regression (normal vs abnormal) whose offset is the shipped
    normal-vs-rest logit, so the penalty pulls toward the shipped weights. It is **adopted only**
    when its out-of-fold AUROC beats the shipped head's on the same films (paired bootstrap:
    the 95 % interval of the difference above 0); otherwise the shipped head stays and the
    provenance says why. The other classes' rows never change.
(b) the **temperature** (the graph's ``Div`` before the softmax), by the films' likelihood.
(a) the **refer threshold** for the asked sensitivity: the conformal rule (refer when the score
    reaches the k-th lowest abnormal film's, k = floor((1 - S)(n + 1))), so a new abnormal film
    is referred with probability at least S; the Wilson lower bound of the fit films'
    sensitivity is reported beside it.
(c) the **input check's reference**: the centre of its feature statistics (``qc.mean``) moved
    to the site's films and its offset set so their median score is the training films', so the
    site's own films stop reading as unfamiliar or shifted; its thresholds stay. The shift
    check's reference becomes the site's films.

The output is a new self-describing model (``cxr.adaptation``: base sha256, films, what was
refitted, held-out figures, date; a card beside it). Nothing else changes: every other
initializer and node is compared with the base model's, and the outputs are checked against
what the fit predicts, before the file is written. The base file is never written.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import model_edit
from ..metrics import auroc, golden_section_min, softmax
from . import shift as shift_mod
from .validate import collect, rate, rate_text, wilson

FORMAT = "cxr-adaptation/1"
MIN_GROUP = 30  # normal and abnormal films each (fit part); below it the fit would be noise
FOLDS = 5
LAMBDAS = (1.0, 10.0, 100.0, 1000.0)  # ridge strength on standardised features, times n/100
BOOTSTRAP = 1000
DEFAULT_SENSITIVITY = 0.98
PARITY_FILMS = 32
PARITY_TOL = 1e-4


class AdaptError(ValueError):
    """The films or the model cannot make a site model; the message says what is missing."""


# ----------------------------------------------------------------------------- the graph's parts


@dataclass
class Head:
    """Where the parts ``adapt`` may refit sit in a cxr-export graph."""

    features: str  # the penultimate features (the last Gemm's input)
    logits: str  # what the Div divides: the Gemm's output, or its quantize-dequantize (int8)
    gemm: Any
    div: Any  # logits / temperature
    temperature: float
    weight: np.ndarray  # [K, d], dequantized when the model is int8
    bias: np.ndarray  # [K]
    cam: Any  # the Conv that draws the class-activation map from the same head, or None
    qc_sub: Any  # Sub(stats, qc.mean), or None without an input check
    qc_stats: str | None
    qc_mean: np.ndarray | None
    qc_offset: np.ndarray | None
    logits_qdq: bool = False  # int8: the logits pass a QuantizeLinear/DequantizeLinear pair
    cam_weight: np.ndarray | None = None  # [K, d, 1, 1]


def _const(proto, name: str) -> np.ndarray:
    """The value of ``name`` when it is an initializer or a constant expression of them
    (DequantizeLinear, Unsqueeze, Reshape, Identity, Constant)."""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if name not in node.output:
            continue
        if node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Identity":
            return _const(proto, node.input[0])
        if node.op_type == "DequantizeLinear":  # (x - zero point) * scale, in float32 as onnxruntime computes it
            x = _const(proto, node.input[0]).astype(np.int64)
            scale = _const(proto, node.input[1]).astype(np.float32)
            zp = _const(proto, node.input[2]).astype(np.int64) if len(node.input) > 2 and node.input[2] else np.int64(0)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if np.ndim(scale) == 1 and x.ndim > 1:
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
            return (x - zp).astype(np.float32) * scale
        break
    raise AdaptError(f"{name} is not a constant of the graph")


def locate(proto) -> Head:
    """Find the head (Gemm -> Div by the temperature -> Softmax 'probabilities'), the heatmap's
    Conv and the input check's centre; an AdaptError when the graph is not cxr-export's."""
    g = proto.graph
    prod = {o: n for n in g.node for o in n.output}
    out = g.output[0].name
    sm = prod.get(out)
    div = prod.get(sm.input[0]) if sm is not None and sm.op_type == "Softmax" else None
    gemm = prod.get(div.input[0]) if div is not None and div.op_type == "Div" else None
    qdq = False
    if gemm is not None and gemm.op_type == "DequantizeLinear":  # int8: the logits are quantized on their way
        q = prod.get(gemm.input[0])
        gemm = prod.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        qdq = True
    if gemm is None or gemm.op_type != "Gemm":
        raise AdaptError("the graph does not end in Gemm -> Div (temperature) -> Softmax as cxr-export writes it")
    attrs = {a.name: a for a in gemm.attribute}
    if "transB" not in attrs or attrs["transB"].i != 1 or ("transA" in attrs and attrs["transA"].i != 0):
        raise AdaptError("the last layer is not a plain Gemm(features, W^T, b)")
    weight, bias = _const(proto, gemm.input[1]), _const(proto, gemm.input[2])
    t = float(np.asarray(_const(proto, div.input[1])).reshape(-1)[0])
    cam = None
    cam_names = {o.name for o in g.output} & {"cam"}
    if cam_names:
        c = prod.get("cam")
        if c is None or c.op_type != "Conv" or len(c.input) < 3 or c.input[2] != gemm.input[2]:
            raise AdaptError("the heatmap output is not drawn from the last layer as cxr-export draws it")
        cam = c
    sub = next((n for n in g.node if n.op_type == "Sub" and len(n.input) == 2 and n.input[1] == "qc.mean"), None)
    offset = None
    if sub is not None:
        offset = _const(proto, "qc.offset")
    return Head(features=gemm.input[0], logits=div.input[0], gemm=gemm, div=div, temperature=t, logits_qdq=qdq,
                cam_weight=_const(proto, cam.input[1]).astype(np.float32) if cam is not None else None,
                weight=weight.astype(np.float32), bias=bias.astype(np.float32), cam=cam, qc_sub=sub,
                qc_stats=sub.input[0] if sub is not None else None,
                qc_mean=_const(proto, "qc.mean") if sub is not None else None, qc_offset=offset)


def _with_outputs(proto, names: Sequence[str]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n and n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return m


def _session(proto, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the films


def embed(model, head: Head, proto, paths: Sequence[str], progress: Callable[[int, int], None] | None = None,
          batch_size: int = 16):
    """Run the base graph once over ``paths``: (rows, unreadable, sample), rows being (index, [logits,
    features, qc statistics, qc_score, header/pixel verdict]) of each readable film in order, and
    sample the model inputs of the first ``PARITY_FILMS`` of them (the parity proof runs on those)."""
    from ..engine import prepare_checked

    names = [head.logits, head.features] + ([head.qc_stats, model.qc_output] if head.qc_sub is not None else [])
    sess = _session(_with_outputs(proto, names), model.threads)
    iname = sess.get_inputs()[0].name
    pp = model.info.preprocess
    rows: list[tuple[int, list]] = []
    bad: list[tuple[int, str]] = []
    sample: list[np.ndarray] = []
    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            prepared = list(pool.map(lambda i: prepare_checked(paths[i], pp), chunk))
            keep = [(i, p) for i, p in zip(chunk, prepared) if p[1] is None]
            bad += [(i, p[1]) for i, p in zip(chunk, prepared) if p[1] is not None]
            if keep:
                x = np.stack([p[0] for _, p in keep]).astype(np.float32)
                sample += list(x[: PARITY_FILMS - len(sample)])
                outs = sess.run(names, {iname: x})
                for j, (i, p) in enumerate(keep):
                    rows.append((i, [np.asarray(o[j], np.float32).reshape(-1) for o in outs] + [p[4]]))
            done += len(chunk)
            if progress:
                progress(done, len(paths))
    return rows, bad, np.stack(sample) if sample else None


# ----------------------------------------------------------------------------- the fits


def _lse(a: np.ndarray, axis: int = 1) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def normal_margin(logits: np.ndarray, t: float, normal: int) -> np.ndarray:
    """log P(normal) - log P(not normal) at temperature ``t``."""
    z = logits.astype(np.float64) / t
    others = np.delete(z, normal, axis=1)
    return z[:, normal] - _lse(others)


def fit_ridge_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray, lam: float, iters: int = 50):
    """(w, c) minimising sum logloss(y, sigmoid(offset + x w + c)) + lam/2 |w|^2 by Newton's method
    with a backtracking line search (x standardised by the caller; the intercept carries a tiny
    penalty only to keep the system solvable). w = 0, c = 0 is the shipped head."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, float(lam))
    reg[-1] = 1e-3
    theta = np.zeros(d + 1)

    def objective(th):
        z = offset + xa @ th
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(reg * th * th))

    f = objective(theta)
    for _ in range(iters):
        z = offset + xa @ theta
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
        g = xa.T @ (p - y) + reg * theta
        h = (xa * (p * (1 - p))[:, None]).T @ xa + np.diag(reg)
        step = np.linalg.solve(h, g)
        t = 1.0
        while t > 1e-6:
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f - 1e-4 * t * float(g @ step):
                break
            t *= 0.5
        else:
            break
        theta, f_old, f = cand, f, fc
        if f_old - f < 1e-9 * max(1.0, abs(f)):
            break
    return theta[:-1], float(theta[-1])


def _folds(groups: np.ndarray, k: int, rng) -> np.ndarray:
    """A fold number per film, stratified by ``groups``."""
    fold = np.empty(len(groups), int)
    for gval in np.unique(groups):
        idx = np.flatnonzero(groups == gval)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _logloss(y, z) -> float:
    return float(np.mean(np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y)))


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature; a feature constant on these films (a dead unit) gets an infinite
    scale, so it standardises to 0 and the refit cannot lean on it."""
    mu, sd = x.mean(0), x.std(0)
    return mu, np.where(sd > 1e-6 * max(1.0, float(np.median(sd))), sd, np.inf)


def refit_head(feat: np.ndarray, margin: np.ndarray, is_normal: np.ndarray, *, seed: int = 0,
               folds: int = FOLDS, lambdas=LAMBDAS, bootstrap: int = BOOTSTRAP) -> dict:
    """Cross-validate the Normal-row refit; the decision and, when adopted, the fit on every film.

    Scores compared: -margin (the shipped head) against the refit's out-of-fold -margin'."""
    rng = np.random.default_rng(seed)
    y = is_normal.astype(np.float64)
    n = len(y)
    fold = _folds(is_normal, folds, rng)
    base_auc = auroc(-margin[is_normal], -margin[~is_normal])
    tried = []
    for lam0 in lambdas:
        lam = lam0 * n / 100.0
        oof = np.empty(n)
        for f in range(folds):
            tr, te = fold != f, fold == f
            mu, sd = _standardiser(feat[tr])
            w, c = fit_ridge_logistic((feat[tr] - mu) / sd, y[tr], margin[tr], lam)
            oof[te] = margin[te] + ((feat[te] - mu) / sd) @ w + c
        tried.append({"lambda": lam0, "oof_auroc": auroc(-oof[is_normal], -oof[~is_normal]),
                      "oof_logloss": _logloss(y, oof), "oof": oof})
    best = min(tried, key=lambda r: r["oof_logloss"])
    # paired bootstrap of the AUROC difference, films resampled within normal and abnormal
    ni, ai = np.flatnonzero(is_normal), np.flatnonzero(~is_normal)
    diffs = []
    for _ in range(bootstrap):
        bn, ba = rng.choice(ni, len(ni)), rng.choice(ai, len(ai))
        diffs.append(auroc(-best["oof"][bn], -best["oof"][ba]) - auroc(-margin[bn], -margin[ba]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    base_ll = _logloss(y, margin)
    adopted = bool(lo > 0)
    rep = {"method": "Normal row of the last layer: ridge logistic regression on the standardised penultimate "
                     f"features, offset = the shipped normal-vs-rest logit ({folds}-fold cross-validation, "
                     f"penalty chosen by out-of-fold log loss among {list(lambdas)} x n/100)",
           "lambda": best["lambda"], "shipped_auroc": base_auc, "refit_oof_auroc": best["oof_auroc"],
           "auroc_gain_ci95": [float(lo), float(hi)], "shipped_logloss": base_ll,
           "refit_oof_logloss": best["oof_logloss"],
           "tried": [{k: v for k, v in r.items() if k != "oof"} for r in tried], "adopted": adopted}
    if adopted:
        mu, sd = _standardiser(feat)
        w, c = fit_ridge_logistic((feat - mu) / sd, y, margin, best["lambda"] * n / 100.0)
        rep["why"] = (f"out-of-fold AUROC {best['oof_auroc']:.4f} against the shipped {base_auc:.4f} "
                      f"(gain 95 % interval {lo:+.4f} to {hi:+.4f}, above 0)")
        rep["_w"], rep["_c"] = w / sd, c - float((w / sd) @ mu)  # in the raw features' units
    else:
        rep["why"] = (f"kept the shipped head: the refit's out-of-fold AUROC {best['oof_auroc']:.4f} against the "
                      f"shipped {base_auc:.4f} (gain 95 % interval {lo:+.4f} to {hi:+.4f}) does not beat it")
    return rep


def fit_temperature(logits: np.ndarray, label_index: np.ndarray, abnormal: np.ndarray, normal: int) -> tuple[float, dict]:
    """The temperature minimising the films' negative log-likelihood: -log p(class) for films of a
    model class, -log P(not normal) for abnormal films of a folder no class is named after."""
    known = label_index >= 0
    other = ~known & abnormal

    def nll(t: float) -> float:
        lp = np.log(np.clip(softmax(logits, t), 1e-300, None))
        s = -lp[known, label_index[known]].sum() if known.any() else 0.0
        if other.any():
            p_not = 1.0 - np.exp(lp[other, normal])
            s += -np.log(np.clip(p_not, 1e-300, None)).sum()
        return float(s / max(1, known.sum() + other.sum()))

    t = math.exp(golden_section_min(lambda log_t: nll(math.exp(log_t)), math.log(0.05), math.log(20.0)))
    return t, {"nll_at": nll(t)}


def conformal_threshold(abnormal_scores: np.ndarray, sensitivity: float) -> tuple[float, int]:
    """(threshold, k): refer when score >= threshold; the k lowest abnormal scores fall below it,
    k = floor((1 - S)(n + 1)), so a new abnormal film is referred with probability >= S."""
    s = np.sort(np.asarray(abnormal_scores, np.float64))
    k = int(math.floor((1.0 - sensitivity) * (len(s) + 1) + 1e-9))
    k = min(max(k, 0), len(s) - 1)
    return float(s[k]), k


def operating_table(neg: np.ndarray, pos: np.ndarray, default: float, max_rows: int = 200) -> list[list[float]]:
    """[threshold, sensitivity, specificity, referred] rows (runtime/triage.py), the default's among them."""
    allv = np.r_[neg, pos]
    ts = np.unique(np.quantile(allv, np.linspace(0, 1, max_rows))) if len(np.unique(allv)) > max_rows else np.unique(allv)
    ts = np.unique(np.r_[ts, default])
    rows = [[0.0, 1.0, 0.0, 1.0]]
    for t in ts[::-1]:
        rows.append([round(float(t), 6), round(float((pos >= t).mean()), 5), round(float((neg < t).mean()), 5),
                     round(float((allv >= t).mean()), 5)])
    return sorted(rows, key=lambda r: r[0])


# ----------------------------------------------------------------------------- the whole step


def _split(folders: Sequence[str], holdout: float, seed: int) -> np.ndarray:
    """bool per film: True = held out (stratified by class folder, seeded)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(folders), bool)
    if holdout <= 0:
        return out
    arr = np.asarray(folders, dtype=object)
    for f in sorted(set(folders)):
        idx = np.flatnonzero(arr == f)
        rng.shuffle(idx)
        out[idx[: int(round(holdout * len(idx)))]] = True
    return out


def _rates(score: np.ndarray, refer_flagged: np.ndarray, abnormal: np.ndarray, t: float) -> dict:
    refer = (score >= t) | refer_flagged
    return {"sensitivity": rate(int(refer[abnormal].sum()), int(abnormal.sum())),
            "specificity": rate(int((~refer[~abnormal]).sum()), int((~abnormal).sum())),
            "referred": rate(int(refer.sum()), len(refer))}


def adapt(model_path, dirs: Sequence["str | os.PathLike[str]"], out: "str | os.PathLike[str]", *,
          sensitivity: float = DEFAULT_SENSITIVITY, holdout: float = 0.0, seed: int = 0,
          refit_head_too: bool = True, progress: Callable[[int, int], None] | None = None) -> dict:
    """Fit a site model on the films of ``dirs`` and write it to ``out``; returns the provenance."""
    from ..modelinfo import sha256_file
    from ..session import load_model
    from ..triage import find_normal_class

    model_edit.require_onnx("cxr-infer adapt")
    if not 0.5 <= sensitivity < 1.0:
        raise AdaptError(f"--sensitivity must be in [0.5, 1), e.g. 0.98; got {sensitivity:g}")
    if not 0.0 <= holdout < 0.9:
        raise AdaptError(f"--holdout must be a fraction in [0, 0.9); got {holdout:g}")
    model = load_model(model_path, threads=None)
    base_path = Path(model.path)
    if model_edit.same_file(base_path, out):
        raise AdaptError(f"--out {out} is the base model itself: adapt writes a new file and never modifies "
                         "the model it starts from")
    classes = list(model.classes)
    normal_name = find_normal_class(classes)
    if normal_name is None:
        raise AdaptError(f"no class named Normal among {classes}: a site's refer/routine point needs one")
    normal = classes.index(normal_name)
    items, kinds = collect(dirs, classes, normal_name)
    proto = model_edit.load_proto(base_path, "cxr-infer adapt")
    head = locate(proto)

    rows, bad, sample = embed(model, head, proto, [str(it.path) for it in items], progress)
    if not rows:
        raise AdaptError("no film could be read")
    idx = np.array([i for i, _ in rows])
    cols = list(zip(*[r for _, r in rows]))
    logits, feat = np.stack(cols[0]).astype(np.float64), np.stack(cols[1]).astype(np.float64)
    stats = np.stack(cols[2]).astype(np.float64) if head.qc_sub is not None else None
    qc0 = np.concatenate(cols[3]).astype(np.float64) if head.qc_sub is not None else None
    early = list(cols[-1])
    folders = [items[i].label for i in idx]
    kind = [kinds[i] for i in idx]
    abnormal = np.array([k != normal_name for k in kind], bool)
    label_index = np.array([classes.index(k) if k in classes else -1 for k in kind])
    # films a header/pixel check objected to are referred whatever the score; they do not fit anything
    objected = np.array([e is not None for e in early], bool)
    held = _split(folders, holdout, seed)
    fit = ~held & ~objected
    n_norm, n_abn = int((fit & ~abnormal).sum()), int((fit & abnormal).sum())
    if n_norm < MIN_GROUP or n_abn < MIN_GROUP:
        raise AdaptError(f"adapt needs at least {MIN_GROUP} normal and {MIN_GROUP} abnormal readable films to fit on"
                         f"{' (after --holdout)' if holdout else ''}; got {n_norm} normal and {n_abn} abnormal")

    t0 = head.temperature
    margin0 = normal_margin(logits, t0, normal)
    # (d) the head
    if refit_head_too:
        d = refit_head(feat[fit], margin0[fit], ~abnormal[fit], seed=seed)
    else:
        d = {"adopted": False, "why": "not attempted (--no-head)"}
    logits1 = logits.copy()
    w_new, b_new = head.weight.astype(np.float64).copy(), head.bias.astype(np.float64).copy()
    if d["adopted"]:
        dw, dc = d.pop("_w"), d.pop("_c")  # dw also moves the heatmap's Normal row
        # margin' = margin + x.w + c at temperature t0: the Normal logit moves by t0 (x.w + c)
        w_new[normal] += t0 * dw
        b_new[normal] += t0 * dc
        logits1 = feat @ w_new.T + b_new
    # (b) the temperature
    t1, tinfo = fit_temperature(logits1[fit], label_index[fit], abnormal[fit], normal)
    # (c) the input check's centre and offset
    qc = {"refitted": False}
    qc_proto = None
    new_mean = new_offset = None
    qc1 = qc0
    check = model.input_check
    if head.qc_sub is not None and check is not None:
        val = (model.info.extra.get("input_check") or {}).get("validation") or {}
        target = float(val["median"]) if isinstance(val.get("median"), (int, float)) else 0.0  # the validation films' median
        new_mean = stats[fit].mean(0).astype(np.float32).reshape(head.qc_mean.shape)
        qc_proto = _qc_subgraph(proto, head, model.qc_output)
        raw = _run_qc(qc_proto, stats, new_mean, np.zeros_like(head.qc_offset))
        new_offset = np.full_like(head.qc_offset, target - float(np.median(raw[fit]))).astype(np.float32)
        qc1 = raw + float(new_offset.reshape(-1)[0])
        unf = check.unfamiliar
        qc = {"refitted": True, "what": "qc.mean (the centre of the feature statistics) = the site films' mean; "
                                        "qc.offset so their median score is the training films'",
              "target_median": target, "thresholds_kept": {"unfamiliar_above": unf,
                                                           "not_chest_xray_above": check.not_chest_xray},
              "median_before": float(np.median(qc0[fit])), "median_after": float(np.median(qc1[fit])),
              "unfamiliar_before": rate(int((qc0[fit] > unf).sum()), int(fit.sum())),
              "unfamiliar_after": rate(int((qc1[fit] > unf).sum()), int(fit.sum()))}

    p1 = softmax(logits1, t1)
    score1 = 1.0 - p1[:, normal]
    thr, k = conformal_threshold(score1[fit & abnormal], sensitivity)
    thr = math.floor(thr * 1e6) / 1e6  # as the table stores it, rounded down: the k-th film stays referred
    flagged1 = objected | ((qc1 > check.unfamiliar) if (check is not None and qc1 is not None) else False)
    fit_rates = _rates(score1[fit], flagged1[fit], abnormal[fit], thr)
    lo_bound = wilson(fit_rates["sensitivity"]["k"], fit_rates["sensitivity"]["n"])[0]
    table = operating_table(score1[fit & ~abnormal], score1[fit & abnormal], thr)
    a = {"asked_sensitivity": sensitivity, "threshold": thr, "abnormal_films_below": k,
         "rule": "conformal: the (k+1)-th lowest abnormal score, k = floor((1 - S)(n + 1))",
         "fit": fit_rates, "sensitivity_lower_bound95": lo_bound}

    # the figures before/after on the held-out films (or, without them, the fit films)
    from ..triage import default_policy

    pol0, _ = default_policy(model.info)
    score0 = 1.0 - softmax(logits, t0)[:, normal]
    flagged0 = objected | ((qc0 > check.unfamiliar) if (check is not None and qc0 is not None) else False)
    ev = held if held.any() else fit
    evaluation = {"on": "held-out films (--holdout)" if held.any() else "the fit films themselves (no --holdout)",
                  "n": int(ev.sum()),
                  "auroc_shipped": auroc(score0[ev & ~abnormal], score0[ev & abnormal]),
                  "auroc_adapted": auroc(score1[ev & ~abnormal], score1[ev & abnormal]),
                  "shipped_point": None if pol0 is None else {
                      "threshold": pol0.threshold, **_rates(score0[ev], flagged0[ev], abnormal[ev], pol0.threshold)},
                  "adapted_point": {"threshold": thr, **_rates(score1[ev], flagged1[ev], abnormal[ev], thr)}}
    if qc1 is not None and check is not None:
        evaluation["unfamiliar_before"] = rate(int((qc0[ev] > check.unfamiliar).sum()), int(ev.sum()))
        evaluation["unfamiliar_after"] = rate(int((qc1[ev] > check.unfamiliar).sum()), int(ev.sum()))

    # the new file
    new = _rewrite(proto, head, normal, w_new if d["adopted"] else None, b_new if d["adopted"] else None, t1,
                   new_mean, new_offset, dw=t0 * dw if d["adopted"] else None)
    films = {}
    for f, kd, h in zip(folders, kind, held):
        e = films.setdefault(f, {"counts_as": "normal" if kd == normal_name else
                                 (kd if kd in classes else "abnormal (no class of the model)"), "fit": 0, "held_out": 0})
        e["held_out" if h else "fit"] += 1
    base_sha = sha256_file(base_path)
    prov = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": {"file": base_path.name, "sha256": base_sha, "precision": model.info.precision},
            "films": films, "fit_films": int(fit.sum()), "held_out_films": int(held.sum()),
            "unreadable": len(bad), "objected_by_header_or_pixel_check": int(objected.sum()), "seed": seed,
            "refitted": {"threshold": a, "temperature": {"before": t0, "after": t1, **tinfo},
                         "head": {k2: v for k2, v in d.items() if not k2.startswith("_")}, "input_check": qc},
            "evaluation": evaluation, "minimum": {"normal": MIN_GROUP, "abnormal": MIN_GROUP}}
    props = {"cxr.adaptation": None, "cxr.operating_points": model_edit.encode({
        "available": True, "normal_class": normal_name, "score": f"1 - P({normal_name})",
        "fitted_on": f"site films (cxr-infer adapt, {int(fit.sum())} films)",
        "n": int(fit.sum()), "n_abnormal": n_abn,
        "default": {"threshold": thr, "sensitivity": fit_rates["sensitivity"]["value"],
                    "specificity": fit_rates["specificity"]["value"], "referred": fit_rates["referred"]["value"],
                    "target_sensitivity": sensitivity, "rule": "site (conformal)"},
        "table": table}),
        "cxr.calibration": model_edit.encode(_calibration(model.info.extra.get("calibration"), logits1[fit],
                                                          label_index[fit], t0, t1, int(fit.sum())))}
    if qc1 is not None:
        eligible = fit & (qc1 <= check.not_chest_xray)
        labels1 = [classes[i] for i in p1.argmax(1)]
        feats = _site_features(new, head, stats[eligible])
        entry = shift_mod.build_reference(feats, ["site"] * int(eligible.sum()),
                                          [labels1[i] for i in np.flatnonzero(eligible)],
                                          fitted_on=f"site films (cxr-infer adapt, {int(eligible.sum())} films)",
                                          precision=model.info.precision)
        props["cxr." + shift_mod.METADATA_KEY] = model_edit.encode(entry)
    model_edit.set_props(new, props)
    parity = prove_parity(proto, new, head, x=sample,
                          expect_logits=logits1[:PARITY_FILMS], t1=t1, expect_qc=None if qc1 is None else qc1[:PARITY_FILMS],
                          normal=normal, head_changed=d["adopted"], base_logits=logits[:PARITY_FILMS])
    prov["parity"] = parity
    model_edit.set_props(new, {"cxr.adaptation": model_edit.encode(prov)})
    model_edit.save_checked(new, out)
    card = write_card(prov, out, classes)
    prov["card"] = str(card)
    return prov


def _calibration(base: Any, logits: np.ndarray, label_index: np.ndarray, t0: float, t: float, n: int) -> dict:
    """``cxr.calibration`` of the site model: its temperature and the ECE at the base temperature
    and at the new one, on the fit films of a model class (the base entry kept under ``base_model``)."""
    from ..metrics import expected_calibration_error

    known = label_index >= 0
    out = {"temperature": round(t, 6), "fitted_on": f"site films (cxr-infer adapt, {n} films)", "n": int(known.sum()),
           "ece_before": None, "ece_after": None, "bins": {"count": 15, "kind": "equal-width on top-1 confidence"},
           "base_model": base if isinstance(base, dict) else None}
    if known.sum():
        y = label_index[known]
        out["ece_before"] = round(float(expected_calibration_error(y, softmax(logits[known], t0))), 5)
        out["ece_after"] = round(float(expected_calibration_error(y, softmax(logits[known], t))), 5)
    return out


def _qc_subgraph(proto, head: Head, qc_output: str):
    """The graph from the qc statistics to qc_score, with qc.mean and qc.offset as inputs."""
    import onnx

    m = onnx.utils.Extractor(proto).extract_model([head.qc_stats], [qc_output])
    keep = [i for i in m.graph.initializer if i.name not in ("qc.mean", "qc.offset")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for name in ("qc.mean", "qc.offset"):
        m.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


def _site_features(new, head: Head, stats: np.ndarray) -> np.ndarray:
    """The site model's ``shift_features`` of films whose qc statistics are ``stats`` (the output is
    added to ``new`` where the base lacked it): they move with the refitted centre, so the site's
    reference is computed through the new graph."""
    import onnx

    from .shift_reference import add_feature_output

    if shift_mod.OUTPUT not in {o.name for o in new.graph.output}:
        add_feature_output(new)
    sub = onnx.utils.Extractor(new).extract_model([head.qc_stats], [shift_mod.OUTPUT])
    sess = _session(sub)
    out = sess.run(None, {sess.get_inputs()[0].name: stats.astype(np.float32)})[0]
    return np.asarray(out, np.float64).reshape(len(stats), -1)


def _run_qc(qc_proto, stats: np.ndarray, mean: np.ndarray, offset: np.ndarray) -> np.ndarray:
    sess = _session(qc_proto)
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: stats.astype(np.float32), "qc.mean": mean.astype(np.float32),
                          "qc.offset": offset.astype(np.float32)})[0]
    return np.asarray(out, np.float64).reshape(-1)


def _rewrite(proto, head: Head, normal: int, weight, bias, temperature: float, qc_mean, qc_offset, dw=None):
    """A copy of the base graph with the refitted values as new initializers (``site.*``), wired
    into the nodes that used the old ones; nothing else is touched."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    pos = {id(n): i for i, n in enumerate(proto.graph.node)}

    def node(orig):
        return m.graph.node[pos[id(orig)]]

    def add(name, arr):
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))

    if weight is not None:
        add("site.head.weight", weight)
        add("site.head.bias", bias)
        g = node(head.gemm)
        g.input[1], g.input[2] = "site.head.weight", "site.head.bias"
        if head.cam is not None:
            cw = head.cam_weight.astype(np.float64).copy()  # the other classes' maps keep the base weights
            cw[normal] = (cw[normal].reshape(-1) + dw).reshape(cw[normal].shape)
            add("site.cam.weight", cw)
            c = node(head.cam)
            c.input[1], c.input[2] = "site.cam.weight", "site.head.bias"
    add("site.temperature", np.asarray(temperature, np.float32).reshape(_const(proto, head.div.input[1]).shape))
    node(head.div).input[1] = "site.temperature"
    if weight is not None and head.logits_qdq:  # refitted logits: their int8 range was calibrated for the old
        node(head.div).input[0] = head.gemm.output[0]  # ones, so the new float Gemm feeds the Div directly
    if qc_mean is not None:
        add("site.qc.mean", qc_mean)
        add("site.qc.offset", qc_offset)
        for n in m.graph.node:
            for i, name in enumerate(n.input):
                if name == "qc.mean":
                    n.input[i] = "site.qc.mean"
                elif name == "qc.offset":
                    n.input[i] = "site.qc.offset"
    model_edit.drop_unread_initializers(m.graph)
    return m


def prove_parity(base, new, head: Head, *, x: np.ndarray, expect_logits, t1: float, expect_qc,
                 normal: int, head_changed: bool, base_logits=None) -> dict:
    """Structure: every node has the base's op and inputs except the rewired ones, every base
    initializer still used is byte-identical. Numbers: on real films, the new file's probabilities
    are softmax(fitted logits / fitted temperature), its qc_score the refitted check's, and the
    heatmap of every class whose row was not refitted is the base's, exactly."""

    bi = {i.name: model_edit.tensor_digest(i) for i in base.graph.initializer}
    ni = {i.name: model_edit.tensor_digest(i) for i in new.graph.initializer}
    added = sorted(k for k in ni if k not in bi)
    changed = sorted(k for k in ni if k in bi and ni[k] != bi[k])
    if changed:
        raise model_edit.ModelEditError(f"adapt changed base initializers {changed}; refusing to write the model")
    if [n.op_type for n in base.graph.node] != [n.op_type for n in new.graph.node]:
        raise model_edit.ModelEditError("adapt changed the graph's nodes; refusing to write the model")
    rewired = [n.name or n.output[0] for a, n in zip(base.graph.node, new.graph.node) if list(a.input) != list(n.input)]
    outs = [o.name for o in new.graph.output]
    b_out = dict(zip(outs, _session(base).run(outs, {base.graph.input[0].name: x})))
    n_out = dict(zip(outs, _session(new).run(outs, {new.graph.input[0].name: x})))
    probs = softmax(np.asarray(expect_logits[: len(x)]), t1)
    rep = {"films": int(len(x)), "initializers_added": added, "base_initializers_changed": 0,
           "nodes_rewired": rewired, "nodes_otherwise_identical": len(base.graph.node) - len(rewired),
           "probabilities_max_abs_diff": float(np.abs(n_out[outs[0]] - probs).max())}
    if expect_qc is not None and "qc_score" in n_out:
        rep["qc_score_max_abs_diff"] = float(np.abs(n_out["qc_score"].reshape(-1) - expect_qc[: len(x)]).max())
    if "cam" in n_out:
        keep = [k for k in range(n_out["cam"].shape[1]) if not (head_changed and k == normal)]
        rep["cam_unrefitted_classes_max_abs_diff"] = float(np.abs(n_out["cam"][:, keep] - b_out["cam"][:, keep]).max())
        if head_changed:  # the refitted class's map: its spatial mean is the new logit, as closely as the base's was
            def gap(maps, lg):
                return float(np.abs(maps.reshape(len(x), maps.shape[1], -1).mean(2) - lg).max())

            rep["cam_mean_vs_logit_max_abs_diff"] = gap(n_out["cam"][:, [normal]],
                                                        np.asarray(expect_logits[: len(x)])[:, [normal]])
            rep["base_cam_mean_vs_logit_max_abs_diff"] = gap(b_out["cam"], np.asarray(base_logits[: len(x)]))
    bad = [k for k in ("probabilities_max_abs_diff", "qc_score_max_abs_diff") if rep.get(k, 0) > PARITY_TOL]
    if "cam" in n_out:  # float rounding only: a millionth of the maps' range
        rep["cam_tolerance"] = 1e-6 * max(1.0, float(np.abs(b_out["cam"]).max()))
        if rep["cam_unrefitted_classes_max_abs_diff"] > rep["cam_tolerance"]:
            bad.append("cam_unrefitted_classes_max_abs_diff")
    if rep.get("cam_mean_vs_logit_max_abs_diff", 0) > max(1e-3, 1.5 * rep.get("base_cam_mean_vs_logit_max_abs_diff", 0)):
        bad.append("cam_mean_vs_logit_max_abs_diff")
    rep["passed"] = not bad
    if bad:
        raise model_edit.ModelEditError(f"parity failed ({', '.join(f'{k} {rep[k]:.3g}' for k in bad)}); "
                                        "the site model was not written")
    return rep


def format_text(prov: dict) -> str:
    """The plain summary printed on stderr (and, indented, in the card)."""
    r = prov["refitted"]
    a, h, q, t = r["threshold"], r["head"], r["input_check"], r["temperature"]
    ev = prov["evaluation"]
    lines = [f"adapted {prov['base_model']['file']} (sha256 {prov['base_model']['sha256'][:16]}) on "
             f"{prov['fit_films']} site films" + (f", {prov['held_out_films']} held out" if prov["held_out_films"] else ""),
             "  films: " + ", ".join(f"{k} {v['fit']}+{v['held_out']} ({v['counts_as']})" for k, v in prov["films"].items()),
             f"  (d) head: {'refitted' if h['adopted'] else 'shipped head kept'}: {h['why']}",
             f"  (b) temperature: {t['before']:.4g} -> {t['after']:.4g}",
             f"  (a) refer when P(not Normal) >= {a['threshold']:.6g} for sensitivity {a['asked_sensitivity']:g}: on the "
             f"fit films sensitivity {rate_text(a['fit']['sensitivity'])}, specificity {rate_text(a['fit']['specificity'])}; "
             f"95 % lower bound of the sensitivity {100 * a['sensitivity_lower_bound95']:.1f} %"]
    if q.get("refitted"):
        lines.append(f"  (c) input check: median qc_score {q['median_before']:.3g} -> {q['median_after']:.3g}; "
                     f"unfamiliar {rate_text(q['unfamiliar_before'])} -> {rate_text(q['unfamiliar_after'])}")
    else:
        lines.append("  (c) input check: not refitted (the model has none)")
    lines.append(f"  on {ev['on']} ({ev['n']}): AUROC {ev['auroc_shipped']:.4f} shipped -> {ev['auroc_adapted']:.4f} adapted")
    if ev.get("shipped_point"):
        s = ev["shipped_point"]
        lines.append(f"    shipped point ({s['threshold']:.4g}): sensitivity {rate_text(s['sensitivity'])}, "
                     f"specificity {rate_text(s['specificity'])}")
    s = ev["adapted_point"]
    lines.append(f"    adapted point ({s['threshold']:.4g}): sensitivity {rate_text(s['sensitivity'])}, "
                 f"specificity {rate_text(s['specificity'])}")
    p = prov["parity"]
    lines.append(f"  parity on {p['films']} films: probabilities within {p['probabilities_max_abs_diff']:.2g}"
                 + (f", qc_score within {p['qc_score_max_abs_diff']:.2g}" if "qc_score_max_abs_diff" in p else "")
                 + (", heatmaps of unrefitted classes identical" if "cam_unrefitted_classes_max_abs_diff" in p else "")
                 + f"; {len(p['nodes_rewired'])} nodes rewired, {p['nodes_otherwise_identical']} identical, "
                   f"no base weight changed")
    return "\n".join(lines)


def write_card(prov: dict, out: "str | os.PathLike[str]", classes: Sequence[str]) -> Path:
    out = Path(out)
    card = out.with_name(out.stem + ".card.md")
    text = [f"# {out.name}: a site model made by cxr-infer adapt", "",
            f"Made {prov['created']} from `{prov['base_model']['file']}` (sha256 `{prov['base_model']['sha256']}`, "
            f"{prov['base_model']['precision']}), classes {', '.join(classes)}. Research and triage aid, not a "
            "diagnosis. Its figures hold for the films it was fitted on and are estimates elsewhere: validate it "
            "on other films of the site (`cxr-infer validate`) before use, and again after any change of machines.",
            "", "## What was refitted", "", "```", format_text(prov), "```", "",
            "Everything else in the graph is the base model's (see parity in `cxr-infer info --json`, "
            "key `adaptation`, or `cxr.adaptation` in the file).", ""]
    card.write_text("\n".join(text), encoding="utf-8")
    return card
