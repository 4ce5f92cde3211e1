"""The Celery/Redis settings the fault guarantees rest on (docs/reliability.md, "Traps")."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspection_audit.settings import Settings


@pytest.mark.parametrize(("vt", "interval"), [(3600, 10), (60, 10), (30, 6), (5, 1), (2, 1)])
def test_visibility_timeout_in_all_three_places_and_swept_in_time(
    tmp_path: Path, vt: int, interval: int
) -> None:
    from worker.app import celery_config

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
    from worker.app import celery_config

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


def test_pool_processes_dispose_inherited_engines(tmp_path: Path) -> None:
    """A pool process forked from a parent that holds a database engine starts without it.

    The app built by ``create_app`` wires ``worker_process_init`` to ``init_process``; firing
    that signal in a forked child (as billiard does) drops the inherited engine there, pins the
    torch threads, and leaves the parent's engine and its pooled connection untouched.
    """
    import os

    from celery import signals

    import db.session
    from db.session import make_engine
    from worker.app import create_app

    url = f"sqlite:///{(tmp_path / 'a.sqlite3').as_posix()}"
    settings = Settings(home=tmp_path, database_url=url, torch_threads=1)
    parent_engine = make_engine(url)
    with parent_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    create_app(settings)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "pool process"
        try:
            os.close(read)
            inherited = url in db.session._engines
            signals.worker_process_init.send(sender=None)
            import torch

            ok = inherited and url not in db.session._engines and torch.get_num_threads() == 1
            os.write(write, b"ok" if ok else b"fail")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert db.session._engines[url][1] is parent_engine  # the parent keeps its engine
    with parent_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    db.session.dispose_engines(url)
