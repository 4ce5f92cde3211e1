"""Break: `calibrate` with a view typo, a file that is not a bank, or a manifest without the
split ends in a traceback instead of one line saying what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.models import tiny_checkpoint, tiny_manifest


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--views", "identity,hflp"], "hflp"),
        (["--bank", "MODEL"], "feature extractor"),
        (["--split", "test", "--manifest", "EMPTY"], "no rows"),
    ],
)
def test_calibrate_says_what_is_wrong_in_one_line(
    tmp_path: Path, extra: list[str], words: str
) -> None:
    from inspection_audit.cli import main

    manifest = tiny_manifest(tmp_path, n_ok=6, n_defect=4, size=32)
    ckpt = tiny_checkpoint(tmp_path, size=(32, 32))
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label,split\n")
    extra = [str(ckpt) if e == "MODEL" else str(empty) if e == "EMPTY" else e for e in extra]
    args = ["calibrate", "--manifest", str(manifest), "--model", str(ckpt), "--threads", "1"]
    result = CliRunner().invoke(main, args + extra)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert words in result.output
