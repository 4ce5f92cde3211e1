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
