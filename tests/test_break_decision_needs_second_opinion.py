"""Break: a decision method that reads a second opinion the settings do not turn on
(``INSPECTION_AUDIT_DECISION_METHOD=auditor_mean`` without auditors) starts a worker that scores
every image NULL and never flags anything; only an INFO line says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "method", ["auditor_mean", "ensemble_mean", "views_mean", "snapshot_mean", "anomaly_own"]
)
def test_a_decision_method_without_its_second_opinion_is_refused(
    tmp_path: Path, method: str
) -> None:
    from worker.runtime import RuntimeConfigError, validate

    prod = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    with pytest.raises(RuntimeConfigError, match=method):
        validate(Settings(model=prod, home=tmp_path, decision_method=method))


def test_a_decision_method_with_its_second_opinion_starts(tmp_path: Path) -> None:
    from worker.runtime import validate

    prod = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    aud = tiny_checkpoint(tmp_path, size=(48, 48), seed=2, name="aud.pt")
    s = Settings(model=prod, home=tmp_path, decision_method="auditor_mean", auditor_models=[aud])
    assert validate(s).decision_method == "auditor_mean"


def test_the_default_decision_method_reads_the_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product's default (snapshot_mean, the lowest out-of-fold TN flag rate at 100 % FN
    recall on magnetic tile): refused without snapshots, started with them, and its score is
    the mean of the snapshots' P(defect), recomputed here from each checkpoint."""
    import torch

    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits
    from worker.runtime import RuntimeConfigError, load_runtime, validate

    monkeypatch.delenv("INSPECTION_AUDIT_DECISION_METHOD")
    prod = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    snaps = [
        tiny_checkpoint(tmp_path, size=(64, 64), seed=s, name=f"prod-epoch{s}.pt") for s in (3, 4)
    ]
    assert Settings(model=prod, home=tmp_path).decision_method == "snapshot_mean"
    with pytest.raises(RuntimeConfigError, match="snapshot_mean reads a second opinion"):
        validate(Settings(model=prod, home=tmp_path))
    s = Settings(model=prod, home=tmp_path, snapshot_models=snaps)
    assert validate(s).decision_method == "snapshot_mean"
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(5))
    row = load_runtime(s).suite.measure([image]).rows[0]
    with torch.no_grad():
        by_hand = [
            float(p_defect_from_logits(pm.model(pm_x), pm.defect_index)[0])
            for pm, pm_x in ((load_checkpoint(p), image[None]) for p in snaps)
        ]
    assert row["snapshot_mean"] == pytest.approx(sum(by_hand) / 2, abs=1e-6)
