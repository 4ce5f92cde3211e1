"""Scoring labelled images with the engine, in batches (the lab's side of the engine).

:func:`score_records` preprocesses manifest records once and returns one measurement row per
image (:meth:`worker.engine.score.ReliabilityScores.rows`) with its path, label and defect type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.progress import track

from inspection_audit.lab.dataset import Record, load_tensors
from worker.engine.options import EngineConfig
from worker.engine.score import ReliabilityEngine
from worker.model.checkpoint import ProductionModel


@dataclass
class Scored:
    """Measurement rows and labels of scored images (one row dict per image)."""

    records: list[Record]
    rows: list[dict[str, Any]]
    labels: np.ndarray  # int64[N], 1 = defect


def make_engine(pm: ProductionModel, config: EngineConfig) -> ReliabilityEngine:
    """An engine for ``pm`` (``config.target_layer`` overrides the checkpoint's layer).

    Raises:
        ValueError: the layer is not a module of the model.
    """
    return ReliabilityEngine.from_production_model(pm, config)


def engine_record(engine: ReliabilityEngine) -> dict[str, Any]:
    """The engine options as a calibration sidecar stores them (target layer resolved)."""
    return {**engine.config.to_dict(), "target_layer": engine.target_layer_name}


def score_records(
    engine: ReliabilityEngine,
    pm: ProductionModel,
    records: list[Record],
    *,
    batch_size: int = 32,
    description: str = "scoring",
    show_progress: bool = True,
) -> Scored:
    """Preprocess and score ``records`` in batches of ``batch_size``; returns rows and labels.

    Each row holds the engine's measurements plus ``path`` (relative to the manifest),
    ``label`` and ``defect_type``.
    """
    x, y = load_tensors(records, pm.input_size, pm.in_channels, "loading images", show_progress)
    device = next(pm.model.parameters()).device
    rows: list[dict[str, Any]] = []
    starts = range(0, len(x), batch_size)
    for i in track(starts, description=description) if show_progress else starts:
        rows.extend(engine.score(x[i : i + batch_size].to(device)).rows())
    for r, rec in zip(rows, records, strict=True):
        r["path"] = rec.rel_path
        r["label"] = rec.label
        r["defect_type"] = rec.defect_type
    return Scored(records, rows, y.numpy())
