"""Engine-variant sweep on one labelled split (``inspection-audit sweep``), for choosing options
on ``val`` only: target layer × class-agnostic map × binarisation / soft IoU, each with and
without FGSM, plus stronger attacks on the default variant. For each variant the scores
``iou_gap``, ``iou_gap_adv``, ``iou_defect`` and ``iou_defect_adv`` are compared with the
``msp`` and ``energy`` baselines by AUROC (FN vs TN among predicted ok) and by the TN flag rate at
100 % FN recall.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from inspection_audit.lab.dataset import load_tensors, read_manifest
from worker.engine.options import EngineConfig
from worker.engine.score import ReliabilityEngine
from worker.model.checkpoint import load_checkpoint


def _metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    tau = s[y == 1].min()
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tn_flag_rate_at_full_recall": float((s[y == 0] >= tau).mean()),
    }


def variants() -> list[tuple[str, EngineConfig, str]]:
    """``(name, config, layer)`` of every variant the sweep runs."""
    out = []
    maps = [
        ("threshold", "binary", "θ0.5"),
        ("otsu", "binary", "otsu"),
        ("topk", "binary", "top20%"),
        ("threshold", "soft", "soft"),
    ]
    for layer, agn, (binz, iou, label) in itertools.product(
        ["layer4", "layer3"], ["eigen", "mean"], maps
    ):
        cfg = EngineConfig(
            binarize=binz,  # type: ignore[arg-type]
            iou=iou,  # type: ignore[arg-type]
            agnostic=agn,  # type: ignore[arg-type]
            attack="fgsm",
            target_layer=layer,
        )
        out.append((f"{layer}/{agn}/{label}/fgsm2", cfg, layer))
    for eps, attack in [(8 / 255, "fgsm"), (8 / 255, "pgd")]:
        cfg = EngineConfig(attack=attack, epsilon=eps, target_layer="layer4")  # type: ignore[arg-type]
        out.append((f"layer4/eigen/θ0.5/{attack}{round(eps * 255)}", cfg, "layer4"))
    return out


def run_sweep(
    manifest: str | Path, model: str | Path, split: str = "val", batch_size: int = 32
) -> dict[str, Any]:
    """Score ``split`` under every variant; returns per-variant metrics and a ranking by AUROC."""
    pm = load_checkpoint(model)
    records = read_manifest(manifest, split)
    x, y = load_tensors(records, pm.input_size, pm.in_channels, "loading images", resize=pm.resize)
    results: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    vs = variants()
    with Progress() as progress:
        task = progress.add_task("sweep", total=len(vs))
        for name, cfg, layer in vs:
            eng = ReliabilityEngine.from_production_model(pm, cfg)
            rows = []
            for i in range(0, len(x), batch_size):
                rows += eng.score(x[i : i + batch_size]).rows()
            p = np.array([r["p_defect"] for r in rows])
            ok = p < 0.5
            yy = y.numpy()[ok]
            if len(set(yy.tolist())) < 2:
                raise ValueError(f"split {split!r} needs both false negatives and true negatives")
            sub = [r for r, k in zip(rows, ok, strict=True) if k]
            if not base:
                base = {
                    "msp": _metrics(yy, p[ok]),
                    "energy": _metrics(yy, np.array([r["energy"] for r in sub])),
                    "n_false_negative": int(yy.sum()),
                    "n_true_negative": int((yy == 0).sum()),
                }
            for score in ("iou_gap", "iou_gap_adv", "iou_defect", "iou_defect_adv"):
                s = np.array([r[score] for r in sub], dtype=np.float64)
                label = name if score.endswith("_adv") else name.rsplit("/", 1)[0] + "/none"
                results.append(
                    {
                        "variant": f"{label} :: {score.removesuffix('_adv')}",
                        "config": cfg.to_dict(),
                        "layer": layer,
                        "score": score,
                        **_metrics(yy, s),
                    }
                )
            progress.advance(task)
    seen: set[str] = set()
    unique = [r for r in results if not (r["variant"] in seen or seen.add(r["variant"]))]  # type: ignore[func-returns-value]
    ranking = sorted(unique, key=lambda r: (-r["auroc"], r["tn_flag_rate_at_full_recall"]))
    return {
        "model_version": pm.model_version,
        "split": split,
        "baselines": base,
        "ranking": ranking,
        "torch_threads": torch.get_num_threads(),
    }
