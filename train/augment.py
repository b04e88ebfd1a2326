"""Batched augmentation on uint8 tensors, after the one-time decode.

Two families: the study's geometry (horizontal flip, +-10 deg rotation, 90-110% zoom), and
acquisition robustness -- X-rays reach users resized by other filters, re-encoded as JPEG,
windowed differently -- so training sees random down/up-sampling with varied interpolation,
mild blur/sharpen, JPEG re-compression and gamma/contrast changes.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr.runtime.preprocess import Preprocessing

_MODES = ("bilinear", "bicubic", "area", "nearest")


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    rotate_deg: float = 10.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    translate: float = 0.04
    resample_p: float = 0.5
    resample_min: float = 0.4
    blur_sharpen_p: float = 0.3
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (40, 95)
    intensity_p: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.08
    robust: bool = True


def normalize_tensor(x01: torch.Tensor, pp: Preprocessing) -> torch.Tensor:
    """Same arithmetic as ``cxr.runtime.preprocess.normalize`` on a [0,1] float tensor (B,1,S,S)."""
    x = (x01 - pp.mean) / pp.std
    if pp.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x


def to_unit(batch_u8: torch.Tensor) -> torch.Tensor:
    """(B,S,S) uint8 -> (B,1,S,S) float in [0,1], exactly pixel/255 like the runtime."""
    return batch_u8.unsqueeze(1).to(torch.float32) * (1.0 / 255.0)


def _geometry(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    angle = u(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    zoom = u(cfg.scale_min, cfg.scale_max)
    flip = torch.where(torch.rand(b, generator=gen) < cfg.hflip, -1.0, 1.0)
    tx, ty = u(-cfg.translate, cfg.translate), u(-cfg.translate, cfg.translate)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, tx], dim=1),
        torch.stack([sin * flip, cos, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _resample(x: torch.Tensor, cfg: AugmentConfig, rng: random.Random) -> torch.Tensor:
    s = x.shape[-1]
    small = max(8, int(round(s * rng.uniform(cfg.resample_min, 1.0))))
    down = rng.choice(_MODES)
    up = rng.choice(("bilinear", "bicubic", "nearest"))
    kw = {"antialias": True} if down in ("bilinear", "bicubic") else {}
    y = F.interpolate(x, size=(small, small), mode=down, **kw)
    y = F.interpolate(y, size=(s, s), mode=up, **({} if up == "nearest" else {"align_corners": False}))
    return y.clamp_(0, 1)


def _blur_sharpen(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    sigma = rng.uniform(0.4, 1.2)
    k = torch.arange(-1, 2, dtype=torch.float32)
    g = torch.exp(-(k ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    s = x.shape[-1]
    # separable 3-tap blur as shifted sums: far cheaper than a 1-channel conv2d on CPU
    rows = g[0] * padded[..., :, 0:s] + g[1] * padded[..., :, 1:s + 1] + g[2] * padded[..., :, 2:s + 2]
    blurred = g[0] * rows[..., 0:s, :] + g[1] * rows[..., 1:s + 1, :] + g[2] * rows[..., 2:s + 2, :]
    if rng.random() < 0.5:
        return blurred
    amount = rng.uniform(0.3, 1.0)
    return (x + amount * (x - blurred)).clamp_(0, 1)


def _jpeg_roundtrip(gray: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    # Pillow's libjpeg-turbo (torchvision's JPEG codec is deprecated since 0.29)
    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()
    decoded = np.stack([_jpeg_roundtrip(img[0], quality)[None] for img in u8])
    return torch.from_numpy(decoded).to(torch.float32) / 255.0


def _subset(b: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.nonzero(torch.rand(b, generator=gen) < p).flatten()


def augment_batch(batch_u8: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                  rng: random.Random) -> torch.Tensor:
    """uint8 (B,S,S) -> augmented float (B,1,S,S) in [0,1].

    Each robustness op hits a random subset of the batch with one random setting per batch,
    which keeps the cost per batch, not per image, while epochs still see every setting.
    """
    x = _geometry(to_unit(batch_u8), cfg, gen)
    if not cfg.robust:
        return x.clamp_(0, 1)
    b = x.shape[0]
    for p, op in ((cfg.resample_p, lambda t: _resample(t, cfg, rng)),
                  (cfg.blur_sharpen_p, lambda t: _blur_sharpen(t, rng)),
                  (cfg.jpeg_p, lambda t: _jpeg(t, rng.randint(*cfg.jpeg_quality)))):
        idx = _subset(b, p, gen)
        if len(idx):
            x[idx] = op(x[idx])
    idx = _subset(b, cfg.intensity_p, gen)
    if len(idx):
        n = len(idx)
        lg = torch.empty(n).uniform_(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), generator=gen)
        c = torch.empty(n).uniform_(*cfg.contrast, generator=gen)
        br = torch.empty(n).uniform_(-cfg.brightness, cfg.brightness, generator=gen)
        y = x[idx].clamp(1e-6, 1).pow(torch.exp(lg).view(-1, 1, 1, 1))
        x[idx] = (y - 0.5) * c.view(-1, 1, 1, 1) + 0.5 + br.view(-1, 1, 1, 1)
    return x.clamp_(0, 1)
