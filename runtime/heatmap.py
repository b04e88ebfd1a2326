"""Draw a class-activation map over the X-ray it came from (Pillow + numpy only).

The map lives on the model's input grid; where that grid sits on the original image depends on
the model's resize policy (``preprocess.py``): ``squash`` stretches it over the whole image,
``center_crop`` covers only the central square (the rest was never seen: no colour there), and
``pad`` covers the letterbox, of which only the image part is drawn. The overlay is therefore
always at the input's own aspect ratio.

Each map is stretched to its own min..max before colouring: the colours say *where* the
evidence for a class is strongest in this image, not how strong it is compared with other
images (the probability says that).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .preprocess import Preprocessing

# Dark blue -> cyan -> yellow -> red: cold areas barely tint the film, hot ones stand out.
_ANCHORS = np.array([
    (0.00, 20, 30, 140),
    (0.30, 0, 150, 230),
    (0.55, 60, 210, 120),
    (0.78, 255, 215, 0),
    (1.00, 225, 25, 25),
], dtype=np.float64)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), _ANCHORS[:, 0], _ANCHORS[:, i]) for i in (1, 2, 3)],
               axis=1).round().astype(np.uint8)
FIGURE_SIDE = 512  # longer side of the film in a heatmap figure
MAX_ALPHA = 0.6  # opacity of the hottest colour; the film stays visible underneath
ALPHA_GAMMA = 1.5  # opacity grows faster than heat: the film stays clear where the evidence is weak


def normalize_map(cam: np.ndarray) -> np.ndarray:
    """float map -> [0, 1] by its own min..max (all zeros when flat)."""
    cam = np.asarray(cam, dtype=np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(cam)
    return (cam - lo) / (hi - lo)


def _resize_f(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F").resize(
        (max(1, w), max(1, h)), Image.Resampling.BILINEAR), dtype=np.float32)


def map_on_image(cam: np.ndarray, size: tuple[int, int], pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D map [h, w] on the model grid -> (heat [H, W] in 0..1, seen [H, W] bool) for an image
    of ``size`` = (W, H): the map placed where the model's input came from."""
    w, h = size
    heat = normalize_map(cam)
    if pp.resize == "squash":
        return np.clip(_resize_f(heat, w, h), 0, 1), np.ones((h, w), bool)
    if pp.resize == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out = np.zeros((h, w), np.float32)
        seen = np.zeros((h, w), bool)
        out[top:top + side, left:left + side] = _resize_f(heat, side, side)
        seen[top:top + side, left:left + side] = True
        return np.clip(out, 0, 1), seen
    side = max(w, h)  # pad: the map covers the letterboxed square
    full = _resize_f(heat, side, side)
    left, top = (side - w) // 2, (side - h) // 2
    return np.clip(full[top:top + h, left:left + w], 0, 1), np.ones((h, w), bool)


def overlay(image: Image.Image, cam: np.ndarray, pp: Preprocessing) -> Image.Image:
    """The grayscale film with the map blended in (RGB, same size as ``image``)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    heat, seen = map_on_image(cam, image.size, pp)
    colour = LUT[np.round(heat * 255).astype(np.uint8)].astype(np.float32)
    alpha = (MAX_ALPHA * heat ** ALPHA_GAMMA * seen)[..., None]
    out = gray[..., None] * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def render_heatmap(image: Image.Image, cam: np.ndarray, pp: Preprocessing, label: str, confidence: float,
                   caption: str = "") -> Image.Image:
    """The figure written by ``--heatmaps``: title band, overlay, colour scale with its meaning.
    The film is drawn with its longer side at ``FIGURE_SIDE`` pixels, at its own aspect ratio."""
    scale = FIGURE_SIDE / max(image.size)
    if abs(scale - 1) > 0.01:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    body = overlay(image, cam, pp)
    w, h = body.size
    bar_w, pad, band = 18, 10, 46
    legend_w = 86
    fig = Image.new("RGB", (max(w + pad + bar_w + legend_w, 400), max(h, 90) + band), (255, 255, 255))
    fig.paste(body, (0, band))
    d = ImageDraw.Draw(fig)
    d.text((6, 4), f"{label}  {100 * confidence:.1f}%", fill=(0, 0, 0), font=_font(18))
    d.text((6, 27), caption or f"colour = where the evidence for {label} is strongest", fill=(60, 60, 60),
           font=_font(12))
    # colour scale: high at the top
    x0, y0, y1 = w + pad, band, band + max(h, 90) - 1
    ramp = LUT[np.linspace(255, 0, max(2, y1 - y0 + 1)).round().astype(int)]
    fig.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1)), (x0, y0))
    d.rectangle((x0, y0, x0 + bar_w - 1, y1), outline=(0, 0, 0))
    f = _font(12)
    d.text((x0 + bar_w + 4, y0), "strongest", fill=(0, 0, 0), font=f)
    d.text((x0 + bar_w + 4, y0 + 14), "evidence", fill=(0, 0, 0), font=f)
    d.text((x0 + bar_w + 4, y1 - 28), "weakest", fill=(0, 0, 0), font=f)
    d.text((x0 + bar_w + 4, y1 - 14), "(no tint)", fill=(0, 0, 0), font=f)
    return fig
