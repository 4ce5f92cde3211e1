"""Pictures of the evaluation: ROC curves (matplotlib) and image/map panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.calibration import Calibration
from worker.engine.methods import REGISTRY
from worker.engine.score import ReliabilityScores


def plot_roc(
    rows: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    calibrations: Sequence[Calibration],
    row_cal: np.ndarray,
    path: Path,
    title: str,
) -> None:
    """ROC curves (FN vs TN among predicted ok) of every method, AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    p = np.array([r["p_defect"] for r in rows])
    idx = np.flatnonzero(p < 0.5)
    y = np.asarray(labels)[idx]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="chance")
    if len(set(y.tolist())) == 2:
        for m in REGISTRY.names():
            s = [calibrations[row_cal[i]].score(m, rows[int(i)]) for i in idx]
            if any(v is None for v in s):
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.8, label=f"{m} (AUROC {roc_auc_score(y, s):.3f})")
    ax.set_xlabel("true negatives flagged (TN flag rate)")
    ax.set_ylabel("false negatives caught (FN recall)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_panel(x: torch.Tensor, s: ReliabilityScores, i: int, path: Path, title: str) -> None:
    """A 4-panel PNG: the image and the Grad-CAM defect / Grad-CAM ok / class-agnostic overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = x[i].detach().cpu()
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    cmap_img = "gray" if img.dim() == 2 else None
    panels = [
        ("image", None),
        ("Grad-CAM defect", s.cam_defect),
        ("Grad-CAM ok", s.cam_ok),
        (f"class-agnostic ({s.config.agnostic})", s.cam_agnostic),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (name, cam) in zip(axes, panels, strict=True):
        ax.imshow(img.numpy(), cmap=cmap_img, vmin=0, vmax=1)
        if cam is not None:
            ax.imshow(cam[i].detach().cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
