"""The input check's score, fitted on the training split and built into the ONNX graph.

Why these statistics: a network trained only on chest X-rays maps a CT slice or a photo close to
its class means in the penultimate layer, so a distance there alone is nearly blind (the probe in
docs/input-check.md). Earlier layers keep texture and intensity statistics that differ between
kinds of image. So the score reads several depths: for every *stage* of the network's trunk (a
run of blocks with the same output shape; its last block's output is tapped) and the input of
the final linear layer where that is not simply the last stage pooled, each image gives a vector
of per-channel spatial means and root mean squares. Pooling discards where things are, so one more
"depth" is the input's coarse layout (``layout``: an 8 x 8 grid of block means, standardised per
image). For each depth the training split's vectors
give a Gaussian model whose covariance is that of probabilistic PCA -- the top ``k`` principal
components kept, the other directions sharing their average variance -- so the Mahalanobis
distance is well defined with a few thousand images and a few thousand dimensions, and the file
grows by the ``D x k`` projection only. Each depth's squared distance is standardised by its
mean and standard deviation over the training split, and the score is the mean over depths
(higher = less like the training X-rays). Nothing here is fitted on non-X-rays.

Everything after the taps is plain tensor arithmetic (pool, mean, subtract, multiply, matmul), so
it exports as ordinary ONNX ops: the runtime computes the score without torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr.runtime.imageio import ImageReadError, load_image
from cxr.runtime.inputcheck import SCORE_OUTPUT, layout_u8
from cxr.runtime.preprocess import Preprocessing, normalize, resize_to_uint8

from .data import log

METHOD = "ppca-mahalanobis-multidepth/2"  # 2: channel RMS (not sd), stages <= 28 px, the input layout
DEFAULT_COMPONENTS = 64
SD_FLOOR = 1e-2  # feature sd floor, as a fraction of the tap's mean feature sd (dead channels)
LARGEST_TAPPED_MAP = 28  # px: stages with larger maps are not read (cost; see find_taps)
RESIDUAL_FLOOR = 1e-2  # variance floor of the left-out directions, as a fraction of the mean eigenvalue
LAYOUT_AGREEMENT_MIN = 0.5  # median correlation of training films with their mean layout, for an orientation check
LAYOUT_GRID = 8  # the input's layout: averaged over LAYOUT_GRID x LAYOUT_GRID blocks
LAYOUT_EPS = 1.0 / 64  # added to each image's layout sd, in model-input units (about 1 gray level at std 0.25)


# --------------------------------------------------------------------------- where to look

@dataclass
class Tap:
    name: str  # module path, e.g. "features.6"
    module: object
    kind: str  # "stage": pooled statistics of a 4-D output; "head": input of the final Linear; "layout": the input
    dim: int = 0
    block: tuple[int, int] = (0, 0)  # layout: pixels per grid block (fixed by the input size, not traced)


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
    channel count (then it is only that stage pooled, already covered), plus the input's layout
    (``layout``) when the input has at least LAYOUT_GRID pixels a side.

    Stages whose maps are larger than LARGEST_TAPPED_MAP px a side are left out (the last stage is
    kept if every one is larger): pooling costs a few passes over a map, and on MobileNetV2-224 the
    112 px and 56 px maps (``features.1``, ``features.3``) held three fifths of the tapped values
    while the score's branch runs as a chain of small nodes that two cores hardly share. With the
    layout in the score, leaving them out also flagged no fewer non-X-rays on the development
    folder (docs/input-check.md)."""
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
    taps, sizes = [], []
    names = [n for n, _ in trunk if n in shapes]
    mods = dict(trunk)
    for i, n in enumerate(names):
        shape = shapes[n]
        if len(shape) != 3:
            continue
        if i + 1 < len(names) and shapes[names[i + 1]] == shape:
            continue  # not the end of its stage
        taps.append(Tap(n, mods[n], "stage", 2 * shape[0]))
        sizes.append(shape[1] * shape[2])
    if len(taps) > 1:
        taps, sizes = taps[1:], sizes[1:]  # the stem
    if not taps:
        raise ValueError("no 4-D trunk output found for the input check")
    taps = [t for t, hw in zip(taps, sizes) if hw <= LARGEST_TAPPED_MAP ** 2] or taps[-1:]
    last_channels = taps[-1].dim // 2
    if head is not None and head_dim and head_dim[0] != last_channels:
        taps.append(Tap(head[0], head[1], "head", int(head_dim[0])))
    if min(input_shape[1:]) >= LAYOUT_GRID:
        block = (input_shape[1] // LAYOUT_GRID, input_shape[2] // LAYOUT_GRID)
        taps.append(Tap("input.layout", None, "layout", LAYOUT_GRID * LAYOUT_GRID, block))
    return taps


def layout(image, block: tuple[int, int], grid: int = LAYOUT_GRID):
    """[N, C, H, W] model input -> [N, grid x grid]: the image (channels averaged) averaged over a
    grid of ``block``-pixel blocks (a remainder of rows or columns is left out), each image
    standardised by its own mean and standard deviation. ``block`` comes from the model's fixed
    input size (``find_taps``), not from the traced tensor, so every exporter sees constants.

    Why: the network's pooled statistics discard where things are, and an X-ray of a hand or a
    washed-out chest film look alike to them (both sit between the two thresholds). A frontal
    chest radiograph has a stereotyped coarse layout -- two dark lung fields either side of a
    bright mediastinum, bright below the diaphragm -- whatever the machine's contrast, which the
    per-image standardisation removes."""
    import torch

    x = image if image.shape[1] == 1 else image.mean(dim=1, keepdim=True)
    t = torch.nn.functional.avg_pool2d(x, block, block)[:, :, :grid, :grid].flatten(1)
    c = t - t.mean(dim=1, keepdim=True)
    # a Reciprocal and a Mul: the graph's only Div stays the temperature
    return c * torch.reciprocal(torch.sqrt((c * c).mean(dim=1, keepdim=True)) + LAYOUT_EPS)


def pooled(t):
    """[N, C, H, W] -> [N, 2C]: per-channel spatial mean, then root mean square; [N, D] as is.

    The second statistic is the root mean square, not the standard deviation: given the mean they
    carry the same information (sd^2 = rms^2 - mean^2), but the RMS is two passes over the map
    (square, average), where the sd took three (subtract the mean, square, average) plus a square
    root of a difference that rounding can make negative. (ONNX ``ReduceL2`` would be one pass,
    but onnxruntime's symbolic shape inference, which int8 quantization runs first, cannot infer
    its output shape when the axes are an input, as from opset 18.)"""
    import torch

    if t.dim() == 2:
        return t
    m = t.mean(dim=(2, 3))
    return torch.cat([m, torch.sqrt((t * t).mean(dim=(2, 3)))], dim=1)


class TapRecorder:
    """Forward hooks that pool each tap's tensor as soon as it is produced (an in-place ReLU
    after a tapped module must not change what was recorded)."""

    def __init__(self, taps: Sequence[Tap]):
        self.taps = list(taps)
        self.values: list = [None] * len(self.taps)
        self._hooks = []
        for i, t in enumerate(self.taps):
            if t.kind == "layout":
                continue  # read from the input in take()
            if t.kind == "head":
                self._hooks.append(t.module.register_forward_pre_hook(
                    lambda mod, inp, i=i: self.values.__setitem__(i, pooled(inp[0]))))
            else:
                self._hooks.append(t.module.register_forward_hook(
                    lambda mod, inp, out, i=i: self.values.__setitem__(i, pooled(out))))

    def take(self, image) -> list:
        for i, t in enumerate(self.taps):
            if t.kind == "layout":
                self.values[i] = layout(image, t.block)
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


def head_weights(depths: Sequence[DepthModel]) -> dict[str, np.ndarray]:
    """The score as few tensors as possible, for a graph of few nodes (each node costs a dispatch).

    With ``z`` the standardised vector of a depth, ``p = z C`` its projection and ``r = z - p C^T``
    what the kept components leave (zero where a depth keeps every direction), the standardised
    distance ``(d2 - center) x inv_scale``, averaged over the depths, is

        score = sum_j p_j^2 a_j + sum_d r_d^2 b_d + c

    over all depths' components ``j`` and features ``d`` at once, with
    ``a_j = inv_var_j x inv_scale / n``, ``b_d = inv_residual x inv_scale / n`` and
    ``c = -sum(center x inv_scale) / n``: every weight is positive, so float32 sums lose nothing
    to cancellation. (Writing the residual as ``|z|^2 - |p|^2`` instead subtracts two sums of
    thousands of terms: 500 times the rounding error, measured on the shipped model's test
    split.) So the graph concatenates the taps, standardises them in one step, projects each
    depth (one MatMul per depth and one Gemm back, sharing the matrix; a block-diagonal matrix
    would be mostly zeros), and weighs the squares with one MatMul.
    """
    n = len(depths)
    a = [dm.inv_var * dm.inv_scale / n for dm in depths]
    b = [np.full(len(dm.mean), dm.inv_residual * dm.inv_scale / n) for dm in depths if dm.inv_residual]
    return {"mean": np.concatenate([dm.mean for dm in depths]),
            "inv_sd": np.concatenate([dm.inv_sd for dm in depths]),
            "weights": np.concatenate(a + b)[:, None],
            "offset": np.array([-sum(dm.center * dm.inv_scale for dm in depths) / n])}


def build_head(depths: Sequence[DepthModel]):
    """A torch module: list of pooled tap vectors -> qc_score [N] (float32 buffers); the graph
    that ``head_weights`` describes."""
    import torch

    w = head_weights(depths)
    sizes = [len(dm.mean) for dm in depths]
    residual = [bool(dm.inv_residual) for dm in depths]

    class QCHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
            for name, value in w.items():
                self.register_buffer(name, f32(value))
            for i, dm in enumerate(depths):
                self.register_buffer(f"comp{i}", f32(dm.components))

        def forward(self, vectors: list):
            z = (torch.cat(vectors, dim=1) - self.mean) * self.inv_sd
            parts = torch.split(z, sizes, dim=1)
            p = [torch.matmul(zi, getattr(self, f"comp{i}")) for i, zi in enumerate(parts)]
            r = [zi - torch.nn.functional.linear(pi, getattr(self, f"comp{i}"))
                 for i, (zi, pi) in enumerate(zip(parts, p)) if residual[i]]
            q = torch.cat([*p, *r], dim=1)
            return torch.matmul(q * q, self.weights)[:, 0] + self.offset

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
                score = self.qc(self.recorder.take(image))
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
                return tuple(self.recorder.take(image))

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
    layout_template: np.ndarray | None = None  # the training films' mean layout (runtime's orientation check)

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
    layouts: list[np.ndarray] = []
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
        for x, idx, u8, _ in iter_batches(train_items, pp, batch, keep_uint8=True):
            for c, v in zip(chunks, sess.run(list(names), {input_name: x})):
                c.append(np.asarray(v, np.float64))
            layouts += [layout_u8(img, LAYOUT_GRID) for img in u8]
            n += len(idx)
            if n % (batch * 50) < batch:
                log(f"  input check: pooled {n}/{len(train_items)} training images")
    if n < 3:
        raise ValueError(f"the input check needs at least 3 readable training images, got {n}")
    depths = [fit_depth(t.name, np.concatenate(c), components) for t, c in zip(taps, chunks)]
    head = build_head(depths)
    template, info = layout_template(layouts) if pp.size >= LAYOUT_GRID else (None, {})
    return FittedCheck(taps, depths, head, n, time.perf_counter() - t0, components, info=info,
                       layout_template=template)


def layout_template(layouts: Sequence[np.ndarray]) -> tuple[np.ndarray | None, dict]:
    """(the training films' mean layout, or None, and why): the orientation check rests on the
    premise that the training films share a layout -- chest films do, the median one correlating
    about 0.74 with the mean -- so it is only built when the median correlation reaches
    LAYOUT_AGREEMENT_MIN (random or mixed training images give a mean of noise)."""
    from cxr.runtime.inputcheck import layout_correlation

    if not layouts:
        return None, {}
    template = np.mean(np.stack(layouts), axis=0)
    agreement = float(np.median([layout_correlation(v, template) for v in layouts]))
    info = {"layout_agreement": round(agreement, 4)}
    if agreement < LAYOUT_AGREEMENT_MIN:
        log(f"input check: the training images share no layout (median correlation {agreement:.2f} < "
            f"{LAYOUT_AGREEMENT_MIN:g} with their mean): no orientation check")
        return None, info
    return template, info


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


def pool_quantized_taps(model_proto, branch: "set[str]") -> list[str]:
    """Rewrite an int8 (QDQ) graph so the score's pooling reads each tapped tensor once, as uint8.

    In the quantized graph every tap is ``DequantizeLinear(q)`` feeding the network's next layer and
    the score's pooling (a ``ReduceMean`` of x and a ``ReduceMean`` of ``Mul(x, x)``). onnxruntime
    gives each consumer of a DequantizeLinear its own copy (so that each quantized node unit owns
    its inputs): the full map was dequantized three times per tap, the largest part of the
    check's cost in int8. Here the pooling reads ``Cast(q)`` instead, once, and the affine map
    ``x = s (q - z)`` moves onto the pooled [N, C] vectors, where it is nearly free:

        mean(x) = s (mean(q) - z)        mean(x^2) = s^2 (mean(q^2) - 2 z mean(q) + z^2)

    Only that exact pattern is rewritten (per-tensor scale and zero point, spatial reductions
    with keepdims=0); any other consumer in ``branch`` leaves its tap as it was. Returns the
    names of the rewritten DequantizeLinear nodes.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in dict.fromkeys(n.input):
            consumers.setdefault(i, []).append(n)

    def keepdims0(n) -> bool:
        return any(a.name == "keepdims" and a.i == 0 for a in n.attribute)

    def scalar(name):
        if name not in inits:
            return None
        a = numpy_helper.to_array(inits[name])
        return a if a.size == 1 else None

    new_inits, added, done = [], {}, []  # added: node name -> nodes to place after it

    def const(name, value):
        new_inits.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(()), name))
        return name

    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        x = dq.output[0]
        mine = [c for c in consumers.get(x, []) if c.name in branch]
        if not mine or len(dq.input) < 3:
            continue
        s, z = scalar(dq.input[1]), scalar(dq.input[2])
        if s is None or z is None:
            continue
        means = [c for c in mine if c.op_type == "ReduceMean" and c.input[0] == x and keepdims0(c)]
        squares = []
        for c in mine:
            if c.op_type == "Mul" and list(c.input) == [x, x]:
                after = consumers.get(c.output[0], [])
                if len(after) == 1 and after[0].op_type == "ReduceMean" and keepdims0(after[0]) \
                        and after[0].input[0] == c.output[0]:
                    squares.append((c, after[0]))
        axes = {tuple(numpy_helper.to_array(inits[r.input[1]]).tolist()) if len(r.input) > 1 and r.input[1] in inits
                else None for r in [*means, *(r for _, r in squares)]}
        if len(means) > 1 or len(means) + len(squares) != len(mine) or len(axes) != 1 or None in axes:
            continue
        axes_name = (means[0] if means else squares[0][1]).input[1]
        p = dq.name or x
        qf = f"{p}/qc_q"
        sc, zf = float(s), float(z)
        out = [helper.make_node("Cast", [dq.input[0]], [qf], name=f"{p}/qc_cast", to=onnx.TensorProto.FLOAT)]
        s_name, z_name = const(f"{p}/qc_s", sc), const(f"{p}/qc_z", zf)
        mean_q = None
        for r in means:
            old = r.output[0]
            r.input[0] = qf
            r.output[0] = mean_q = f"{old}/qc_q"
            added.setdefault(r.name, []).extend([
                helper.make_node("Sub", [mean_q, z_name], [f"{old}/qc_c"], name=f"{old}/qc_sub"),
                helper.make_node("Mul", [f"{old}/qc_c", s_name], [old], name=f"{old}/qc_scale")])
        for mul, r in squares:
            old = r.output[0]
            mul.input[0] = mul.input[1] = qf
            r.output[0] = f"{old}/qc_q2"
            if zf == 0.0:
                tail = [helper.make_node("Mul", [f"{old}/qc_q2", const(f"{old}/qc_s2", sc * sc)], [old], name=f"{old}/qc_scale")]
            else:
                if mean_q is None:
                    mean_q = f"{p}/qc_mean_q"
                    out.append(helper.make_node("ReduceMean", [qf, axes_name], [mean_q], name=f"{p}/qc_mean", keepdims=0))
                tail = [helper.make_node("Mul", [mean_q, const(f"{old}/qc_2z", 2 * zf)], [f"{old}/qc_a"], name=f"{old}/qc_a"),
                        helper.make_node("Sub", [f"{old}/qc_q2", f"{old}/qc_a"], [f"{old}/qc_b"], name=f"{old}/qc_b"),
                        helper.make_node("Add", [f"{old}/qc_b", const(f"{old}/qc_z2", zf * zf)], [f"{old}/qc_c"], name=f"{old}/qc_c"),
                        helper.make_node("Mul", [f"{old}/qc_c", const(f"{old}/qc_s2", sc * sc)], [old], name=f"{old}/qc_scale")]
            added.setdefault(r.name, []).extend(tail)
        added.setdefault(dq.name, []).extend(out)
        done.append(dq.name)
    if not done:
        return done
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(added.get(n.name, []))
    nodes = _topological(nodes, {i.name for i in g.input} | set(inits) | {i.name for i in new_inits})
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    return done


def _topological(nodes: list, available: set[str]) -> list:
    """Nodes in an order where every input is produced first; ties keep the given order."""
    have = set(available) | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in have for i in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    return out
