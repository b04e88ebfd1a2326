"""Class-activation maps (CAM) as a second graph output, for models whose head allows it.

CAM (Zhou et al. 2016) applies to a network that ends in feature map -> global average pool ->
one linear layer. Because the pool and the linear layer commute, the classifier can be run on
every cell of the last feature map instead of on its average:

    cam[n, k, i, j] = sum_c W[k, c] * F[n, c, i, j] + b[k]

and the spatial mean of ``cam[n, k]`` is then exactly logit ``k``. The bias is added to every
cell so that this identity holds (a test checks it); displays normalise each map to its own
min..max, which a constant shift does not change.

The exported graph computes the probabilities from the same feature map (pool -> linear ->
softmax), so the two outputs share the whole trunk; the fp32 parity step still compares the
probabilities with the unmodified PyTorch model. Architectures without that head are exported
without a map, and the metadata says why (``cam_support``).
"""

from __future__ import annotations

from dataclasses import dataclass

OUTPUT_NAME = "cam"


@dataclass(frozen=True)
class CamSupport:
    """Whether ``arch`` gets a ``cam`` output, and which layer feeds it."""

    available: bool
    layer: str | None = None
    reason: str | None = None


# Where the last feature map is, per architecture; the head after the pool is one nn.Linear.
_LAYERS = {
    "mobilenet_v2": "features",
    "efficientnet_b0": "features",
    "resnet18": "layer4",
}
_NOT_APPLICABLE = {
    "baseline_cnn": "the head flattens the feature map into a dense layer (no global pooling)",
    "squeezenet1_0": "the classifier is a 1x1 conv + ReLU before the pooling, not a linear layer after it",
    "mobilenet_v3_small": "the head after the pooling is Linear-Hardswish-Linear, not one linear layer",
}


def cam_support(arch: str) -> CamSupport:
    if arch in _LAYERS:
        return CamSupport(True, layer=_LAYERS[arch])
    return CamSupport(False, reason=_NOT_APPLICABLE.get(arch, f"architecture {arch!r} has no known CAM layer"))


def _head(model, arch: str):
    """(feature trunk as a callable, the final nn.Linear)."""
    import torch

    if arch == "resnet18":
        def trunk(x):
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            return model.layer4(model.layer3(model.layer2(model.layer1(x))))
        linear = model.fc
    else:  # mobilenet_v2, efficientnet_b0: features -> pool -> classifier (Dropout, Linear)
        trunk = model.features
        linear = model.classifier[-1]
        if any(not isinstance(m, (torch.nn.Dropout, torch.nn.Linear)) for m in model.classifier):
            raise ValueError(f"{arch} classifier is not Dropout+Linear; CAM does not apply")
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(f"{arch} head is {type(linear).__name__}, not nn.Linear; CAM does not apply")
    return trunk, linear


def with_softmax_and_cam(model, arch: str, temperature: float | None = None):
    """Module image -> (probabilities [N, K], cam [N, K, h, w]); eval mode. ``temperature``
    (calibration, docs/triage.md) divides the logits before the softmax, as ``_with_softmax`` does;
    the map stays in logit units (its mean is the logit before that division)."""
    import torch

    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    trunk, linear = _head(model, arch)

    class WithSoftmaxAndCam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model  # registers the weights once

        def forward(self, image: torch.Tensor):
            f = trunk(image)
            logits = linear(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(f, 1), 1))
            if temperature is not None:
                logits = logits / temperature
            w = linear.weight[:, :, None, None]
            cam = torch.nn.functional.conv2d(f, w, linear.bias)
            return torch.softmax(logits, dim=1), cam

    return WithSoftmaxAndCam().eval()


def torch_cam_runner(wrapped):
    """PyTorch reference for the map: float32 [N, K, h, w]."""
    import numpy as np
    import torch

    def run(x):
        with torch.inference_mode():
            return wrapped(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))[1].numpy()

    return run


def ort_cam_runner(session):
    import numpy as np

    name = session.get_inputs()[0].name
    return lambda x: session.run([OUTPUT_NAME], {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def cam_metadata(support: CamSupport, grid: "tuple[int, int] | None" = None, parity: dict | None = None) -> dict:
    """The ``cxr.cam`` metadata value."""
    if not support.available:
        return {"available": False, "reason": support.reason}
    meta = {"available": True, "output": OUTPUT_NAME, "layer": support.layer,
            "grid": list(grid) if grid else None, "method": "CAM (Zhou et al. 2016)",
            "bias": "included in every cell: the spatial mean of cam[k] is logit k"}
    if parity is not None:
        meta["parity"] = parity
    return meta
