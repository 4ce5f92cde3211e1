"""Break: a calibration made with one anomaly bank is accepted with another bank of the same
kind (for the same model), so τ of anomaly_own / rules set on bank A decides on bank B."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint
from tests.support.workers import make_images

pytestmark = pytest.mark.usefixtures("single_thread")


def _bank(pm, images, layers, out: Path) -> Path:
    from inspection_audit.lab.banks import build_bank
    from worker.model.preprocess import load_image

    ok = [load_image(p, pm.in_channels) for p in images]
    bank = build_bank("own", pm, ok, layers, coreset_size=50, show_progress=False)
    return bank.save(out)


def test_calibration_with_bank_a_is_refused_with_bank_b(tmp_path: Path) -> None:
    from worker.engine import EngineConfig, ReliabilityEngine
    from worker.engine.calibration import Calibration, sidecar_path
    from worker.measure import load_suite
    from worker.model.checkpoint import load_checkpoint
    from worker.runtime import RuntimeConfigError, validate

    ckpt = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    pm = load_checkpoint(ckpt)
    images = make_images(tmp_path / "img", 3, seed=1)
    a = _bank(pm, images, ("backbone.layer2", "backbone.layer3"), tmp_path / "a.pt")
    b = _bank(pm, images, ("backbone.layer1", "backbone.layer2"), tmp_path / "b.pt")
    engine = ReliabilityEngine.from_production_model(pm, EngineConfig())
    suite_a = load_suite(pm, engine, anomaly_banks=[a])
    suite_b = load_suite(pm, engine, anomaly_banks=[b])
    # two different banks (other layers, other distance scale) must not look the same
    cal = Calibration(
        pm.model_version,
        "val",
        1.0,
        {},
        methods={"anomaly_own": {"tau": 1.0}},
        second_opinions=suite_a.describe(),
    )
    cal.save(sidecar_path(ckpt))
    with pytest.raises(RuntimeConfigError, match="second opinions"):
        validate(
            Settings(model=ckpt, home=tmp_path, anomaly_banks=[b], decision_method="anomaly_own")
        )
    assert suite_a.describe() != suite_b.describe()
