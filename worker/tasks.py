"""The audit task: receive -> decode -> score (micro-batched) -> one row per inspection.

Micro-batching (``Settings.batch_size`` = B, ``Settings.batch_wait_ms`` = T) uses
``celery-batches``: the worker's consumer buffers received messages and hands up to B of them
to one pool process at once (or whatever arrived when the T timer fires); that process decodes
them, scores them in one engine call and writes their rows in one transaction.

Acknowledgement (DESIGN §6): every message is acknowledged late, by the worker's main process,
only after the pool process has *returned*, i.e. after the rows are committed.
``celery_batches.Batches.flush`` acks every request when the pool job returns and does nothing
when the job fails, so a batch whose process died (``WorkerLostError``) would sit unacked in
the worker, blocking the prefetch window, until a restart or the visibility timeout.
:class:`AuditBatches` replaces ``flush`` so that

* the job's result says which requests to acknowledge and which to put back on the queue
  (``{"requeue": [request ids]}``): a database that stays down after the retries puts back
  only the messages whose rows were not written;
* a failed job (process lost, terminated, or an unexpected exception) puts all its messages
  back at once (``reject(requeue=True)``), like ``task_reject_on_worker_lost``.

Redelivery cap (DESIGN §7): requeueing has no limit, so every delivery during which an image
is *at risk* (decoded and scored) is counted in ``delivery_attempts`` (:mod:`db.deliveries`), in
its own committed transaction, before the risk: a fresh image (never counted before) when its
batch is received, a redelivered image only when its own turn comes. Redelivered images are
decoded, scored and written one at a time, after the fresh ones are committed. So a count grows
only while its own image was being worked on: an image that kills its process cannot take its
batch-mates down with it more than once, nor drag them to the cap (counting every image of a
lost batch at receipt did: a batch-mate queued behind the killer went down with it at every
redelivery and got the killer's error row). An inspection lost more than
``Settings.max_redeliveries`` times gets an ``error`` row "worker lost N times while scoring
this image; giving up".

One failure never loses the others: a bad message, an unreadable or hostile image and a scoring
failure each become an ``error`` row for that image only; database faults
(``OperationalError``, ``InterfaceError``, invalidated connections) are retried with exponential
backoff (``Settings.task_max_retries``, capped at ``Settings.retry_backoff_max_s``), inside the
pool process, without crashing the worker.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import signals
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from inspection_audit.settings import Settings, get_settings
from worker.celery_app import TASK_NAME, make_celery
from worker.runtime import DatabaseUnavailable, one_line, with_db_retries

if TYPE_CHECKING:
    import torch

    from producer.schema import InspectionMessage
    from worker.runtime import Runtime

log = logging.getLogger("inspection_audit.worker")

settings: Settings = get_settings()
app = make_celery(settings)

#: pid of the process that imported this module first: the worker's main process (the pool
#: processes are forked from it and inherit the value).
MAIN_PID = os.getpid()

Key = tuple[str, str, str]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


# --- acknowledgement ------------------------------------------------------------------------------
class AuditBatches(Batches):
    """``celery_batches.Batches`` whose acks follow the outcome of each request (see module doc)."""

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


# --- one batch ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Item:
    """One received message on its way to its audit row."""

    request_id: str
    payload: Any
    msg: InspectionMessage | None = None
    inspection: dict[str, Any] | None = None  # upsert_inspection kwargs
    key: Key | None = None
    attempts: int = 1
    redelivered: bool = False  # counted before: decoded, counted and scored alone (see run)
    duplicate: bool = False  # its row is already there and done: only count the delivery
    duplicate_of: Item | None = None  # the same key earlier in this batch
    error: str | None = None
    x: torch.Tensor | None = None
    decode_ms: float | None = None
    row: dict[str, Any] | None = None
    written: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _payload_of(req: Any) -> Any:
    args, kwargs = list(req.args or ()), dict(req.kwargs or {})
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"message"}:
        return kwargs["message"]
    return _BadCall(
        f"the audit task takes one message (got {len(args)} args, kwargs {sorted(kwargs)})"
    )


@dataclass
class _BadCall:
    reason: str


def _placeholder_inspection(payload: Any, iid: str) -> dict[str, Any]:
    """Inspection fields for an invalid message: what is valid, placeholders for the rest."""
    p = payload if isinstance(payload, dict) else {}
    pred = p.get("prediction") if p.get("prediction") in ("ok", "defect") else "ok"
    score = p.get("score")
    ok_score = (
        isinstance(score, (int, float))
        and not isinstance(score, bool)
        and math.isfinite(score)
        and 0 <= score <= 1
    )
    captured = datetime.now(UTC)
    if isinstance(p.get("captured_at"), str):
        try:
            parsed = datetime.fromisoformat(p["captured_at"])
            if parsed.tzinfo is not None:
                captured = parsed
        except ValueError:
            pass
    ref = p.get("image_path") if isinstance(p.get("image_path"), str) else "<inline>"

    def short(v: Any) -> str | None:
        return v[:64] if isinstance(v, str) and v.strip() else None

    return {
        "inspection_id": iid,
        "image_ref": ref[:4096],
        "line": short(p.get("line")),
        "station": short(p.get("station")),
        "captured_at": captured,
        "prediction": pred,
        "score": float(score) if ok_score else 0.0,
        "expected_model_version": short(p.get("model_version")),
    }


def _inspection_of(msg: InspectionMessage) -> dict[str, Any]:
    return {
        "inspection_id": msg.inspection_id,
        "image_ref": msg.image_path if msg.image_path is not None else "<inline>",
        "line": msg.line,
        "station": msg.station,
        "captured_at": msg.captured_at,
        "prediction": msg.prediction,
        "score": msg.score,
        "expected_model_version": msg.model_version,
    }


def _limits(s: Settings) -> Any:
    from worker.preprocess import ImageLimits

    return ImageLimits(
        max_bytes=s.max_image_bytes,
        max_pixels=s.max_image_pixels,
        min_side=s.min_image_side,
        max_aspect_ratio=s.max_aspect_ratio,
    )


def _image_bytes(msg: InspectionMessage, s: Settings) -> bytes:
    """The encoded image of a message: inline bytes, or a file confined to the image roots.

    Raises:
        worker.preprocess.ImageError: outside the roots, missing, not a file, empty, too big,
            or not matching ``image_sha256``.
    """
    from worker.preprocess import ImageError, read_image_bytes, resolve_under_roots

    limits = _limits(s)
    if msg.image_b64 is not None:
        data = base64.b64decode(msg.image_b64)
        if len(data) > s.max_inline_bytes:
            raise ImageError(
                f"inline image is {len(data)} bytes, over the limit of {s.max_inline_bytes}"
            )
    else:
        path = resolve_under_roots(msg.image_path or "", list(s.image_roots))
        try:
            data = read_image_bytes(path, limits)
        except OSError as exc:
            raise ImageError(f"cannot read image file {path}: {exc}") from exc
    if msg.image_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != msg.image_sha256:
            raise ImageError(
                f"image bytes do not match image_sha256 (expected {msg.image_sha256[:12]}…, "
                f"got {digest[:12]}…): the file changed after it was enqueued"
            )
    return data


def _base_row(item: Item, rt: Runtime, status: str, host: str) -> dict[str, Any]:
    assert item.key is not None
    return {
        "inspection_id": item.key[0],
        "model_version": item.key[1],
        "method": item.key[2],
        "status": status,
        "worker_host": host,
        "delivery_count": item.attempts,
        "decode_ms": item.decode_ms,
        "params": dict(rt.params),
    }


def _error_row(item: Item, rt: Runtime, host: str, message: str) -> dict[str, Any]:
    row = _base_row(item, rt, "error", host)
    row["error"] = message
    return row


class _Batch:
    """The work of one pool-process call on up to B requests."""

    def __init__(self, requests: list[Any], rt: Runtime, s: Settings) -> None:
        self.rt = rt
        self.s = s
        self.t0 = time.perf_counter()
        self.host = _worker_host()
        self.items = [Item(req.id, _payload_of(req)) for req in requests]
        self.dropped: list[Item] = []

    # 1. parse -------------------------------------------------------------------------------
    def parse(self) -> None:
        from producer.schema import MessageError, parse_message

        keep: list[Item] = []
        seen: dict[Key, Item] = {}
        for it in self.items:
            if isinstance(it.payload, _BadCall):
                log.error("dropping request %s: %s", it.request_id, it.payload.reason)
                self.dropped.append(it)
                continue
            try:
                try:
                    it.msg = parse_message(it.payload, self.s)
                except MessageError:
                    raise
                except Exception as exc:  # a validator bug must not loop the message
                    p = it.payload if isinstance(it.payload, dict) else {}
                    raw = p.get("inspection_id")
                    raise MessageError(
                        [("", f"cannot be parsed: {type(exc).__name__}: {one_line(exc)}")],
                        inspection_id=raw if isinstance(raw, str) else None,
                    ) from exc
                it.inspection = _inspection_of(it.msg)
                iid = it.msg.inspection_id
            except MessageError as exc:
                iid = exc.inspection_id or ""
                if not _ID_RE.match(iid) or len(iid) > 128:
                    log.error(
                        "dropping message %s: %s (no usable inspection_id to record it under)",
                        it.request_id,
                        exc,
                    )
                    self.dropped.append(it)
                    continue
                it.error = str(exc)
                it.inspection = _placeholder_inspection(it.payload, iid)
            it.key = (iid, self.rt.model_version, self.rt.method)
            first = seen.setdefault(it.key, it)
            if first is not it:
                it.duplicate_of = first
            keep.append(it)
        self.items = keep

    # 2. count deliveries (own transaction, committed before any scoring) ------------------
    def count_deliveries(self) -> None:
        """Count fresh images now (their batch is at risk); redelivered ones wait their turn."""
        from db.deliveries import delivery_attempts, done_keys, record_deliveries
        from db.session import session_scope

        keys = [it.key for it in self.items if it.key is not None]
        if not keys:
            return

        def tx() -> tuple[dict[Key, int], dict[Key, int], set[Key]]:
            with session_scope(self.s.resolved_database_url) as session:
                before = {k: delivery_attempts(session, k) for k in set(keys)}
                fresh = [k for k in keys if before[k] == 0]
                counts = record_deliveries(session, fresh, self.host)
                done = done_keys(session, keys)
            return before, counts, done

        before, counts, done = with_db_retries(tx, "counting deliveries", self.s)
        occurrences = Counter(keys)
        for it in self.items:
            assert it.key is not None
            if before[it.key] > 0:
                # Counted when its turn comes (score_alone); until then, the tentative count.
                it.redelivered = True
                it.attempts = before[it.key] + 1
            elif it.duplicate_of is not None:
                it.attempts = counts.get(it.key, 1)
            else:
                # Copies of this message in the same batch are not earlier lost deliveries.
                it.attempts = counts.get(it.key, 1) - (occurrences[it.key] - 1)
            if it.duplicate_of is None and it.key in done:
                it.duplicate = True

    def score_alone(self, it: Item) -> None:
        """A redelivered image: count this delivery (committed), apply the cap, else decode and
        score it on its own, then write its row."""
        from db.deliveries import record_deliveries
        from db.session import session_scope

        assert it.key is not None
        key = it.key

        def tx() -> int:
            with session_scope(self.s.resolved_database_url) as session:
                return record_deliveries(session, [key], self.host)[key]

        it.attempts = with_db_retries(tx, "counting a redelivery", self.s)
        lost = it.attempts - 1
        log.info("%s: delivered %d time(s) before; working on it alone", key[0], lost)
        if lost > self.s.max_redeliveries:
            it.error = f"worker lost {lost} times while scoring this image; giving up"
            log.error("%s: %s", key[0], it.error)
        else:
            self.decode([it])
            self.score_cheap([it])
            if self._is_ready(it):
                self.score_full([it])
        self.write(self.rows_to_write([it]))

    # 3. decode ----------------------------------------------------------------------------
    def decode(self, items: list[Item]) -> None:
        from worker.preprocess import ImageError, preprocess

        pm = self.rt.pm
        limits = _limits(self.s)
        for it in items:
            if it.error is not None or it.duplicate or it.duplicate_of or it.msg is None:
                continue
            t = time.perf_counter()
            try:
                data = _image_bytes(it.msg, self.s)
                it.x = preprocess(data, pm.input_size, pm.in_channels, limits)
            except ImageError as exc:
                it.error = str(exc)
            except Exception as exc:  # a decoder bug must not take the batch down
                it.error = f"cannot decode image: {type(exc).__name__}: {one_line(exc)}"
            it.decode_ms = (time.perf_counter() - t) * 1000.0
            if it.error is not None:
                log.warning("%s: %s", it.key[0] if it.key else "?", it.error)

    # 4. score -------------------------------------------------------------------------------
    @staticmethod
    def _is_ready(it: Item) -> bool:
        return (
            it.x is not None
            and it.error is None
            and not it.duplicate
            and it.duplicate_of is None
            and it.row is None
        )

    def _ready(self) -> list[Item]:
        return [it for it in self.items if self._is_ready(it)]

    def score_cheap(self, items: list[Item]) -> None:
        """Images the line called ``defect``: p_defect only (unless score_defect_predictions)."""
        if self.s.score_defect_predictions:
            return
        group = [
            it for it in items if self._is_ready(it) and it.msg and it.msg.prediction == "defect"
        ]
        if not group:
            return
        import torch

        rt = self.rt
        t = time.perf_counter()
        try:
            x = torch.stack([it.x for it in group]).to(rt.device)
            with torch.no_grad():
                z = rt.pm.model(x).float()
            if z.shape[1] == 1:
                p = torch.sigmoid(z[:, 0])
            else:
                p = torch.softmax(z, dim=1)[:, rt.pm.defect_index]
            probs = p.cpu().tolist()
        except Exception as exc:
            for it in group:
                it.error = f"scoring failed: {type(exc).__name__}: {one_line(exc)}"
            return
        ms = (time.perf_counter() - t) * 1000.0 / len(group)
        for it, pd in zip(group, probs, strict=True):
            row = _base_row(it, rt, "done", self.host)
            row["params"] = {**row["params"], "batch_size": len(group), "cheap": True}
            row.update(p_defect=float(pd), score_ms=ms, suspected_false_negative=False)
            it.row = row

    def score_full(self, group: list[Item]) -> None:
        """One engine call on ``group``; on failure, each image alone (to isolate the bad one)."""
        import torch

        rt = self.rt
        t = time.perf_counter()
        try:
            x = torch.stack([it.x for it in group]).to(rt.device)
            with _fault_injection(group):
                scores = rt.engine.score(x)
            rows = scores.rows()
        except Exception as exc:
            if len(group) > 1:
                log.warning(
                    "engine call on %d images failed (%s: %s); scoring them one by one",
                    len(group),
                    type(exc).__name__,
                    one_line(exc),
                )
                for it in group:
                    self.score_full([it])
                return
            group[0].error = f"scoring failed: {type(exc).__name__}: {one_line(exc)}"
            log.warning("%s: %s", group[0].key[0] if group[0].key else "?", group[0].error)
            return
        elapsed = (time.perf_counter() - t) * 1000.0
        log.info("scored a batch of %d image(s) in %.0f ms", len(group), elapsed)
        for i, (it, r) in enumerate(zip(group, rows, strict=True)):
            decision, tau, flagged, fusion = rt.decide(r)
            # Only an `ok` call can be a false negative (defect calls are scored in full only
            # with score_defect_predictions, for the record).
            flagged = flagged and it.msg is not None and it.msg.prediction == "ok"
            row = _base_row(it, rt, "done", self.host)
            row["params"] = {**row["params"], "batch_size": len(group)}
            row.update({k: _finite(v) for k, v in r.items()})
            row.update(
                fusion_score=_finite(fusion),
                decision_score=_finite(decision),
                tau=tau,
                suspected_false_negative=bool(flagged),
                score_ms=elapsed / len(group),
            )
            if flagged and self.s.save_overlays:
                row["overlay_path"] = self._overlay(it, scores.cam_defect[i], decision, tau)
            it.row = row

    def _overlay(self, it: Item, cam: Any, score: float | None, tau: float | None) -> str | None:
        from worker.overlay import save_overlay

        assert it.key is not None and it.x is not None
        iid, version, method = it.key
        path = result_path(self.s, version, method, iid)
        title = f"{iid}  {method} {score:.3f} >= tau {tau:.3f}" if score is not None else iid
        try:
            return str(save_overlay(it.x, cam, path, title=title))
        except Exception as exc:  # a full disk must not cost the audit row
            log.warning("%s: could not save overlay %s: %s", iid, path, exc)
            return None

    # 5. write -------------------------------------------------------------------------------
    def rows_to_write(self, items: list[Item]) -> list[Item]:
        """Fill in the row of each unwritten item of ``items`` (error row if not scored)."""
        now = time.perf_counter()
        out = []
        for it in items:
            if it.written or it.key is None:
                continue
            if it.duplicate_of is not None:
                if it.duplicate_of.row is None:
                    continue  # written after its original (see run)
                it.row = {**it.duplicate_of.row, "delivery_count": it.attempts}
                out.append(it)
                continue
            if it.duplicate:
                # The row exists and is done: only count the duplicate delivery.
                it.row = {
                    "inspection_id": it.key[0],
                    "model_version": it.key[1],
                    "method": it.key[2],
                    "status": "done",
                    "delivery_count": it.attempts,
                }
            elif it.row is None:
                it.row = _error_row(it, self.rt, self.host, it.error or "not scored (no reason)")
            if it.row.get("total_ms") is None and not it.duplicate:
                it.row["total_ms"] = (now - self.t0) * 1000.0
            out.append(it)
        return out

    def write(self, items: list[Item]) -> None:
        """Write ``items`` in one transaction (with retries); per item if that fails hard."""
        if not items:
            return
        try:
            with_db_retries(lambda: self._write_tx(items), f"writing {len(items)} row(s)", self.s)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if len(items) == 1:
                self._write_last_resort(items[0], exc)
                return
            log.warning(
                "writing %d rows failed (%s: %s); writing them one by one",
                len(items),
                type(exc).__name__,
                one_line(exc),
            )
            for it in items:
                self.write([it])
            return
        for it in items:
            it.written = True

    def _write_tx(self, items: list[Item]) -> None:
        from db.repository import upsert_audit, upsert_inspection
        from db.session import session_scope

        with session_scope(self.s.resolved_database_url) as session:
            for it in items:
                assert it.inspection is not None and it.row is not None
                upsert_inspection(session, **it.inspection)
                upsert_audit(session, it.row)

    def _write_last_resort(self, it: Item, exc: Exception) -> None:
        """A row the database refuses (not a connection fault): record an error row instead."""
        assert it.key is not None
        reason = f"audit row could not be stored: {type(exc).__name__}: {one_line(exc)}"
        log.error("%s: %s", it.key[0], reason)
        if it.row is not None and it.row.get("status") == "error" and it.inspection is not None:
            # Already an error row; the inspection fields themselves may be the problem.
            it.inspection = _placeholder_inspection({}, it.key[0])
        it.row = _error_row(it, self.rt, self.host, reason)
        try:
            with_db_retries(lambda: self._write_tx([it]), "writing an error row", self.s)
            it.written = True
        except DatabaseUnavailable:
            raise
        except Exception as exc2:
            log.error(
                "%s: giving up on this message, its error row failed too: %s", it.key[0], exc2
            )
            it.written = True  # acknowledged: redelivering cannot help

    # the whole thing -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.parse()
            self.count_deliveries()
            # Redelivered images are decoded, counted and scored one at a time, after
            # everything else is committed (score_alone).
            later = [
                it
                for it in self.items
                if it.redelivered
                and it.error is None
                and not it.duplicate
                and it.duplicate_of is None
                and it.msg is not None
            ]
            fresh = [it for it in self.items if all(it is not o for o in later)]
            self.decode(fresh)
            self.score_cheap(fresh)
            ready = [it for it in fresh if self._is_ready(it)]
            for i in range(0, len(ready), max(1, self.s.batch_size)):
                self.score_full(ready[i : i + self.s.batch_size])
            copies = [it for it in self.items if it.duplicate_of is not None]
            self.write(self.rows_to_write([it for it in fresh if it.duplicate_of is None]))
            for it in later:
                self.score_alone(it)
            self.write(self.rows_to_write(copies))
        except DatabaseUnavailable as exc:
            log.error("%s; requeueing the messages whose rows are not written", exc)
        except Exception:
            # Not a per-image problem (those become error rows): e.g. a database that refuses
            # the delivery counter. Put the messages back after a pause, the cap still applies.
            log.exception("batch failed; requeueing the messages whose rows are not written")
            time.sleep(min(5.0, float(self.s.retry_backoff_max_s)))
        requeue = [it.request_id for it in self.items if not it.written]
        dups = [it for it in self.items if it.duplicate or it.duplicate_of is not None]
        fresh = [
            it for it in self.items if it.written and it.row and all(it is not d for d in dups)
        ]
        log.info(
            "batch of %d message(s): %d done, %d error, %d duplicate, %d dropped, %d requeued "
            "in %.0f ms",
            len(self.items) + len(self.dropped),
            sum(1 for it in fresh if it.row and it.row["status"] == "done"),
            sum(1 for it in fresh if it.row and it.row["status"] == "error"),
            len(dups),
            len(self.dropped),
            len(requeue),
            (time.perf_counter() - self.t0) * 1000.0,
        )
        return {"requeue": requeue, "written": len(self.items) - len(requeue)}


# --- FAULT-INJECTION HOOK (tests only) ------------------------------------------------------------
#: Comma-separated inspection ids. When this variable is set (tests/test_faults_loss.py does, in
#: the worker's environment), a pool process that runs the engine on a batch holding one of these
#: ids kills itself with SIGKILL inside the FGSM step, as a native crash or the kernel's OOM killer
#: would. It is not a setting and nothing reads it unless it is set; never set it in production.
FAULT_KILL_IN_ATTACK_ENV = "INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK"


@contextlib.contextmanager
def _fault_injection(group: list[Item]) -> Iterator[None]:
    """Fault injection for tests (see :data:`FAULT_KILL_IN_ATTACK_ENV`); a no-op otherwise."""
    targets = {t for t in os.environ.get(FAULT_KILL_IN_ATTACK_ENV, "").split(",") if t}
    if not targets or not any(it.key is not None and it.key[0] in targets for it in group):
        yield
        return
    import worker.engine.score as score_module

    real_step = score_module.fgsm_step

    def killing_fgsm_step(*args: Any, **kwargs: Any) -> Any:
        log.critical("FAULT INJECTION: pool process %d kills itself during FGSM", os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)  # pragma: no cover - never reached

    score_module.fgsm_step = killing_fgsm_step
    try:
        yield
    finally:
        score_module.fgsm_step = real_step


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _worker_host() -> str:
    from worker.runtime import worker_host

    return worker_host()


def _request_worker_shutdown(reason: str) -> None:
    """Ask the whole worker to stop (warm shutdown): it cannot score anything."""
    log.critical("%s; shutting the worker down", reason)
    target = MAIN_PID if os.getpid() != MAIN_PID else os.getpid()
    with contextlib.suppress(OSError):  # the main process may be gone already
        os.kill(target, signal.SIGTERM)


def process_requests(requests: Iterable[Any], s: Settings | None = None) -> dict[str, Any]:
    """Audit a batch of requests; returns ``{"requeue": [request ids to put back], ...}``."""
    from worker.runtime import RuntimeConfigError, get_runtime

    s = s or settings
    requests = list(requests)
    try:
        rt = get_runtime()
    except RuntimeConfigError as exc:
        _request_worker_shutdown(f"cannot load the model in pool process {os.getpid()}: {exc}")
        return {"requeue": [r.id for r in requests], "written": 0}
    return _Batch(requests, rt, s).run()


@app.task(
    base=AuditBatches,
    name=TASK_NAME,
    bind=True,
    flush_every=max(1, settings.batch_size),
    flush_interval=max(settings.batch_wait_ms, 1) / 1000.0,
    acks_late=True,
    reject_on_worker_lost=True,
)
def audit(self: AuditBatches, requests: list[SimpleRequest]) -> dict[str, Any]:
    """Audit up to ``batch_size`` inspections (celery-batches hands over the list)."""
    return process_requests(requests)


# --- worker signals --------------------------------------------------------------------------------
@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    from worker.runtime import init_process

    init_process(settings)


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    log.info(
        "inspection-audit worker ready: node %s, queue %s, batch %d / %d ms, method %s, "
        "database %s",
        getattr(sender, "hostname", "?"),
        settings.queue,
        settings.batch_size,
        settings.batch_wait_ms,
        settings.decision_method,
        _safe_url(settings.resolved_database_url),
    )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def result_path(s: Settings, model_version: str, method: str, inspection_id: str) -> Path:
    """Where the overlay PNG of a flagged inspection is written."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", inspection_id) + ".png"
    return s.resolved_results_dir / "overlays" / model_version / method / name
