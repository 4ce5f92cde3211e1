"""The reliability engine: saliency maps, IoU score, adversarial step, calibration.

Plain PyTorch; never imports Celery, so it runs the same in a task, a notebook, a benchmark
or an evaluation.
"""

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
from worker.engine.score import EngineConfig, MapScores, ReliabilityEngine, ReliabilityScores

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
