"""Shared pytest configuration. Fixtures live in per-area modules registered as plugins."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.db",
    "tests.support.queue",
    "tests.support.models",
    "tests.support.rabbit",
]


@pytest.fixture(autouse=True)
def _test_decision_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process ``Settings()`` decide by the paper's score, as the tests' worker subprocesses
    do (``tests.support.workers.TEST_DECISION_METHOD``): the product's default
    (``snapshot_mean``) reads snapshots the tiny test checkpoints do not have. A test of the
    default itself removes the variable (``monkeypatch.delenv``)."""
    from tests.support.workers import TEST_DECISION_METHOD

    monkeypatch.setenv("INSPECTION_AUDIT_DECISION_METHOD", TEST_DECISION_METHOD)
