"""Saliency maps against an independent oracle (``pytorch_grad_cam`` 1.5.7) and hand cases.

docs/design.md §3.1–3.3 and the §7 notes on using ``pytorch_grad_cam`` as an oracle: it calls
``model.eval()`` and keeps hooks while it lives (so it gets a deep copy and a ``with`` block),
normalises min-max, resizes with cv2 (bilinear) and normalises again, which
``F.interpolate(bilinear, align_corners=False)`` + min-max reproduces to about 1e-6; its
``EigenCAM`` does not fix the SVD sign, so it is compared up to sign; ``targets`` has one entry
per image.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.support.models import tiny_model
from worker.engine import (
    EngineConfig,
    ReliabilityEngine,
    binarize,
    eigen_cam,
    eigen_cam_projection,
    forward_with_activations,
    grad_cam,
    linear_head_weights,
    minmax_normalize,
    upsample,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4
B = 4


def _images(b: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models() -> dict[tuple[int, int], nn.Module]:
    """Seeded resnet18 (weights=None) in a NormalizedModel: (num_classes, in_channels) -> model."""
    return {
        (2, 3): tiny_model(num_classes=2, in_channels=3, seed=0),
        (2, 1): tiny_model(num_classes=2, in_channels=1, seed=1),
        (1, 1): tiny_model(num_classes=1, in_channels=1, seed=2),
    }


def _oracle_gradcam(model: nn.Module, layer: str, x: torch.Tensor, targets: list) -> np.ndarray:
    mc = copy.deepcopy(model)
    with GradCAM(model=mc, target_layers=[mc.backbone.get_submodule(layer)]) as cam:
        out = cam(input_tensor=x, targets=targets)
    assert out.dtype == np.float32 and out.shape == (x.shape[0], *x.shape[2:])
    return out


def _activations(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, act = forward_with_activations(
            model, model.backbone.get_submodule(layer), x, need_grad=False
        )
    return act


# -- Grad-CAM ---------------------------------------------------------------------------------

GRADCAM_CASES = [
    # (in_channels, (H, W), layer, closed_form)
    (3, (64, 64), "layer4", True),
    (3, (64, 64), "layer4", False),
    (3, (64, 64), "layer3", True),  # no closed form at layer3: falls back to autograd
    (3, (64, 64), "layer3", False),
    (1, (64, 96), "layer4", True),
    (1, (64, 96), "layer4", False),
    (1, (64, 96), "layer3", False),
]


@pytest.mark.parametrize(("cin", "size", "layer", "closed_form"), GRADCAM_CASES)
def test_gradcam_matches_pytorch_grad_cam(models, cin, size, layer, closed_form):
    model = models[(2, cin)]
    x = _images(B, cin, *size, seed=10 + cin)
    engine = ReliabilityEngine(
        model, f"backbone.{layer}", config=EngineConfig(closed_form=closed_form, attack="none")
    )
    s = engine.score(x)
    assert s.cam_defect.shape == (B, *size) and s.cam_defect.dtype == torch.float32
    for c, ours in ((1, s.cam_defect), (0, s.cam_ok)):
        oracle = _oracle_gradcam(model, layer, x, [ClassifierOutputTarget(c)] * B)
        np.testing.assert_allclose(ours.numpy(), oracle, rtol=0, atol=ATOL)
        # Not a vacuous comparison: some maps are non-constant (max 1 after normalisation).
        # (A random-init net may have no positive evidence for a class in an image: then
        # ReLU leaves nothing and both sides give an all-zero map.)
        assert (ours.amax(dim=(1, 2)) == 1).any()
        assert float(ours.min()) == 0.0


@pytest.mark.parametrize("closed_form", [True, False])
def test_gradcam_single_logit_matches_oracle(models, closed_form):
    """1-logit head: S_defect explains z, S_ok explains −z (oracle target: a callable)."""
    model = models[(1, 1)]
    x = _images(B, 1, 64, 64, seed=3)
    s = ReliabilityEngine(
        model, "backbone.layer4", config=EngineConfig(closed_form=closed_form, attack="none")
    ).score(x)
    oracle_def = _oracle_gradcam(model, "layer4", x, [ClassifierOutputTarget(0)] * B)
    oracle_ok = _oracle_gradcam(model, "layer4", x, [lambda out: -out[0]] * B)
    np.testing.assert_allclose(s.cam_defect.numpy(), oracle_def, rtol=0, atol=ATOL)
    np.testing.assert_allclose(s.cam_ok.numpy(), oracle_ok, rtol=0, atol=ATOL)


def test_grad_cam_function_hand_case():
    """grad_cam = ReLU(Σ_k mean_ij(g_k) A_k) on a 2-channel 2×2 case computed by hand."""
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    g = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-4.0, 0.0], [0.0, 0.0]]]])
    # α = (1, −1): map = A_0 − A_1 = [[−3, 2], [3, 4]] → ReLU → [[0, 2], [3, 4]]
    expected = torch.tensor([[[0.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(grad_cam(a, g), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        grad_cam(a, g[:, :1])


# -- Eigen-CAM --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cin", "size", "layer"), [(3, (64, 64), "layer4"), (1, (64, 96), "layer3")]
)
def test_eigencam_matches_oracle_up_to_sign(models, cin, size, layer):
    model = models[(2, cin)]
    x = _images(B, cin, *size, seed=20 + cin)
    mc = copy.deepcopy(model)
    with EigenCAM(model=mc, target_layers=[mc.backbone.get_submodule(layer)]) as cam:
        oracle = cam(input_tensor=x, targets=None)
    p = eigen_cam_projection(_activations(model, layer, x))
    pos = minmax_normalize(upsample(F.relu(p), size)).numpy()
    neg = minmax_normalize(upsample(F.relu(-p), size)).numpy()
    for i in range(B):
        err = min(np.abs(oracle[i] - pos[i]).max(), np.abs(oracle[i] - neg[i]).max())
        assert err <= ATOL, f"image {i}: max abs error {err}"
        # the two candidates really differ, so the comparison decides something
        assert np.abs(pos[i] - neg[i]).max() > 0.5
    # the engine's class-agnostic map is the sign-fixed (positive) variant
    s = ReliabilityEngine(
        model, f"backbone.{layer}", config=EngineConfig(attack="none", agnostic="eigen")
    ).score(x)
    np.testing.assert_allclose(s.cam_agnostic.numpy(), pos, rtol=0, atol=1e-6)


def _blob(h: int = 6, w: int = 6) -> torch.Tensor:
    b = torch.zeros(h, w, dtype=torch.float64)
    b[1:3, 2:5] = 1.0  # a 2×3 blob
    return b


def test_eigen_sign_fix_hand_case_foreground_channels():
    """K=2, both channels fire on the blob (A_1 = 2·A_0): v₁ = ±(1, 2)/√5, P = ±√5 (b − b̄).

    The channel-mean map 1.5·b correlates positively with +(b − b̄): the fixed sign is +.
    """
    b = _blob()
    a = torch.stack([b, 2 * b])[None]  # [1, 2, 6, 6]
    p = eigen_cam_projection(a)[0]
    torch.testing.assert_close(p, math.sqrt(5) * (b - b.mean()), rtol=0, atol=1e-9)
    mask = eigen_cam(a)[0] > 0
    assert torch.equal(mask, b > 0)


def test_eigen_sign_fix_hand_case_background_channel_dominates():
    """A_0 = b (blob), A_1 = 3·(1 − b) (background): v₁ = ±(1, −3)/√10, P = ±√10 (b − b̄).

    The channel-mean map (3 − 2b)/2 is high on the background, so the fixed sign is −: the
    positive part of P is the background, not the blob.
    """
    b = _blob()
    a = torch.stack([b, 3 * (1 - b)])[None]
    p = eigen_cam_projection(a)[0]
    torch.testing.assert_close(p, -math.sqrt(10) * (b - b.mean()), rtol=0, atol=1e-9)
    assert torch.equal(eigen_cam(a)[0] > 0, b == 0)


def test_eigen_sign_fix_correlates_with_channel_mean_random():
    g = torch.Generator().manual_seed(5)
    a = F.relu(torch.randn(16, 8, 5, 7, generator=g) + torch.randn(16, 8, 1, 1, generator=g))
    p = eigen_cam_projection(a).flatten(1).double()
    mean_map = a.mean(dim=1).flatten(1).double()
    corr = ((p - p.mean(1, keepdim=True)) * (mean_map - mean_map.mean(1, keepdim=True))).sum(1)
    assert (corr > 0).all()
    # and the projection is the SVD's: |P| equals |Mc · v₁| from numpy
    for i in range(a.shape[0]):
        m = a[i].reshape(8, -1).T.double().numpy()
        mc = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(mc, full_matrices=False)
        np.testing.assert_allclose(np.abs(p[i].numpy()), np.abs(mc @ vt[0]), atol=1e-5)


def test_eigen_constant_activations_give_zero_projection():
    a = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.0]).view(1, 3, 1, 1)
    assert torch.equal(eigen_cam_projection(a), torch.zeros(2, 4, 4))


# -- closed form ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [(2, 3), (2, 1), (1, 1)])
def test_linear_head_weights_closed_form_equals_autograd(models, key):
    model = models[key]
    cin = key[1]
    layer = model.backbone.layer4
    w = linear_head_weights(model, layer)
    assert w is not None
    assert torch.equal(w, model.backbone.fc.weight)
    assert not w.requires_grad
    x = _images(3, cin, 64, 96, seed=7)
    with torch.enable_grad():
        z, act = forward_with_activations(model, layer, x, need_grad=True)
        hw = act.shape[2] * act.shape[3]
        assert hw == 2 * 3
        for c in range(z.shape[1]):
            (g,) = torch.autograd.grad(z[:, c].sum(), act, retain_graph=True)
            alpha = g.mean(dim=(2, 3))  # [B, K]
            expected = (w[c] / hw).expand_as(alpha)
            torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-7)
            # the gradient is W_ck/(h·w) at every position, not only on average
            torch.testing.assert_close(
                g, expected[:, :, None, None].expand_as(g), rtol=1e-5, atol=1e-7
            )


class _GapNet(nn.Module):
    """features → avgpool → fc, the closed-form structure, with configurable pool / head."""

    def __init__(self, pool: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.avgpool = pool
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def test_linear_head_weights_none_without_gap_fc(models):
    model = models[(2, 3)]
    assert linear_head_weights(model, model.backbone.layer3) is None
    assert linear_head_weights(model, model.backbone.layer4[0]) is None
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert linear_head_weights(seq, seq[0]) is None
    ok = _GapNet(nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2))
    assert torch.equal(linear_head_weights(ok, ok.features), ok.fc.weight)
    maxpool = _GapNet(nn.AdaptiveMaxPool2d(1), nn.Linear(4, 2))
    assert linear_head_weights(maxpool, maxpool.features) is None
    pool2 = _GapNet(nn.AdaptiveAvgPool2d(2), nn.Linear(16, 2))
    assert linear_head_weights(pool2, pool2.features) is None
    mlp = _GapNet(nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Dropout(), nn.Linear(4, 2)))
    assert linear_head_weights(mlp, mlp.features) is None


@pytest.mark.parametrize("closed_form", [True, False])
def test_gapnet_closed_form_and_autograd_agree(closed_form):
    """A hand-made GAP + fc net: the engine's maps equal ReLU(Σ_k W_ck/(hw) A_k) by hand."""
    torch.manual_seed(0)
    net = _GapNet(nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)).eval()
    x = _images(3, 1, 12, 12, seed=9)
    s = ReliabilityEngine(
        net, "features", config=EngineConfig(closed_form=closed_form, attack="none")
    ).score(x)
    with torch.no_grad():
        a = net.features(x)
    w = net.fc.weight.detach()
    for c, ours in ((1, s.cam_defect), (0, s.cam_ok)):
        d = torch.einsum("k,bkhw->bhw", w[c] / 144, a)
        torch.testing.assert_close(ours, minmax_normalize(F.relu(d)), rtol=0, atol=1e-6)


# -- mirror property (docs/design.md §7) --------------------------------------------------------------


def _masks(s) -> tuple[torch.Tensor, torch.Tensor]:
    return binarize(s.cam_defect, "threshold", 0.5), binarize(s.cam_ok, "threshold", 0.5)


# Why disjointness survives bilinear upsampling at θ = 0.5: at an output pixel the upsampled
# maps are u = Σ_{D_i>0} w_i D_i and v = Σ_{D_i<0} w_i |D_i| with w ≥ 0, Σ w = 1, so
# u ≥ max(u)/2 needs Σ_{D_i>0} w_i ≥ 1/2 and v ≥ max(v)/2 needs Σ_{D_i<0} w_i ≥ 1/2: both only
# when a weight sum is exactly 1/2, which the half-pixel sampling positions of an integer scale
# factor (odd multiples of 1/(2s)) never produce. Min-max normalisation only raises the bar.


@pytest.mark.parametrize("closed_form", [True, False])
def test_mirror_single_logit_masks_disjoint(models, closed_form):
    model = models[(1, 1)]
    x = _images(8, 1, 64, 64, seed=31)
    s = ReliabilityEngine(
        model, "backbone.layer4", config=EngineConfig(closed_form=closed_form, attack="none")
    ).score(x)
    # S_ok = ReLU(−D) where S_defect = ReLU(D): check against D computed by hand.
    a = _activations(model, "layer4", x)
    d = torch.einsum("k,bkhw->bhw", model.backbone.fc.weight[0].detach() / 4, a)
    torch.testing.assert_close(
        s.cam_defect, minmax_normalize(upsample(F.relu(d), (64, 64))), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        s.cam_ok, minmax_normalize(upsample(F.relu(-d), (64, 64))), rtol=0, atol=1e-5
    )
    m_def, m_ok = _masks(s)
    assert not (m_def & m_ok).any()
    both = (m_def.flatten(1).any(1) & m_ok.flatten(1).any(1)).sum()
    assert both >= 4, "the test needs images where both masks are non-empty"


def test_two_logit_alpha_relation_and_opposite_weights(models):
    model = copy.deepcopy(models[(2, 3)])
    layer = model.backbone.layer4
    x = _images(6, 3, 64, 64, seed=41)
    # generic weights: α_ok + α_def = (w_ok + w_def)/hw for every image
    with torch.enable_grad():
        z, act = forward_with_activations(model, layer, x, need_grad=True)
        g_def = torch.autograd.grad(z[:, 1].sum(), act, retain_graph=True)[0].mean(dim=(2, 3))
        g_ok = torch.autograd.grad(z[:, 0].sum(), act)[0].mean(dim=(2, 3))
    w = model.backbone.fc.weight.detach()
    torch.testing.assert_close(g_ok, -g_def + (w[0] + w[1]) / 4, rtol=1e-5, atol=1e-7)
    # opposite weights (what cross-entropy training drifts to): w_ok = −w_def → disjoint masks
    with torch.no_grad():
        model.backbone.fc.weight[0] = -model.backbone.fc.weight[1]
        model.backbone.fc.bias.copy_(torch.tensor([0.3, -0.2]))
    for closed_form in (True, False):
        s = ReliabilityEngine(
            model, "backbone.layer4", config=EngineConfig(closed_form=closed_form, attack="none")
        ).score(x)
        m_def, m_ok = _masks(s)
        assert not (m_def & m_ok).any()
        assert (m_def.flatten(1).any(1) & m_ok.flatten(1).any(1)).sum() >= 3
