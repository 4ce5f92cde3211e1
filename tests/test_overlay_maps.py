"""Review maps (worker/model/overlay.py): a fixed colour scale anchored to the decision
threshold, every map at the image's own aspect ratio with a legend, the binarised masks and
the decision region outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.model.overlay import (
    ANCHOR_AT,
    REGION_RGB,
    EvidenceScale,
    boundary,
    cam_mask,
    decision_region,
    evidence_colours,
    render_map,
    save_review_maps,
)

ANCHOR_RGB = (255, 224, 51)


def _blob(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    m = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return m / m.max()


def test_the_anchor_is_the_same_colour_on_every_scale() -> None:
    scales = [
        EvidenceScale.for_cam(0.5),
        EvidenceScale.for_cam(0.3),
        EvidenceScale.for_distance(2.5),
        EvidenceScale.for_distance(0.01),
    ]
    for s in scales:
        t = s.normalise(np.array([s.lo, s.anchor, s.hi, s.hi * 10]))
        assert t.tolist() == pytest.approx([0.0, ANCHOR_AT, 1.0, 1.0])
        rgb, alpha = evidence_colours(t[1:2])
        assert tuple(np.round(rgb[0] * 255).astype(int)) == ANCHOR_RGB
    # below the anchor: translucent; from the anchor up: opaque and warm
    rgb, alpha = evidence_colours(np.array([0.0, 0.49, 0.5, 1.0]))
    assert alpha[0] == 0.0 and alpha[1] < 0.4 <= alpha[2] <= alpha[3]
    assert rgb[3][0] > rgb[3][2]  # red end
    # the anchor of a CAM map is θ; of a distance map, τ (or the middle, uncalibrated)
    assert EvidenceScale.for_cam(0.3).anchor == 0.3
    unc = EvidenceScale.for_distance(None, np.array([0.0, 4.0]))
    assert (unc.anchor, unc.hi, unc.calibrated) == (2.0, 4.0, False)
    with pytest.raises(ValueError):
        EvidenceScale(0.0, 1.0, 1.0)


def test_same_value_same_colour_on_two_images() -> None:
    """A value at θ is drawn in the same colour whatever the rest of the map holds (a min-max
    stretch would not do that)."""
    s = EvidenceScale.for_cam(0.5)
    img = torch.full((1, 8, 8), 0.5)
    a = torch.zeros(8, 8)
    a[2, 2] = 0.5
    b = torch.full((8, 8), 0.2)
    b[2, 2] = 0.5
    b[5, 5] = 0.9
    pa, pb = render_map(img, a, s), render_map(img, b, s)
    assert tuple(pa[2, 2]) == tuple(pb[2, 2])


def test_masks_regions_and_outlines() -> None:
    m = _blob(40, 60, 20, 30, 5)
    mask = cam_mask(m, "threshold", 0.5)
    assert mask.sum() == int((m >= 0.5).sum())
    edge = boundary(mask)
    assert edge.sum() > 0 and (edge <= mask).all() and not edge[20, 30]
    defect = mask
    agn = cam_mask(_blob(40, 60, 22, 33, 6), "threshold", 0.5)
    region = decision_region("iou_gap_adv", {"gradcam_defect": defect, "agnostic": agn})
    assert region is not None and (region == (defect & agn)).all()
    far = cam_mask(_blob(40, 60, 5, 5, 2), "threshold", 0.5)
    region = decision_region("msp", {"gradcam_defect": defect, "agnostic": far})
    assert (region == defect).all()  # no overlap: the defect evidence itself
    # a method that is not an IoU (the default, snapshot_mean): the defect evidence, even where
    # the class-agnostic map overlaps it
    region = decision_region("snapshot_mean", {"gradcam_defect": defect, "agnostic": agn})
    assert region is not None and (region == defect).all() and not (defect == (defect & agn)).all()
    anomaly = np.zeros((40, 60), bool)
    anomaly[1:3, 1:3] = True
    assert (
        decision_region("anomaly_own", {"gradcam_defect": defect, "anomaly_own": anomaly})
        is anomaly
    )
    pic = render_map(torch.full((1, 40, 60), 0.5), m, EvidenceScale.for_cam(0.5), region=defect)
    assert tuple(pic[boundary(defect, 2)][0]) == REGION_RGB


@pytest.mark.parametrize("shape", [(128, 256), (256, 64), (100, 100)])
def test_every_map_at_the_images_aspect_ratio(tmp_path: Path, shape: tuple[int, int]) -> None:
    h, w = shape
    image = torch.rand(1, h, w)
    maps = {
        "gradcam_defect": _blob(h, w, h / 3, w / 3, 6),
        "gradcam_ok": _blob(h, w, 2 * h / 3, 2 * w / 3, 9),
        "agnostic": _blob(h, w, h / 3, w / 3, 8),
        "anomaly_own": 3.0 * _blob(h, w, h / 3, w / 3, 5),
    }
    out = save_review_maps(
        image,
        maps,
        tmp_path / "x",
        method="iou_gap_adv",
        taus={"anomaly_own": 1.5},
        caption="X-1 iou_gap_adv 0.4 >= τ 0.1",
    )
    assert set(out.maps) == {"image", *maps}
    with Image.open(out.maps["image"]) as im:
        assert im.size == (w, h)
    for name in maps:
        with Image.open(out.maps[name]) as im:
            pic = np.asarray(im.convert("RGB"))
        # the map itself sits on top at the image's size; the legend strip below it
        assert pic.shape[0] > h + 20
        left = (pic.shape[1] - w) // 2
        assert pic[:h, left : left + w].shape == (h, w, 3)
        # the legend's bar holds the anchor colour (as drawn over white)
        rgb, alpha = evidence_colours(np.array([ANCHOR_AT]))
        on_white = np.round(((1 - alpha[0]) + alpha[0] * rgb[0]) * 255)
        strip = pic[h:].reshape(-1, 3)
        assert (np.abs(strip.astype(int) - on_white).sum(1) <= 6).any()
    assert out.scales["anomaly_own"].startswith("0.00 … τ 1.50 … 3.00")
    assert out.scales["gradcam_defect"] == "0.00 … θ 0.50 … 1.00"
    assert 0 < out.region_fraction < 0.2
    with Image.open(out.composite) as im:
        assert im.size[0] >= 2 * round(192 * w / max(h, w))  # two panels side by side
