"""Datasets as ``manifest.csv`` (docs/design.md §4): ``path,label,defect_type,mask_path,split``.

Paths are relative to the manifest's folder; labels are ``ok``/``defect``; ``split`` is
``train``/``val``/``test``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from worker.model.preprocess import preprocess

LABELS = ("ok", "defect")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the row and the reason."""


@dataclass(frozen=True)
class Record:
    """One manifest row, with ``path`` resolved against the manifest's folder."""

    path: Path
    label: str
    defect_type: str
    split: str
    rel_path: str
    mask_path: Path | None = None

    @property
    def y(self) -> int:
        """1 for ``defect``, 0 for ``ok``."""
        return int(self.label == "defect")


def read_manifest(manifest: str | Path, split: str | None = None) -> list[Record]:
    """Read ``manifest.csv`` (optionally one split) into :class:`Record` s.

    Raises:
        ManifestError: missing file or columns, unknown label or split, or a missing image.
    """
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / "manifest.csv"
    if not manifest.is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    root = manifest.parent
    out: list[Record] = []
    # utf-8-sig: a manifest saved by a spreadsheet ("CSV UTF-8") starts with a byte-order mark
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = {"path", "label", "split"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ManifestError(
                f"{manifest}: needs columns {sorted(need)}, has {reader.fieldnames}"
            )
        for i, row in enumerate(reader, start=2):
            missing = [k for k in sorted(need) if row.get(k) is None]
            if missing:
                raise ManifestError(f"{manifest}:{i}: the row has no {', '.join(missing)}")
            label, sp = row["label"].strip(), row["split"].strip()
            if label not in LABELS:
                raise ManifestError(f"{manifest}:{i}: label must be ok/defect, got {label!r}")
            if sp not in SPLITS:
                raise ManifestError(f"{manifest}:{i}: split must be train/val/test, got {sp!r}")
            if split is not None and sp != split:
                continue
            p = root / row["path"].strip()
            if not p.is_file():
                raise ManifestError(f"{manifest}:{i}: image not found: {p}")
            mask = (row.get("mask_path") or "").strip()
            out.append(
                Record(
                    p,
                    label,
                    (row.get("defect_type") or "").strip(),
                    sp,
                    row["path"].strip(),
                    root / mask if mask else None,
                )
            )
    if not out:
        raise ManifestError(f"{manifest}: no rows" + (f" in split {split!r}" if split else ""))
    return out


def load_tensors(
    records: list[Record],
    input_size: tuple[int, int],
    in_channels: int,
    description: str = "loading images",
    show_progress: bool = True,
    resize: str = "squash",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess every record once (``resize``: ``squash`` or ``pad``, see
    :func:`worker.model.preprocess.fit_to_input`).

    Returns ``(x, y)``: ``float32[N, C, H, W]`` in [0, 1] and ``int64[N]`` (1 = defect).

    Raises:
        worker.model.images.ImageError: an image that cannot be decoded.
    """
    x = torch.empty((len(records), in_channels, *input_size), dtype=torch.float32)
    it = track(records, description=description) if show_progress else records
    for i, r in enumerate(it):
        x[i] = preprocess(r.path, input_size, in_channels, resize=resize)
    y = torch.tensor([r.y for r in records], dtype=torch.int64)
    return x, y


def stratified_folds(records: list[Record], k: int, seed: int = 0) -> np.ndarray:
    """Assign each record a fold in ``0..k-1``, stratified by label (deterministic in ``seed``).

    Returns ``int64[N]``. Raises ``ValueError`` when ``k < 2`` or a class has fewer than k rows.
    """
    if k < 2:
        raise ValueError("folds must be >= 2")
    y = np.array([r.y for r in records])
    folds = np.empty(len(records), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        if 0 < len(idx) < k:
            raise ValueError(f"class {LABELS[cls]} has {len(idx)} images, fewer than {k} folds")
        rng.shuffle(idx)
        folds[idx] = np.arange(len(idx)) % k
    return folds
