"""The batch pipeline: receive -> decode -> score (micro-batched) -> one row per inspection.

Micro-batching (``Settings.batch_size`` = B, ``Settings.batch_wait_ms`` = T) uses
``celery-batches``: the worker's consumer buffers received messages and hands up to B of them
to one pool process at once (or whatever arrived when the T timer fires); that process decodes
them, scores them in one engine call and writes their rows in one transaction.

Acknowledgement per outcome is :mod:`worker.acks`'s (the pool process returns which
requests to put back).

Redelivery cap (docs/design.md §7): requeueing has no limit, so every *attempt* on an image, the
risky part (decoding and scoring), is recorded in ``delivery_attempts`` (:mod:`db.deliveries`):
started in its own committed transaction before the risk, finished in another right after it.
An image whose previous attempt is still open when it comes back was being worked on when its
process died: it is a *suspect*, decoded, scored and written alone, after the others are
committed, and only then is that lost attempt charged to it. A delivery whose previous attempt
finished (a requeue after a database outage, a dropped broker connection, a warm shutdown) is
not charged: it is scored with its batch. So an image that kills its process cannot take its
batch-mates down with it more than once, nor drag them to the cap (counting every image of a
lost batch at receipt did: a batch-mate queued behind the killer went down with it at every
redelivery and got the killer's error row), and healthy images are not condemned by requeues
that were not deaths. An inspection lost more than ``Settings.max_redeliveries`` times gets an
``error`` row "worker lost N times while scoring this image; giving up".

One failure never loses the others: a bad message, an unreadable or hostile image and a scoring
failure each become an ``error`` row for that image only; database faults
(``OperationalError``, ``InterfaceError``, invalidated connections) are retried with exponential
backoff (``Settings.task_max_retries``, capped at ``Settings.retry_backoff_max_s``), inside the
pool process, without crashing the worker.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.rows import AuditRow, InspectionRow
from inspection_audit.settings import Settings
from worker.acks import FINISHED_ATTEMPT_HEADER
from worker.retry import DatabaseUnavailable, one_line, with_db_retries
from worker.rows import (
    Key,
    cheap_row,
    duplicate_row,
    error_row,
    inspection_of,
    placeholder_inspection,
    scored_row,
)

if TYPE_CHECKING:
    import torch

    from producer.schema import InspectionMessage
    from worker.model.images import ImageLimits
    from worker.runtime import Runtime

log = logging.getLogger("inspection_audit.worker")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


@dataclass(eq=False)
class Item:
    """One received message on its way to its audit row."""

    request_id: str
    payload: Any
    msg: InspectionMessage | None = None
    inspection: InspectionRow | None = None
    key: Key | None = None
    attempts: int = 1  # the delivery_count its row gets: this attempt's number
    attempt: int | None = None  # the attempt started on it (db.deliveries), if any
    closed: bool = False  # that attempt is recorded finished
    finished_before: int | None = None  # the message says this earlier attempt finished
    suspect: bool = False  # its previous attempt never finished: scored alone (see run)
    duplicate: bool = False  # its row is already there and done: only count the delivery
    duplicate_of: Item | None = None  # the same key earlier in this batch
    error: str | None = None
    image: torch.Tensor | None = None  # decoded at its own size, float32[C, h, w]
    x: torch.Tensor | None = None  # fitted to the production model's input
    decode_ms: float | None = None
    row: AuditRow | None = None
    written: bool = False


@dataclass
class _BadCall:
    reason: str


def _finished_attempt(req: Any) -> int | None:
    """The attempt number a requeued copy says finished (:data:`FINISHED_ATTEMPT_HEADER`)."""
    headers = getattr(req, "request_dict", None) or {}
    value = headers.get(FINISHED_ATTEMPT_HEADER) if isinstance(headers, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _payload_of(req: Any) -> Any:
    args, kwargs = list(req.args or ()), dict(req.kwargs or {})
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"message"}:
        return kwargs["message"]
    return _BadCall(
        f"the audit task takes one message (got {len(args)} args, kwargs {sorted(kwargs)})"
    )


def _raw_payload(payload: Any) -> bytes:
    """A dropped payload as bytes for its dead letter (JSON when it can be)."""
    if isinstance(payload, _BadCall):
        return b""
    try:
        return json.dumps(payload, default=repr).encode("utf-8", "backslashreplace")
    except (TypeError, ValueError):
        return repr(payload).encode("utf-8", "backslashreplace")


def image_limits(s: Settings) -> ImageLimits:
    """The input limits of ``s`` (bytes, pixels, smallest side, aspect ratio)."""
    from worker.model.images import ImageLimits

    return ImageLimits(
        max_bytes=s.max_image_bytes,
        max_pixels=s.max_image_pixels,
        min_side=s.min_image_side,
        max_aspect_ratio=s.max_aspect_ratio,
    )


def image_bytes(msg: InspectionMessage, s: Settings) -> bytes:
    """The encoded image of a message: inline bytes, or a file confined to the image roots.

    Raises:
        worker.model.images.ImageError: outside the roots, missing, not a file, empty, too big,
            or not matching ``image_sha256``.
    """
    from worker.model.images import ImageError, read_image_bytes, resolve_under_roots

    if msg.image_b64 is not None:
        data = base64.b64decode(msg.image_b64)
        if len(data) > s.max_inline_bytes:
            raise ImageError(
                f"inline image is {len(data)} bytes, over the limit of {s.max_inline_bytes}"
            )
    else:
        path = resolve_under_roots(msg.image_path or "", list(s.image_roots))
        try:
            data = read_image_bytes(path, image_limits(s))
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


def fault_hook() -> Callable[[Iterable[str]], contextlib.AbstractContextManager[None]]:
    """The test-only fault hook when its environment variable is set, else a no-op.

    :mod:`worker.faults` is imported only when ``INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK``
    or ``INSPECTION_AUDIT_TEST_FAULT_HOLD_IN_ATTACK`` is set; production never loads it.
    """
    if os.environ.get("INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK") or os.environ.get(
        "INSPECTION_AUDIT_TEST_FAULT_HOLD_IN_ATTACK"
    ):
        from worker.faults import any_fault

        return any_fault
    return lambda _ids: contextlib.nullcontext()


class Batch:
    """The work of one pool-process call on up to B requests."""

    def __init__(self, requests: list[Any], rt: Runtime, s: Settings) -> None:
        from worker.runtime import worker_host

        self.rt = rt
        self.s = s
        self.t0 = time.perf_counter()
        self.host = worker_host()
        self.items = [
            Item(req.id, _payload_of(req), finished_before=_finished_attempt(req))
            for req in requests
        ]
        self.dropped: list[Item] = []
        self.fault_hook = fault_hook()

    # 1. parse -------------------------------------------------------------------------------
    def parse(self) -> None:
        from producer.schema import MessageError, parse_message

        keep: list[Item] = []
        seen: dict[Key, Item] = {}
        for it in self.items:
            if isinstance(it.payload, _BadCall):
                it.error = it.payload.reason
                log.error("dropping request %s: %s", it.request_id, it.error)
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
                it.inspection = inspection_of(it.msg)
                iid = it.msg.inspection_id
            except MessageError as exc:
                iid = exc.inspection_id or ""
                if not _ID_RE.match(iid) or len(iid) > 128:
                    it.error = f"{exc} (no usable inspection_id to record it under)"
                    log.error("dropping message %s: %s", it.request_id, it.error)
                    self.dropped.append(it)
                    continue
                it.error = str(exc)
                it.inspection = placeholder_inspection(it.payload, iid)
            it.key = (iid, self.rt.model_version, self.rt.method)
            first = seen.setdefault(it.key, it)
            if first is not it:
                it.duplicate_of = first
            keep.append(it)
        self.items = keep

    # 2. start attempts (own transaction, committed before any scoring) --------------------
    def count_deliveries(self) -> None:
        """Start an attempt on each image at risk now, in one committed transaction; an image
        whose previous attempt never finished is a suspect and waits for its own turn
        (:meth:`score_alone`). Images already done, and messages already known to be errors,
        are not at risk: nothing is started for them."""
        from db.deliveries import AttemptState, attempt_state, done_keys, start_attempt
        from db.session import session_scope

        firsts = [it for it in self.items if it.key is not None and it.duplicate_of is None]
        if not firsts:
            return

        def tx() -> tuple[set[Key], dict[Key, AttemptState], dict[Key, int]]:
            with session_scope(self.s.resolved_database_url) as session:
                done = done_keys(session, [it.key for it in firsts if it.key is not None])
                states: dict[Key, AttemptState] = {}
                started: dict[Key, int] = {}
                for it in firsts:
                    assert it.key is not None
                    state = states[it.key] = attempt_state(session, it.key)
                    if (
                        it.error is None
                        and it.key not in done
                        and not state.unfinished(it.finished_before)
                    ):
                        attempt = start_attempt(session, it.key, self.host, it.finished_before)
                        started[it.key] = attempt.number
            return done, states, started

        done, states, started = with_db_retries(tx, "counting deliveries", self.s)
        for it in self.items:
            assert it.key is not None
            if it.key in started:
                it.attempts = started[it.key]
                if it.duplicate_of is None:
                    it.attempt = started[it.key]
                continue
            state = states[it.key]
            it.attempts = state.attempts + 1  # tentative: nothing was started for it
            if it.duplicate_of is not None:
                continue
            if it.key in done:
                it.duplicate = True
            elif it.error is None and state.unfinished(it.finished_before):
                it.suspect = True

    def finish_attempts(self, items: list[Item]) -> None:
        """Record the attempts on ``items`` finished (their process came through decoding and
        scoring), in one committed transaction."""
        from db.deliveries import finish_attempts
        from db.session import session_scope

        open_ = [it for it in items if it.attempt is not None and not it.closed]
        if not open_:
            return
        pairs = [(it.key, it.attempt) for it in open_ if it.key is not None and it.attempt]

        def tx() -> None:
            with session_scope(self.s.resolved_database_url) as session:
                finish_attempts(session, pairs)

        with_db_retries(tx, f"finishing {len(pairs)} attempt(s)", self.s)
        for it in open_:
            it.closed = True

    def score_alone(self, it: Item) -> None:
        """A suspect: start its attempt (committed; the lost one is charged now, unless it
        finished meanwhile), apply the cap, else decode and score it on its own, then finish
        the attempt and write its row."""
        from db.deliveries import Attempt, done_keys, start_attempt
        from db.session import session_scope

        assert it.key is not None
        key = it.key

        def tx() -> Attempt | None:
            with session_scope(self.s.resolved_database_url) as session:
                if done_keys(session, [key]):
                    return None  # its earlier attempt finished and wrote the row meanwhile
                return start_attempt(session, key, self.host, it.finished_before)

        started = with_db_retries(tx, "counting a redelivery", self.s)
        if started is None:
            it.duplicate = True
            self.write(self.rows_to_write([it]))
            return
        it.attempt = it.attempts = started.number
        log.info(
            "%s: %d earlier attempt(s) never finished; working on it alone", key[0], started.lost
        )
        if started.lost > self.s.max_redeliveries:
            it.error = f"worker lost {started.lost} times while scoring this image; giving up"
            log.error("%s: %s", key[0], it.error)
        else:
            self.decode([it])
            self.score_cheap([it])
            if self._is_ready(it):
                self.score_full([it])
        self.finish_attempts([it])
        self.write(self.rows_to_write([it]))

    # 3. decode ----------------------------------------------------------------------------
    def decode(self, items: list[Item]) -> None:
        """Decode each image at its own size (``it.image``) and fit it to the production
        model's input (``it.x``); an image that cannot be read becomes the item's error."""
        from worker.model.preprocess import ImageError, fit_to_input, load_image

        pm = self.rt.pm
        limits = image_limits(self.s)
        for it in items:
            if it.error is not None or it.duplicate or it.duplicate_of or it.msg is None:
                continue
            t = time.perf_counter()
            try:
                data = image_bytes(it.msg, self.s)
                it.image = load_image(data, pm.in_channels, limits)
                it.x = fit_to_input(it.image, pm.input_size, pm.resize)
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

    def _params(self, batch_size: int) -> dict[str, Any]:
        return {**self.rt.params, "batch_size": batch_size}

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

        from worker.model.checkpoint import p_defect_from_logits

        rt = self.rt
        t = time.perf_counter()
        try:
            x = torch.stack([it.x for it in group if it.x is not None]).to(rt.device)
            with torch.no_grad():
                z = rt.pm.model(x).float()
            probs = p_defect_from_logits(z, rt.pm.defect_index).cpu().tolist()
        except Exception as exc:
            for it in group:
                it.error = f"scoring failed: {type(exc).__name__}: {one_line(exc)}"
            return
        ms = (time.perf_counter() - t) * 1000.0 / len(group)
        for it, pd in zip(group, probs, strict=True):
            assert it.key is not None
            it.row = cheap_row(
                it.key,
                float(pd),
                host=self.host,
                delivery_count=it.attempts,
                params=self._params(len(group)),
                decode_ms=it.decode_ms,
                score_ms=ms,
            )

    def score_full(self, group: list[Item]) -> None:
        """One engine call on ``group``; on failure, each image alone (to isolate the bad one)."""
        import torch

        rt = self.rt
        t = time.perf_counter()
        try:
            x = torch.stack([it.x for it in group if it.x is not None]).to(rt.device)
            images = [it.image for it in group if it.image is not None]
            with self.fault_hook(it.key[0] for it in group if it.key is not None):
                measured = rt.suite.measure(images, x)
            rows = measured.rows
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
        for i, (it, measurements) in enumerate(zip(group, rows, strict=True)):
            assert it.key is not None
            decision = rt.decide(measurements)
            # Only an `ok` call can be a false negative (defect calls are scored in full only
            # with score_defect_predictions, for the record).
            flagged = decision.flagged and it.msg is not None and it.msg.prediction == "ok"
            row = scored_row(
                it.key,
                measurements,
                rt.scores(measurements),
                decision_score=decision.score,
                tau=decision.tau,
                flagged=flagged,
                host=self.host,
                delivery_count=it.attempts,
                params=self._params(len(group)),
                decode_ms=it.decode_ms,
                score_ms=elapsed / len(group),
            )
            if self.s.save_overlays and (flagged or self.s.overlay_all):
                self._save_maps(it, row, measured.images[i], measured.maps[i], decision)
            it.row = row

    def _save_maps(self, it: Item, row: AuditRow, image: Any, maps: Any, decision: Any) -> None:
        """Write the review maps (worker/model/overlay.py) and record them in the row: the
        composite thumbnail in ``overlay_path``, each map's PNG in ``details["maps"]``."""
        from worker.model.overlay import save_review_maps

        assert it.key is not None
        iid, version, method = it.key
        folder = result_folder(self.s, version, method, iid)
        cfg = self.rt.engine.config
        score, tau = decision.score, decision.tau
        caption = f"{iid}  {method} {score:.3f}" if score is not None else iid
        if score is not None and tau is not None:
            caption += f" {'>=' if score >= tau else '<'} τ {tau:.3f}"
        try:
            saved = save_review_maps(
                image,
                maps,
                folder,
                method=method,
                binarize=cfg.binarize,
                theta=cfg.theta,
                topk=cfg.topk,
                taus=self.rt.params.get("taus") or {},
                caption=caption,
            )
        except Exception as exc:  # a full disk must not cost the audit row
            log.warning("%s: could not save review maps under %s: %s", iid, folder, exc)
            return
        row.overlay_path = str(saved.composite)
        row.details = {
            **(row.details or {}),
            "maps": {name: str(path) for name, path in saved.maps.items()},
            "region_fraction": saved.region_fraction,
        }

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
                it.row = dataclasses.replace(it.duplicate_of.row, delivery_count=it.attempts)
                out.append(it)
                continue
            if it.duplicate:
                # The row exists and is done: only count the duplicate delivery.
                it.row = duplicate_row(it.key, it.attempts)
            elif it.row is None:
                it.row = error_row(
                    it.key,
                    it.error or "not scored (no reason)",
                    host=self.host,
                    delivery_count=it.attempts,
                    params=self.rt.params,
                    decode_ms=it.decode_ms,
                )
            if it.row.total_ms is None and not it.duplicate:
                it.row.total_ms = (now - self.t0) * 1000.0
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
                upsert_inspection(session, it.inspection)
                upsert_audit(session, it.row)

    def _write_last_resort(self, it: Item, exc: Exception) -> None:
        """A row the database refuses (not a connection fault): record an error row instead."""
        assert it.key is not None
        reason = f"audit row could not be stored: {type(exc).__name__}: {one_line(exc)}"
        log.error("%s: %s", it.key[0], reason)
        if it.row is not None and it.row.status == "error" and it.inspection is not None:
            # Already an error row; the inspection fields themselves may be the problem.
            it.inspection = placeholder_inspection({}, it.key[0])
        it.row = error_row(
            it.key,
            reason,
            host=self.host,
            delivery_count=it.attempts,
            params=self.rt.params,
            decode_ms=it.decode_ms,
        )
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

    def record_dropped(self) -> None:
        """Record each dropped message (no usable ``inspection_id``) as a dead letter.

        The worker's consumer takes such messages off the queue before they reach a batch
        (:mod:`worker.consumer`); this is the same record for any that still get here.
        """
        from db.dead_letters import DeadLetterRow, record_dead_letter
        from db.session import session_scope

        pending = [it for it in self.dropped if not it.written]
        if not pending:
            return
        rows = [
            DeadLetterRow(
                stage="envelope" if isinstance(it.payload, _BadCall) else "message",
                reason=it.error or "dropped",
                raw=_raw_payload(it.payload),
                task_id=it.request_id,
                queue=self.s.queue,
                worker_host=self.host,
            )
            for it in pending
        ]

        def tx() -> None:
            with session_scope(self.s.resolved_database_url) as session:
                for row in rows:
                    record_dead_letter(session, row)

        with_db_retries(tx, f"recording {len(rows)} dead letter(s)", self.s)
        for it in pending:
            it.written = True

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
                if it.suspect
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
            self.finish_attempts(fresh)
            copies = [it for it in self.items if it.duplicate_of is not None]
            self.write(self.rows_to_write([it for it in fresh if it.duplicate_of is None]))
            for it in later:
                self.score_alone(it)
            self.write(self.rows_to_write(copies))
            self.record_dropped()
        except DatabaseUnavailable as exc:
            log.error("%s; requeueing the messages whose rows are not written", exc)
        except Exception:
            # Not a per-image problem (those become error rows): e.g. a database that refuses
            # the delivery counter. Put the messages back after a pause, the cap still applies.
            log.exception("batch failed; requeueing the messages whose rows are not written")
            time.sleep(min(5.0, float(self.s.retry_backoff_max_s)))
        unwritten = [it for it in self.items + self.dropped if not it.written]
        requeue = list(dict.fromkeys(it.request_id for it in unwritten))
        # Attempts that ended here without being recorded finished (the database went down):
        # the requeued copy says so (worker.acks.requeue_copy), so they are not charged.
        finished = {
            it.request_id: it.attempt
            for it in unwritten
            if it.attempt is not None and not it.closed
        }
        dups = [it for it in self.items if it.duplicate or it.duplicate_of is not None]
        fresh = [
            it for it in self.items if it.written and it.row and all(it is not d for d in dups)
        ]
        log.info(
            "batch of %d message(s): %d done, %d error, %d duplicate, %d dropped, %d requeued "
            "in %.0f ms",
            len(self.items) + len(self.dropped),
            sum(1 for it in fresh if it.row and it.row.status == "done"),
            sum(1 for it in fresh if it.row and it.row.status == "error"),
            len(dups),
            len(self.dropped),
            len(requeue),
            (time.perf_counter() - self.t0) * 1000.0,
        )
        return {
            "requeue": requeue,
            "finished": finished,
            "written": sum(1 for it in self.items if it.written),
        }


def process_requests(requests: Iterable[Any], s: Settings) -> dict[str, Any]:
    """Audit a batch of requests; returns ``{"requeue": [request ids to put back], ...}``.

    A pool process that cannot load its model asks the whole worker to stop (warm shutdown)
    and puts every request back.
    """
    from worker.runtime import RuntimeConfigError, get_runtime

    requests = list(requests)
    try:
        rt = get_runtime(s)
    except RuntimeConfigError as exc:
        request_worker_shutdown(f"cannot load the model in pool process {os.getpid()}: {exc}")
        return {"requeue": [r.id for r in requests], "finished": {}, "written": 0}
    return Batch(requests, rt, s).run()


#: pid of the worker's main process, set by :func:`worker.app.create_app` (the pool processes
#: are forked from it and inherit the value).
MAIN_PID = os.getpid()


def request_worker_shutdown(reason: str) -> None:
    """Ask the whole worker to stop (warm shutdown): it cannot score anything."""
    import signal

    log.critical("%s; shutting the worker down", reason)
    target = MAIN_PID if os.getpid() != MAIN_PID else os.getpid()
    with contextlib.suppress(OSError):  # the main process may be gone already
        os.kill(target, signal.SIGTERM)


def result_path(s: Settings, model_version: str, method: str, inspection_id: str) -> Path:
    """Where the composite thumbnail of an inspection's review maps is written."""
    return result_folder(s, model_version, method, inspection_id) / "composite.png"


def result_folder(s: Settings, model_version: str, method: str, inspection_id: str) -> Path:
    """The folder of one inspection's review maps (``<results>/overlays/<version>/<method>/<id>/``)."""
    from worker.model.naming import safe_name

    return s.resolved_results_dir / "overlays" / model_version / method / safe_name(inspection_id)
