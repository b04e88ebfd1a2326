"""The input check's score, fitted on the training split and built into the ONNX graph.

Why these statistics: a network trained only on chest X-rays maps a CT slice or a photo close to
its class means in the penultimate layer, so a distance there alone is nearly blind (the probe in
docs/input-check.md). Earlier layers keep texture and intensity statistics that differ between
kinds of image. So the score reads several depths: for every *stage* of the network's trunk (a
run of blocks with the same output shape; its last block's output is tapped) and the input of
the final linear layer where that is not simply the last stage pooled, each image gives a vector
of per-channel spatial means and standard deviations. For each depth the training split's vectors
give a Gaussian model whose covariance is that of probabilistic PCA -- the top ``k`` principal
components kept, the other directions sharing their average variance -- so the Mahalanobis
distance is well defined with a few thousand images and a few thousand dimensions, and the file
grows by the ``D x k`` projection only. Each depth's squared distance is standardised by its
mean and standard deviation over the training split, and the score is the mean over depths
(higher = less like the training X-rays). Nothing here is fitted on non-X-rays.

Everything after the taps is plain tensor arithmetic (mean, subtract, multiply, matmul, sum), so
it exports as ordinary ONNX ops: the runtime computes the score without torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr.runtime.imageio import ImageReadError, load_image
from cxr.runtime.inputcheck import SCORE_OUTPUT
from cxr.runtime.preprocess import Preprocessing, normalize, resize_to_uint8

from .data import log

METHOD = "ppca-mahalanobis-multidepth/1"
DEFAULT_COMPONENTS = 64
SD_FLOOR = 1e-2  # feature sd floor, as a fraction of the tap's mean feature sd (dead channels)
MEANS_ONLY_ABOVE = 28  # px: larger maps give channel means only (cost; see pooled)
STD_EPS = 1e-6  # added to each pooled variance: channel sds below ~1e-3 read as ~1e-3
RESIDUAL_FLOOR = 1e-2  # variance floor of the left-out directions, as a fraction of the mean eigenvalue


# --------------------------------------------------------------------------- where to look

@dataclass
class Tap:
    name: str  # module path, e.g. "features.6"
    module: object
    kind: str  # "stage": pooled statistics of a 4-D output; "head": input of the final Linear
    dim: int = 0
    with_std: bool = True  # stage taps: channel standard deviations after the means


def _trunk(model) -> list[tuple[str, object]]:
    """The feature-extracting modules in order: ``features`` children (MobileNets, EfficientNet,
    SqueezeNet, the baseline CNN) or ResNet's stem and layers."""
    import torch

    feats = getattr(model, "features", None)
    if isinstance(feats, torch.nn.Sequential):
        return [(f"features.{n}", m) for n, m in feats.named_children()]
    names = [n for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
             if hasattr(model, n)]
    if names:
        return [(n, getattr(model, n)) for n in names]
    raise ValueError(f"{type(model).__name__}: no 'features' Sequential or ResNet layers to read the input check from")


def _final_linear(model):
    import torch

    last = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            last = (name, m)
    return last


def find_taps(model, input_shape: tuple[int, int, int]) -> list[Tap]:
    """The last module of every run of trunk modules with the same output shape (a *stage*),
    except the stem (the first stage: one convolution of the raw pixels, which the runtime's
    pixel checks cover), plus the final Linear's input when its width is not the last stage's
    channel count (then it is only that stage pooled, already covered). Stages whose maps are
    larger than MEANS_ONLY_ABOVE px give their channel means only."""
    import torch

    trunk = _trunk(model)
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n, m in trunk]
    head = _final_linear(model)
    head_dim = []
    if head is not None:
        hooks.append(head[1].register_forward_pre_hook(lambda mod, i: head_dim.append(i[0].shape[-1])))
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    taps = []
    names = [n for n, _ in trunk if n in shapes]
    mods = dict(trunk)
    for i, n in enumerate(names):
        shape = shapes[n]
        if len(shape) != 3:
            continue
        if i + 1 < len(names) and shapes[names[i + 1]] == shape:
            continue  # not the end of its stage
        full = shape[1] * shape[2] <= MEANS_ONLY_ABOVE ** 2
        taps.append(Tap(n, mods[n], "stage", (2 if full else 1) * shape[0], full))
    if len(taps) > 1:
        taps = taps[1:]  # the stem
    if not taps:
        raise ValueError("no 4-D trunk output found for the input check")
    last_channels = taps[-1].dim // (2 if taps[-1].with_std else 1)
    if head is not None and head_dim and head_dim[0] != last_channels:
        taps.append(Tap(head[0], head[1], "head", int(head_dim[0])))
    return taps


def pooled(t, with_std: bool = True):
    """[N, C, H, W] -> [N, 2C]: per-channel spatial mean, then standard deviation ([N, C]:
    means only); [N, D] as is.

    Why means only on large maps: the standard deviation takes three more passes over the map,
    and MobileNetV2-224's stem, 112 px and 56 px maps hold most of the tapped values; reading them
    whole made the check cost about 0.9 ms of CPU per image, a third of an int8 inference here.
    (A strided sub-grid was tried instead: onnxruntime's strided Slice cost more than it saved.)"""
    import torch

    if t.dim() == 2:
        return t
    m = t.mean(dim=(2, 3))
    if not with_std:
        return m
    var = ((t - m[:, :, None, None]) ** 2).mean(dim=(2, 3))
    # STD_EPS: a constant channel's variance is rounding noise (1e-14 in PyTorch, 1e-10 in
    # onnxruntime); under a square root that noise became a 0.2 shift of the score between them
    return torch.cat([m, torch.sqrt(var + STD_EPS)], dim=1)


class TapRecorder:
    """Forward hooks that pool each tap's tensor as soon as it is produced (an in-place ReLU
    after a tapped module must not change what was recorded)."""

    def __init__(self, taps: Sequence[Tap]):
        self.taps = list(taps)
        self.values: list = [None] * len(self.taps)
        self._hooks = []
        for i, t in enumerate(self.taps):
            if t.kind == "head":
                self._hooks.append(t.module.register_forward_pre_hook(
                    lambda mod, inp, i=i: self.values.__setitem__(i, pooled(inp[0]))))
            else:
                self._hooks.append(t.module.register_forward_hook(
                    lambda mod, inp, out, i=i, s=t.with_std: self.values.__setitem__(i, pooled(out, s))))

    def take(self) -> list:
        vals, self.values = self.values, [None] * len(self.taps)
        if any(v is None for v in vals):
            raise RuntimeError("an input-check tap did not fire")
        return vals

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# --------------------------------------------------------------------------- the score

@dataclass
class DepthModel:
    """Probabilistic-PCA Gaussian of one depth's pooled vectors (standardised features)."""

    name: str
    mean: np.ndarray  # [D]
    inv_sd: np.ndarray  # [D]
    components: np.ndarray  # [D, k], orthonormal columns
    inv_var: np.ndarray  # [k], 1 / variance along each component
    inv_residual: float  # 1 / mean variance of the other D - k directions (0: none left)
    center: float = 0.0  # mean of the squared distance over the training split
    inv_scale: float = 1.0  # 1 / its standard deviation

    def distance2(self, v: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance in float64 (the fit's own reference)."""
        z = (np.asarray(v, np.float64) - self.mean) * self.inv_sd
        p = z @ self.components
        d2 = (p * p) @ self.inv_var
        if self.inv_residual:
            d2 = d2 + ((z * z).sum(1) - (p * p).sum(1)) * self.inv_residual
        return d2


def fit_depth(name: str, x: np.ndarray, k: int) -> DepthModel:
    x = np.asarray(x, np.float64)
    n, d = x.shape
    mean = x.mean(0)
    sd = x.std(0)
    # dead or constant features (a briefly trained net has many) must not turn float rounding into
    # huge distances: floor the sd at a share of the tap's typical sd and of its activation scale
    rms = float(np.sqrt(np.mean(x * x)))
    sd = np.maximum(sd, max(SD_FLOOR * float(sd.mean()), 1e-3 * rms, 1e-6))
    z = (x - mean) / sd
    cov = (z.T @ z) / max(n - 1, 1)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    k = int(max(1, min(k, d, n - 1)))
    rest = lam[k:]
    # the directions left out share their mean variance; with fewer images than dimensions most
    # of them were never observed (eigenvalue ~0), so that variance is floored at a small share
    # of the average one rather than trusted to be zero
    floor = RESIDUAL_FLOOR * max(float(lam.sum()) / d, 1e-12)
    residual = max(float(rest.mean()), floor) if rest.size else 0.0
    dm = DepthModel(name, mean, 1.0 / sd, np.ascontiguousarray(vec[:, :k]),
                    1.0 / np.maximum(lam[:k], max(residual, floor)), 1.0 / residual if rest.size else 0.0)
    d2 = dm.distance2(x)
    dm.center = float(d2.mean())
    # with fewer images than kept components every training image sits at the same in-sample
    # distance (sd 0); a chi-squared's sd for that mean, sqrt(2 x mean), is the floor (on the
    # shipped model's training split the measured sd was 3 to 9 times larger, so it does not bind)
    dm.inv_scale = 1.0 / max(float(d2.std()), float(np.sqrt(2.0 * max(dm.center, 0.0))), 1e-9)
    return dm


def score_from_depths(depths: Sequence[DepthModel], vectors: Sequence[np.ndarray]) -> np.ndarray:
    """float64 reference of the graph's score: mean over depths of the standardised distances."""
    return np.mean([(dm.distance2(v) - dm.center) * dm.inv_scale for dm, v in zip(depths, vectors)], axis=0)


def build_head(depths: Sequence[DepthModel]):
    """A torch module: list of pooled tap vectors -> qc_score [N] (float32 buffers)."""
    import torch

    class QCHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = len(depths)
            self.residual = [bool(dm.inv_residual) for dm in depths]
            f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
            for i, dm in enumerate(depths):
                self.register_buffer(f"mean{i}", f32(dm.mean))
                self.register_buffer(f"inv_sd{i}", f32(dm.inv_sd))
                self.register_buffer(f"comp{i}", f32(dm.components))
                self.register_buffer(f"inv_var{i}", f32(dm.inv_var))
                self.register_buffer(f"coef{i}", f32([dm.inv_residual, dm.center, dm.inv_scale]))

        def forward(self, vectors: list):
            total = None
            for i, v in enumerate(vectors):
                z = (v - getattr(self, f"mean{i}")) * getattr(self, f"inv_sd{i}")
                p = torch.matmul(z, getattr(self, f"comp{i}"))
                pp = p * p
                d2 = (pp * getattr(self, f"inv_var{i}")).sum(dim=1)
                coef = getattr(self, f"coef{i}")
                if self.residual[i]:
                    d2 = d2 + ((z * z).sum(dim=1) - pp.sum(dim=1)) * coef[0]
                s = (d2 - coef[1]) * coef[2]
                total = s if total is None else total + s
            return total * (1.0 / self.n)  # a Mul: the graph's only Div stays the temperature

    return QCHead().eval()


class ScoreOutput:
    """Adds ``qc_score`` as the last output of the module that cxr-export builds (probabilities,
    with the temperature and the ``cam`` output where those are on): ``onnx_export.export_fp32``
    calls it on that module. ``module`` is the result, the PyTorch reference for parity."""

    def __init__(self, taps: Sequence[Tap], head):
        self.taps, self.head, self.module = list(taps), head, None

    def __call__(self, base):
        import torch

        taps, head = self.taps, self.head

        class WithScore(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base
                self.qc = head
                self.recorder = TapRecorder(taps)  # the taps fire inside base's forward

            def forward(self, image: torch.Tensor):
                out = self.base(image)
                score = self.qc(self.recorder.take())
                return (*out, score) if isinstance(out, tuple) else (out, score)

        self.module = WithScore().eval()
        return self.module

    def remove_hooks(self) -> None:
        if self.module is not None:
            self.module.recorder.remove()


def wrap_with_score(taps: Sequence[Tap], head) -> ScoreOutput:
    return ScoreOutput(taps, head)


# --------------------------------------------------------------------------- fit

def _read(path, pp: Preprocessing, with_verdict: bool):
    """(model-size uint8, header/pixel verdict or None), or None for an unreadable file."""
    from cxr.runtime.imageio import load_image_with_facts
    from cxr.runtime.inputcheck import early_verdict

    try:
        if not with_verdict:
            return resize_to_uint8(load_image(path), pp), None
        img, facts = load_image_with_facts(path)
        u8 = resize_to_uint8(img, pp)
        return u8, early_verdict(facts, u8)
    except (ImageReadError, ValueError):
        return None


def iter_batches(items: Sequence[tuple[Path, str | None]], pp: Preprocessing, batch: int = 32,
                 keep_uint8: bool = False, with_verdicts: bool = False, workers: int = 2) -> Iterable[tuple]:
    """(float32 batch, indices into ``items``, uint8 copy or None, the runtime's header/pixel
    verdicts or None) per batch, decoded in ``workers`` threads; unreadable files are skipped."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            got = list(pool.map(lambda it: _read(it[0], pp, with_verdicts), chunk))
            idx = [start + i for i, g in enumerate(got) if g is not None]
            if not idx:
                continue
            u8 = np.stack([got[i - start][0] for i in idx])
            verdicts = [got[i - start][1] for i in idx] if with_verdicts else None
            yield normalize(u8, pp), idx, (u8 if keep_uint8 else None), verdicts


class _TapsOnly:
    """Builds a module image -> pooled vector of every tap, for exporting the pooling to ONNX."""

    def __new__(cls, model, taps: Sequence[Tap]):
        import torch

        class TapsOnly(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model
                self.recorder = TapRecorder(taps)

            def forward(self, image):
                self.net(image)
                return tuple(self.recorder.take())

        return TapsOnly().eval()


@dataclass
class FittedCheck:
    taps: list[Tap]
    depths: list[DepthModel]
    head: object
    n_train: int
    seconds: float
    components: int
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"method": METHOD, "output": SCORE_OUTPUT, "components": self.components,
                "depths": [{"tap": t.name, "kind": t.kind, "dim": t.dim, "k": int(d.components.shape[1]),
                            "residual": bool(d.inv_residual)} for t, d in zip(self.taps, self.depths)],
                "fit": {"split": "train", "images": self.n_train, "seconds": round(self.seconds, 1)}}


def fit(model, pp: Preprocessing, train_items: Sequence[tuple[Path, str]], components: int = DEFAULT_COMPONENTS,
        batch: int = 32, workdir: "str | Path | None" = None, exporter: str = "dynamo",
        opset: int | None = None) -> FittedCheck:
    """Pool every tap over the training images, then fit one probabilistic-PCA Gaussian per depth.

    The pooling runs as an ONNX graph in onnxruntime (exported from the same module hooks that
    the final graph uses), about three times the speed of eager PyTorch on a small CPU; images
    stream through it, and only the pooled vectors are kept.
    """
    import tempfile

    import onnxruntime as ort

    from .onnx_export import export_module

    t0 = time.perf_counter()
    taps = find_taps(model, (pp.channels, pp.size, pp.size))
    names = tuple(f"tap{i}" for i in range(len(taps)))
    taps_only = _TapsOnly(model, taps)
    chunks: list[list[np.ndarray]] = [[] for _ in taps]
    n = 0
    with tempfile.TemporaryDirectory(prefix="cxr-qc-", dir=workdir) as tmp:
        path = Path(tmp) / "taps.onnx"
        try:
            export_module(taps_only, (pp.channels, pp.size, pp.size), path, list(names), exporter, opset)
        finally:
            taps_only.recorder.remove()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        input_name = sess.get_inputs()[0].name
        for x, idx, _, _ in iter_batches(train_items, pp, batch):
            for c, v in zip(chunks, sess.run(list(names), {input_name: x})):
                c.append(np.asarray(v, np.float64))
            n += len(idx)
            if n % (batch * 50) < batch:
                log(f"  input check: pooled {n}/{len(train_items)} training images")
    if n < 3:
        raise ValueError(f"the input check needs at least 3 readable training images, got {n}")
    depths = [fit_depth(t.name, np.concatenate(c), components) for t, c in zip(taps, chunks)]
    head = build_head(depths)
    return FittedCheck(taps, depths, head, n, time.perf_counter() - t0, components)


def ancestors(model_proto, outputs: Iterable[str]) -> set[int]:
    """Indices (into ``graph.node``) of the nodes that ``outputs`` depend on. Indices, not the
    node objects: protobuf hands out a new wrapper object on every access."""
    nodes = model_proto.graph.node
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(nodes[i].input)
    return seen


def nodes_serving_only(model_proto, outputs: Sequence[str], keep: str) -> list:
    """Nodes of an ONNX graph needed for ``outputs`` but not for output ``keep``: the score's own
    branch, which int8 quantization leaves in float."""
    main = ancestors(model_proto, [keep])
    branch = ancestors(model_proto, outputs)
    return [n for i, n in enumerate(model_proto.graph.node) if i in branch and i not in main]
