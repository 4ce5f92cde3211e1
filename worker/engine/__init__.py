"""The reliability engine: saliency maps, IoU score, adversarial step, calibration, and the
second-opinion scores (PatchCore anomaly, test-time views, full-recall rules).

Plain PyTorch; never imports Celery, so it runs the same in a task, a notebook, a benchmark
or an evaluation.
"""

from worker.engine.adversarial import fgsm, fgsm_step, pgd
from worker.engine.anomaly import (
    AnomalyScores,
    BankError,
    NearestNeighbourIndex,
    PatchBank,
    PatchFeatures,
    anomaly_scores,
    build_patch_bank,
    extract_patch_features,
    greedy_coreset,
    k_center_greedy,
    letterbox,
    patch_valid_mask,
)
from worker.engine.backbones import (
    EFFICIENTNET_LITE0_LAYERS,
    BackboneUnavailableError,
    efficientnet_lite0_feature_model,
    efficientnet_lite0_version,
    load_efficientnet_lite0,
)
from worker.engine.cam import (
    CamError,
    channel_mean_map,
    eigen_cam,
    eigen_cam_projection,
    forward_with_activations,
    grad_cam,
    linear_head_weights,
)
from worker.engine.full_recall import (
    OrRule,
    PercentileRule,
    fit_max_percentile_rule,
    fit_or_rule,
    recall_lower_bound,
)
from worker.engine.iou import binary_iou, soft_iou
from worker.engine.maps import binarize, minmax_normalize, otsu_threshold, upsample
from worker.engine.score import EngineConfig, MapScores, ReliabilityEngine, ReliabilityScores
from worker.engine.views import (
    DIHEDRAL_VIEWS,
    FLIP_VIEWS,
    apply_view,
    invert_view,
    view_summary,
    views_p_defect,
)

__all__ = [
    "DIHEDRAL_VIEWS",
    "EFFICIENTNET_LITE0_LAYERS",
    "FLIP_VIEWS",
    "AnomalyScores",
    "BackboneUnavailableError",
    "BankError",
    "CamError",
    "EngineConfig",
    "MapScores",
    "NearestNeighbourIndex",
    "OrRule",
    "PatchBank",
    "PatchFeatures",
    "PercentileRule",
    "ReliabilityEngine",
    "ReliabilityScores",
    "anomaly_scores",
    "apply_view",
    "binarize",
    "binary_iou",
    "build_patch_bank",
    "channel_mean_map",
    "efficientnet_lite0_feature_model",
    "efficientnet_lite0_version",
    "eigen_cam",
    "eigen_cam_projection",
    "extract_patch_features",
    "fgsm",
    "fgsm_step",
    "fit_max_percentile_rule",
    "fit_or_rule",
    "forward_with_activations",
    "grad_cam",
    "greedy_coreset",
    "invert_view",
    "k_center_greedy",
    "letterbox",
    "linear_head_weights",
    "load_efficientnet_lite0",
    "minmax_normalize",
    "otsu_threshold",
    "patch_valid_mask",
    "pgd",
    "recall_lower_bound",
    "soft_iou",
    "upsample",
    "view_summary",
    "views_p_defect",
]
