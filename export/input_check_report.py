"""Measuring the input check at export: thresholds on the validation split, parity of the score,
the optional development folder of non-X-rays, and the text for the report and the card.

The thresholds come from validation X-rays only. A folder of non-X-rays given with ``--ood-dir``
is scored and reported, never used to choose anything (docs/input-check.md says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cxr.runtime.inputcheck import NOT_CHEST_XRAY, UNFAMILIAR, Verdict
from cxr.runtime.metrics import auroc
from cxr.runtime.preprocess import Preprocessing, normalize

from .data import ExportInputError, Manifest, log, stratified_subset
from .input_check import METHOD, FittedCheck, iter_batches

UNFAMILIAR_QUANTILE = 99.0  # per validation source
UNFAMILIAR_CONFIDENCE = 0.95  # that the threshold is at or above that percentile
ORIENTATION_QUANTILE = 99.75  # per validation source: the orientation check's budget is a quarter of a percent
NOT_CXR_FACTOR = 2.0  # not_chest_xray: this many times as far above the validation median


# --------------------------------------------------------------------------- image sets

@dataclass
class CheckSet:
    """Images cached as model-size uint8 (a quarter of float32), with each image's group (a
    validation source, or a kind of non-X-ray) and the runtime's header/pixel verdict."""

    name: str
    u8: np.ndarray
    groups: list[str]
    early: list[Verdict | None]

    def __len__(self) -> int:
        return len(self.u8)


def manifest_sources(man: Manifest, split: str, default: str) -> dict[str, str]:
    """Resolved path -> source for ``split`` (the manifest's per-item source, else ``default``)."""
    source_of = getattr(man, "source_of", None) or {}
    return {str(p): str(source_of.get(p) or source_of.get(str(p)) or default) for p, _, s in man.items if s == split}


def load_set(name: str, items: Sequence[tuple[Path, str | None]], groups: Sequence[str], pp: Preprocessing) -> CheckSet:
    u8s, kept, early = [], [], []
    for _, idx, u8, verdicts in iter_batches(items, pp, keep_uint8=True, with_verdicts=True):
        u8s.append(u8)
        kept += [groups[i] for i in idx]
        early += verdicts
    if not u8s:
        raise ExportInputError(f"no readable images in {name}")
    skipped = len(items) - len(kept)
    if skipped:
        log(f"  {name}: skipped {skipped} unreadable file(s)")
    return CheckSet(name, np.concatenate(u8s), kept, early)


def validation_set(man: Manifest, pp: Preprocessing, default_source: str, limit: int, seed: int) -> CheckSet:
    items = man.split("val")
    if not items:
        raise ExportInputError(f"{man.path} has no validation items: the input check's threshold is chosen on them "
                               "(or pass --no-input-check)")
    src = manifest_sources(man, "val", default_source)
    items = stratified_subset(items, limit, seed, key=lambda it: (src.get(str(it[0]), default_source), it[1]))
    return load_set("validation split", items, [src.get(str(p), default_source) for p, _ in items], pp)


def folder_set(folder: Path, pp: Preprocessing) -> CheckSet:
    """``--ood-dir``: ``<kind>/images/*`` or ``<kind>/*`` folders; a flat folder is one kind."""
    from cxr.runtime.dataset import discover_labelled, is_candidate_image

    try:
        _, found = discover_labelled(folder)
        items, groups = [(li.path, None) for li in found], [li.label for li in found]
    except ValueError:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_candidate_image(p.name))
        items, groups = [(p, None) for p in paths], [Path(folder).name] * len(paths)
    if not items:
        raise ExportInputError(f"--ood-dir {folder}: no images")
    return load_set(f"--ood-dir {folder}", items, groups, pp)


def run_scores(fn: Callable[[np.ndarray], np.ndarray], u8: np.ndarray, pp: Preprocessing, batch: int = 32) -> np.ndarray:
    """qc_score of cached uint8 images through ``fn`` (float32 batch -> [N] scores)."""
    outs = [np.asarray(fn(normalize(u8[i:i + batch], pp)), np.float64).reshape(-1)
            for i in range(0, len(u8), batch)]
    return np.concatenate(outs) if outs else np.zeros(0)


def ort_score_fn(session, output: str = "qc_score") -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda x: session.run([output], {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def torch_score_fn(wrapped) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return wrapped(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))[-1].numpy()

    return run


# --------------------------------------------------------------------------- thresholds and rates

def confident_rank(n: int, quantile: float, confidence: float) -> int:
    """The smallest rank k (1-based) such that the k-th smallest of n scores lies at or above the
    population's ``quantile``-th percentile with probability at least ``confidence``, or n + 1
    when n images cannot give that confidence.

    The k-th smallest is below that percentile only when k or more of the n images are, so
    P(k-th smallest >= percentile) = P(Binomial(n, quantile / 100) <= k - 1).
    """
    q = quantile / 100.0
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie strictly between 0 and 100, got {quantile}")
    log_q, log_p = math.log(q), math.log1p(-q)
    cdf = 0.0
    for j in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_q + (n - j) * log_p)
        if cdf >= confidence:
            return j + 1
    return n + 1


def thresholds(scores: np.ndarray, sources: Sequence[str], quantile: float = UNFAMILIAR_QUANTILE,
               factor: float = NOT_CXR_FACTOR, confidence: float = UNFAMILIAR_CONFIDENCE) -> dict:
    """The two thresholds from validation scores, and how they were chosen.

    ``unfamiliar``: for each source, the score that lies at or above that source's ``quantile``-th
    percentile with probability ``confidence`` (an order statistic, ``confident_rank``): the plain
    sample percentile is below the true one half of the time, so a threshold on it flags more than
    100 - quantile % of new X-rays from the same source about as often as not. A source too small
    for that confidence gives its largest score. The threshold is the largest over sources.
    ``not_chest_xray``: ``factor`` times as far above the validation median as ``unfamiliar`` is.
    """
    scores = np.asarray(scores, np.float64)
    src = np.asarray(list(sources))
    per, ranks = {}, {}
    for s in sorted(set(src.tolist())):
        v = np.sort(scores[src == s])
        k = confident_rank(len(v), quantile, confidence)
        ranks[s] = {"n": int(len(v)), "rank": int(min(k, len(v))), "confident": bool(k <= len(v))}
        per[s] = float(v[min(k, len(v)) - 1])
    lo = max(per.values())
    med = float(np.median(scores))
    hi = med + factor * (lo - med)
    rule = (f"{UNFAMILIAR}: the largest over validation sources of a {confidence:.0%} upper confidence bound on each "
            f"source's {quantile:g}th percentile of qc_score (the k-th smallest of its n scores, with k the smallest rank "
            f"such that P(Binomial(n, {quantile / 100:g}) <= k - 1) >= {confidence:g}; a source with too few images "
            f"for that gives its largest score), so that with {confidence:.0%} confidence at most {100 - quantile:g} % "
            f"of new X-rays from any validation source score above it; "
            f"{NOT_CHEST_XRAY}: median + {factor:g} x ({UNFAMILIAR} - median) of all validation scores")
    return {UNFAMILIAR: lo, NOT_CHEST_XRAY: hi, "rule": rule, "quantile": quantile, "factor": factor,
            "confidence": confidence, "validation_median": med, "per_source_percentile": per,
            "per_source_rank": ranks}


def orientation_entry(template: np.ndarray, val: CheckSet, ood: CheckSet | None = None,
                      quantile: float = ORIENTATION_QUANTILE) -> dict:
    """The runtime's orientation check (``inputcheck.OrientationCheck``): the training films' mean
    layout and the margin, chosen on validation films only -- the largest over sources of each
    source's ``quantile``-th percentile of (best mistake's correlation - correlation as it is),
    floored at 0 -- and how often it flags each validation source (and the development folder)."""
    from cxr.runtime.inputcheck import OrientationCheck

    probe = OrientationCheck(np.asarray(template, np.float32), 0.0)

    def gaps(cs: CheckSet) -> np.ndarray:
        return np.array([best - as_is for as_is, _, best in (probe.scores(img) for img in cs.u8)])

    g_val, src = gaps(val), np.asarray(val.groups)
    per = {s: float(np.percentile(g_val[src == s], quantile, method="inverted_cdf")) for s in sorted(set(val.groups))}
    margin = max(0.0, max(per.values()))
    flagged = {s: float((g_val[src == s] > margin).mean()) for s in per}
    entry = {"grid": int(template.shape[0]), "template": [round(float(v), 5) for v in np.ravel(template)],
             "margin": margin, "validation_flagged": flagged, "per_source_percentile": per,
             "rule": (f"misoriented when the training films' mean {template.shape[0]}x{template.shape[0]} layout "
                      "correlates better with the film inverted, turned upside down or on its side than as it is, "
                      f"by more than the margin: the largest over validation sources of each source's {quantile:g}th "
                      "percentile of that difference")}
    if ood is not None:
        g_ood, kinds = gaps(ood), np.asarray(ood.groups)
        entry["development_set_flagged"] = {k: float((g_ood[kinds == k] > margin).mean()) for k in sorted(set(ood.groups))}
    return entry


def verdicts(scores: np.ndarray, early: Sequence[Verdict | None], th: dict) -> np.ndarray:
    """Per image 0 ok, 1 unfamiliar, 2 not_chest_xray (or a header/pixel objection)."""
    s = np.asarray(scores, np.float64)
    v = np.where(~np.isfinite(s) | (s > th[NOT_CHEST_XRAY]), 2, np.where(s > th[UNFAMILIAR], 1, 0))
    pix = np.array([e is not None for e in early], bool) if len(early) else np.zeros(len(s), bool)
    return np.where(pix, 2, v)


def group_rates(cs: CheckSet, scores: np.ndarray, th: dict) -> dict:
    """Per group: images, share flagged by the whole check, by the score alone, by pixels alone,
    and the share called not_chest_xray."""
    v = verdicts(scores, cs.early, th)
    s = np.asarray(scores)
    pix = np.array([e is not None for e in cs.early], bool)
    g = np.asarray(cs.groups)
    out = {}
    for name in sorted(set(cs.groups)):
        m = g == name
        out[name] = {"n": int(m.sum()), "flagged": float((v[m] > 0).mean()),
                     "flagged_by_score": float((s[m] > th[UNFAMILIAR]).mean()),
                     "flagged_by_pixels": float(pix[m].mean()),
                     "not_chest_xray": float((v[m] == 2).mean())}
    out["all"] = {"n": int(len(v)), "flagged": float((v > 0).mean()),
                  "flagged_by_score": float((s > th[UNFAMILIAR]).mean()),
                  "flagged_by_pixels": float(pix.mean()), "not_chest_xray": float((v == 2).mean())}
    return out


def dev_report(ood: CheckSet, ood_scores: np.ndarray, val_scores: np.ndarray, th: dict) -> dict:
    """The development folder: flag rates per kind and the AUROC of qc_score against validation
    X-rays (score alone, and with header/pixel objections ranked above every score)."""
    pix = np.array([e is not None for e in ood.early], bool)
    top = max(float(np.max(ood_scores)), float(np.max(val_scores))) + 1.0
    with_pixels = np.where(pix, top, ood_scores)
    return {"folder": ood.name, "per_kind": group_rates(ood, ood_scores, th),
            "auroc_score": auroc(val_scores, ood_scores), "auroc_with_pixel_checks": auroc(val_scores, with_pixels),
            "used_for": "reporting only: not used to choose the thresholds or any parameter"}


# --------------------------------------------------------------------------- parity

def score_parity(reference: np.ndarray, other: np.ndarray, atol: float, rtol: float, source: str) -> dict:
    """Largest |difference| against ``atol + rtol * |reference|``: the fp32 proof for the score."""
    ref, oth = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    diff = np.abs(ref - oth)
    ok = bool(ref.size and np.all(np.isfinite(oth)) and np.all(diff <= atol + rtol * np.abs(ref)))
    return {"n_images": int(ref.size), "source": source, "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "max_rel_diff": float((diff / np.maximum(np.abs(ref), 1e-12)).max()) if diff.size else 0.0,
            "tolerance": {"atol": atol, "rtol": rtol}, "passed": ok}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def int8_agreement(val: CheckSet, s32: np.ndarray, th32: dict, s8: np.ndarray, th8: dict) -> dict:
    """int8 against fp32 on validation, each judged by its own thresholds."""
    v32, v8 = verdicts(s32, val.early, th32), verdicts(s8, val.early, th8)
    return {"n": int(len(s32)), "verdict_agreement": float((v32 == v8).mean()),
            "flag_agreement": float(((v32 > 0) == (v8 > 0)).mean()),
            "spearman": spearman(s32, s8), "max_abs_diff": float(np.abs(s32 - s8).max())}


# --------------------------------------------------------------------------- metadata, report, card

def metadata_entry(fitted: FittedCheck, th: dict, val_rates: dict, parity: dict, precision: str,
                   dev: dict | None = None, int8: dict | None = None, orientation: dict | None = None) -> dict:
    """``cxr.input_check``: what the runtime needs (thresholds, output) and how it was made."""
    entry = {
        **fitted.describe(),
        "precision": precision,
        "thresholds": {UNFAMILIAR: th[UNFAMILIAR], NOT_CHEST_XRAY: th[NOT_CHEST_XRAY]},
        "rule": th["rule"],
        "score": ("mean over depths of the squared Mahalanobis distance (probabilistic PCA covariance) of the "
                  "per-channel mean and root mean square of each stage's map and of the input's coarse layout (block "
                  "means standardised per image), each standardised by its training-split mean and sd; "
                  "higher = less like the training X-rays"),
        "validation": {"per_source": val_rates, "per_source_percentile": th["per_source_percentile"],
                       "per_source_rank": th["per_source_rank"], "median": th["validation_median"]},
        "parity": parity,
        "runtime_checks": "DICOM header (Modality, BodyPartExamined, ViewPosition), pixel checks (blank, "
                          "noise, colour, aspect ratio) and the orientation check run in the runtime before the score; "
                          "see docs/input-check.md",
    }
    if int8:
        entry["int8_vs_fp32"] = int8
    if orientation:
        entry["orientation"] = orientation
    if dev:
        entry["development_set"] = {"folder": dev["folder"], "auroc_score": dev["auroc_score"],
                                    "auroc_with_pixel_checks": dev["auroc_with_pixel_checks"],
                                    "flagged_per_kind": {k: v["flagged"] for k, v in dev["per_kind"].items()},
                                    "used_for": dev["used_for"]}
    return entry


def _ordered(d: dict) -> list:
    """Items with the "all" summary last (the metadata JSON sorts keys)."""
    return sorted(d.items(), key=lambda kv: (kv[0] == "all", kv[0]))


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def text_lines(qc: dict) -> list[str]:
    """The report table's input-check lines (one precision's entry of the report)."""
    th = qc["thresholds"]
    par = qc["parity"]
    proof = (f"score parity vs PyTorch {'PASSED' if par.get('passed') else 'FAILED'} (max |d| {par['max_abs_diff']:.3g})"
             if "passed" in par else
             f"score vs {par.get('vs', 'fp32')}: max |d| {par['max_abs_diff']:.3g}, Spearman {par.get('spearman', math.nan):.4f}")
    out = [f"input check ({qc['precision']}): thresholds unfamiliar > {th[UNFAMILIAR]:.3f}, "
           f"not_chest_xray > {th[NOT_CHEST_XRAY]:.3f}; {proof}"]
    rates = qc["validation"]["per_source"]
    out.append("  validation flagged: " + ", ".join(f"{s} {_pct(r['flagged'])} of {r['n']}" for s, r in _ordered(rates)))
    dev = qc.get("development_set")
    if dev:
        out.append(f"  dev set (not used to choose anything) {dev['folder']}: AUROC {dev['auroc_score']:.4f} "
                   f"(with pixel checks {dev['auroc_with_pixel_checks']:.4f}); flagged "
                   + ", ".join(f"{k} {_pct(v)}" for k, v in _ordered(dev["flagged_per_kind"])))
    if qc.get("int8_vs_fp32"):
        a = qc["int8_vs_fp32"]
        out.append(f"  int8 vs fp32 on {a['n']} validation images: same verdict {_pct(a['verdict_agreement'])}, "
                   f"same flag {_pct(a['flag_agreement'])}, Spearman {a['spearman']:.4f}")
    return out


def card_lines(qc: dict | None) -> list[str]:
    """The card's "Input check" section from the decoded ``cxr.input_check`` metadata."""
    if not qc:
        return ["", "## Input check", "",
                "None in this file (exported before the check): every result reads `qc` = `unchecked`; only the "
                "runtime's DICOM-header and pixel checks run."]
    th = qc.get("thresholds", {})
    L = ["", "## Input check", "",
         f"Output `{qc.get('output', 'qc_score')}` (float32 [N]): {qc.get('score', '')}. Method `{qc.get('method', METHOD)}`, "
         f"{len(qc.get('depths', []))} depths, {qc.get('components')} principal components each, fitted on "
         f"{(qc.get('fit') or {}).get('images')} training-split images.",
         "",
         f"- `unfamiliar` above {th.get(UNFAMILIAR, float('nan')):.4g}, `not_chest_xray` above "
         f"{th.get(NOT_CHEST_XRAY, float('nan')):.4g}. Rule: {qc.get('rule', '-')}.",
         f"- {qc.get('runtime_checks', '')}."]
    ori = qc.get("orientation")
    if ori:
        L.append(f"- `misoriented` (inverted, upside down, on its side; checked in the runtime): {ori.get('rule', '-')}; "
                 f"margin {ori.get('margin', float('nan')):.3f}; validation flagged "
                 + ", ".join(f"{s} {_pct(r)}" for s, r in (ori.get("validation_flagged") or {}).items())
                 + ("; development folder flagged " + ", ".join(
                     f"{k} {_pct(r)}" for k, r in ori["development_set_flagged"].items())
                    if ori.get("development_set_flagged") else "") + ".")
    rates = (qc.get("validation") or {}).get("per_source") or {}
    if rates:
        L += ["", "| validation source | images | flagged | by the score | by pixel checks |", "|---|---|---|---|---|"]
        L += [f"| {s} | {r['n']} | {_pct(r['flagged'])} | {_pct(r['flagged_by_score'])} | {_pct(r['flagged_by_pixels'])} |"
              for s, r in _ordered(rates)]
    par = qc.get("parity") or {}
    if par:
        L.append("")
        if "passed" in par:
            L.append(f"- score parity with PyTorch: max |Δ| {par.get('max_abs_diff', 0):.3g} on {par.get('n_images')} "
                     f"images ({par.get('source', '-')}), tolerance {par.get('tolerance')}: "
                     f"{'passed' if par['passed'] else 'FAILED'}.")
        else:
            L.append(f"- score against the {par.get('vs', 'fp32')} model on {par.get('n_images')} images "
                     f"({par.get('source', '-')}): max |Δ| {par.get('max_abs_diff', 0):.3g}, Spearman "
                     f"{par.get('spearman', math.nan):.4f}.")
    a = qc.get("int8_vs_fp32")
    if a:
        L.append(f"- int8 vs fp32 on {a['n']} validation images, each with its own thresholds: same verdict "
                 f"{_pct(a['verdict_agreement'])}, Spearman {a['spearman']:.4f}; the score's own branch is kept in float.")
    dev = qc.get("development_set")
    if dev:
        L.append(f"- development folder {dev['folder']} ({dev['used_for']}): AUROC {dev['auroc_score']:.4f}, with pixel "
                 f"checks {dev['auroc_with_pixel_checks']:.4f}; flagged " +
                 ", ".join(f"{k} {_pct(v)}" for k, v in _ordered(dev["flagged_per_kind"])) + ".")
    L.append("- Lateral views: none in the data, not measured. Pooled feature statistics barely separate them from "
             "frontal ones (a layout depth may); only a DICOM `ViewPosition` (LL, RL, LAT, LATERAL) flags them for "
             "sure (`not_frontal`).")
    return L


# --------------------------------------------------------------------------- the export's steps

class CheckExport:
    """The input check's part of one cxr-export run: prove the fp32 score, choose each model's
    thresholds on the validation split, score the development folder, compare int8 with fp32."""

    def __init__(self, fitted: FittedCheck, pp: Preprocessing, man: Manifest, default_source: str,
                 val_limit: int, seed: int, ood_dirs: Sequence[Path], atol: float, rtol: float,
                 int8_min_spearman: float = 0.9):
        self.fitted, self.pp, self.atol, self.rtol = fitted, pp, atol, rtol
        self.int8_min_spearman = int8_min_spearman
        log("input check: loading the validation split (it chooses the thresholds)")
        self.val = validation_set(man, pp, default_source, val_limit, seed)
        self.ood = [folder_set(Path(d), pp) for d in ood_dirs]
        if len(self.ood) > 1:
            self.ood = [CheckSet(", ".join(o.name for o in self.ood), np.concatenate([o.u8 for o in self.ood]),
                                 [g for o in self.ood for g in o.groups], [e for o in self.ood for e in o.early])]
        self.fp32_val: dict = {}
        self.orientation = None
        if fitted.layout_template is not None:
            self.orientation = orientation_entry(fitted.layout_template, self.val, self.ood[0] if self.ood else None)
            log(f"input check: orientation margin {self.orientation['margin']:.3f}; validation flagged "
                + ", ".join(f"{s} {_pct(r)}" for s, r in self.orientation["validation_flagged"].items())
                + ("; development folder flagged " + ", ".join(
                    f"{k} {_pct(r)}" for k, r in self.orientation["development_set_flagged"].items())
                   if "development_set_flagged" in self.orientation else ""))

    def _measure(self, fn, precision: str, parity: dict, int8: dict | None = None) -> tuple[dict, dict]:
        """(metadata entry, report entry) for one model whose score function is ``fn``."""
        s_val = run_scores(fn, self.val.u8, self.pp)
        th = thresholds(s_val, self.val.groups)
        rates = group_rates(self.val, s_val, th)
        dev = None
        if self.ood:
            s_ood = run_scores(fn, self.ood[0].u8, self.pp)
            dev = dev_report(self.ood[0], s_ood, s_val, th)
        if precision == "fp32":
            self.fp32_val = {"val": s_val, "th": th}
        elif int8 is not None:
            int8.update(int8_agreement(self.val, self.fp32_val["val"], self.fp32_val["th"], s_val, th))
        entry = metadata_entry(self.fitted, th, rates, parity, precision, dev, int8, self.orientation)
        report = {**entry, "development_set_full": dev}
        for line in text_lines(entry):
            log(line.strip())
        return entry, report

    def prove_fp32(self, score_output, session, ev_x: np.ndarray, ev_name: str) -> tuple[dict, dict]:
        """Score parity PyTorch vs ONNX on the eval images (raises ParityError), then thresholds.
        ``score_output``: the ``input_check.ScoreOutput`` the graph was exported with."""
        from .evaluate import run_batched
        from .parity import ParityError

        ref = run_batched(torch_score_fn(score_output.module), ev_x)
        got = run_batched(ort_score_fn(session), ev_x)
        par = score_parity(ref, got, self.atol, self.rtol, ev_name)
        if not par["passed"]:
            raise ParityError(f"fp32 parity FAILED for qc_score: max |d| {par['max_abs_diff']:.3g}, max relative "
                              f"{par['max_rel_diff']:.3g} (tolerance atol {self.atol:g} + rtol {self.rtol:g} x |score|) "
                              f"on {par['n_images']} images from {ev_name}")
        self.ev_fp32 = got
        log(f"input check: fp32 score parity passed: max |d| {par['max_abs_diff']:.3g} on {par['n_images']} images")
        return self._measure(ort_score_fn(session), "fp32", par)

    def int8_refusal(self, entry: dict) -> str | None:
        """Why the int8 score is not fit to ship (``measure_int8``'s metadata entry), or None.

        The bound is on the rank correlation with fp32 on validation: int8 gets its own thresholds,
        which absorb a shift or a stretch of the score, but not a reordering (a quantized branch once
        gave 0.68)."""
        rho = (entry.get("int8_vs_fp32") or {}).get("spearman")
        if rho is None or not rho >= self.int8_min_spearman:  # NaN fails too
            return (f"qc_score rank correlation with fp32 on {entry.get('int8_vs_fp32', {}).get('n')} validation "
                    f"images {rho:.3f} < {self.int8_min_spearman:g}" if rho is not None else "no int8 score comparison")
        return None

    def measure_int8(self, session, ev_x: np.ndarray, ev_name: str) -> tuple[dict, dict]:
        """int8's own thresholds, and how far its score is from fp32's (reported, not refused)."""
        from .evaluate import run_batched

        got = run_batched(ort_score_fn(session), ev_x)
        par = {"n_images": int(len(got)), "source": ev_name, "vs": "fp32",
               "max_abs_diff": float(np.abs(got - self.ev_fp32).max()), "spearman": spearman(self.ev_fp32, got),
               "note": "int8 has its own thresholds, chosen on the same validation images"}
        return self._measure(ort_score_fn(session), "int8", par, int8={})
