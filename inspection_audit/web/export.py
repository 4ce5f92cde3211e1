"""Export reviewed inspections as a dataset for retraining (the lab's own format).

``<out>/manifest.csv`` with ``path,label,defect_type,mask_path,split`` (docs/design.md §4:
paths relative to the manifest's folder) and the images under ``<out>/images/<label>/``:

* a **confirmed** miss (newest verdict ``confirmed_defect``) is a ``defect`` with
  ``defect_type`` ``confirmed_miss`` (no mask: the reviewer confirmed the part, not a region);
* a **cleared** flag (newest verdict ``cleared``) is an ``ok`` part (a hard negative).

Images are copied byte for byte from the image roots. An inspection sent inline (no file) is
exported from the image the worker kept with its review maps (``details["maps"]["image"]``, at
most 256 px on its longest side) when there is one, else skipped and reported. Each label is
split deterministically (by a hash of the ``inspection_id``) into ``train`` and ``val``
(``val_fraction``, at least one ``val`` image per label that has two or more), so
``inspection-audit train --manifest <out>/manifest.csv`` takes the folder as it is once it holds
both labels (export ``--verdict confirmed --verdict cleared``, or merge it with the original
dataset). The service never imports the lab: the CSV is written here with ``csv.DictWriter``.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inspection_audit.settings import Settings

MANIFEST_COLUMNS = ("path", "label", "defect_type", "mask_path", "split")
#: verdict name on the command line → (stored verdict, dataset label, defect_type)
VERDICTS = {
    "confirmed": ("confirmed_defect", "defect", "confirmed_miss"),
    "cleared": ("cleared", "ok", ""),
}


class ExportError(ValueError):
    """The export cannot be written (an unknown verdict, a non-empty target folder)."""


@dataclass
class ExportResult:
    """What :func:`export_dataset` wrote."""

    manifest: Path
    rows: list[dict[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[f"{r['label']}/{r['split']}"] = out.get(f"{r['label']}/{r['split']}", 0) + 1
        return out


def _source(row: dict[str, Any], settings: Settings) -> tuple[Path | None, str]:
    """The file to copy for an inspection, or None and why not."""
    from worker.model.images import ImageError, resolve_under_roots

    ref = row.get("image_ref") or ""
    if ref and ref != "<inline>":
        try:
            path = resolve_under_roots(ref, list(settings.image_roots))
        except ImageError as exc:
            why = str(exc)
        else:
            if path.is_file():
                return path, ""
            why = f"image file not found: {path}"
    else:
        why = "sent inline (no image file)"
    kept = ((row.get("details") or {}).get("maps") or {}).get("image")
    if kept:
        from inspection_audit.web.media import confined

        kept_path = confined(Path(kept), [settings.resolved_results_dir])
        if kept_path is not None:
            return kept_path, ""
    return None, why


def _split(ids: list[str], val_fraction: float) -> dict[str, str]:
    order = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    n_val = round(len(order) * val_fraction)
    n_val = min(max(1, n_val), len(order) - 1) if len(order) >= 2 else 0
    return {iid: ("val" if k < n_val else "train") for k, iid in enumerate(order)}


def export_dataset(
    url: str,
    settings: Settings,
    out: Path,
    verdicts: list[str],
    *,
    val_fraction: float = 0.2,
) -> ExportResult:
    """Write the reviewed inspections of ``verdicts`` (``confirmed``, ``cleared``) to ``out``.

    Raises:
        ExportError: an unknown verdict, a ``val_fraction`` outside [0, 1), or an ``out`` that
            exists and is not an empty folder.
    """
    from db.session import session_scope
    from inspection_audit.web.queries import verdict_rows
    from worker.model.naming import safe_name

    unknown = [v for v in verdicts if v not in VERDICTS]
    if unknown or not verdicts:
        raise ExportError(f"verdicts must be among {sorted(VERDICTS)}, got {verdicts}")
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder")
    stored = {VERDICTS[v][0]: v for v in verdicts}
    with session_scope(url) as session:
        found = verdict_rows(session, list(stored))
    result = ExportResult(out / "manifest.csv")
    by_label: dict[str, list[tuple[dict[str, Any], Path]]] = {}
    for row in found:
        src, why = _source(row, settings)
        if src is None:
            result.skipped.append((row["inspection_id"], why))
            continue
        label = VERDICTS[stored[row["verdict"]]][1]
        by_label.setdefault(label, []).append((row, src))
    out.mkdir(parents=True, exist_ok=True)
    for label, items in sorted(by_label.items()):
        splits = _split([r["inspection_id"] for r, _ in items], val_fraction)
        for row, src in items:
            iid = row["inspection_id"]
            rel = f"images/{label}/{safe_name(iid)}{src.suffix.lower() or '.png'}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
            defect_type = VERDICTS[stored[row["verdict"]]][2]
            result.rows.append(
                {
                    "path": rel,
                    "label": label,
                    "defect_type": defect_type,
                    "mask_path": "",
                    "split": splits[iid],
                }
            )
    with result.manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(result.rows)
    return result
