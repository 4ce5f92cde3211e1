"""Image decoding and preprocessing, identical for training, evaluation and the worker.

An image (file path, bytes or array; 8- or 16-bit grayscale, RGB, RGBA, CMYK; any size) becomes
``float32[C, H, W]`` in [0, 1] pixel units at the model's ``input_size``: EXIF orientation
applied, converted to the model's channel count, resized bilinearly with antialiasing.
Normalisation by mean/std happens inside the model (:class:`worker.checkpoint.NormalizedModel`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be read, decoded or accepted; the message says which and why."""


@dataclass(frozen=True)
class ImageLimits:
    """Limits that guard the worker against hostile input (decompression bombs etc.)."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_aspect_ratio: float = 20.0


DEFAULT_LIMITS = ImageLimits()


def resolve_under_roots(path: str | Path, roots: list[Path]) -> Path:
    """Resolve ``path`` (absolute, or relative to the first root) and confine it to ``roots``.

    Symlinks are resolved first, so a link that escapes a root is refused.

    Raises:
        ImageError: no roots are configured, or the resolved path lies outside every root.
    """
    if not roots:
        raise ImageError("no image roots are configured (INSPECTION_AUDIT_IMAGE_ROOTS)")
    p = Path(path)
    candidate = p if p.is_absolute() else roots[0] / p
    real = candidate.resolve()
    for root in roots:
        if real.is_relative_to(root.resolve()):
            return real
    raise ImageError(f"path {str(path)!r} resolves outside the configured image roots")


def read_image_bytes(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Read a file's bytes, enforcing ``limits.max_bytes``.

    Raises:
        ImageError: missing file, not a regular file, empty, or over the byte limit.
    """
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a regular file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    if size > limits.max_bytes:
        raise ImageError(f"image file is {size} bytes, over the limit of {limits.max_bytes}")
    return path.read_bytes()


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode bytes into an upright PIL image (EXIF orientation applied), fully loaded.

    The pixel count is checked from the header *before* decoding, so a decompression bomb is
    refused without allocating it.

    Raises:
        ImageError: empty or oversize input, bytes that are not an image, a truncated file,
            or dimensions outside ``limits`` (pixels, smallest side, aspect ratio).
    """
    if len(data) == 0:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
                    "(possible decompression bomb)"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("bytes are not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image is truncated or corrupt: {exc}") from exc
    w, h = img.size
    if min(w, h) < limits.min_side:
        raise ImageError(f"image is {w}x{h}, smaller than the minimum side of {limits.min_side} px")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise ImageError(
            f"image is {w}x{h}, aspect ratio over the limit of {limits.max_aspect_ratio}"
        )
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is not worth losing the image for
        pass
    return img


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
        gray = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        out = gray[None] if in_channels == 1 else np.repeat(gray[None], 3, axis=0)
        return np.ascontiguousarray(out.astype(np.float32))
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
    if arr8.ndim == 2:
        arr8 = arr8[None]
    else:
        arr8 = arr8.transpose(2, 0, 1)
    return np.ascontiguousarray(arr8, dtype=np.float32) / 255.0


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``float32[C, h, w]`` to ``float32[C, H, W]``, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return y.clamp_(0.0, 1.0)


def preprocess(
    image: bytes | Path | str | np.ndarray | Image.Image,
    input_size: tuple[int, int],
    in_channels: int,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Turn an image into the model's input: ``float32[C, H, W]`` in [0, 1].

    ``image`` may be encoded bytes, a file path, a PIL image, or an array (``uint8`` or
    ``uint16`` ``[h, w]``/``[h, w, 3|4]``, or float in [0, 1]).

    Raises:
        ImageError: unreadable, undecodable or out-of-limits image (see :func:`decode_image`).
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, (str, Path)):
        image = decode_image(read_image_bytes(Path(image), limits), limits)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(image), limits)
    arr = image_to_array(image, in_channels)
    return resize_tensor(torch.from_numpy(arr), input_size)


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
