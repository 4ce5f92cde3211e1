"""Pictures of the evaluation: ROC curves (matplotlib) and image/map panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.calibration import Calibration
from worker.engine.methods import REGISTRY


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


MAP_TITLES = {
    "gradcam_defect": "Grad-CAM defect",
    "gradcam_ok": "Grad-CAM ok",
    "agnostic": "class-agnostic",
    "anomaly_imagenet": "anomaly (ImageNet)",
    "anomaly_own": "anomaly (own features)",
}


def save_panel(
    image: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    path: Path,
    title: str,
    mask: Any = None,
) -> None:
    """A PNG: the image (defect mask outlined when given) and every map over it, at the image's
    own aspect ratio; each map's maximum is marked with a cross.

    Args:
        image: ``float[C, h, w]`` in [0, 1].
        maps: name → ``float[h, w]`` (Grad-CAM maps in [0, 1]; anomaly maps in feature units,
            drawn on their own 0…max scale).
        path: the PNG to write.
        title: one line above the panels.
        mask: optional ``bool[H, W]`` defect mask (any size; resized to ``h × w``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    img = image.detach().cpu()
    h, w = int(img.shape[1]), int(img.shape[2])
    shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    cmap_img = "gray" if shown.dim() == 2 else None
    outline = None
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        outline = F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0].numpy()
    names = list(maps)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3.4 * h / w + 0.6))
    axes = np.atleast_1d(axes)
    axes[0].imshow(shown.numpy(), cmap=cmap_img, vmin=0, vmax=1)
    axes[0].set_title("image" + (" (mask outlined)" if outline is not None else ""), fontsize=9)
    for ax, name in zip(axes[1:], names, strict=True):
        ax.imshow(shown.numpy(), cmap=cmap_img, vmin=0, vmax=1)
        value = maps[name].detach().cpu().float().numpy()
        top = 1.0 if name.startswith(("gradcam", "agnostic")) else float(max(value.max(), 1e-9))
        im = ax.imshow(value, cmap="inferno", alpha=0.5, vmin=0, vmax=top)
        yx = np.unravel_index(int(np.argmax(value)), value.shape)
        ax.plot(yx[1], yx[0], marker="x", color="cyan", markersize=9, mew=2)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(MAP_TITLES.get(name, name), fontsize=9)
    for ax in axes:
        if outline is not None:
            ax.contour(outline, levels=[0.5], colors="lime", linewidths=1.0)
        ax.axis("off")
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
