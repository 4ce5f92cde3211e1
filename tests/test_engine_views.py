"""Test-time views (worker/engine/views.py): exactness, inverses, hand cases, flip invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.views import (
    DIHEDRAL_VIEWS,
    FLIP_VIEWS,
    apply_view,
    invert_view,
    view_summary,
    views_p_defect,
)

# 2 × 3 image, read row by row:  1 2 3 / 4 5 6
_M = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

#: Hand-written views of _M (as displayed: row 0 on top).
_HAND = {
    "identity": [[1, 2, 3], [4, 5, 6]],
    "hflip": [[3, 2, 1], [6, 5, 4]],
    "vflip": [[4, 5, 6], [1, 2, 3]],
    "hvflip": [[6, 5, 4], [3, 2, 1]],
    "transpose": [[1, 4], [2, 5], [3, 6]],
    "rot90": [[3, 6], [2, 5], [1, 4]],  # counter-clockwise: the top-right 3 goes top-left
    "rot270": [[4, 1], [5, 2], [6, 3]],  # clockwise: the bottom-left 4 goes top-left
    "antitranspose": [[6, 3], [5, 2], [4, 1]],
}


@pytest.mark.parametrize("name", DIHEDRAL_VIEWS)
def test_views_hand_case_2x3(name):
    out = apply_view(_M, name, allow_shape_change=True)
    assert out.tolist() == [[float(v) for v in row] for row in _HAND[name]]
    back = invert_view(out, name, allow_shape_change=True)
    assert torch.equal(back, _M)


def _image(b: int = 2, c: int = 3, n: int = 7) -> torch.Tensor:
    return torch.rand(b, c, n, n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", DIHEDRAL_VIEWS)
def test_every_view_is_an_exact_permutation_with_an_exact_inverse(name):
    x = _image()
    v = apply_view(x, name)
    assert v.shape == x.shape and v.is_contiguous()
    # a permutation of each channel's pixels: same sorted values, nothing resampled
    assert torch.equal(v.flatten(2).sort(dim=2).values, x.flatten(2).sort(dim=2).values)
    assert torch.equal(invert_view(v, name), x)
    # maps [B, H, W] are inverted too
    m = x[:, 0]
    assert torch.equal(invert_view(apply_view(m, name), name), m)
    if name != "identity":
        assert not torch.equal(v, x)


def test_group_relations():
    x = _image()
    for flip in ("hflip", "vflip", "hvflip", "transpose", "antitranspose"):
        assert torch.equal(apply_view(apply_view(x, flip), flip), x)
    r = x
    for _ in range(4):
        r = apply_view(r, "rot90")
    assert torch.equal(r, x)
    assert torch.equal(apply_view(apply_view(x, "rot90"), "rot90"), apply_view(x, "hvflip"))
    assert torch.equal(apply_view(apply_view(x, "rot90"), "rot270"), x)
    assert torch.equal(apply_view(apply_view(x, "hflip"), "vflip"), apply_view(x, "hvflip"))
    # transpose then hflip is a 90° clockwise rotation
    assert torch.equal(apply_view(apply_view(x, "transpose"), "hflip"), apply_view(x, "rot270"))


def test_non_square_swapping_views_are_refused():
    x = torch.rand(1, 1, 4, 6)
    for name in ("transpose", "rot90", "rot270", "antitranspose"):
        with pytest.raises(ValueError, match="not square"):
            apply_view(x, name)
        with pytest.raises(ValueError, match="not square"):
            invert_view(x[:, 0], name)
        with pytest.raises(ValueError, match="not square"):
            views_p_defect(lambda t: torch.zeros(t.shape[0]), x, ["identity", name])
    for name in FLIP_VIEWS:
        assert apply_view(x, name).shape == x.shape
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(x, "rot45")


def _tiny_classifier(seed: int = 0) -> nn.Module:
    """A seeded random conv net with a non-symmetric receptive field → P(defect) ``[B]``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(1),
        )
        net(torch.zeros(1, 1, 12, 16))  # materialise the lazy layer for 12 × 16 inputs
    return net.eval()


def test_mean_over_flip_views_is_invariant_to_flipping_the_input():
    net = _tiny_classifier()

    def predict(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(net(t)[:, 0])

    x = torch.rand(3, 1, 12, 16, generator=torch.Generator().manual_seed(1))
    base = view_summary(views_p_defect(predict, x, FLIP_VIEWS))["mean"]
    for flip in ("hflip", "vflip", "hvflip"):
        flipped = view_summary(views_p_defect(predict, apply_view(x, flip), FLIP_VIEWS))["mean"]
        torch.testing.assert_close(flipped, base, rtol=0, atol=1e-6)
    # not trivially so: a single view does change under a flip
    p_id = views_p_defect(predict, x, ["identity"])[0]
    p_h = views_p_defect(predict, apply_view(x, "hflip"), ["identity"])[0]
    assert float((p_id - p_h).abs().max()) > 1e-3


def test_views_p_defect_layout_and_chunking():
    x = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    calls: list[int] = []

    def predict(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return t[:, 0, 0, 0]  # the top-left pixel, in [0, 1]

    views = ["identity", "hflip", "rot90"]
    p = views_p_defect(predict, x, views)
    assert p.shape == (3, 3) and p.dtype == torch.float32 and calls == [9]
    torch.testing.assert_close(p[0], x[:, 0, 0, 0])
    torch.testing.assert_close(p[1], x[:, 0, 0, -1])  # hflip: top-right comes top-left
    torch.testing.assert_close(p[2], x[:, 0, 0, -1])  # rot90 (ccw): top-right comes top-left
    calls.clear()
    p4 = views_p_defect(predict, x, views, chunk_size=4)
    assert calls == [4, 4, 1] and torch.equal(p4, p)
    with pytest.raises(ValueError, match="shape"):
        views_p_defect(lambda t: t[:, 0, 0], x, views)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        views_p_defect(lambda t: t[:, 0, 0, 0] + 2.0, x, views)
    with pytest.raises(ValueError, match="repeat"):
        views_p_defect(predict, x, ["hflip", "hflip"])
    with pytest.raises(ValueError, match="empty"):
        views_p_defect(predict, x, [])


def test_view_summary_hand_case():
    p = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.5, 0.9], [0.8, 0.5, float("nan")]])
    s = view_summary(p)
    torch.testing.assert_close(s["mean"][:2], torch.tensor([0.4, 0.5]))
    torch.testing.assert_close(s["max"][:2], torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(s["min"][:2], torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(s["disagreement"][:2], torch.tensor([0.7, 0.0]))
    # population std of (0.1, 0.3, 0.8): mean 0.4, deviations −0.3, −0.1, 0.4 → sqrt(0.26/3)
    assert float(s["std"][0]) == pytest.approx((0.26 / 3) ** 0.5, abs=1e-6)
    assert float(s["std"][1]) == 0.0
    assert all(torch.isnan(s[k][2]) for k in s)
    single = view_summary(torch.tensor([[0.25, 0.75]]))
    assert single["std"].tolist() == [0.0, 0.0] and single["disagreement"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[V, B\]"):
        view_summary(torch.zeros(3))
