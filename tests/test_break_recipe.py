"""Break: ``evaluate --auditor-recipe`` junk either crashes with a traceback (``seed=abc``,
``image_size=0x5``) or is accepted and fails only when the auditor is trained, after the
fold's production model (``augment=junk``, ``resize=junk``, ``in_channels=2``)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.support.models import tiny_manifest


@pytest.mark.parametrize(
    "spec",
    [
        "seed=abc",
        "image_size=0x5",
        "augment=junk",
        "resize=junk",
        "optimizer=junk",
        "in_channels=2",
        "epochs=0",
        "class_weighting=maybe",
    ],
)
def test_a_bad_recipe_is_a_usage_error(spec: str) -> None:
    from inspection_audit.cli.lab import _parse_recipe

    with pytest.raises(click.BadParameter):
        _parse_recipe(spec)


def test_evaluate_refuses_a_bad_recipe_in_one_line(tmp_path: Path) -> None:
    from inspection_audit.cli import main

    manifest = tiny_manifest(tmp_path, n_ok=6, n_defect=4, size=32)
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--folds",
            "2",
            "--auditor-recipe",
            "seed=abc",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "seed" in result.output and "Traceback" not in result.output
