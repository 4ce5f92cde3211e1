"""Acknowledgement per outcome for the micro-batched audit task (docs/design.md §6).

Every message is acknowledged late, by the worker's main process, only after the pool process
has *returned*, i.e. after the rows are committed. ``celery_batches.Batches.flush`` acks every
request when the pool job returns and does nothing when the job fails, so a batch whose
process died (``WorkerLostError``) would sit unacked in the worker, blocking the prefetch
window, until a restart or the visibility timeout. :class:`AuditBatches` replaces ``flush`` so
that

* the job's result says which requests to acknowledge and which to put back on the queue
  (``{"requeue": [request ids]}``): a database that stays down after the retries puts back
  only the messages whose rows were not written;
* a failed job (process lost, terminated, or an unexpected exception) puts all its messages
  back at once (``reject(requeue=True)``), like ``task_reject_on_worker_lost``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.retry import one_line

log = logging.getLogger("inspection_audit.worker")


class AuditBatches(Batches):
    """``celery_batches.Batches`` whose acks follow the outcome of each request."""

    abstract = True

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
            else:  # the job raised (logged by celery_batches): put everything back
                requeue = {r.id for r in late}
            for req in late:
                if req.id in requeue:
                    req.reject(requeue=True)
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
