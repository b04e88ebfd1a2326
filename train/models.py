"""Architectures, all with a one-channel input and ``num_classes`` logits out.

``--weights FILE`` loads a local torchvision state dict (no downloads, ever) and folds the
pretrained RGB stem into one channel by summing over the colour axis: a gray image g fed as
(g, g, g) gives sum_c W_c * g, which is exactly what the folded kernel computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

ARCHS = ("baseline_cnn", "resnet18", "mobilenet_v2", "squeezenet1_0", "mobilenet_v3_small", "efficientnet_b0")


class BaselineCNN(nn.Module):
    """The study's small CNN: conv32-pool-conv64-pool-dense128-dropout0.25, sized to the input."""

    def __init__(self, num_classes: int, in_channels: int = 1, input_size: int = 224, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _stem_path(arch: str) -> str:
    """State-dict prefix of the first conv (the one that sees the image)."""
    return {
        "resnet18": "conv1",
        "mobilenet_v2": "features.0.0",
        "squeezenet1_0": "features.0",
        "mobilenet_v3_small": "features.0.0",
        "efficientnet_b0": "features.0.0",
        "baseline_cnn": "features.0",
    }[arch]


def _get_module(model: nn.Module, dotted: str) -> nn.Module:
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_path, _, last = dotted.rpartition(".")
    parent = _get_module(model, parent_path) if parent_path else model
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _one_channel_stem(model: nn.Module, arch: str, in_channels: int) -> None:
    path = _stem_path(arch)
    old = _get_module(model, path)
    assert isinstance(old, nn.Conv2d)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode)
    _set_module(model, path, new)


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif arch in ("mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small"):
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    elif arch == "squeezenet1_0":
        old = model.classifier[1]
        model.classifier[1] = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        nn.init.normal_(model.classifier[1].weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.classifier[1].bias)


def build_model(arch: str, num_classes: int, in_channels: int = 1, input_size: int = 224,
                bn_momentum: float | None = 0.1) -> nn.Module:
    """A freshly initialised model (no pretrained weights; see ``load_pretrained``).

    BatchNorm momentum is set to ``bn_momentum`` everywhere (None keeps torchvision's choice).
    torchvision's MobileNetV3/EfficientNet use 0.01, tuned for 600-epoch ImageNet schedules;
    in a 30-epoch run from scratch their running statistics lag the weights so far that the
    eval-mode model predicted one class for every validation image after two epochs.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "baseline_cnn":
        return BaselineCNN(num_classes, in_channels, input_size)
    model = getattr(tvm, arch)(weights=None)
    _replace_head(model, arch, num_classes)
    _one_channel_stem(model, arch, in_channels)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return model


def fold_rgb_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(out, 3, k, k) RGB kernel -> (out, in_channels, k, k) with the same response to gray input."""
    if weight.shape[1] == in_channels:
        return weight
    summed = weight.sum(dim=1, keepdim=True)
    if in_channels == 1:
        return summed
    return summed.repeat(1, in_channels, 1, 1) / in_channels


def _head_prefix(model: nn.Module) -> str:
    """The class head: the last module holding a weight (Linear, or SqueezeNet's 1x1 Conv)."""
    name = ""
    for n, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            name = n
    return name + "."


def _map_head_rows(v: torch.Tensor, own: torch.Tensor, src_classes: list, classes: list) -> "torch.Tensor | None":
    """A head tensor for ``classes`` from one trained for ``src_classes``: rows of classes both know
    are copied by name, a new class keeps its fresh initialisation (its bias the mean of the copied
    biases, so it starts neither favoured nor suppressed). None when no class is shared."""
    if v.shape[0] != len(src_classes) or own.shape[0] != len(classes) or v.shape[1:] != own.shape[1:]:
        return None
    shared = [(classes.index(c), src_classes.index(c)) for c in classes if c in src_classes]
    if not shared:
        return None
    out = own.clone()
    for i, j in shared:
        out[i] = v[j]
    if v.ndim == 1:
        copied = torch.stack([v[j] for _, j in shared]).mean()
        for i, c in enumerate(classes):
            if c not in src_classes:
                out[i] = copied
    return out


def load_pretrained(model: nn.Module, arch: str, weights_file: "str | Path", classes: "list | None" = None) -> dict:
    """Load local weights: a torchvision state dict (stem folded, class head skipped) or a
    cxr-train checkpoint, whose head rows are matched to ``classes`` by name -- a 3-class model
    fine-tuned to 4 classes keeps what it knew of its 3 and learns the fourth. Returns a summary."""
    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    src_classes = None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        if isinstance(state.get("classes"), (list, tuple)):
            src_classes = [str(c) for c in state["classes"]]
        state = state["state_dict"]
    own = model.state_dict()
    stem_key = _stem_path(arch) + ".weight"
    head = _head_prefix(model)
    loaded, skipped, mapped = [], [], []
    new_state = {}
    for k, v in state.items():
        if k not in own:
            skipped.append(k)
            continue
        if k == stem_key and v.ndim == 4 and v.shape[1] != own[k].shape[1]:
            v = fold_rgb_stem(v, own[k].shape[1])
        if v.shape != own[k].shape or (k.startswith(head) and src_classes and classes and src_classes != list(classes)):
            rows = (_map_head_rows(v, own[k], src_classes, list(classes))
                    if k.startswith(head) and src_classes and classes else None)
            if rows is None:
                skipped.append(k)  # the class head of an ImageNet model
                continue
            v = rows
            mapped.append(k)
        new_state[k] = v
        loaded.append(k)
    if not loaded:
        raise ValueError(f"{path} shares no tensors with {arch}; is it a torchvision {arch} state dict?")
    model.load_state_dict(new_state, strict=False)
    summary = {"file": str(path), "loaded": len(loaded), "skipped": skipped, "stem_folded": stem_key in new_state}
    if mapped:
        summary["head_classes"] = {"from": src_classes, "to": list(classes),
                                   "new": [c for c in classes if c not in src_classes]}
    return summary


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
