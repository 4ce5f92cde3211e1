"""Equal work: the engine's maps (b) against pytorch_grad_cam's (d), and CUDA against CPU.

(b) vs (d) is only a fair comparison when both compute the same maps; :func:`maps_agreement`
checks that on one batch before anything is timed (``tests/test_bench_smoke.py`` holds it to
1e-4). :func:`device_agreement` checks that the engine's FGSM scores on a GPU match the CPU's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from bench.throughput.config import threads
from bench.throughput.model import ModelSpec, make_engine
from bench.throughput.workloads import GradCamRunner

if TYPE_CHECKING:
    from worker.engine.score import ReliabilityScores

#: CUDA vs CPU: largest allowed difference of each compared quantity (see :func:`device_agreement`).
DEVICE_TOLERANCE = {
    "p_defect": 5e-3,
    "iou_gap": 0.05,
    "iou_gap_adv": 0.05,
    "cam_defect_mean_abs": 5e-3,
    "cam_ok_mean_abs": 5e-3,
    "cam_agnostic_mean_abs": 5e-3,
}


def compare_with_gradcam(
    spec: ModelSpec, x: Tensor, scores: ReliabilityScores, cams: Sequence[np.ndarray]
) -> dict[str, float]:
    """Largest absolute difference (map units, maps in [0, 1]) between (b)'s and (d)'s maps.

    ``scores`` is the engine's result on ``x``, ``cams`` the :class:`GradCamRunner` output on
    the same ``x``. Keys: ``defect``, ``ok`` (Grad-CAM of each class), ``agnostic`` (Eigen-CAM)
    and ``engine_agnostic_vs_fixed_sign``. EigenCAM does not fix the SVD sign (docs/design.md
    §7): each image's pytorch_grad_cam map is compared with both signs of the engine's
    projection and the closer one counts; the last key compares the engine's own map with the
    positive sign.
    """
    import torch.nn.functional as F

    from worker.engine.cam import eigen_cam_projection, forward_with_activations
    from worker.engine.maps import minmax_normalize, upsample

    cam_defect, cam_ok, cam_eigen = cams
    out = {
        "defect": float(np.abs(scores.cam_defect.detach().cpu().numpy() - cam_defect).max()),
        "ok": float(np.abs(scores.cam_ok.detach().cpu().numpy() - cam_ok).max()),
    }
    with torch.no_grad():
        _, act = forward_with_activations(spec.model, spec.target_module(), x, need_grad=False)
    p = eigen_cam_projection(act)
    size = (x.shape[2], x.shape[3])
    pos = minmax_normalize(upsample(F.relu(p), size)).cpu().numpy()
    neg = minmax_normalize(upsample(F.relu(-p), size)).cpu().numpy()
    per_image = [
        min(np.abs(cam_eigen[i] - pos[i]).max(), np.abs(cam_eigen[i] - neg[i]).max())
        for i in range(x.shape[0])
    ]
    out["agnostic"] = float(max(per_image))
    out["engine_agnostic_vs_fixed_sign"] = float(
        np.abs(scores.cam_agnostic.detach().cpu().numpy() - pos).max()
    )
    return out


def maps_agreement(spec: ModelSpec, pool: Tensor, b: int) -> dict[str, float]:
    """(b) and (d) on the first ``b`` images of ``pool``, one thread: see :func:`compare_with_gradcam`."""
    x = pool[:b]
    with threads(1):
        scores = make_engine(spec, "none").score(x)
        with GradCamRunner(spec) as runner:
            cams = runner(x)
        return compare_with_gradcam(spec, x, scores, cams)


def device_agreement(spec: ModelSpec, pool: Tensor, b: int, device: str) -> dict[str, Any]:
    """The engine's FGSM scores on ``device`` against the CPU ones, on the first ``b`` images.

    Returns ``batch_size``, ``max_abs_diff`` (largest difference of ``p_defect``, ``iou_gap``,
    ``iou_gap_adv``; mean absolute difference of each map, in map units), ``tolerance``
    (:data:`DEVICE_TOLERANCE`) and ``passed``. The model is moved back to the CPU after.
    """
    x = pool[:b]
    with threads(1):
        cpu = make_engine(spec, "fgsm").score(x)
        spec.model.to(device)
        try:
            dev = make_engine(spec, "fgsm").score(x.to(device))
        finally:
            spec.model.to("cpu")
    diffs: dict[str, float] = {}
    for name in ("p_defect", "iou_gap", "iou_gap_adv"):
        a, c = getattr(cpu, name), getattr(dev, name)
        diffs[name] = float((a - c.cpu()).abs().max())
    for name in ("cam_defect", "cam_ok", "cam_agnostic"):
        diffs[f"{name}_mean_abs"] = float(
            (getattr(cpu, name) - getattr(dev, name).cpu()).abs().mean()
        )
    return {
        "batch_size": b,
        "max_abs_diff": diffs,
        "tolerance": dict(DEVICE_TOLERANCE),
        "passed": all(diffs[k] <= tol for k, tol in DEVICE_TOLERANCE.items()),
    }
