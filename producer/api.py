"""Send inspections to the audit queue: :func:`enqueue` and :func:`enqueue_many`.

Everything is validated before anything is sent: the message fields (see
:class:`producer.schema.InspectionMessage`), the image file (it must exist, be a regular
non-empty file of at most ``Settings.max_image_bytes`` bytes, and resolve, symlinks followed,
under one of ``Settings.image_roots``) and the size of inline bytes
(``Settings.max_inline_bytes``). A batch is validated as a whole before its first message is
sent. Messages go out as JSON (never pickle) to ``Settings.queue``; a broker that is down is
retried for at most about ``Settings.enqueue_timeout_s`` seconds, then :class:`EnqueueError`
says which broker (password hidden) and how many messages were sent.

On the wire an image path is stored relative to the *first* image root when it lies under it
(the worker resolves relative paths against its own first root), otherwise as the absolute,
symlink-resolved path. The SHA-256 of the image bytes is always filled in.

With the outbox on (``Settings.outbox``, or ``outbox=True``), every message of a batch is
recorded in the database as queued before the first is sent (:mod:`producer.outbox`), so that
``inspection-audit reconcile`` can find and resend what a broker loses.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from inspection_audit.settings import Settings, get_settings
from producer.schema import InspectionMessage, MessageError

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "EnqueueError",
    "enqueue",
    "enqueue_many",
    "get_app",
    "prepare_message",
    "reset_apps",
    "retry_policy",
    "send_messages",
]

ImageInput = str | Path | bytes | bytearray | memoryview


class EnqueueError(RuntimeError):
    """The broker could not take the messages.

    Attributes:
        sent_ids: ``inspection_id`` s of the messages that the broker accepted before the
            failure, in order (the first ``len(sent_ids)`` of the batch); nothing else was sent.
        total: how many messages the batch had.
        broker: the broker URL with its password hidden.
        queue: the queue name.
    """

    def __init__(
        self, message: str, *, sent_ids: list[str], total: int, broker: str, queue: str
    ) -> None:
        super().__init__(message)
        self.sent_ids = list(sent_ids)
        self.total = total
        self.broker = broker
        self.queue = queue


# --- the Celery app, one per settings -----------------------------------------------------------
_APPS: dict[str, Celery] = {}
_APPS_LOCK = threading.Lock()


def get_app(settings: Settings | None = None) -> Celery:
    """The producer's Celery app for ``settings`` (cached per distinct settings, thread-safe).

    A sending-only app built by :func:`worker.app.create_app` (no torch import). For a Redis broker the
    socket connect/read timeouts are bounded by ``settings.enqueue_timeout_s`` (at most 5 s),
    so an unreachable host cannot hang a send.
    """
    settings = settings or get_settings()
    key = settings.model_dump_json()
    with _APPS_LOCK:
        app = _APPS.get(key)
        if app is None:
            from worker.app import create_app

            app = create_app(settings, worker=False)
            if settings.resolved_broker_url.startswith(("redis://", "rediss://")):
                t = min(float(settings.enqueue_timeout_s), 5.0)
                opts = dict(app.conf.broker_transport_options or {})
                opts.setdefault("socket_connect_timeout", t)
                opts.setdefault("socket_timeout", t)
                app.conf.broker_transport_options = opts
            _APPS[key] = app
        return app


def reset_apps() -> None:
    """Close and forget the cached apps (their broker connection pools)."""
    with _APPS_LOCK:
        apps = list(_APPS.values())
        _APPS.clear()
    for app in apps:
        with suppress(Exception):  # closing a dead pool is best effort
            app.close()


def retry_policy(timeout_s: float) -> dict[str, float | int]:
    """A kombu retry policy whose sleeps add up to at most ~60 % of ``timeout_s`` seconds.

    The rest of the budget is left for the connection attempts themselves. Sleeps start at
    ``min(0.1, T/20)`` s and grow by ``min(0.5, T/10)`` s up to ``min(2, T/4)`` s.
    """
    t = float(timeout_s)
    start, step, cap = min(0.1, t / 20), min(0.5, t / 10), min(2.0, t / 4)
    budget, total, n = 0.6 * t, 0.0, 0
    while n < 1000:
        nxt = min(start + n * step, cap)
        if total + nxt > budget:
            break
        total += nxt
        n += 1
    return {"max_retries": n, "interval_start": start, "interval_step": step, "interval_max": cap}


def _broker_for_humans(app: Celery, settings: Settings) -> str:
    from kombu.utils.url import maybe_sanitize_url

    url = app.conf.broker_url or settings.resolved_broker_url
    return str(maybe_sanitize_url(url))


# --- validation --------------------------------------------------------------------------------
def _wire_path(resolved: Path, roots: list[Path]) -> str:
    first = roots[0].resolve()
    if resolved.is_relative_to(first):
        return resolved.relative_to(first).as_posix()
    return str(resolved)


def _check_path_image(msg: InspectionMessage, settings: Settings) -> InspectionMessage:
    from worker.model.images import ImageError, ImageLimits, read_image_bytes, resolve_under_roots

    given = msg.image_path or ""

    def fail(reason: str) -> MessageError:
        return MessageError([("image_path", reason)], inspection_id=msg.inspection_id)

    try:
        path = resolve_under_roots(given, list(settings.image_roots))
    except ImageError as exc:
        roots = ", ".join(str(r) for r in settings.image_roots) or "none"
        raise fail(f"{exc} (image roots: {roots})") from None
    try:
        data = read_image_bytes(path, ImageLimits(max_bytes=settings.max_image_bytes))
    except ImageError as exc:
        hint = " (INSPECTION_AUDIT_MAX_IMAGE_BYTES)" if "over the limit" in str(exc) else ""
        raise fail(f"{exc}{hint}") from None
    except OSError as exc:
        raise fail(f"cannot read image file {path}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if msg.image_sha256 is not None and msg.image_sha256 != digest:
        raise MessageError(
            [("image_sha256", f"{msg.image_sha256} does not match the file {path} ({digest})")],
            inspection_id=msg.inspection_id,
        )
    return msg.model_copy(
        update={"image_path": _wire_path(path, list(settings.image_roots)), "image_sha256": digest}
    )


def prepare_message(
    message: InspectionMessage | Mapping[str, Any], settings: Settings | None = None
) -> InspectionMessage:
    """Validate one message against ``settings`` and return it in the form that is sent.

    A mapping is validated like a received payload (see :func:`producer.schema.parse_message`).
    A path image is checked on disk and rewritten relative to the first image root (or
    absolute); ``image_sha256`` is filled in (and checked when given).

    Raises:
        MessageError: any invalid field, a missing/empty/oversize image file, a path outside
            the image roots (symlinks resolved), or inline bytes over the limit.
    """
    settings = settings or get_settings()
    if isinstance(message, InspectionMessage):
        msg = message.validate_limits(settings)
    elif isinstance(message, Mapping):
        from producer.schema import parse_message

        msg = parse_message(message, settings)
    else:
        raise MessageError(
            [("", f"expected an InspectionMessage or a dict, got {type(message).__name__}")]
        )
    if msg.image_path is not None:
        return _check_path_image(msg, settings)
    if msg.image_sha256 is None:
        digest = hashlib.sha256(msg.image_bytes()).hexdigest()
        msg = msg.model_copy(update={"image_sha256": digest})
    return msg


# --- sending ---------------------------------------------------------------------------------
def _send(
    messages: list[InspectionMessage],
    settings: Settings,
    app: Celery | None,
    on_sent: Callable[[InspectionMessage], None] | None,
) -> list[str]:
    from worker.app import TASK_NAME

    app = app or get_app(settings)
    policy = retry_policy(settings.enqueue_timeout_s)
    sent: list[str] = []
    t0 = time.monotonic()

    def failure(exc: Exception) -> EnqueueError:
        broker = _broker_for_humans(app, settings)
        return EnqueueError(
            f"could not enqueue to broker {broker} (queue {settings.queue!r}) after "
            f"{time.monotonic() - t0:.1f} s: {type(exc).__name__}: {exc}; "
            f"{len(sent)} of {len(messages)} message(s) were sent",
            sent_ids=sent,
            total=len(messages),
            broker=broker,
            queue=settings.queue,
        )

    with ExitStack() as stack:
        try:
            producer = stack.enter_context(app.producer_or_acquire())
        except Exception as exc:
            raise failure(exc) from exc
        for msg in messages:
            try:
                app.send_task(
                    TASK_NAME,
                    args=[msg.to_json_dict()],
                    queue=settings.queue,
                    serializer="json",
                    compression=None,
                    retry=True,
                    retry_policy=dict(policy),
                    producer=producer,
                )
            except Exception as exc:
                raise failure(exc) from exc
            sent.append(msg.inspection_id)
            if on_sent is not None:
                on_sent(msg)
    return sent


def send_messages(
    messages: list[InspectionMessage],
    *,
    settings: Settings,
    app: Celery | None = None,
    on_sent: Callable[[InspectionMessage], None] | None = None,
) -> list[str]:
    """Send already prepared messages to ``settings.queue`` in order (no validation, no
    outbox); returns the sent ``inspection_id`` s (``inspection-audit reconcile`` resends
    with it).

    Raises:
        EnqueueError: the broker failed; ``err.sent_ids`` lists the messages sent before.
    """
    return _send(messages, settings, app, on_sent)


def enqueue_many(
    messages: Iterable[InspectionMessage | Mapping[str, Any]],
    *,
    settings: Settings | None = None,
    app: Celery | None = None,
    on_sent: Callable[[InspectionMessage], None] | None = None,
    outbox: bool | None = None,
) -> list[str]:
    """Validate every message, then send them in order; returns the sent ``inspection_id`` s.

    Nothing is sent unless every message is valid (see :func:`prepare_message`) and the
    ``inspection_id`` s of the batch are distinct. ``on_sent`` (optional) is called after each
    message the broker accepted (e.g. to advance a progress bar). With the outbox on, the
    batch is recorded in the database as queued (one committed transaction) before the first
    message is sent, and each message the broker accepted is counted as sent.

    Args:
        messages: :class:`InspectionMessage` objects or dicts in wire form.
        settings: default :func:`inspection_audit.settings.get_settings`.
        app: a Celery app to send with; default the cached app for ``settings``.
        outbox: record in the outbox first; default ``settings.outbox``.

    Raises:
        MessageError: the first invalid message, with its position (``index``) in the batch;
            nothing was sent.
        producer.outbox.OutboxError: the outbox could not be written (the database stayed
            unreachable for ~``enqueue_timeout_s`` s); nothing was sent.
        EnqueueError: the broker failed (after retrying for ~``enqueue_timeout_s`` s);
            ``err.sent_ids`` lists the messages sent before the failure.
    """
    settings = settings or get_settings()
    prepared: list[InspectionMessage] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(messages):
        try:
            msg = prepare_message(raw, settings)
        except MessageError as exc:
            raise exc.located(index=i) from None
        if msg.inspection_id in seen:
            raise MessageError(
                [
                    (
                        "inspection_id",
                        f"duplicate in this batch (also message {seen[msg.inspection_id]})",
                    )
                ],
                inspection_id=msg.inspection_id,
                index=i,
            )
        seen[msg.inspection_id] = i
        prepared.append(msg)
    if not prepared:
        return []
    if not (settings.outbox if outbox is None else outbox):
        return _send(prepared, settings, app, on_sent)

    from producer.outbox import mark_sent, record_queued

    record_queued(prepared, settings)
    try:
        sent = _send(prepared, settings, app, on_sent)
    except EnqueueError as exc:
        mark_sent(exc.sent_ids, settings)
        raise
    mark_sent(sent, settings)
    return sent


def enqueue(
    inspection_id: str,
    image: ImageInput,
    prediction: str,
    score: float,
    *,
    line: str,
    station: str,
    captured_at: datetime | None = None,
    model_version: str | None = None,
    settings: Settings | None = None,
    app: Celery | None = None,
    outbox: bool | None = None,
) -> str:
    """Validate and send one inspection; returns its ``inspection_id`` once the broker has it.

    Args:
        inspection_id: the line's own id (1–128 chars, ``[A-Za-z0-9][A-Za-z0-9._:-]*``).
        image: a path (``str``/``Path``; relative to the first image root, or absolute under
            one of ``settings.image_roots``) or the encoded image bytes (sent inline, base64;
            at most ``settings.max_inline_bytes`` bytes).
        prediction: the production model's call, ``"ok"`` or ``"defect"``.
        score: the production model's P(defect), finite, in [0, 1].
        line, station: where the image was taken (1–64 chars).
        captured_at: timezone-aware time of capture; default now (UTC). Naive is refused.
        model_version: the production model version the line ran, if known.
        settings: default :func:`inspection_audit.settings.get_settings`.
        app: a Celery app to send with; default the cached app for ``settings``.
        outbox: record it in the outbox before sending; default ``settings.outbox``.

    Raises:
        MessageError: any invalid input (nothing is sent).
        producer.outbox.OutboxError: the outbox could not be written (nothing is sent).
        EnqueueError: the broker failed after retrying for ~``settings.enqueue_timeout_s`` s.
    """
    fields: dict[str, Any] = {
        "inspection_id": inspection_id,
        "prediction": prediction,
        "score": score,
        "line": line,
        "station": station,
        "captured_at": captured_at if captured_at is not None else datetime.now(UTC),
        "model_version": model_version,
    }
    if isinstance(image, (bytes, bytearray, memoryview)):
        fields["image_b64"] = base64.b64encode(bytes(image)).decode("ascii")
    elif isinstance(image, (str, Path)):
        fields["image_path"] = str(image)
    else:
        raise MessageError(
            [("image", f"must be a path (str/Path) or bytes, got {type(image).__name__}")],
            inspection_id=inspection_id if isinstance(inspection_id, str) else None,
        )
    settings = settings or get_settings()
    try:
        msg = InspectionMessage.model_validate(fields, context={"settings": settings})
    except ValidationError as exc:
        iid = inspection_id if isinstance(inspection_id, str) else None
        raise MessageError.from_validation_error(exc, inspection_id=iid) from None
    return enqueue_many([msg], settings=settings, app=app, outbox=outbox)[0]
