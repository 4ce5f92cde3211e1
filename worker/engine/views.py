"""Test-time views: a classifier scored on exact symmetries of the image.

The eight views are the dihedral group D4 of the square acting on the last two dims
``(H, W)``: rotations by multiples of 90° and reflections, each an exact permutation of the
pixels (no resampling). Averaging a model over views is test-time augmentation (TTA; e.g.
A. Krizhevsky, I. Sutskever and G. E. Hinton, *ImageNet Classification with Deep
Convolutional Neural Networks*, NeurIPS 2012, averaged over flips and crops); the spread
between views is a cheap second-opinion signal: a part the model calls ``ok`` in one view and
``defect`` in another deserves a look.

Conventions (row 0 at the top, column 0 on the left, as the image is displayed):

=================  ===========================================  ==============
name               ``out[i, j] =`` (input ``H × W``)             inverse
=================  ===========================================  ==============
``identity``       ``x[i, j]``                                   identity
``hflip``          ``x[i, W−1−j]`` (left–right mirror)           hflip
``vflip``          ``x[H−1−i, j]`` (top–bottom mirror)           vflip
``hvflip``         ``x[H−1−i, W−1−j]`` (= rotation by 180°)      hvflip
``transpose``      ``x[j, i]`` (mirror in the main diagonal)     transpose
``rot90``          ``x[j, W−1−i]`` (90° counter-clockwise)       rot270
``rot270``         ``x[H−1−j, i]`` (90° clockwise)               rot90
``antitranspose``  ``x[H−1−j, W−1−i]`` (anti-diagonal mirror)    antitranspose
=================  ===========================================  ==============

``rot90`` is ``torch.rot90(x, 1, dims=(-2, -1))``. The last four swap ``H`` and ``W``; the
model's input size is fixed, so they are refused on non-square images unless asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: All eight exact views (the dihedral group of the square).
DIHEDRAL_VIEWS: tuple[str, ...] = (
    "identity",
    "hflip",
    "vflip",
    "hvflip",
    "transpose",
    "rot90",
    "rot270",
    "antitranspose",
)
#: The flip views: closed under composition, and keep ``H × W`` for any image.
FLIP_VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "hvflip")
#: Views that exchange ``H`` and ``W``.
SWAPPING_VIEWS = frozenset({"transpose", "rot90", "rot270", "antitranspose"})

_INVERSE = {
    "identity": "identity",
    "hflip": "hflip",
    "vflip": "vflip",
    "hvflip": "hvflip",
    "transpose": "transpose",
    "rot90": "rot270",
    "rot270": "rot90",
    "antitranspose": "antitranspose",
}


def _check(x: Tensor, name: str, *, allow_shape_change: bool, min_dim: int) -> None:
    if name not in _INVERSE:
        raise ValueError(f"unknown view {name!r}; use one of {', '.join(DIHEDRAL_VIEWS)}")
    if x.dim() < min_dim:
        raise ValueError(f"expected at least {min_dim} dims [..., H, W], got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if name in SWAPPING_VIEWS and h != w and not allow_shape_change:
        raise ValueError(
            f"view {name!r} swaps H and W and the input is {h}x{w}, not square; the model's "
            f"input size is fixed, so use the flip views {FLIP_VIEWS} for non-square images"
        )


def _apply(x: Tensor, name: str) -> Tensor:
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "hvflip":
        return x.flip(-2, -1)
    if name == "transpose":
        return x.transpose(-2, -1)
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if name == "rot270":
        return torch.rot90(x, -1, dims=(-2, -1))
    return x.flip(-2, -1).transpose(-2, -1)  # antitranspose


def apply_view(x: Tensor, name: str, *, allow_shape_change: bool = False) -> Tensor:
    """The view ``name`` of a batch, exactly (a permutation of the pixels).

    Args:
        x: ``float32[B, C, H, W]`` (any dtype, any leading dims ≥ 2 kept).
        name: one of :data:`DIHEDRAL_VIEWS`.
        allow_shape_change: allow a view that swaps ``H`` and ``W`` on a non-square input
            (the result is ``[..., W, H]``; a fixed-size model cannot take it).

    Returns:
        The view, same dtype and device, contiguous (``[..., H, W]``, or ``[..., W, H]``).

    Raises:
        ValueError: unknown view, ``x`` has fewer than 2 dims, or ``name`` swaps ``H`` and ``W``
            of a non-square ``x`` without ``allow_shape_change``.
    """
    _check(x, name, allow_shape_change=allow_shape_change, min_dim=2)
    return _apply(x, name).contiguous()


def invert_view(maps: Tensor, name: str, *, allow_shape_change: bool = False) -> Tensor:
    """Map a view's output back to the original frame: ``invert_view(apply_view(x, v), v) == x``.

    Use it on saliency or anomaly maps computed on a view, so they can be compared or averaged
    pixel by pixel with the original image's.

    Args:
        maps: ``float[B, H, W]`` or ``float[B, C, H, W]`` in the view's frame.
        name: the view the maps were computed on.
        allow_shape_change: as in :func:`apply_view`.

    Returns:
        The maps in the original frame, same dtype and device, contiguous.

    Raises:
        ValueError: as :func:`apply_view`.
    """
    _check(maps, name, allow_shape_change=allow_shape_change, min_dim=2)
    return _apply(maps, _INVERSE[name]).contiguous()


def views_p_defect(
    predict_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    views: Sequence[str] = FLIP_VIEWS,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """P(defect) of every view of every image.

    The ``V`` views of the ``B`` images are stacked view-major into one batch of ``V·B`` images
    and passed to ``predict_fn`` at once, or in chunks of ``chunk_size`` images to bound memory.

    Args:
        predict_fn: maps ``float32[n, C, H, W]`` in [0, 1] to P(defect) ``float[n]`` in [0, 1]
            (e.g. the softmax of the production model's defect logit). Called under the
            caller's grad mode.
        x: ``float32[B, C, H, W]`` in [0, 1].
        views: names from :data:`DIHEDRAL_VIEWS`, without repeats.
        chunk_size: largest batch passed to ``predict_fn`` (None: all ``V·B`` at once).

    Returns:
        ``float32[V, B]``; row ``v`` is view ``views[v]``. NaN from ``predict_fn`` is kept.

    Raises:
        ValueError: ``x`` is not 4-D, ``views`` is empty, repeats or names an unknown view, a
            view swaps ``H`` and ``W`` of a non-square ``x``, ``chunk_size < 1``, or
            ``predict_fn`` returns a wrong shape or values outside [0, 1].
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    if not views:
        raise ValueError("views must not be empty")
    if len(set(views)) != len(views):
        raise ValueError(f"views repeat a name: {list(views)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    for name in views:
        _check(x, name, allow_shape_change=False, min_dim=4)
    v, b = len(views), x.shape[0]
    stacked = torch.cat([_apply(x, name) for name in views]).contiguous()  # [V*B, C, H, W]
    step = v * b if chunk_size is None else chunk_size
    outs = []
    for i in range(0, v * b, step):
        chunk = stacked[i : i + step]
        p = predict_fn(chunk)
        if p.shape != (chunk.shape[0],):
            raise ValueError(
                f"predict_fn must return P(defect) of shape [{chunk.shape[0]}], "
                f"got {tuple(p.shape)}"
            )
        outs.append(p.detach().float())
    probs = torch.cat(outs)
    finite = probs[~torch.isnan(probs)]
    if finite.numel() and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
        raise ValueError("predict_fn must return probabilities in [0, 1]")
    return probs.reshape(v, b)


def view_summary(p: Tensor) -> dict[str, Tensor]:
    """Per-image summary over views of ``p = float[V, B]`` (:func:`views_p_defect`).

    Returns:
        ``{"mean", "max", "min", "std", "disagreement"}``, each ``float32[B]``: the mean, max
        and min over the ``V`` views, the population standard deviation (divisor ``V``; 0 for
        a single view) and ``disagreement = max − min``. A NaN anywhere in a column gives NaN
        in all five.

    Raises:
        ValueError: ``p`` is not 2-D with ``V ≥ 1``.
    """
    if p.dim() != 2 or p.shape[0] < 1:
        raise ValueError(f"p must be [V, B] with V >= 1, got {tuple(p.shape)}")
    q = p.float()
    hi, lo = q.max(dim=0).values, q.min(dim=0).values
    return {
        "mean": q.mean(dim=0),
        "max": hi,
        "min": lo,
        "std": q.std(dim=0, correction=0),
        "disagreement": hi - lo,
    }
