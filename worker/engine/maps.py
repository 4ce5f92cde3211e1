"""Saliency-map post-processing (docs/design.md §3.3): upsample, normalise, binarise.

Maps are upsampled bilinearly (``align_corners=False``, as cv2.resize does) to the input size,
min-max normalised per image to [0, 1] (a constant map becomes all zeros, never NaN), then
binarised by a fixed threshold θ, by Otsu's method (N. Otsu, *A threshold selection method from
gray-level histograms*, IEEE TSMC 1979) or by keeping the top-k fraction of pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Binarize = Literal["threshold", "otsu", "topk"]

#: A map whose range is below this fraction of its magnitude counts as constant.
CONSTANT_RTOL = 1e-6


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of ``float[B, h, w]`` to ``float[B, H, W]`` (``align_corners=False``).

    Raises:
        ValueError: ``maps`` is not 3-D.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, h, w], got {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-image min-max normalisation of ``float[B, H, W]`` to [0, 1].

    A map that is constant (range ≤ ``CONSTANT_RTOL`` × its largest magnitude, or exactly
    flat) becomes all zeros, so an all-black input or saturated logits never give NaN.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, H, W], got {tuple(maps.shape)}")
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    flat_map = (rng <= CONSTANT_RTOL * scale) | (rng <= 0) | ~torch.isfinite(rng)
    out = (maps - lo) / torch.where(flat_map, torch.ones_like(rng), rng)
    return torch.where(flat_map, torch.zeros_like(maps), out).clamp_(0.0, 1.0)


def otsu_threshold(maps: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold per image for maps in [0, 1].

    Args:
        maps: ``float[B, H, W]`` with values in [0, 1].
        bins: histogram bins over [0, 1].

    Returns:
        ``float32[B]``: pixels strictly above the threshold are foreground. An all-zero map
        gets threshold 0 (so its mask is empty).
    """
    b = maps.shape[0]
    idx = (maps.flatten(1).clamp(0, 1) * (bins - 1e-3)).long().clamp_(0, bins - 1)
    hist = torch.zeros(b, bins, device=maps.device, dtype=torch.float64)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / hist.sum(dim=1, keepdim=True)
    centers = (torch.arange(bins, device=maps.device, dtype=torch.float64) + 0.5) / bins
    w0 = p.cumsum(1)
    m0 = (p * centers).cumsum(1)
    mt = m0[:, -1:]
    w1 = 1.0 - w0
    between = (mt * w0 - m0) ** 2 / (w0 * w1).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.zeros_like(between))
    k = between[:, :-1].argmax(dim=1)
    # Threshold at the upper edge of bin k: bins 0..k are background.
    return ((k + 1).double() / bins).float()


def binarize(
    maps: Tensor, method: Binarize = "threshold", theta: float = 0.5, topk: float = 0.2
) -> Tensor:
    """Binarise normalised maps.

    Args:
        maps: ``float[B, H, W]`` in [0, 1] (output of :func:`minmax_normalize`).
        method: ``"threshold"`` (``map ≥ θ``), ``"otsu"`` (``map > t_otsu``) or ``"topk"``
            (the ``topk`` fraction of highest pixels, ties included; zeros never selected).
        theta: threshold in (0, 1] for ``"threshold"``.
        topk: fraction in (0, 1] for ``"topk"``.

    Returns:
        ``bool[B, H, W]``. An all-zero map always gives an empty mask.

    Raises:
        ValueError: unknown method or a parameter out of range.
    """
    if method == "threshold":
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        return maps >= theta
    if method == "otsu":
        t = otsu_threshold(maps).to(maps.dtype).view(-1, 1, 1)
        return maps > t
    if method == "topk":
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {topk}")
        flat = maps.flatten(1)
        k = max(1, round(topk * flat.shape[1]))
        kth = flat.topk(k, dim=1).values[:, -1].view(-1, 1, 1)
        return (maps >= kth) & (maps > 0)
    raise ValueError(f"unknown binarisation {method!r}; use threshold, otsu or topk")
