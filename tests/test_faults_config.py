"""The Celery/Redis settings the fault guarantees rest on (docs/reliability.md, "Traps")."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspection_audit.settings import Settings


@pytest.mark.parametrize(("vt", "interval"), [(3600, 10), (60, 10), (30, 6), (5, 1), (2, 1)])
def test_visibility_timeout_in_all_three_places_and_swept_in_time(
    tmp_path: Path, vt: int, interval: int
) -> None:
    from worker.celery_app import celery_config

    c = celery_config(
        Settings(broker_url="redis://127.0.0.1:6379/0", home=tmp_path, visibility_timeout_s=vt)
    )
    assert c["broker_transport_options"]["visibility_timeout"] == vt
    assert c["result_backend_transport_options"]["visibility_timeout"] == vt
    assert c["visibility_timeout"] == vt
    # kombu's unacked sweep: every vt/5 s (1..10 s), not its default ~100 s
    assert c["broker_transport_options"]["unacked_restore_interval"] == interval
    assert c["broker_transport_options"]["unacked_restore_throttle"] == 1


def test_delivery_settings(tmp_path: Path) -> None:
    from worker.celery_app import celery_config

    c = celery_config(
        Settings(home=tmp_path, batch_size=8, prefetch_multiplier=1, broker_url="redis://x:1/0")
    )
    assert c["accept_content"] == ["json"] and c["task_serializer"] == "json"
    assert c["result_accept_content"] == ["json"]
    assert c["task_acks_late"] is True and c["task_reject_on_worker_lost"] is True
    assert c["worker_prefetch_multiplier"] == 8  # raised to the micro-batch size
    fs = celery_config(Settings(home=tmp_path))  # the embedded default
    assert fs["broker_url"] == "filesystem://"
    assert "unacked_restore_interval" not in fs["broker_transport_options"]


def test_pool_processes_dispose_inherited_engines() -> None:
    """``worker_process_init`` runs ``worker.runtime.init_process``, which disposes the
    SQLAlchemy engines inherited over fork (``db.session.dispose_engines``)."""
    import inspect

    from celery import signals

    import worker.runtime
    import worker.tasks

    receivers = [r[1]() for r in signals.worker_process_init.receivers]
    assert worker.tasks._on_process_init in receivers
    assert "dispose_engines()" in inspect.getsource(worker.runtime.init_process)
