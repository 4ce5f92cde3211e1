"""Acknowledgement per outcome for the micro-batched audit task (docs/design.md §6).

Every message is acknowledged late, by the worker's main process, only after the pool process
has *returned*, i.e. after the rows are committed. ``celery_batches.Batches.flush`` acks every
request when the pool job returns and does nothing when the job fails, so a batch whose
process died (``WorkerLostError``) would sit unacked in the worker, blocking the prefetch
window, until a restart or the visibility timeout. :class:`AuditBatches` replaces ``flush`` so
that

* the job's result says which requests to acknowledge and which to put back on the queue
  (``{"requeue": [request ids], "finished": {request id: attempt}}``): a database that stays
  down after the retries puts back only the messages whose rows were not written;
* the worker's *own* requeue (its process came back) publishes a copy of the message and
  acknowledges the original (:func:`requeue_copy`). The copy carries
  :data:`FINISHED_ATTEMPT_HEADER` when its attempt could not be marked finished in the
  database (it was down), so the next attempt is not charged with a loss (:mod:`db.deliveries`),
  and RabbitMQ's delivery count does not grow (it counts returns, which are deaths here);
* a failed job (process lost, terminated, or an unexpected exception) puts all its messages
  back at once (``reject(requeue=True)``), like ``task_reject_on_worker_lost``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from queue import Queue
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.retry import one_line

log = logging.getLogger("inspection_audit.worker")

#: Header of a message the worker put back itself: the number of the attempt that ended
#: without its process dying (see :mod:`db.deliveries`).
FINISHED_ATTEMPT_HEADER = "x-inspection-audit-finished-attempt"
#: Headers the broker sets on a delivery (RabbitMQ's counts and deaths): not carried to a copy.
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death", "x-last-death")


class _CountingQueue(Queue[Any]):
    """celery-batches' buffer, counting what was put in (the consumer reads the count)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.puts += 1


def requeue_copy(req: Any, finished_attempt: int | None) -> None:
    """Put ``req``'s message back on its queue as a new copy, then acknowledge the original.

    The copy has the same body, task id and properties, and :data:`FINISHED_ATTEMPT_HEADER`
    set to ``finished_attempt``; when that is None the message's own header is kept (no new
    attempt was left open, so what it said still holds). When publishing fails the original is
    rejected back onto the queue instead.
    """
    message = req.message
    try:
        headers = {
            k: v
            for k, v in (message.headers or {}).items()
            if k != "redelivered" and not k.startswith(_BROKER_HEADERS)
        }
        if finished_attempt is not None:
            headers[FINISHED_ATTEMPT_HEADER] = int(finished_attempt)
        info = message.delivery_info or {}
        props = message.properties or {}
        with req.task.app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=info.get("exchange") or "",
                routing_key=info.get("routing_key") or "",
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=props.get("correlation_id"),
                reply_to=props.get("reply_to"),
                delivery_mode=2,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
    except Exception as exc:
        log.error(
            "could not publish a copy of message %s (%s: %s); rejecting it back instead",
            req.id,
            type(exc).__name__,
            one_line(exc),
        )
        req.reject(requeue=True)
        return
    req.acknowledge()


class AuditBatches(Batches):
    """``celery_batches.Batches`` whose acks follow the outcome of each request."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _CountingQueue()

    @property
    def handed_over(self) -> int:
        """How many requests the strategy has put in the micro-batch buffer so far."""
        return self._buffer.puts if isinstance(self._buffer, _CountingQueue) else 0

    def flush(self, requests: Collection[Any]) -> Any:
        requests = list(requests)
        early = [r for r in requests if not r.task.acks_late]
        late = [r for r in requests if r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in early:
                req.acknowledge()

        def on_return(result: Any) -> None:
            if isinstance(result, dict) and isinstance(result.get("requeue"), list):
                requeue = set(result["requeue"])
                finished = result.get("finished")
                finished = finished if isinstance(finished, dict) else {}
            else:  # the job raised (logged by celery_batches): put everything back
                for req in late:
                    req.reject(requeue=True)
                log.warning("batch of %d failed; requeued its messages", len(late))
                return
            for req in late:
                if req.id in requeue:
                    requeue_copy(req, finished.get(req.id))
                else:
                    req.acknowledge()
            if requeue:
                log.warning("requeued %d of %d message(s)", len(requeue), len(late))

        def on_error(exc_info: Any) -> None:
            exc = getattr(exc_info, "exception", exc_info)
            exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback wrapper
            log.error(
                "batch of %d lost (%s: %s); requeueing its messages",
                len(late),
                type(exc).__name__,
                one_line(exc),
            )
            for req in late:
                req.reject(requeue=True)

        return self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            accept_callback=on_accepted,
            callback=on_return,
            error_callback=on_error,
        )
