"""Image decoding and preprocessing, identical for training, evaluation and the worker.

An image (file path, bytes or array; 8- or 16-bit grayscale, RGB, RGBA, CMYK; any size) becomes
``float32[C, H, W]`` in [0, 1] pixel units at the model's ``input_size``: EXIF orientation
applied, converted to the model's channel count, resized bilinearly with antialiasing.
Normalisation by mean/std happens inside the model (:class:`worker.model.checkpoint.NormalizedModel`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worker.model.images import (
    DEFAULT_LIMITS,
    ImageError,
    ImageLimits,
    decode_image,
    read_image_bytes,
    resolve_under_roots,
)

__all__ = [
    "DEFAULT_LIMITS",
    "ImageError",
    "ImageLimits",
    "RESIZE_MODES",
    "decode_image",
    "fit_box",
    "fit_to_input",
    "image_to_array",
    "load_image",
    "preprocess",
    "read_image_bytes",
    "resize_tensor",
    "resolve_under_roots",
]


def image_to_array(img: Image.Image, in_channels: int) -> np.ndarray:
    """PIL image -> ``float32[C, h, w]`` in [0, 1] with ``C = in_channels`` (1 or 3).

    16-bit images are scaled by 1/65535, 8-bit by 1/255; alpha is dropped (composited on
    black); CMYK and palette images are converted to RGB first; grayscale is ITU-R 601 luma.

    Raises:
        ImageError: ``in_channels`` is not 1 or 3, or the mode cannot be converted.
    """
    if in_channels not in (1, 3):
        raise ImageError(f"models with {in_channels} input channels are not supported")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / scale, 0.0, 1.0).astype(np.float32)
        out = gray[None] if in_channels == 1 else np.repeat(gray[None], 3, axis=0)
        return np.ascontiguousarray(out)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        gray = ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
        out = gray[None] if in_channels == 1 else np.repeat(gray[None], 3, axis=0)
        return np.ascontiguousarray(out, dtype=np.float32)
    try:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(black, rgba).convert("RGB")
        target = "L" if in_channels == 1 else "RGB"
        if img.mode != target:
            img = img.convert("RGB").convert(target) if img.mode == "CMYK" else img.convert(target)
    except Exception as exc:
        raise ImageError(f"cannot convert image mode {mode!r}: {exc}") from exc
    arr8 = np.asarray(img, dtype=np.uint8)
    arr8 = arr8[None] if arr8.ndim == 2 else arr8.transpose(2, 0, 1)
    return np.ascontiguousarray(arr8, dtype=np.float32) / 255.0


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``float32[C, h, w]`` to ``float32[C, H, W]``, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return y.clamp_(0.0, 1.0)


#: How an image is fitted to a model's input size: ``squash`` resizes to it ignoring the aspect
#: ratio (the first checkpoints); ``pad`` keeps the aspect ratio and pads with the border
#: pixels (letterbox). A checkpoint records its mode (``resize``; absent = ``squash``).
RESIZE_MODES = ("squash", "pad")


def load_image(
    image: bytes | Path | str | np.ndarray | Image.Image,
    in_channels: int,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Decode an image at its own size: ``float32[C, h, w]`` in [0, 1] (``C = in_channels``).

    ``image`` may be encoded bytes, a file path, a PIL image, or an array (``uint8`` or
    ``uint16`` ``[h, w]``/``[h, w, 3|4]``, or float in [0, 1]). EXIF orientation is applied.

    Raises:
        ImageError: unreadable, undecodable or out-of-limits image (see :func:`decode_image`).
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, (str, Path)):
        image = decode_image(read_image_bytes(Path(image), limits), limits)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(image), limits)
    return torch.from_numpy(image_to_array(image, in_channels))


def fit_box(
    shape: tuple[int, int], size: tuple[int, int], resize: str
) -> tuple[int, int, int, int]:
    """Where an ``(h, w)`` image lands in a model input of ``size`` = ``(H, W)``: the box
    ``(top, left, height, width)`` in input pixels (the whole input for ``squash``; the
    centred, aspect-preserving box for ``pad``, halves rounded up as
    :func:`worker.engine.anomaly.letterbox` does).

    Raises:
        ValueError: unknown ``resize`` mode.
    """
    if resize == "squash":
        return 0, 0, int(size[0]), int(size[1])
    if resize != "pad":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    h, w = shape
    th, tw = int(size[0]), int(size[1])
    scale = min(th / h, tw / w)
    nh = min(th, max(1, int(h * scale + 0.5)))
    nw = min(tw, max(1, int(w * scale + 0.5)))
    return (th - nh) // 2, (tw - nw) // 2, nh, nw


def fit_to_input(x: torch.Tensor, size: tuple[int, int], resize: str = "squash") -> torch.Tensor:
    """Fit a decoded ``float32[C, h, w]`` image to a model input ``float32[C, H, W]`` in [0, 1].

    ``squash``: bilinear, antialiased resize to ``size``. ``pad``: aspect-preserving resize
    into ``size``, centred, the rest filled by repeating the border pixels (no artificial dark
    edge for a model to take for a defect).

    Raises:
        ValueError: unknown ``resize`` mode.
    """
    if resize == "squash":
        return resize_tensor(x, size)
    if resize != "pad":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    from worker.engine.anomaly import letterbox

    out, _valid = letterbox(x[None], (int(size[0]), int(size[1])), pad="edge")
    return out[0].clamp_(0.0, 1.0)


def preprocess(
    image: bytes | Path | str | np.ndarray | Image.Image,
    input_size: tuple[int, int],
    in_channels: int,
    limits: ImageLimits = DEFAULT_LIMITS,
    resize: str = "squash",
) -> torch.Tensor:
    """Turn an image into the model's input: ``float32[C, H, W]`` in [0, 1].

    :func:`load_image` then :func:`fit_to_input` (``resize``: ``squash`` or ``pad``).

    Raises:
        ImageError: unreadable, undecodable or out-of-limits image (see :func:`decode_image`).
        ValueError: unknown ``resize`` mode.
    """
    return fit_to_input(load_image(image, in_channels, limits), input_size, resize)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype == np.uint16:
        if a.ndim != 2:
            raise ImageError("16-bit arrays must be single-channel [h, w]")
        return Image.fromarray(a)  # mode "I;16": scaled by 1/65535
    if a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.dtype != np.uint8:
        raise ImageError(f"unsupported array dtype {a.dtype}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        return Image.fromarray(a)
    raise ImageError(f"unsupported array shape {a.shape}")
