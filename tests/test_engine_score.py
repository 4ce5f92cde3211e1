"""ReliabilityEngine.score(): batch invariance, robustness, constant maps, docs/design.md §7 guarantees."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.models import tiny_checkpoint, tiny_model
from worker.engine import (
    CamError,
    EngineConfig,
    ReliabilityEngine,
    binarize,
    binary_iou,
    minmax_normalize,
)
from worker.model.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ROW_KEYS = {
    "p_defect",
    "energy",
    "iou_defect",
    "iou_ok",
    "iou_gap",
    "p_defect_adv",
    "iou_defect_adv",
    "iou_ok_adv",
    "iou_gap_adv",
    "flipped",
}


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gray_model() -> nn.Module:
    return tiny_model(num_classes=2, in_channels=1, seed=11)


@pytest.fixture(scope="module")
def single_logit_model() -> nn.Module:
    return tiny_model(num_classes=1, in_channels=1, seed=12)


def _engine(model: nn.Module, layer: str = "backbone.layer4", **cfg) -> ReliabilityEngine:
    return ReliabilityEngine(model, layer, config=EngineConfig(**cfg))


# -- rows() contents --------------------------------------------------------------------------


def test_rows_hold_the_documented_numbers(gray_model):
    x = _rand((3, 1, 64, 64), seed=1)
    s = _engine(gray_model).score(x)
    rows = s.rows()
    assert len(rows) == len(s) == 3
    with torch.no_grad():
        z = gray_model(x)
    p = torch.softmax(z, dim=1)[:, 1]
    energy = -torch.logsumexp(z, dim=1)
    m_agn = binarize(s.cam_agnostic, "threshold", 0.5)
    iou_def = binary_iou(binarize(s.cam_defect, "threshold", 0.5), m_agn)
    iou_ok = binary_iou(binarize(s.cam_ok, "threshold", 0.5), m_agn)
    for i, row in enumerate(rows):
        assert set(row) == ROW_KEYS
        assert isinstance(row["flipped"], bool) and isinstance(row["p_defect"], float)
        assert row["p_defect"] == pytest.approx(float(p[i]), abs=1e-6)
        assert row["energy"] == pytest.approx(float(energy[i]), abs=1e-5)
        assert row["iou_defect"] == pytest.approx(float(iou_def[i]), abs=1e-7)
        assert row["iou_ok"] == pytest.approx(float(iou_ok[i]), abs=1e-7)
        assert row["iou_gap"] == pytest.approx(row["iou_defect"] - row["iou_ok"], abs=1e-7)
    assert any(r["iou_defect"] > 0 or r["iou_ok"] > 0 for r in rows)
    for m in (s.cam_defect, s.cam_ok, s.cam_agnostic):
        assert m.shape == (3, 64, 64) and m.dtype == torch.float32
    none = _engine(gray_model, attack="none").score(x)
    assert none.adv is None and none.x_adv is None and none.flipped is None
    for row in none.rows():
        assert all(row[k] is None for k in ROW_KEYS if k.endswith("_adv") or k == "flipped")


def test_single_logit_probability_and_energy(single_logit_model):
    """1 logit: p = σ(z), energy = −log(e⁰ + e^z) = −softplus(z) (logits [0, z])."""
    x = _rand((4, 1, 64, 64), seed=2)
    rows = _engine(single_logit_model, attack="none").score(x).rows()
    with torch.no_grad():
        z = single_logit_model(x)[:, 0].double()
    for i, row in enumerate(rows):
        assert row["p_defect"] == pytest.approx(1 / (1 + math.exp(-float(z[i]))), abs=1e-6)
        assert row["energy"] == pytest.approx(-math.log1p(math.exp(float(z[i]))), abs=1e-5)


def test_class_indices_follow_the_checkpoint(tmp_path):
    """class_names ["defect", "ok"]: p_defect is softmax column 0 and S_defect explains z_0."""
    model = tiny_model(num_classes=2, in_channels=1, seed=13)
    path = tmp_path / "rev.pt"
    save_checkpoint(
        path,
        model.backbone,
        arch="resnet18",
        num_classes=2,
        class_names=["defect", "ok"],
        input_size=(64, 64),
        mean=[0.5],
        std=[0.25],
        in_channels=1,
    )
    pm = load_checkpoint(path)
    assert (pm.defect_index, pm.ok_index) == (0, 1)
    x = _rand((2, 1, 64, 64), seed=3)
    s = ReliabilityEngine.from_production_model(pm, EngineConfig(attack="none")).score(x)
    swapped = ReliabilityEngine(
        model, "backbone.layer4", defect_index=0, ok_index=1, config=EngineConfig(attack="none")
    ).score(x)
    plain = _engine(model, attack="none").score(x)
    with torch.no_grad():
        p0 = torch.softmax(model(x), dim=1)[:, 0]
    torch.testing.assert_close(s.p_defect, p0)
    torch.testing.assert_close(s.cam_defect, swapped.cam_defect)
    torch.testing.assert_close(s.cam_defect, plain.cam_ok)
    torch.testing.assert_close(s.cam_ok, plain.cam_defect)


def test_from_production_model_equals_engine_on_the_same_weights(tmp_path):
    path = tiny_checkpoint(tmp_path, num_classes=2, in_channels=1, size=(64, 64), seed=14)
    pm = load_checkpoint(path)
    x = _rand((3, 1, 64, 64), seed=4)
    a = ReliabilityEngine.from_production_model(pm).score(x)
    b = _engine(tiny_model(num_classes=2, in_channels=1, seed=14)).score(x)
    for ra, rb in zip(a.rows(), b.rows(), strict=True):
        for k in ROW_KEYS:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), k
    torch.testing.assert_close(a.cam_defect, b.cam_defect)


# -- batch invariance (docs/design.md §7: eval mode, no map depends on its batch) -----------------------

BATCH_CONFIGS = [
    dict(attack="fgsm"),
    dict(attack="fgsm", closed_form=False, agnostic="mean", binarize="otsu"),
    dict(attack="pgd", pgd_steps=2, iou="soft", binarize="topk"),
]


def _masks_agree_up_to_ties(alone, batch, i: int, cfg: EngineConfig) -> bool:
    """True when the binarised maps of image ``i`` are identical in both runs.

    The maps themselves agree to ~1e-6 (checked separately), so a mask can only differ at a
    pixel whose value sits on the threshold: tolerate that (and say so by returning False, so the
    IoUs — a function of the masks — are not compared), anything else fails.
    """
    same = True
    for name in ("cam_defect", "cam_ok", "cam_agnostic"):
        va, vb = getattr(alone, name)[0:1], getattr(batch, name)[i : i + 1]
        ma = binarize(va, cfg.binarize, cfg.theta, cfg.topk)
        mb = binarize(vb, cfg.binarize, cfg.theta, cfg.topk)
        diff = ma != mb
        if not diff.any():
            continue
        same = False
        if cfg.binarize == "threshold":
            assert ((va[diff] - cfg.theta).abs() <= 1e-5).all(), f"{name}: not a threshold tie"
        else:
            assert int(diff.sum()) <= 4, f"{name}: {int(diff.sum())} mask pixels differ"
    return same


@pytest.mark.parametrize("cfg", BATCH_CONFIGS, ids=["fgsm", "autograd-mean-otsu", "pgd-soft"])
def test_image_alone_equals_image_in_batch(gray_model, cfg):
    x = _rand((8, 1, 64, 64), seed=5)
    engine = _engine(gray_model, **cfg)
    batch = engine.score(x)
    rows = batch.rows()
    compared_ious = 0
    for i in (0, 3, 7):
        alone = engine.score(x[i : i + 1])
        (row,) = alone.rows()
        for name in ("cam_defect", "cam_ok", "cam_agnostic"):
            torch.testing.assert_close(
                getattr(alone, name)[0], getattr(batch, name)[i], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                getattr(alone.adv, name)[0], getattr(batch.adv, name)[i], rtol=0, atol=1e-5
            )
        torch.testing.assert_close(alone.x_adv[0], batch.x_adv[i], rtol=0, atol=1e-6)
        for k in ("p_defect", "energy", "p_defect_adv"):
            assert row[k] == pytest.approx(rows[i][k], abs=1e-5), k
        assert row["flipped"] == rows[i]["flipped"]
        exact = engine.config.iou == "soft"
        for scores, suffix in ((alone.clean, ""), (alone.adv, "_adv")):
            batch_scores = batch.clean if suffix == "" else batch.adv
            if exact or _masks_agree_up_to_ties(scores, batch_scores, i, engine.config):
                compared_ious += 1
                for k in ("iou_defect", "iou_ok", "iou_gap"):
                    assert row[k + suffix] == pytest.approx(rows[i][k + suffix], abs=1e-5), k
    assert compared_ious >= 5
    # the comparison is not between trivial numbers
    assert len({round(r["iou_gap"], 6) for r in rows}) > 1
    assert len({round(r["p_defect"], 6) for r in rows}) > 1


# -- robustness -------------------------------------------------------------------------------


def _check_finite_and_ranged(s) -> None:
    for m in (s.cam_defect, s.cam_ok, s.cam_agnostic, s.adv.cam_defect):
        assert torch.isfinite(m).all()
        assert m.min() >= 0 and m.max() <= 1
    for row in s.rows():
        for k in ROW_KEYS - {"flipped"}:
            assert math.isfinite(row[k]), k
        for k in (
            "iou_defect",
            "iou_ok",
            "iou_defect_adv",
            "iou_ok_adv",
            "p_defect",
            "p_defect_adv",
        ):
            assert 0.0 <= row[k] <= 1.0, k
        for k in ("iou_gap", "iou_gap_adv"):
            assert -1.0 <= row[k] <= 1.0, k


@pytest.mark.parametrize(
    ("num_classes", "in_channels", "size"),
    [(1, 1, (64, 64)), (2, 1, (64, 64)), (2, 3, (48, 80)), (1, 3, (96, 64))],
)
@pytest.mark.parametrize("closed_form", [True, False])
def test_robust_models_and_extreme_inputs(num_classes, in_channels, size, closed_form):
    model = tiny_model(num_classes=num_classes, in_channels=in_channels, seed=15)
    x = torch.stack(
        [
            torch.zeros(in_channels, *size),  # all black
            torch.ones(in_channels, *size),  # all white
            _rand((in_channels, *size), seed=6),
            (_rand((in_channels, *size), seed=7) > 0.5).float(),  # only 0s and 1s
        ]
    )
    for cfg in (
        dict(),
        dict(agnostic="mean", binarize="otsu", iou="soft", attack="pgd", pgd_steps=2),
    ):
        s = _engine(model, closed_form=closed_form, **cfg).score(x)
        _check_finite_and_ranged(s)


class ConstantNet(nn.Module):
    """1×1 conv + Softplus, then GAP + fc: a constant input gives spatially constant activations."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Softplus())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("num_classes", [1, 2])
@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(agnostic="mean", binarize="otsu"),
        dict(binarize="topk", attack="pgd", pgd_steps=2),
        dict(iou="soft"),
    ],
)
def test_constant_maps_give_zero_ious_and_gap(num_classes, closed_form, cfg):
    """Documented constant-map value: a constant map normalises to all zeros (never NaN),
    binarises to an empty mask, and IoU with an empty union is 0 — so an input whose
    activations are spatially constant scores iou_defect = iou_ok = iou_gap = 0, also on x'.
    """
    torch.manual_seed(0)
    net = ConstantNet(num_classes).eval()
    x = torch.stack([torch.full((1, 12, 16), v) for v in (0.0, 0.3, 1.0)])
    s = ReliabilityEngine(
        net, "features", config=EngineConfig(closed_form=closed_form, epsilon=8 / 255, **cfg)
    ).score(x)
    for m in (s.cam_defect, s.cam_ok, s.cam_agnostic, s.adv.cam_defect, s.adv.cam_agnostic):
        assert torch.equal(m, torch.zeros(3, 12, 16))
    for row in s.rows():
        for k in ("iou_defect", "iou_ok", "iou_gap", "iou_defect_adv", "iou_ok_adv", "iou_gap_adv"):
            assert row[k] == 0.0, k
        assert 0.0 < row["p_defect"] < 1.0 and math.isfinite(row["energy"])
    # the building blocks, stated directly
    flat = minmax_normalize(torch.full((1, 5, 5), 0.37))
    assert torch.equal(flat, torch.zeros(1, 5, 5))
    empty = binarize(flat, "threshold", 0.5)
    assert not empty.any()
    assert float(binary_iou(empty, empty)[0]) == 0.0


# -- docs/design.md §7 guarantees -------------------------------------------------------------------

GUARANTEE_CONFIGS = [dict(), dict(closed_form=False), dict(attack="pgd", pgd_steps=2)]


@pytest.mark.parametrize("cfg", GUARANTEE_CONFIGS, ids=["closed-fgsm", "autograd-fgsm", "pgd"])
def test_works_under_no_grad_and_with_frozen_parameters(gray_model, cfg):
    x = _rand((2, 1, 64, 64), seed=8)
    ref = _engine(gray_model, **cfg).score(x)
    with torch.no_grad():
        under = _engine(gray_model, **cfg).score(x)
    frozen = copy.deepcopy(gray_model)
    frozen.requires_grad_(False)
    froz = _engine(frozen, **cfg).score(x)
    with torch.no_grad():
        froz_no_grad = _engine(frozen, **cfg).score(x)
    for other in (under, froz, froz_no_grad):
        for a, b in zip(ref.rows(), other.rows(), strict=True):
            assert a["flipped"] == b["flipped"]
            for k in ROW_KEYS - {"flipped"}:
                assert a[k] == pytest.approx(b[k], abs=1e-6), k
        for name in ("cam_defect", "cam_ok", "cam_agnostic"):
            torch.testing.assert_close(getattr(other, name), getattr(ref, name), rtol=0, atol=1e-6)
        torch.testing.assert_close(other.x_adv, ref.x_adv, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in gray_model.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.requires_grad for p in gray_model.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_parameter_grads_stay_none_and_existing_grads_untouched(gray_model):
    model = copy.deepcopy(gray_model)
    x = _rand((2, 1, 64, 64), seed=9)
    for cfg in GUARANTEE_CONFIGS:
        _engine(model, **cfg).score(x)
    assert all(p.grad is None for p in model.parameters())
    # a caller's accumulated gradient is left exactly as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    for cfg in GUARANTEE_CONFIGS:
        _engine(model, **cfg).score(x)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert not model.training


def test_train_mode_is_refused(gray_model):
    model = copy.deepcopy(gray_model).train()
    with pytest.raises(ValueError, match=r"train\(\) mode"):
        _engine(model).score(_rand((2, 1, 64, 64), seed=10))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.full((1, 1, 64, 64), 1.5), r"\[0, 1\]"),
        (torch.full((1, 1, 64, 64), -0.1), r"\[0, 1\]"),
        (torch.full((1, 1, 64, 64), 255.0), r"\[0, 1\]"),
        (torch.full((1, 1, 64, 64), float("nan")), "NaN"),
        (torch.full((1, 1, 64, 64), float("inf")), "NaN or infinite"),
        (torch.rand(1, 64, 64), r"\[B, C, H, W\]"),
        (torch.rand(1, 1, 1, 64, 64), r"\[B, C, H, W\]"),
        (torch.zeros(1, 1, 64, 64, dtype=torch.uint8), "floating point"),
        (torch.zeros(0, 1, 64, 64), "empty batch"),
    ],
    ids=["above", "below", "uint8-range", "nan", "inf", "3d", "5d", "uint8", "empty"],
)
def test_bad_inputs_are_refused_with_a_clear_message(gray_model, x, match):
    with pytest.raises(ValueError, match=match):
        _engine(gray_model).score(x)
    assert len(gray_model.backbone.layer4._forward_hooks) == 0


def test_a_single_nan_pixel_is_refused(gray_model):
    x = _rand((2, 1, 64, 64), seed=11)
    x[1, 0, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _engine(gray_model).score(x)


def test_hooks_are_removed_after_success_and_after_errors(gray_model):
    layer = gray_model.backbone.layer4
    assert len(layer._forward_hooks) == 0
    for cfg in GUARANTEE_CONFIGS + [dict(attack="none")]:
        _engine(gray_model, **cfg).score(_rand((2, 1, 64, 64), seed=12))
        assert len(layer._forward_hooks) == 0
    # an exception inside the forward pass (wrong channel count reaches conv1)
    with pytest.raises(RuntimeError):
        _engine(gray_model).score(_rand((1, 3, 64, 64), seed=13))
    assert len(layer._forward_hooks) == 0
    # a target layer whose output is not [B, K, h, w]
    fc_engine = ReliabilityEngine(gray_model, "backbone.fc", config=EngineConfig(attack="none"))
    with pytest.raises(CamError, match=r"\[B, K, h, w\]"):
        fc_engine.score(_rand((1, 1, 64, 64), seed=14))
    assert len(gray_model.backbone.fc._forward_hooks) == 0


def test_target_layer_that_does_not_run_is_a_cam_error():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(1, 2, 3)
            self.unused = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    net = Skip().eval()
    with pytest.raises(CamError, match="did not run"):
        ReliabilityEngine(net, "unused").score(_rand((1, 1, 8, 8), seed=15))
    assert len(net.unused._forward_hooks) == 0


def test_constructor_and_config_validation(gray_model):
    with pytest.raises(ValueError, match="not a submodule"):
        ReliabilityEngine(gray_model, "backbone.layer9")
    with pytest.raises(ValueError, match="must differ"):
        ReliabilityEngine(gray_model, "backbone.layer4", defect_index=0, ok_index=0)
    with pytest.raises(ValueError, match="out of range"):
        ReliabilityEngine(gray_model, "backbone.layer4", defect_index=5).score(
            _rand((1, 1, 64, 64), seed=16)
        )
    for bad, match in [
        (dict(binarize="mean"), "binarize"),
        (dict(theta=0.0), "theta"),
        (dict(topk=0.0), "topk"),
        (dict(agnostic="gradcam"), "agnostic"),
        (dict(iou="dice"), "iou"),
        (dict(attack="cw"), "attack"),
        (dict(epsilon=2.0), "epsilon"),
        (dict(pgd_steps=0), "pgd_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(**bad)
    cfg = EngineConfig(attack="pgd", epsilon=4 / 255, binarize="otsu")
    assert EngineConfig.from_dict({**cfg.to_dict(), "unknown_key": 1}) == cfg
    assert EngineConfig().epsilon == pytest.approx(2 / 255)
