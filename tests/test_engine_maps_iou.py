"""Map post-processing (upsample, normalise, binarise) and IoU: hand cases and oracles (docs/design.md §3.3–3.4)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from worker.engine import (
    binarize,
    binary_iou,
    minmax_normalize,
    otsu_threshold,
    soft_iou,
    upsample,
)

# -- upsample ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"), [((2, 2), (64, 64)), ((2, 3), (64, 96)), ((5, 7), (33, 50))]
)
def test_upsample_matches_cv2_bilinear(src, dst):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, *src, generator=g)
    ours = upsample(maps, dst)
    assert ours.shape == (3, *dst)
    for i in range(3):
        ref = cv2.resize(maps[i].numpy(), (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=0, atol=1e-5)


def test_upsample_same_size_is_identity_and_rejects_4d():
    m = torch.rand(2, 4, 5)
    assert upsample(m, (4, 5)) is m
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        upsample(m[None], (8, 10))


# -- min-max normalisation --------------------------------------------------------------------


def test_minmax_hand_case_per_image():
    m = torch.tensor([[[0.0, 2.0], [4.0, 1.0]], [[-3.0, -1.0], [-2.0, 5.0]]])
    out = minmax_normalize(m)
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.25]], [[0.0, 0.25], [0.125, 1.0]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, 1.0, 3.7, -2.0, 1e20, 1e-30])
def test_minmax_constant_map_is_all_zeros(value):
    """docs/design.md §3.3/§7: a constant map becomes all zeros, never NaN."""
    out = minmax_normalize(torch.full((2, 8, 8), value))
    assert torch.equal(out, torch.zeros(2, 8, 8))


def test_minmax_near_constant_nan_and_inf_give_zeros_not_nan():
    near = 5.0 + 1e-7 * torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(minmax_normalize(near), torch.zeros(1, 4, 4))
    bad = torch.tensor([[[0.0, float("nan")], [1.0, 2.0]], [[0.0, float("inf")], [1.0, 2.0]]])
    out = minmax_normalize(bad)
    assert torch.equal(out, torch.zeros(2, 2, 2))
    # one constant image does not disturb its neighbour in the batch
    mixed = torch.stack([torch.full((2, 2), 7.0), torch.tensor([[1.0, 3.0], [2.0, 5.0]])])
    out = minmax_normalize(mixed)
    assert torch.equal(out[0], torch.zeros(2, 2))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))


# -- binarisation -----------------------------------------------------------------------------


def test_threshold_hand_case():
    m = torch.tensor([[[0.2, 0.5], [0.7, 1.0]]])
    assert binarize(m, "threshold", 0.5).tolist() == [[[False, True], [True, True]]]
    assert binarize(m, "threshold", 0.7).tolist() == [[[False, False], [True, True]]]
    assert binarize(m, "threshold", 1.0).tolist() == [[[False, False], [False, True]]]
    assert not binarize(torch.zeros(1, 3, 3), "threshold", 0.5).any()


def test_topk_keeps_the_right_count():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(2, 10, 10, generator=g)
    mask = binarize(m, "topk", topk=0.2)
    assert mask.flatten(1).sum(1).tolist() == [20, 20]
    for i in range(2):
        kept = m[i][mask[i]]
        dropped = m[i][~mask[i]]
        assert kept.min() > dropped.max()
    # ties at the k-th value are kept; zeros are never selected
    ties = torch.tensor([[[0.9, 0.5, 0.5, 0.5, 0.1]]])
    assert binarize(ties, "topk", topk=0.4).tolist() == [[[True, True, True, True, False]]]
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 0, :5] = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    assert int(binarize(sparse, "topk", topk=0.2).sum()) == 5
    assert not binarize(torch.zeros(1, 4, 4), "topk", topk=0.5).any()


def _brute_force_otsu_mask(values: np.ndarray) -> np.ndarray:
    """Otsu by exhaustive search over every split between distinct values (no histogram)."""
    v = values.ravel().astype(np.float64)
    levels = np.unique(v)
    best, best_t = -1.0, None
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        t = (lo + hi) / 2
        fg, bg = v[v > t], v[v <= t]
        w0, w1 = len(bg) / len(v), len(fg) / len(v)
        between = w0 * w1 * (bg.mean() - fg.mean()) ** 2
        if between > best + 1e-12:
            best, best_t = between, t
    assert best_t is not None
    return values > best_t


def test_otsu_bimodal_hand_case():
    """Two modes at 0.1 (60 px) and 0.9 (40 px): the threshold falls between them."""
    m = torch.full((1, 10, 10), 0.1)
    m[0, :4] = 0.9
    t = float(otsu_threshold(m)[0])
    assert 0.1 < t < 0.9
    mask = binarize(m, "otsu")
    assert torch.equal(mask[0], m[0] > 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_matches_brute_force_on_bin_centred_maps(seed):
    """On values at the 256 histogram bin centres, histogram Otsu is exact Otsu."""
    rng = np.random.default_rng(seed)
    n = 24 * 24
    centres = rng.choice([0.15, 0.45, 0.8], size=n, p=[0.5, 0.3, 0.2])
    vals = np.clip(centres + 0.06 * rng.standard_normal(n), 0, 1)
    vals = (np.floor(vals * 256).clip(0, 255) + 0.5) / 256  # bin centres
    maps = torch.tensor(vals.reshape(1, 24, 24), dtype=torch.float32)
    ours = binarize(maps, "otsu")[0].numpy()
    ref = _brute_force_otsu_mask(vals.reshape(24, 24))
    assert ours.sum() > 0 and (~ours).sum() > 0
    np.testing.assert_array_equal(ours, ref)


def test_otsu_degenerate_maps():
    assert not binarize(torch.zeros(2, 5, 5), "otsu").any()
    two_level = torch.zeros(1, 4, 4)
    two_level[0, 1:3, 1:3] = 1.0
    assert torch.equal(binarize(two_level, "otsu"), two_level.bool())


def test_binarize_rejects_bad_parameters():
    m = torch.rand(1, 3, 3)
    with pytest.raises(ValueError, match="theta"):
        binarize(m, "threshold", theta=0.0)
    with pytest.raises(ValueError, match="topk"):
        binarize(m, "topk", topk=1.5)
    with pytest.raises(ValueError, match="unknown binarisation"):
        binarize(m, "mean")  # type: ignore[arg-type]


# -- IoU --------------------------------------------------------------------------------------


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_binary_iou_hand_cases():
    a = _mask(["##..", "##..", "....", "...."])
    disjoint = _mask(["....", "....", "..##", "..##"])
    empty = torch.zeros(4, 4, dtype=torch.bool)
    # overlap of 2 cells, union 6: a = 4 cells, b = 4 cells sharing the right column of a
    b = _mask([".##.", ".##.", "....", "...."])
    assert float(binary_iou(a, a)) == 1.0
    assert float(binary_iou(a, disjoint)) == 0.0
    assert float(binary_iou(empty, empty)) == 0.0
    assert float(binary_iou(a, empty)) == 0.0
    assert float(binary_iou(a, b)) == pytest.approx(2 / 6, abs=1e-7)
    batch = binary_iou(torch.stack([a, a, empty, a]), torch.stack([a, disjoint, empty, b]))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.tensor([1.0, 0.0, 0.0, 2 / 6]))


def test_binary_iou_rejects_bad_input():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        binary_iou(a, a[:, :3])
    with pytest.raises(ValueError, match="bool"):
        binary_iou(a.float(), a.float())
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        binary_iou(a[0, 0], a[0, 0])


def test_soft_iou_on_binary_maps_equals_binary_iou():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(6, 9, 9, generator=g) > 0.6
    q = torch.rand(6, 9, 9, generator=g) > 0.5
    q[0] = p[0]
    p[1] = False
    q[1] = False
    expected = binary_iou(p, q)
    torch.testing.assert_close(soft_iou(p.float(), q.float()), expected, rtol=0, atol=1e-7)
    assert float(expected[0]) == 1.0 and float(expected[1]) == 0.0


def test_soft_iou_fractional_hand_case():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.0]])
    q = torch.tensor([[0.6, 0.4], [0.5, 1.0]])
    # Σ min = 0.2 + 0.4 + 0.5 + 0 = 1.1; Σ max = 0.6 + 0.8 + 0.5 + 1 = 2.9
    assert float(soft_iou(p, q)) == pytest.approx(1.1 / 2.9, abs=1e-6)
    assert float(soft_iou(torch.zeros(2, 2), torch.zeros(2, 2))) == 0.0
    assert float(soft_iou(p, p)) == pytest.approx(1.0)
