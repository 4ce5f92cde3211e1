"""Scoring labelled images the way the worker does (the lab's side of :mod:`worker.measure`).

:func:`score_records` decodes manifest records at their own size and measures them in batches
with an :class:`~worker.measure.AuditSuite` (the production model's engine and any second
opinions), returning one measurement row per image with its path, label and defect type, and
the maps of the images asked for (for overlays and the pointing game).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.progress import track
from torch import Tensor

from inspection_audit.lab.dataset import Record
from worker.engine.options import EngineConfig
from worker.engine.score import ReliabilityEngine
from worker.measure import AuditSuite
from worker.model.checkpoint import ProductionModel
from worker.model.preprocess import load_image


@dataclass
class Scored:
    """Measurement rows and labels of scored images (one row dict per image).

    ``maps[i]`` / ``images[i]``: the maps and display image of row ``i`` when kept.
    """

    records: list[Record]
    rows: list[dict[str, Any]]
    labels: np.ndarray  # int64[N], 1 = defect
    maps: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    images: dict[int, Tensor] = field(default_factory=dict)


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
    suite: AuditSuite | ReliabilityEngine,
    pm: ProductionModel,
    records: list[Record],
    *,
    batch_size: int = 16,
    description: str = "scoring",
    show_progress: bool = True,
    keep_maps: Callable[[Record], bool] | None = None,
) -> Scored:
    """Decode ``records`` and measure them in batches of ``batch_size``.

    Args:
        suite: the :class:`~worker.measure.AuditSuite` (or a bare engine: no second opinion).
        pm: the production model (its channel count decides the decoding).
        records: manifest records.
        keep_maps: keep the maps (and display image) of the records it accepts.

    Returns:
        :class:`Scored`; each row holds the measurements plus ``path`` (relative to the
        manifest), ``label`` and ``defect_type``.

    Raises:
        worker.model.images.ImageError: an image that cannot be decoded.
    """
    if isinstance(suite, ReliabilityEngine):
        suite = AuditSuite(pm, suite)
    rows: list[dict[str, Any]] = []
    maps: dict[int, dict[str, Tensor]] = {}
    images: dict[int, Tensor] = {}
    starts = range(0, len(records), batch_size)
    for i in track(starts, description=description) if show_progress else starts:
        batch = records[i : i + batch_size]
        measured = suite.measure([load_image(r.path, pm.in_channels) for r in batch])
        rows.extend(measured.rows)
        for j, rec in enumerate(batch):
            if keep_maps is not None and keep_maps(rec):
                maps[i + j] = measured.maps[j]
                images[i + j] = measured.images[j]
    for r, rec in zip(rows, records, strict=True):
        r["path"] = rec.rel_path
        r["label"] = rec.label
        r["defect_type"] = rec.defect_type
    labels = np.array([rec.y for rec in records], dtype=np.int64)
    return Scored(records, rows, labels, maps, images)
