"""The method registry: a scoring method declared in one place reaches every consumer.

A toy method is registered *in this test only* (``REGISTRY.temporarily``) and, with no other
edit anywhere, is then: accepted as a decision method by the settings and the CLI's choice,
calibrated (τ on hand-made rows), evaluated (AUROC by hand), computed and stored by the
worker's batch pipeline (``audits.scores``), and queryable by name through ``audit_scores``.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint
from tests.support.workers import make_images
from worker.engine.calibration import calibrate
from worker.engine.methods import REGISTRY, ScoringMethod, UnknownMethodError


def _toy(m: Any, _state: Any) -> float | None:
    """2·p_defect − iou_gap: a made-up score, easy to compute by hand."""
    if m.get("p_defect") is None or m.get("iou_gap") is None:
        return None
    return 2.0 * float(m["p_defect"]) - float(m["iou_gap"])


TOY = ScoringMethod("toy_score", _toy, "2·p_defect − iou_gap (a test's toy method)")


def _row(p: float, gap: float) -> dict[str, float]:
    return {"p_defect": p, "iou_gap": gap, "energy": -1.0}


def test_builtin_methods_are_declared_once() -> None:
    names = REGISTRY.names()
    assert names[:7] == [
        "msp",
        "energy",
        "iou_gap",
        "iou_gap_adv",
        "iou_defect",
        "iou_defect_adv",
        "fusion",
    ]
    assert len(set(names)) == len(names)
    assert REGISTRY.get("iou_gap_adv").needs_adversarial
    assert REGISTRY.get("fusion").fitted and not REGISTRY.get("msp").fitted
    with pytest.raises(UnknownMethodError, match="choose from msp"):
        REGISTRY.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        REGISTRY.register(ScoringMethod("msp", _toy, "dup"))


def test_orientation_is_applied_by_the_registry() -> None:
    low = ScoringMethod(
        "toy_low", lambda m, _s: m["x"], "x, lower = worse", higher_is_suspicious=False
    )
    assert low.score({"x": 0.25}) == -0.25
    assert low.score({"x": float("nan")}) is None and low.score({}) is None


def test_toy_method_is_a_setting_and_a_cli_choice() -> None:
    from inspection_audit.cli.lab import MethodName

    with pytest.raises(ValueError, match="unknown decision method 'toy_score'"):
        Settings(decision_method="toy_score")
    with REGISTRY.temporarily(TOY):
        assert Settings(decision_method="toy_score").decision_method == "toy_score"
        assert MethodName().convert("toy_score", None, None) == "toy_score"


def test_toy_method_is_calibrated_and_evaluated() -> None:
    from inspection_audit.lab.stats import compute_metrics

    # predicted ok (p < 0.5): FN rows 0, 1; TN rows 2, 3, 4; row 5 predicted defect
    rows = [_row(0.40, 0.20), _row(0.30, -0.10), _row(0.10, 0.00), _row(0.35, 0.40)]
    rows += [_row(0.05, -0.30), _row(0.90, 0.90)]
    labels = [1, 1, 0, 0, 0, 1]
    with REGISTRY.temporarily(TOY):
        cal = calibrate(rows, labels, model_version="m", engine={})
        metrics = compute_metrics(rows, np.asarray(labels), [cal], n_boot=20)
    # toy scores: FN 0.60, 0.70; TN 0.20, 0.30, 0.40 -> τ at full recall = 0.60, flags no TN
    assert cal.tau("toy_score") == pytest.approx(0.60)
    assert cal.methods["toy_score"]["tn_flag_rate"] == 0.0
    m = metrics["methods"]["toy_score"]
    assert m["auroc"] == pytest.approx(1.0)  # every FN above every TN
    assert m["tn_flag_rate_at_full_recall"] == 0.0
    assert "toy_score" not in REGISTRY  # the test's method is gone again


@pytest.mark.parametrize("fixture", ["migrated_sqlite_url", "migrated_pg_url"])
def test_toy_method_is_computed_stored_and_queryable(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The worker's batch pipeline (in this process) writes the toy score of each image into
    ``audits.scores``; it decides with it when it is the decision method; SQL reads it back."""
    import torch

    from db.models import audit_scores_view
    from db.session import session_scope
    from worker.batch import Batch
    from worker.engine.options import EngineConfig
    from worker.engine.score import ReliabilityEngine
    from worker.model.checkpoint import load_checkpoint
    from worker.model.preprocess import preprocess
    from worker.runtime import load_runtime

    url = request.getfixturevalue(fixture)
    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(40, 40))
    pm = load_checkpoint(ckpt)
    engine = ReliabilityEngine.from_production_model(pm, EngineConfig(attack="none"))
    expected = {}
    for i, p in enumerate(images):
        with torch.no_grad():
            row = engine.score(preprocess(p, pm.input_size, pm.in_channels)[None]).rows()[0]
        expected[f"toy-{i}"] = 2.0 * row["p_defect"] - row["iou_gap"]

    settings = Settings(
        model=ckpt,
        home=tmp_path / "home",
        database_url=url,
        image_roots=[tmp_path / "img"],
        attack="none",
        decision_method="msp",  # validated before the toy exists; switched below
        save_overlays=False,
    )
    requests = [
        SimpleNamespace(
            id=f"req-{i}",
            args=[
                {
                    "inspection_id": f"toy-{i}",
                    "image_b64": base64.b64encode(p.read_bytes()).decode(),
                    "prediction": "ok",
                    "score": 0.1,
                    "line": "L1",
                    "station": "S1",
                    "captured_at": datetime.now(UTC).isoformat(),
                }
            ],
            kwargs={},
        )
        for i, p in enumerate(images)
    ]
    with REGISTRY.temporarily(TOY):
        s = Settings(**{**settings.model_dump(), "decision_method": "toy_score"})
        rt = load_runtime(s)
        result = Batch(requests, rt, s).run()
    assert result["requeue"] == []
    v = audit_scores_view.c
    with session_scope(url) as session:
        got = dict(
            session.execute(
                sa.select(v.inspection_id, v.value).where(v.method == "toy_score")
            ).all()
        )
        decided = dict(
            session.execute(
                sa.text(
                    "SELECT inspection_id, decision_score FROM audits WHERE method = 'toy_score'"
                )
            ).all()
        )
    assert got == pytest.approx(expected, abs=1e-6)
    assert decided == pytest.approx(expected, abs=1e-6)  # decided by the toy method
