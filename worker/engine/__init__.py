"""The reliability engine: saliency maps, IoU score, adversarial step, scoring methods, calibration.

Plain PyTorch; never imports Celery or the lab, so it runs the same in a task, a notebook, a
benchmark or an evaluation. Importing the package is cheap: the torch-free parts
(:mod:`worker.engine.options`, :mod:`worker.engine.methods`, :mod:`worker.engine.calibration`)
can be imported by the settings and the producer without loading torch; the names below are
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "fgsm": "adversarial",
    "fgsm_step": "adversarial",
    "pgd": "adversarial",
    "CamError": "cam",
    "channel_mean_map": "cam",
    "eigen_cam": "cam",
    "eigen_cam_projection": "cam",
    "forward_with_activations": "cam",
    "grad_cam": "cam",
    "linear_head_weights": "cam",
    "binary_iou": "iou",
    "soft_iou": "iou",
    "binarize": "maps",
    "minmax_normalize": "maps",
    "otsu_threshold": "maps",
    "upsample": "maps",
    "EngineConfig": "options",
    "MapScores": "score",
    "ReliabilityEngine": "score",
    "ReliabilityScores": "score",
}

if TYPE_CHECKING:
    from worker.engine.adversarial import fgsm, fgsm_step, pgd
    from worker.engine.cam import (
        CamError,
        channel_mean_map,
        eigen_cam,
        eigen_cam_projection,
        forward_with_activations,
        grad_cam,
        linear_head_weights,
    )
    from worker.engine.iou import binary_iou, soft_iou
    from worker.engine.maps import binarize, minmax_normalize, otsu_threshold, upsample
    from worker.engine.options import EngineConfig
    from worker.engine.score import MapScores, ReliabilityEngine, ReliabilityScores


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"worker.engine.{module}"), name)


__all__ = [
    "CamError",
    "EngineConfig",
    "MapScores",
    "ReliabilityEngine",
    "ReliabilityScores",
    "binarize",
    "binary_iou",
    "channel_mean_map",
    "eigen_cam",
    "eigen_cam_projection",
    "fgsm",
    "fgsm_step",
    "forward_with_activations",
    "grad_cam",
    "linear_head_weights",
    "minmax_normalize",
    "otsu_threshold",
    "pgd",
    "soft_iou",
    "upsample",
]
