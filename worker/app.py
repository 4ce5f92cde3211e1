"""The Celery application, built from one :class:`Settings` by :func:`create_app`.

No torch import here: the producer builds a sending-only app from :func:`celery_config` too.

Settings that the guarantees of docs/design.md §6 rest on:

* JSON only (``accept_content=["json"]``): a pickle message is refused, never deserialised.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  row is written; a worker killed mid-task leaves the message to be redelivered.
* The Redis visibility timeout counts from *delivery* (prefetched messages too) and is read in
  three places: ``broker_transport_options``, ``result_backend_transport_options`` and
  ``visibility_timeout``. All three are set from one setting.
* ``worker_prefetch_multiplier`` is kept small; micro-batching raises it to the batch size.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from inspection_audit.settings import Settings

TASK_NAME = "inspection_audit.audit"

log = logging.getLogger("inspection_audit.worker")


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


def is_redis(url: str) -> bool:
    """A Redis broker URL (``redis://``, ``rediss://``, ``redis+socket://``)."""
    return url.startswith(("redis://", "rediss://", "redis+socket://"))


def is_amqp(url: str) -> bool:
    """A RabbitMQ broker URL (``amqp://``, ``amqps://``, ``pyamqp://``)."""
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def dead_letter_queue(settings: Settings) -> str:
    """The queue RabbitMQ dead-letters the audit queue's messages to (``<queue>.dead-letter``)."""
    return f"{settings.queue}.dead-letter"


def consumed_queues(settings: Settings) -> list[str]:
    """The queues a worker consumes: the audit queue, and on RabbitMQ its dead-letter queue
    too (what the broker dead-letters is recorded by a worker, like any malformed message)."""
    if is_amqp(settings.resolved_broker_url):
        return [settings.queue, dead_letter_queue(settings)]
    return [settings.queue]


def rabbitmq_queues(settings: Settings) -> list[Any]:
    """The audit queue and its dead-letter queue as RabbitMQ quorum queues (kombu ``Queue``).

    The audit queue: ``x-queue-type: quorum`` (replicated, durable, at-least-once),
    ``x-delivery-limit`` = ``settings.rabbitmq_delivery_limit`` (a message returned to the
    queue more often is dead-lettered: the broker's own answer to a message that keeps killing
    whoever holds it), dead-lettered through the default exchange to
    :func:`dead_letter_queue`, itself a quorum queue that the workers consume.
    """
    from kombu import Exchange, Queue

    dlq = dead_letter_queue(settings)
    return [
        Queue(
            settings.queue,
            Exchange(settings.queue, type="direct", durable=True),
            routing_key=settings.queue,
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": settings.rabbitmq_delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            },
        ),
        Queue(
            dlq,
            Exchange(dlq, type="direct", durable=True),
            routing_key=dlq,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        ),
    ]


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict, easy to test)."""
    url = settings.resolved_broker_url
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if is_redis(url):
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
    queues: dict[str, Any] = {}
    if is_amqp(url):
        queues["task_queues"] = rabbitmq_queues(settings)
    return {
        **queues,
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


def create_app(settings: Settings, *, worker: bool = True) -> Celery:
    """A Celery app configured from ``settings`` (never from the environment at import time).

    With ``worker=True`` the audit task is registered — micro-batched by
    ``settings.batch_size`` (B) and ``settings.batch_wait_ms`` (T) with celery-batches, acked
    per outcome (:class:`worker.acks.AuditBatches`), run by :func:`worker.batch.process_requests`
    — and the worker's signals are connected (pool-process start-up, the ready line). That app
    is what ``inspection-audit worker`` starts. With ``worker=False`` the app only sends (the
    producer).
    """
    app = Celery("inspection_audit", set_as_current=False)
    app.conf.update(celery_config(settings))
    if worker:
        _register_worker(app, settings)
    return app


def worker_config(settings: Settings) -> dict[str, Any]:
    """What a worker adds to :func:`celery_config`: its consumer
    (:class:`worker.consumer.AuditConsumer`, which takes malformed messages off the queue and
    records them) and, for Redis and the filesystem broker, kombu's transport reading entries
    safely (:mod:`worker.transport`)."""
    from worker.consumer import consumer_class

    extra: dict[str, Any] = {"worker_consumer": consumer_class(settings)}
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        extra["broker_transport"] = "worker.transport:Transport"
    elif url.startswith("filesystem://"):
        extra["broker_transport"] = "worker.transport:FilesystemTransport"
    return extra


def _register_worker(app: Celery, settings: Settings) -> None:
    import os

    from celery import signals

    import worker.batch as batch
    from worker.acks import AuditBatches

    batch.MAIN_PID = os.getpid()  # the pool processes, forked later, inherit it
    app.conf.update(worker_config(settings))

    @app.task(
        base=AuditBatches,
        name=TASK_NAME,
        bind=True,
        flush_every=max(1, settings.batch_size),
        flush_interval=max(settings.batch_wait_ms, 1) / 1000.0,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def audit(self: AuditBatches, requests: list[Any]) -> dict[str, Any]:
        """Audit up to ``batch_size`` inspections (celery-batches hands over the list)."""
        return batch.process_requests(requests, settings)

    def on_process_init(**_: Any) -> None:
        from worker.runtime import init_process

        init_process(settings)

    def on_ready(sender: Any = None, **_: Any) -> None:
        from sqlalchemy.engine import make_url

        log.info(
            "inspection-audit worker ready: node %s, queue %s, batch %d / %d ms, method %s, "
            "database %s",
            getattr(sender, "hostname", "?"),
            settings.queue,
            settings.batch_size,
            settings.batch_wait_ms,
            settings.decision_method,
            make_url(settings.resolved_database_url).render_as_string(hide_password=True),
        )

    # One receiver each per process (dispatch_uid): the last app built is the one that runs.
    signals.worker_process_init.connect(
        on_process_init, weak=False, dispatch_uid="inspection_audit.process_init"
    )
    signals.worker_ready.connect(on_ready, weak=False, dispatch_uid="inspection_audit.ready")
