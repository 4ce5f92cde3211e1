"""The Celery application (no torch import here: the producer imports this module too).

Settings that the guarantees of DESIGN.md §6 rest on:

* JSON only (``accept_content=["json"]``): a pickle message is refused, never deserialised.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  row is written; a worker killed mid-task leaves the message to be redelivered.
* The Redis visibility timeout counts from *delivery* (prefetched messages too) and is read in
  three places: ``broker_transport_options``, ``result_backend_transport_options`` and
  ``visibility_timeout``. All three are set from one setting.
* ``worker_prefetch_multiplier`` is kept small; micro-batching raises it to the batch size.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from inspection_audit.settings import Settings, get_settings

TASK_NAME = "inspection_audit.audit"


def restore_options(visibility_timeout_s: int) -> dict[str, Any]:
    """How often a Redis consumer looks for messages whose visibility timeout has passed.

    kombu (5.7) sweeps kombu's ``unacked`` index once when a worker starts and then on a timer
    every ``unacked_restore_interval`` (10 s) x ``unacked_restore_throttle`` (10) = ~100 s. The
    messages of a worker that was killed become visible again only at such a sweep, so with
    the defaults a short visibility timeout did not help: they came back ~100 s late. Sweep
    every ``visibility_timeout / 5`` s (1 to 10 s, one ``ZRANGE`` each), unthrottled.
    """
    interval = max(1, min(10, visibility_timeout_s // 5))
    return {"unacked_restore_interval": interval, "unacked_restore_throttle": 1}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict, easy to test)."""
    url = settings.resolved_broker_url
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        transport.update(restore_options(settings.visibility_timeout_s))
    if url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),
            store_processed=False,
        )
    return {
        "broker_url": url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "worker_prefetch_multiplier": max(settings.prefetch_multiplier, settings.batch_size),
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "visibility_timeout": settings.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the environment)."""
    settings = settings or get_settings()
    app = Celery("inspection_audit", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    return app
