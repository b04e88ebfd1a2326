"""Batched augmentation on uint8 tensors, after the one-time decode.

Two families: the study's geometry (horizontal flip, +-10 deg rotation, 90-110% zoom), and
acquisition robustness -- X-rays reach users resized by other filters, re-encoded as JPEG,
windowed differently -- so training sees random down/up-sampling with varied interpolation,
mild blur/sharpen, JPEG re-compression, gamma/contrast changes, per-film level stretching or
histogram equalisation (some exports stretch each film to its own minimum and maximum, as the
lung-opacity copy's false-colour round trip did, so the stretch must not identify a source) and
detector noise.
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
    # per-film windowing as other pipelines apply it: min-max stretch (half) or equalisation (half)
    levels_p: float = 0.2
    noise_p: float = 0.15
    noise_sd: tuple[float, float] = (0.005, 0.03)
    robust: bool = True
    # cues outside the lungs (burnt-in letters and markers, borders, collimation edges) differ by
    # source; hiding them at random keeps them from predicting the class
    cue_erase_p: float = 0.5
    border_max: float = 0.12
    patch_max: int = 3


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


def _levels(x: torch.Tensor, equalize: bool) -> torch.Tensor:
    """Each film stretched to its own 0.5-99.5 percentile range, or histogram-equalised (256 bins)."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    if not equalize:
        lo = torch.quantile(flat, 0.005, dim=1, keepdim=True)
        hi = torch.quantile(flat, 0.995, dim=1, keepdim=True)
        return ((flat - lo) / (hi - lo).clamp_min(1e-3)).clamp_(0, 1).reshape(x.shape)
    levels = (flat * 255).round_().clamp_(0, 255).long()
    hist = torch.zeros(b, 256).scatter_add_(1, levels, torch.ones_like(flat))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).min(1, keepdim=True).values
    lut = ((cdf - cdf_min) / (flat.shape[1] - cdf_min).clamp_min(1)).clamp_(0, 1)
    return lut.gather(1, levels).reshape(x.shape)


def _noise(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    sd = cfg.noise_sd[0] + (cfg.noise_sd[1] - cfg.noise_sd[0]) * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    return (x + sd * torch.randn(x.shape, generator=gen)).clamp_(0, 1)


def _erase_cues(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random bands along the edges and small blocks in the outer margin, each one flat grey.

    The bands mimic collimation and borders of other machines; the blocks cover where burnt-in
    letters and side markers sit: the outer 15 % strips of the image.
    """
    b, _, h, w = x.shape
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    widths = (r(b, 4) < 0.5) * (r(b, 4) * cfg.border_max * torch.tensor([h, h, w, w]))
    widths = widths.long()
    band = ((rows < widths[:, 0].view(b, 1, 1)) | (rows >= h - widths[:, 1].view(b, 1, 1))
            | (cols < widths[:, 2].view(b, 1, 1)) | (cols >= w - widths[:, 3].view(b, 1, 1)))
    fill = r(b, 1, 1)
    out = torch.where(band, fill, x[:, 0])
    for _ in range(cfg.patch_max):
        use = r(b) < 0.5
        ph = (h * (0.04 + 0.10 * r(b))).long()
        pw = (w * (0.04 + 0.10 * r(b))).long()
        # the top-left corner lies in the outer quarter: one of the four edge strips
        y0 = (r(b) * (h - ph)).long()
        x0 = (r(b) * (w - pw)).long()
        edge = (r(b) * 4).long()
        y0 = torch.where(edge == 0, (r(b) * h * 0.15).long(), torch.where(edge == 1, h - ph - (r(b) * h * 0.15).long(), y0))
        x0 = torch.where(edge == 2, (r(b) * w * 0.15).long(), torch.where(edge == 3, w - pw - (r(b) * w * 0.15).long(), x0))
        y0, x0 = y0.clamp(0, h - 1), x0.clamp(0, w - 1)
        m = ((rows >= y0.view(b, 1, 1)) & (rows < (y0 + ph).view(b, 1, 1))
             & (cols >= x0.view(b, 1, 1)) & (cols < (x0 + pw).view(b, 1, 1)) & use.view(b, 1, 1))
        shade = torch.where(r(b) < 0.5, 0.85 + 0.15 * r(b), 0.15 * r(b)).view(b, 1, 1)
        out = torch.where(m, shade, out)
    return out.unsqueeze(1)


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
    idx = _subset(b, cfg.levels_p, gen)
    if len(idx):
        x[idx] = _levels(x[idx].clamp(0, 1), equalize=rng.random() < 0.5)
    idx = _subset(b, cfg.intensity_p, gen)
    if len(idx):
        n = len(idx)
        lg = torch.empty(n).uniform_(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), generator=gen)
        c = torch.empty(n).uniform_(*cfg.contrast, generator=gen)
        br = torch.empty(n).uniform_(-cfg.brightness, cfg.brightness, generator=gen)
        y = x[idx].clamp(1e-6, 1).pow(torch.exp(lg).view(-1, 1, 1, 1))
        x[idx] = (y - 0.5) * c.view(-1, 1, 1, 1) + 0.5 + br.view(-1, 1, 1, 1)
    idx = _subset(b, cfg.noise_p, gen)
    if len(idx):
        x[idx] = _noise(x[idx].clamp(0, 1), cfg, gen)
    idx = _subset(b, cfg.cue_erase_p, gen)
    if len(idx):
        x[idx] = _erase_cues(x[idx].clamp(0, 1), cfg, gen)
    return x.clamp_(0, 1)
