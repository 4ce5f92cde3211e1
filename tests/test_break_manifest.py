"""Break: a manifest row with missing fields raises AttributeError (not ManifestError naming
the row), and a manifest saved with a UTF-8 byte-order mark (Excel's "CSV UTF-8") is refused
for lacking a ``path`` column it has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEADER = "path,label,defect_type,mask_path,split\n"


def _image(folder: Path) -> None:
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "a.png")


def test_a_short_row_is_a_manifest_error_naming_the_row(tmp_path: Path) -> None:
    from inspection_audit.lab.dataset import ManifestError, read_manifest

    _image(tmp_path)
    m = tmp_path / "manifest.csv"
    m.write_text(HEADER + "a.png,ok,,,train\na.png,ok\n")
    with pytest.raises(ManifestError, match=":3"):
        read_manifest(m)


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    from inspection_audit.lab.dataset import read_manifest

    _image(tmp_path)
    m = tmp_path / "manifest.csv"
    m.write_text(HEADER + "a.png,ok,,,train\n", encoding="utf-8-sig")
    assert [r.rel_path for r in read_manifest(m)] == ["a.png"]


def test_enqueue_reads_a_manifest_with_a_byte_order_mark(tmp_path: Path) -> None:
    from inspection_audit.cli.enqueue import _read_manifest

    _image(tmp_path)
    m = tmp_path / "manifest.csv"
    m.write_text(HEADER + "a.png,ok,,,train\n", encoding="utf-8-sig")
    assert [rel for _p, rel in _read_manifest(m, "train")] == ["a.png"]
