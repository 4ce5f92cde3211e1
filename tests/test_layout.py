"""The import rules of the house (docs/architecture.md), checked on a fresh interpreter.

* the engine imports neither Celery nor the lab (nor the CLI);
* no module of the service (``worker/``, ``producer/``, ``db/``) imports the lab or the CLI;
* the settings, the method registry and the producer import no torch;
* migrations import no application code outside ``db``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, json, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(*modules: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(modules)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return set(json.loads(out.stdout))


def _under(mods: set[str], package: str) -> list[str]:
    return sorted(m for m in mods if m == package or m.startswith(package + "."))


ENGINE = [p.stem for p in (ROOT / "worker" / "engine").glob("*.py") if p.stem != "__init__"]


def test_engine_imports_neither_celery_nor_the_lab() -> None:
    mods = _loaded(*(f"worker.engine.{m}" for m in ENGINE))
    assert _under(mods, "celery") == []
    assert _under(mods, "kombu") == []
    assert _under(mods, "inspection_audit.lab") == []
    assert _under(mods, "inspection_audit.cli") == []


@pytest.mark.parametrize(
    "service",
    [
        "worker.app",
        "worker.batch",
        "worker.acks",
        "worker.runtime",
        "worker.measure",
        "worker.rows",
        "worker.retry",
        "worker.consumer",
        "worker.transport",
        "worker.malformed",
        "producer",
        "producer.api",
        "db.repository",
        "db.deliveries",
        "db.migrate",
        "inspection_audit.web",
        "inspection_audit.web.app",
        "inspection_audit.web.export",
        "inspection_audit.web.metrics",
    ],
)
def test_the_service_never_imports_the_lab_or_the_cli(service: str) -> None:
    mods = _loaded(service)
    assert _under(mods, "inspection_audit.lab") == [], service
    assert _under(mods, "inspection_audit.cli") == [], service


def test_the_review_station_is_torch_free() -> None:
    """The web server answers pages, ingest, metrics and exports without loading torch."""
    mods = _loaded(
        "inspection_audit.web.app",
        "inspection_audit.web.pages",
        "inspection_audit.web.ingest",
        "inspection_audit.web.media",
        "inspection_audit.web.metrics",
        "inspection_audit.web.export",
        "worker.model.naming",
    )
    assert _under(mods, "torch") == []


def test_settings_registry_and_producer_are_torch_free() -> None:
    mods = _loaded("inspection_audit.settings", "worker.engine.methods", "producer", "worker.app")
    assert _under(mods, "torch") == []


def test_migrations_import_no_application_code() -> None:
    versions = ROOT / "db" / "migrations" / "versions"
    for path in versions.glob("*.py"):
        text = path.read_text()
        for banned in (
            "import worker",
            "from worker",
            "import inspection_audit",
            "from inspection_audit",
            "import producer",
            "from producer",
            "from db.",
            "import db.",
        ):
            assert banned not in text, f"{path.name} has {banned!r}"
