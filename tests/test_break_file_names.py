"""Break: inspection ids that differ only in ':' vs '_' (both valid ids) share one review-map
folder and one exported image file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from inspection_audit.settings import Settings


def test_review_map_folders_of_distinct_ids_are_distinct(tmp_path: Path) -> None:
    from worker.batch import result_folder

    s = Settings(home=tmp_path)
    a = result_folder(s, "v1", "iou_gap_adv", "LINE3:ST2:000123")
    b = result_folder(s, "v1", "iou_gap_adv", "LINE3_ST2_000123")
    assert a != b


def test_export_keeps_both_images_of_ids_that_differ_in_colon(
    tmp_path: Path, migrated_sqlite_url: str
) -> None:
    from db.repository import record_verdict, upsert_inspection
    from db.rows import InspectionRow
    from db.session import dispose_engines, session_scope
    from inspection_audit.web.export import export_dataset

    root = tmp_path / "img"
    root.mkdir()
    for n, name in enumerate(("a.png", "b.png")):
        Image.fromarray(np.full((20, 20), 40 * (n + 1), np.uint8)).save(root / name)
    with session_scope(migrated_sqlite_url) as session:
        for iid, ref in (("L:1", "a.png"), ("L_1", "b.png")):
            upsert_inspection(
                session, InspectionRow(iid, ref, "l", "s", datetime.now(UTC), "ok", 0.1)
            )
            record_verdict(session, iid, "confirmed_defect", reviewer="ann")
    s = Settings(home=tmp_path / "home", image_roots=[root], database_url=migrated_sqlite_url)
    result = export_dataset(migrated_sqlite_url, s, tmp_path / "out", ["confirmed"])
    dispose_engines(migrated_sqlite_url)
    paths = [r["path"] for r in result.rows]
    assert len(paths) == 2
    assert len(set(paths)) == 2, paths  # one image silently overwrote the other
