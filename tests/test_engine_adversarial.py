"""FGSM / PGD toward the defect class (docs/design.md §3.6): bounds, hand-computed gains, equivalences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support.models import tiny_model
from worker.engine import EngineConfig, ReliabilityEngine, fgsm, fgsm_step, pgd

pytestmark = pytest.mark.usefixtures("single_thread")

EPSILONS = [2 / 255, 8 / 255]


def _x_with_extremes(
    shape: tuple[int, ...], seed: int, dtype=torch.float32, margin: float = 0.0
) -> torch.Tensor:
    """Random pixels in [margin, 1 − margin], with some exactly 0 and some exactly 1."""
    g = torch.Generator().manual_seed(seed)
    x = margin + (1 - 2 * margin) * torch.rand(shape, generator=g, dtype=dtype)
    u = torch.rand(shape, generator=g)
    x[u < 0.15] = 0.0
    x[u > 0.85] = 1.0
    return x


class SmoothNet(nn.Module):
    """A tiny smooth conv net (Softplus, average pooling): FGSM ascends its defect logit."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1), nn.Softplus(), nn.Conv2d(6, 8, 3, padding=1)
        )
        self.act = nn.Softplus()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.act(self.features(x))), 1))


def _smooth_net(seed: int = 0, **kw) -> SmoothNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmoothNet(**kw).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return tiny_model(num_classes=2, in_channels=3, seed=4)


@pytest.mark.parametrize("eps", EPSILONS)
def test_fgsm_and_pgd_stay_in_ball_and_pixel_range(resnet, eps):
    x = _x_with_extremes((3, 3, 64, 64), seed=1)

    def z_def(t: torch.Tensor) -> torch.Tensor:
        return resnet(t)[:, 1]

    for adv in (fgsm(z_def, x, eps), pgd(z_def, x, eps, steps=4)):
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        # pixels at the range's ends can only move inwards
        assert (adv[x == 0.0] >= 0.0).all() and (adv[x == 1.0] <= 1.0).all()
        # and the attack actually moved the image by ε on most pixels
        moved = ((adv - x).abs() > eps * 0.999).float().mean()
        assert moved > 0.5


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("num_classes", [1, 2])
def test_fgsm_on_linear_model_gains_exactly_eps_sum_abs_w(eps, num_classes):
    """z_defect = w·x + b: FGSM moves every unclipped pixel by ε·sign(w), so z gains ε·Σ|w|.

    Pixels at 0 with w < 0 and at 1 with w > 0 are clipped back and gain nothing; every other
    pixel is at least ε away from the range's ends, or at an end and moving inwards.
    """
    torch.manual_seed(0)
    c, h, w = 2, 6, 5
    lin = nn.Linear(c * h * w, num_classes).double()
    model = nn.Sequential(nn.Flatten(), lin).eval()
    d = 0 if num_classes == 1 else 1
    x = _x_with_extremes((4, c, h, w), seed=2, dtype=torch.float64, margin=eps)
    wd = lin.weight[d].detach().view(c, h, w)
    adv = fgsm(lambda t: model(t)[:, d], x, eps)
    clipped = ((x == 0) & (wd < 0)) | ((x == 1) & (wd > 0))
    assert clipped.any() and (~clipped).any()
    gain = (model(adv)[:, d] - model(x)[:, d]).detach()
    expected = eps * (wd.abs() * (~clipped)).flatten(1).sum(1)
    torch.testing.assert_close(gain, expected, rtol=1e-9, atol=1e-12)
    # PGD on a linear model takes the same direction every step: it lands on FGSM's point.
    torch.testing.assert_close(
        pgd(lambda t: model(t)[:, d], x, eps, steps=5), adv, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("eps", EPSILONS)
def test_fgsm_increases_defect_logit_on_smooth_model(eps):
    net = _smooth_net(seed=3)
    x = _x_with_extremes((6, 1, 16, 16), seed=4)
    adv = fgsm(lambda t: net(t)[:, 1], x, eps)
    with torch.no_grad():
        before, after = net(x)[:, 1], net(adv)[:, 1]
    assert (after > before).all()
    adv_pgd = pgd(lambda t: net(t)[:, 1], x, eps, steps=4)
    with torch.no_grad():
        assert (net(adv_pgd)[:, 1] > before).all()


def test_pgd_one_step_equals_fgsm(resnet):
    x = _x_with_extremes((2, 3, 64, 64), seed=5)

    def z_def(t: torch.Tensor) -> torch.Tensor:
        return resnet(t)[:, 1]

    for eps in EPSILONS:
        assert torch.equal(pgd(z_def, x, eps, steps=1), fgsm(z_def, x, eps))


def test_fgsm_step_hand_case_and_validation():
    x = torch.tensor([[[[0.0, 0.5, 1.0, 0.999]]]])
    g = torch.tensor([[[[-1.0, 2.0, 3.0, 0.0]]]])
    out = fgsm_step(x, g, 0.01)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.51, 1.0, 0.999]]]]))
    assert torch.equal(fgsm_step(x, g, 0.0), x)
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_step(x, g, 1.5)
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_step(x, g, -0.1)
    with pytest.raises(ValueError, match="grad shape"):
        fgsm_step(x, g[..., :2], 0.1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fgsm_step(x[0], g[0], 0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(lambda t: t.sum(dim=(1, 2, 3)), x, 0.1, steps=0)


def test_fgsm_does_not_touch_parameter_grads():
    net = _smooth_net(seed=6)
    x = _x_with_extremes((2, 1, 8, 8), seed=6)
    fgsm(lambda t: net(t)[:, 1], x, 2 / 255)
    pgd(lambda t: net(t)[:, 1], x, 2 / 255, steps=3)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_engine_adv_pass_is_the_attack_and_rescored(attack):
    """score(): x_adv is exactly fgsm/pgd of z_defect; *_adv numbers are those of x_adv."""
    net = _smooth_net(seed=7)
    x = _x_with_extremes((4, 1, 16, 16), seed=7)
    eps = 8 / 255
    cfg = EngineConfig(attack=attack, epsilon=eps, pgd_steps=3)
    s = ReliabilityEngine(net, "features", config=cfg).score(x)

    def z_def(t: torch.Tensor) -> torch.Tensor:
        return net(t)[:, 1]

    ref = fgsm(z_def, x, eps) if attack == "fgsm" else pgd(z_def, x, eps, steps=3)
    torch.testing.assert_close(s.x_adv, ref, rtol=0, atol=1e-7)
    with torch.no_grad():
        p_adv = torch.softmax(net(s.x_adv), dim=1)[:, 1]
        p = torch.softmax(net(x), dim=1)[:, 1]
    rows = s.rows()
    for i, row in enumerate(rows):
        assert row["p_defect_adv"] == pytest.approx(float(p_adv[i]), abs=1e-6)
        assert row["p_defect_adv"] > row["p_defect"]  # pushed toward defect
        assert row["flipped"] == bool((p_adv[i] >= 0.5) != (p[i] >= 0.5))
        assert row["iou_gap_adv"] == pytest.approx(row["iou_defect_adv"] - row["iou_ok_adv"])
    # a fresh clean score of x_adv gives the *_adv numbers
    clean_adv = ReliabilityEngine(net, "features", config=EngineConfig(attack="none")).score(
        s.x_adv
    )
    torch.testing.assert_close(clean_adv.clean.iou_defect, s.adv.iou_defect)
    torch.testing.assert_close(clean_adv.clean.iou_ok, s.adv.iou_ok)
    torch.testing.assert_close(clean_adv.cam_defect, s.adv.cam_defect)


def test_engine_single_logit_attack_ascends_z():
    net = _smooth_net(seed=8, num_classes=1)
    x = _x_with_extremes((3, 1, 16, 16), seed=8)
    s = ReliabilityEngine(net, "features", config=EngineConfig(epsilon=4 / 255)).score(x)
    torch.testing.assert_close(s.x_adv, fgsm(lambda t: net(t)[:, 0], x, 4 / 255), rtol=0, atol=0)
    with torch.no_grad():
        assert (net(s.x_adv)[:, 0] > net(x)[:, 0]).all()
