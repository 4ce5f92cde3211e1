"""Image decoding and preprocessing: formats, EXIF orientation, limits, path confinement."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.model.preprocess import (
    ImageError,
    ImageLimits,
    decode_image,
    preprocess,
    read_image_bytes,
    resolve_under_roots,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _check_tensor(t: torch.Tensor, channels: int, size: tuple[int, int]) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert t.shape == (channels, *size)
    assert t.min() >= 0.0 and t.max() <= 1.0


# -- formats ----------------------------------------------------------------------------------


def test_8bit_gray_exact_values_and_requested_size():
    a = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 256
    data = _encode(Image.fromarray(a.astype(np.uint8), mode="L"))
    t = preprocess(data, (32, 32), 1)
    _check_tensor(t, 1, (32, 32))
    np.testing.assert_allclose(t[0].numpy(), a / 255.0, atol=1e-7)
    t3 = preprocess(data, (32, 32), 3)
    _check_tensor(t3, 3, (32, 32))
    assert torch.equal(t3[0], t3[1]) and torch.equal(t3[1], t3[2])
    _check_tensor(preprocess(data, (20, 28), 1), 1, (20, 28))


def test_resize_matches_pil_antialiased_bilinear():
    """Downsizing is antialiased: compare with PIL's BILINEAR resize (an independent oracle)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 90), dtype=np.uint8)
    t = preprocess(_encode(Image.fromarray(a, mode="L")), (24, 36), 1)
    ref = np.asarray(
        Image.fromarray(a.astype(np.float32) / 255.0, mode="F").resize((36, 24), Image.BILINEAR)
    )
    np.testing.assert_allclose(t[0].numpy(), ref, atol=2e-3)


def test_16bit_gray_png_scaled_by_65535():
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:16, :16] = 65535
    a[:16, 16:] = 32768
    a[16:, :16] = 200  # a dark 16-bit pixel is 200/65535, not 200/255
    data = _encode(Image.fromarray(a))
    t = preprocess(data, (32, 32), 1)
    _check_tensor(t, 1, (32, 32))
    assert float(t[0, 0, 0]) == 1.0
    assert float(t[0, 0, 31]) == pytest.approx(32768 / 65535, abs=1e-6)
    assert float(t[0, 31, 0]) == pytest.approx(200 / 65535, abs=1e-7)
    assert float(t[0, 31, 31]) == 0.0
    # a 16-bit image that is dark everywhere is still scaled by 1/65535
    dark = _encode(Image.fromarray(np.full((32, 32), 200, dtype=np.uint16)))
    assert float(preprocess(dark, (32, 32), 1).max()) == pytest.approx(200 / 65535, abs=1e-7)
    _check_tensor(preprocess(data, (32, 32), 3), 3, (32, 32))


def test_rgb_exact_and_gray_is_itu601_luma():
    a = np.zeros((20, 20, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 200, 100, 50
    data = _encode(Image.fromarray(a, mode="RGB"))
    t = preprocess(data, (20, 20), 3)
    _check_tensor(t, 3, (20, 20))
    np.testing.assert_allclose(t[:, 0, 0].numpy(), [200 / 255, 100 / 255, 50 / 255], atol=1e-7)
    g = preprocess(data, (20, 20), 1)
    luma = (299 * 200 + 587 * 100 + 114 * 50) / 1000  # 124.2
    assert float(g[0, 0, 0]) * 255 == pytest.approx(luma, abs=1.0)


def test_rgba_alpha_is_composited_on_black():
    a = np.zeros((20, 20, 4), dtype=np.uint8)
    a[..., :3] = (200, 100, 50)
    a[..., 3] = 128
    a[:, 10:, 3] = 255  # right half opaque
    a[:, :5, 3] = 0  # left quarter transparent
    data = _encode(Image.fromarray(a, mode="RGBA"))
    t = preprocess(data, (20, 20), 3)
    _check_tensor(t, 3, (20, 20))
    k = 128 / 255  # src·α + black·(1 − α)
    np.testing.assert_allclose(t[:, 0, 7].numpy() * 255, [200 * k, 100 * k, 50 * k], atol=1.0)
    np.testing.assert_allclose(t[:, 0, 15].numpy() * 255, [200, 100, 50], atol=1e-4)
    np.testing.assert_allclose(t[:, 0, 2].numpy(), [0, 0, 0], atol=1e-7)
    g = preprocess(data, (20, 20), 1)
    luma = (299 * 200 + 587 * 100 + 114 * 50) / 1000 * k
    assert float(g[0, 0, 7]) * 255 == pytest.approx(luma, abs=1.5)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # white
    img.paste((255, 0, 0, 0), (16, 0, 32, 32))  # right half cyan
    data = _encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    t = preprocess(data, (32, 32), 3)
    _check_tensor(t, 3, (32, 32))
    np.testing.assert_allclose(t[:, 16, 4].numpy(), [1, 1, 1], atol=0.03)
    np.testing.assert_allclose(t[:, 16, 28].numpy(), [0, 1, 1], atol=0.03)
    _check_tensor(preprocess(data, (24, 24), 1), 1, (24, 24))


def test_palette_png():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.paste(1, (10, 0, 20, 20))
    data = _encode(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    t = preprocess(data, (20, 20), 3)
    _check_tensor(t, 3, (20, 20))
    np.testing.assert_allclose(t[:, 0, 0].numpy(), [1, 0, 0])
    np.testing.assert_allclose(t[:, 0, 19].numpy(), [0, 0, 1])
    g = preprocess(data, (20, 20), 1)
    assert float(g[0, 0, 0]) * 255 == pytest.approx(0.299 * 255, abs=1.0)


def test_arrays_and_pil_images():
    u8 = np.full((20, 24), 51, dtype=np.uint8)
    assert float(preprocess(u8, (20, 24), 1)[0, 0, 0]) == pytest.approx(0.2)
    f = np.full((20, 24, 3), 0.6, dtype=np.float32)
    assert float(preprocess(f, (20, 24), 3)[1, 3, 3]) == pytest.approx(153 / 255)
    u16 = np.full((20, 24), 65535, dtype=np.uint16)
    assert float(preprocess(u16, (20, 24), 1).min()) == 1.0
    rgba = np.zeros((20, 24, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white but fully transparent → black
    assert float(preprocess(rgba, (20, 24), 3).max()) == 0.0
    pil = Image.new("L", (24, 20), 255)
    _check_tensor(preprocess(pil, (10, 12), 1), 1, (10, 12))
    with pytest.raises(ImageError, match="dtype"):
        preprocess(np.zeros((20, 20), dtype=np.int32), (20, 20), 1)
    with pytest.raises(ImageError, match="shape"):
        preprocess(np.zeros((20, 20, 2), dtype=np.uint8), (20, 20), 1)
    with pytest.raises(ImageError, match="16-bit arrays"):
        preprocess(np.zeros((20, 20, 3), dtype=np.uint16), (20, 20), 1)
    with pytest.raises(ImageError, match="2 input channels"):
        preprocess(u8, (20, 24), 2)


# -- EXIF orientation -------------------------------------------------------------------------


def _upright() -> Image.Image:
    """48 wide × 32 tall, mid-grey, a white 8×8 block top-left and a black one bottom-right."""
    a = np.full((32, 48), 128, dtype=np.uint8)
    a[:8, :8] = 255
    a[-8:, -8:] = 0
    return Image.fromarray(a, mode="L")


def test_exif_orientation_6_comes_out_upright():
    upright = _upright()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 32 wide × 48 tall on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated_jpeg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    plain_rotated = _encode(stored, "JPEG", quality=95)  # the same pixels without the tag
    reference = preprocess(_encode(upright, "JPEG", quality=95), (32, 48), 1)

    t = preprocess(rotated_jpeg, (32, 48), 1)
    _check_tensor(t, 1, (32, 48))
    assert float((t - reference).abs().mean()) < 0.01
    assert float(t[0, :8, :8].mean()) > 0.9  # white block top-left
    assert float(t[0, -8:, -8:].mean()) < 0.1  # black block bottom-right
    # the tag is what made the difference: ignoring it would not match the reference
    ignored = preprocess(plain_rotated, (32, 48), 1)
    assert float((ignored - reference).abs().mean()) > 0.05
    assert decode_image(rotated_jpeg).size == (48, 32)


# -- refusals ---------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` (1-bit gray) with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_truncated_jpeg():
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        preprocess(data[: len(data) // 2], (32, 32), 1)


def test_empty_and_non_image_bytes():
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        preprocess(b"", (32, 32), 1)
    with pytest.raises(ImageError, match="not a recognised image format"):
        preprocess(b"this is a text file, not an image\n" * 20, (32, 32), 1)


def test_tiny_and_extreme_aspect_images():
    one = _encode(Image.new("L", (1, 1), 100))
    with pytest.raises(ImageError, match="1x1, smaller than the minimum side of 16"):
        preprocess(one, (32, 32), 1)
    strip = _encode(Image.new("L", (10000, 8), 100))
    with pytest.raises(ImageError, match="10000x8, smaller than the minimum side of 16"):
        preprocess(strip, (32, 32), 1)
    long = _encode(Image.new("L", (400, 16), 100))
    with pytest.raises(ImageError, match="400x16, aspect ratio over the limit of 20"):
        preprocess(long, (32, 32), 1)


def test_pixel_limit_is_checked_from_the_header():
    # 7000 × 7000 = 49 M pixels > 40 M: refused by our limit, before any pixel is decoded
    with pytest.raises(ImageError, match="7000x7000 = 49000000 pixels, over the limit of 40000000"):
        decode_image(_png_header(7000, 7000))
    # far beyond Pillow's own bomb limit: refused too, with the same kind of message
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_png_header(100_000, 100_000))
    # a real, small image over a configured limit
    data = _encode(Image.new("1", (40, 40), 1))
    with pytest.raises(ImageError, match="1600 pixels, over the limit of 1000"):
        preprocess(data, (32, 32), 1, limits=ImageLimits(max_pixels=1000))
    _check_tensor(preprocess(data, (32, 32), 1), 1, (32, 32))


def test_byte_limit():
    data = _encode(Image.new("L", (40, 40), 1))
    with pytest.raises(ImageError, match=f"{len(data)} bytes, over the limit of 50"):
        decode_image(data, ImageLimits(max_bytes=50))


def test_files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(Image.new("L", (40, 40), 255)))
    t = preprocess(good, (32, 32), 1)
    assert float(t.min()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(preprocess(str(good), (32, 32), 1), t)
    with pytest.raises(ImageError, match="image file not found"):
        preprocess(tmp_path / "missing.png", (32, 32), 1)
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        preprocess(empty, (32, 32), 1)
    with pytest.raises(ImageError, match="over the limit of 10"):
        read_image_bytes(good, ImageLimits(max_bytes=10))


# -- path confinement -------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "images"
    other = tmp_path / "more-images"
    outside = tmp_path / "secret"
    for d in (root / "line1", other, outside):
        d.mkdir(parents=True)
    (root / "line1" / "a.png").write_bytes(b"x")
    (other / "b.png").write_bytes(b"x")
    (outside / "passwd").write_bytes(b"x")
    return root, other, outside


def test_resolve_under_roots_accepts_paths_inside(roots):
    root, other, _ = roots
    assert resolve_under_roots("line1/a.png", [root]) == (root / "line1" / "a.png").resolve()
    assert resolve_under_roots(root / "line1" / "a.png", [root]) == (root / "line1/a.png").resolve()
    assert resolve_under_roots(other / "b.png", [root, other]) == (other / "b.png").resolve()
    # ".." that stays inside the root is fine
    assert resolve_under_roots("line1/../line1/a.png", [root]).name == "a.png"
    inner = root / "inner-link.png"
    inner.symlink_to(root / "line1" / "a.png")
    assert resolve_under_roots("inner-link.png", [root]) == (root / "line1" / "a.png").resolve()


def test_resolve_under_roots_refuses_escapes(roots):
    root, other, outside = roots
    for bad in ("../../etc/passwd", "../secret/passwd", "/etc/passwd", str(outside / "passwd")):
        with pytest.raises(ImageError, match="outside the configured image roots"):
            resolve_under_roots(bad, [root])
    link = root / "line1" / "escape.png"
    link.symlink_to(outside / "passwd")
    with pytest.raises(ImageError, match="outside the configured image roots"):
        resolve_under_roots("line1/escape.png", [root])
    dir_link = root / "sneaky"
    dir_link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImageError, match="outside the configured image roots"):
        resolve_under_roots("sneaky/passwd", [root])
    # a sibling folder whose name starts with the root's name is not inside it
    with pytest.raises(ImageError, match="outside"):
        resolve_under_roots(root.parent / "images-evil" / "x.png", [root])
    with pytest.raises(ImageError, match="no image roots"):
        resolve_under_roots("line1/a.png", [])
