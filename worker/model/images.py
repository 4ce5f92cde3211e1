"""Reading and decoding images safely, with no torch import (the producer uses this too).

Paths are confined to the configured image roots (symlinks resolved first); bytes and pixel
counts are limited before decoding, so a decompression bomb is refused without allocating it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

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
        raise ImageError(f"image file {path} is {size} bytes, over the limit of {limits.max_bytes}")
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
    decoded: Image.Image = img
    if img.format == "PPM" and img.mode == "I":
        # a 16-bit PGM (maxval > 255) holds 16-bit values in mode "I": say so, or its depth
        # would be guessed from its content (a dark image read 257 times brighter)
        decoded = img.convert("I;16")
    try:
        upright = ImageOps.exif_transpose(decoded)
    except Exception:  # a broken EXIF block is not worth losing the image for
        upright = None
    return upright if upright is not None else decoded
