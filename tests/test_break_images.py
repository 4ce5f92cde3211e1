"""Break: a 16-bit PGM (Pillow opens it in mode "I") is scaled by 1/255 when it happens to be
dark everywhere (every value <= 255) and by 1/65535 otherwise: the same sensor value becomes a
257x brighter pixel depending on the rest of the image."""

from __future__ import annotations

import numpy as np
import pytest


def _pgm16(a: np.ndarray, maxval: int = 65535) -> bytes:
    h, w = a.shape
    return f"P5\n{w} {h}\n{maxval}\n".encode() + a.astype(">u2").tobytes()


def test_a_dark_16bit_pgm_is_scaled_by_65535() -> None:
    from worker.model.preprocess import load_image

    dark = np.full((32, 32), 200)
    bright = dark.copy()
    bright[0, 0] = 40000
    t_dark = load_image(_pgm16(dark), 1)
    t_bright = load_image(_pgm16(bright), 1)
    # the pixel at (31, 31) holds 200 in both images: it must read the same
    assert float(t_bright[0, 31, 31]) == pytest.approx(200 / 65535, abs=1e-7)
    assert float(t_dark[0, 31, 31]) == pytest.approx(200 / 65535, abs=1e-7)
