"""Heatmap overlay PNGs for reviewers: an image with a saliency map blended on top.

The map is coloured with a matplotlib colormap (``jet`` by default) and alpha-blended onto the
grayscale or RGB image; small images are upscaled (bilinear) so that a reviewer can see them and
an optional title strip fits above. Only matplotlib's colormaps are used (no figure, no pyplot),
so this is fast, thread-safe and needs no display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 256
TITLE_HEIGHT = 22


def _colormap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def overlay_array(
    image: torch.Tensor, cam: torch.Tensor, *, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend ``cam`` onto ``image``; returns ``uint8[H, W, 3]``.

    Args:
        image: ``float[C, H, W]`` in [0, 1], ``C`` = 1 or 3.
        cam: ``float[H', W']`` in [0, 1]; resized bilinearly to ``H × W`` when it differs.
        alpha: weight of the heatmap.
        cmap: a matplotlib colormap name.

    Raises:
        ValueError: wrong shapes.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    if cam.dim() != 2:
        raise ValueError(f"cam must be [H, W], got {tuple(cam.shape)}")
    img = image.detach().float().cpu().clamp(0.0, 1.0)
    h, w = img.shape[1:]
    m = cam.detach().float().cpu()
    if tuple(m.shape) != (h, w):
        m = torch.nn.functional.interpolate(
            m[None, None], size=(h, w), mode="bilinear", align_corners=False
        )[0, 0]
    heat_in = torch.nan_to_num(m, nan=0.0).clamp(0.0, 1.0).numpy()
    rgb = (
        img.expand(3, h, w).permute(1, 2, 0).numpy()
        if img.shape[0] == 1
        else img.permute(1, 2, 0).numpy()
    )
    heat = _colormap(cmap)(heat_in)[..., :3]
    out = (1.0 - alpha) * rgb + alpha * heat
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Split ``text`` at spaces into lines that fit ``width`` pixels (a long word stays whole)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_overlay(
    image: torch.Tensor,
    cam: torch.Tensor,
    path: str | Path,
    title: str | None = None,
    *,
    alpha: float = 0.45,
    cmap: str = "jet",
    min_side: int = MIN_SIDE,
) -> Path:
    """Write a PNG of ``cam`` (``[H, W]`` in [0, 1]) over ``image`` (``[C, H, W]`` in [0, 1]).

    The picture is upscaled so that its shorter side is at least ``min_side`` pixels; a
    ``title`` goes in a white strip above it. The file is written atomically (a temporary file
    renamed into place); parent folders are created. Returns the path written.
    """
    arr = overlay_array(image, cam, alpha=alpha, cmap=cmap)
    pic = Image.fromarray(arr, mode="RGB")
    short = min(pic.size)
    if short < min_side:
        f = min_side / short
        pic = pic.resize(
            (round(pic.size[0] * f), round(pic.size[1] * f)), Image.Resampling.BILINEAR
        )
    if title:
        font = ImageFont.load_default()
        lines = _wrap(title, font, pic.size[0] - 8)
        height = TITLE_HEIGHT * len(lines)
        canvas = Image.new("RGB", (pic.size[0], pic.size[1] + height), "white")
        canvas.paste(pic, (0, height))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            draw.text((4, 4 + i * TITLE_HEIGHT), line, fill="black", font=font)
        pic = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pic.save(tmp, format="PNG")
    tmp.replace(path)
    return path
