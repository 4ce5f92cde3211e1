"""Intersection over union of saliency masks (docs/design.md §3.4).

``IoU(P, Q) = |P ∩ Q| / |P ∪ Q|``, defined as 0 when the union is empty. The soft variant is
the Ruzicka (weighted Jaccard) similarity ``Σ min(p, q) / Σ max(p, q)`` of maps in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(p: Tensor, q: Tensor) -> None:
    if p.shape != q.shape:
        raise ValueError(
            f"masks must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    if p.dim() < 2:
        raise ValueError(f"masks must be [B, H, W] or [H, W], got {tuple(p.shape)}")


def binary_iou(p: Tensor, q: Tensor) -> Tensor:
    """Per-image IoU of boolean masks.

    Args:
        p, q: ``bool[B, H, W]`` (or ``[H, W]``) masks of the same shape.

    Returns:
        ``float32[B]`` (or a 0-d tensor) in [0, 1]; 0 where the union is empty.

    Raises:
        ValueError: shapes differ, masks are not boolean, or have fewer than 2 dims.
    """
    _check_pair(p, q)
    if p.dtype != torch.bool or q.dtype != torch.bool:
        raise ValueError(f"binary_iou takes bool masks, got {p.dtype} and {q.dtype}")
    dims = (-2, -1)
    inter = (p & q).sum(dim=dims).float()
    union = (p | q).sum(dim=dims).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(union))


def soft_iou(p: Tensor, q: Tensor) -> Tensor:
    """Per-image soft IoU ``Σ min(p, q) / Σ max(p, q)`` of maps in [0, 1].

    Args:
        p, q: ``float[B, H, W]`` (or ``[H, W]``) maps with values in [0, 1].

    Returns:
        ``float32[B]`` in [0, 1]; 0 where both maps are all zero. Equals :func:`binary_iou`
        on {0, 1}-valued maps.

    Raises:
        ValueError: shapes differ or have fewer than 2 dims.
    """
    _check_pair(p, q)
    dims = (-2, -1)
    num = torch.minimum(p, q).sum(dim=dims).float()
    den = torch.maximum(p, q).sum(dim=dims).float()
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(den))
