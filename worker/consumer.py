"""The worker's Celery consumer: no message stops it (docs/design.md §6, docs/reliability.md).

Celery's consumer hands each message to the task's strategy (celery-batches' for the audit
task) in the worker's main process. A message of the wrong shape raised there, and an
exception there stops the worker ("Unrecoverable error"); Celery's own callbacks for unknown or
undecodable messages log and drop them. :class:`AuditConsumer` checks every message first
(:func:`worker.malformed.check_task_message`) and hands a malformed one to a pool process,
which records it (:func:`worker.malformed.record_malformed`: its inspection's error row, or a
dead letter). The message is acknowledged after that commit, and put back if the database
stayed down. Anything the strategy still raises is caught the same way, unless the message
was already handed over to a batch (its batch then acknowledges it). One log line each.

:func:`consumer_class` binds the settings; :func:`worker.app.worker_config` installs it as
``worker_consumer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

from celery.worker.consumer import Consumer
from vine import promise as vine_promise

from inspection_audit.settings import Settings
from worker.app import TASK_NAME
from worker.malformed import Malformed, check_task_message, clip, record_malformed

log = logging.getLogger("inspection_audit.worker")


def consumer_class(settings: Settings) -> type[AuditConsumer]:
    """:class:`AuditConsumer` bound to ``settings`` (what its pool jobs are given)."""
    return type("AuditConsumer", (AuditConsumer,), {"settings": settings})


class AuditConsumer(Consumer):
    """Celery's consumer, taking every malformed message off the queue and recording it."""

    settings: ClassVar[Settings | None] = None

    class Blueprint(Consumer.Blueprint):
        """Celery's consumer steps without native delayed delivery: on RabbitMQ quorum queues
        it declares ~30 queues and exchanges per virtual host for ETA tasks, and the audit
        task runs nothing delayed (a message with an ``eta`` is malformed here)."""

        default_steps = [s for s in Consumer.Blueprint.default_steps if "delayed_delivery" not in s]

    # --- the task message handler --------------------------------------------------------------
    def create_task_handler(self, promise: Any = vine_promise) -> Callable[[Any], None]:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> None:
            try:
                bad = check_task_message(message, TASK_NAME, self._queue_name())
            except Exception as exc:  # pragma: no cover - check_task_message never raises
                bad = Malformed("worker", f"the check itself failed: {type(exc).__name__}: {exc}")
            if bad is not None:
                self.take_off(message, bad)
                return
            before = self._handed_over()
            try:
                handle(message)
            except Exception as exc:
                if self._handed_over() == before and not _acknowledged(message):
                    self.take_off(
                        message,
                        Malformed(
                            "worker",
                            f"the worker could not take it: {type(exc).__name__}: {exc}",
                            raw=_body(message),
                            queue=self._queue_name(),
                            headers=getattr(message, "headers", None),
                        ),
                    )
                else:  # its batch owns it now and acknowledges it
                    log.exception("error after a message was handed to its batch")

        return on_task_received

    # Celery's own callbacks for messages its handler cannot use: record them as well.
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.take_off(
            message,
            check_task_message(message, TASK_NAME, self._queue_name())
            or Malformed(
                "envelope",
                f"the message cannot be decoded: {type(exc).__name__}: {exc}",
                raw=_body(message),
                queue=self._queue_name(),
                headers=getattr(message, "headers", None),
            ),
        )

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.on_decode_error(message, ValueError("not a Celery task message"))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.on_decode_error(message, exc)

    # --- taking a message off the queue --------------------------------------------------------
    def take_off(self, message: Any, bad: Malformed) -> None:
        """Log ``bad`` (one line), have a pool process record it, then acknowledge the message
        (or put it back when it could not be recorded). Never raises."""
        try:
            ident = bad.task_id or getattr(message, "delivery_tag", None) or "?"
            log.error(
                "%s %s taken off queue %s: %s; %s",
                "dead-lettered message" if bad.stage == "broker" else "malformed message",
                clip(ident, 80),
                bad.queue or "?",
                bad.reason,
                bad.outcome(),
            )
            settings = self.settings or Settings()

            def on_return(recorded: Any) -> None:
                self._settle(message, requeue=recorded is not True)

            def on_error(exc_info: Any) -> None:
                exc = getattr(exc_info, "exception", exc_info)
                log.error("recording a malformed message failed (%s); putting it back", exc)
                self._settle(message, requeue=True)

            pool = getattr(self, "pool", None)
            if pool is None:
                on_return(record_malformed(bad, settings))
                return
            pool.apply_async(
                record_malformed, (bad, settings), callback=on_return, error_callback=on_error
            )
        except Exception:
            log.exception("could not record a malformed message; acknowledging it anyway")
            self._settle(message, requeue=False)

    def _settle(self, message: Any, *, requeue: bool) -> None:
        """Acknowledge ``message`` (or reject it back onto the queue), soon, on the event loop."""
        try:
            if requeue:
                self.call_soon(message.reject_log_error, log, self.connection_errors, requeue=True)
            else:
                self.call_soon(message.ack_log_error, log, self.connection_errors)
        except Exception:
            log.exception("could not settle a malformed message")

    def _queue_name(self) -> str | None:
        return self.settings.queue if self.settings is not None else None

    def _handed_over(self) -> int:
        task = self.app.tasks.get(TASK_NAME)
        return int(getattr(task, "handed_over", 0))


def _acknowledged(message: Any) -> bool:
    return bool(getattr(message, "acknowledged", False))


def _body(message: Any) -> bytes:
    from worker.malformed import as_bytes

    try:
        return as_bytes(getattr(message, "body", b""))
    except Exception:  # pragma: no cover - a body that cannot even be read
        return b""
