"""Malformed messages: found in the worker's main process, recorded, never fatal.

A message that reaches the queue without going through the producer can be anything. Left to
kombu and Celery, several shapes raised in the worker's main process and stopped it (the
message went back on the queue and stopped the next worker too): an entry that is not JSON, a
body that is JSON ``null`` or ``{}``, a task name that is a list. This module says, for every
shape, what is wrong, before anything else looks at the message:

* :func:`envelope_problem` / :func:`unreadable_envelope`: a Redis list entry that is not a
  kombu message envelope is replaced, in the transport (:mod:`worker.transport`), by an
  envelope that carries its bytes and the reason under :data:`MALFORMED_HEADER`;
* :func:`check_task_message`: headers, content type, body and payload of a kombu message,
  against Celery's task protocol 2 and the audit task's one argument (the consumer,
  :mod:`worker.consumer`, runs it on every message);
* :func:`record_malformed` (in a pool process): the message becomes its inspection's
  ``error`` row when a usable ``inspection_id`` can be recovered, otherwise a dead letter
  (:mod:`db.dead_letters`). The message is acknowledged only after that commit.

Schema errors of a message that has a usable ``inspection_id`` are not this module's: the batch
pipeline records them as error rows (:mod:`worker.batch`). Nothing here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inspection_audit.settings import Settings

log = logging.getLogger("inspection_audit.worker")

#: Header of an envelope made by the transport for an entry that was not a message; its value
#: is the reason. The entry's bytes are the body.
MALFORMED_HEADER = "x-inspection-audit-malformed"
#: Header with the size of the entry before it was cut to :data:`db.dead_letters.RAW_LIMIT`.
RAW_SIZE_HEADER = "x-inspection-audit-raw-size"
#: Content type of such an envelope (never accepted as a task by Celery).
UNREADABLE_CONTENT_TYPE = "application/x-inspection-audit-unreadable"
#: Content type the audit task accepts (``accept_content = ["json"]``).
JSON_CONTENT_TYPE = "application/json"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_ID_MAX = 128
#: The most bytes of an unreadable entry carried on to the dead letter.
_CARRIED_BYTES = 16_384


@dataclass(frozen=True)
class Malformed:
    """What is wrong with a message, and what could be recovered from it.

    Attributes:
        stage: where it was caught (a ``dead_letters.stage``): ``transport``, ``envelope``,
            ``message``, ``broker`` or ``worker``.
        reason: one line saying what was wrong.
        raw: the bytes received (the body; for ``transport``, the whole entry), possibly cut.
        raw_size: the size before cutting (default ``len(raw)``).
        inspection_id: a usable id found in the message, or None.
        payload: the message payload (the task's one argument) when there was one.
        task_id, queue, headers: as received, for the dead letter.
    """

    stage: str
    reason: str
    raw: bytes = b""
    raw_size: int | None = None
    inspection_id: str | None = None
    payload: Any = None
    task_id: str | None = None
    queue: str | None = None
    headers: Any = field(default=None, repr=False)

    def outcome(self) -> str:
        """What will become of it, for the log line."""
        if self.inspection_id is not None:
            return f"recording it as an error row of inspection {self.inspection_id}"
        return "recording it as a dead letter"


# --- small helpers -------------------------------------------------------------------------------
def clip(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters and saying how long it was when cut."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 1]}…{size}"


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def usable_inspection_id(value: Any) -> str | None:
    """``value`` when it can key a row (1–128 characters of ``[A-Za-z0-9._:-]``, not starting
    with punctuation), else None."""
    if isinstance(value, str) and len(value) <= _ID_MAX and _ID_RE.match(value):
        return value
    return None


def unusable_id_reason(value: Any) -> str:
    """Why ``value`` is not a usable ``inspection_id`` (the id itself is cut)."""
    if value is None:
        return "the message has no inspection_id"
    if not isinstance(value, str):
        return f"inspection_id is {json_type(value)}, not a string"
    if len(value) > _ID_MAX:
        return f"inspection_id {clip(value)} is longer than {_ID_MAX} characters"
    return f"inspection_id {clip(value)} is not 1-128 characters of [A-Za-z0-9._:-]"


def as_bytes(body: Any) -> bytes:
    """A message body as bytes (text as UTF-8, unpaired surrogates escaped)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if body is None:
        return b""
    if not isinstance(body, str):
        body = repr(body)
    return body.encode("utf-8", "backslashreplace")


# --- the transport level: one entry of a Redis list --------------------------------------------
def envelope_problem(envelope: Any) -> str | None:
    """Why a decoded Redis list entry is not a kombu message envelope that kombu's virtual
    transport can turn into a message, or None when it is.

    kombu reads ``properties.delivery_tag``, ``properties.delivery_info.exchange`` and
    ``.routing_key`` (the unacked bookkeeping), decodes ``body`` by ``properties.body_encoding``
    and hands on ``headers``, ``content-type`` and ``content-encoding``; any of them missing or
    of the wrong type raised in the worker's main process.
    """
    if not isinstance(envelope, dict):
        return f"the entry is {json_type(envelope)}, not a message envelope (an object)"
    props = envelope.get("properties")
    if not isinstance(props, dict):
        return "the envelope has no properties object"
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "the envelope's properties have no delivery_tag string"
    info = props.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "the envelope's delivery_info is not an object with exchange and routing_key"
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"the envelope's headers are {json_type(headers)}, not an object"
    for name in ("content-type", "content-encoding"):
        value = envelope.get(name)
        if value is not None and not isinstance(value, str):
            return f"the envelope's {name} is {json_type(value)}, not a string"
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        return f"the envelope's body is {json_type(body)}, not a string"
    encoding = props.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"the envelope's body_encoding {clip(encoding)} is not base64"
    if body:
        try:
            data = body.encode("utf-8")
            if encoding == "base64":
                base64.b64decode(data)
        except (binascii.Error, ValueError) as exc:
            return f"the envelope's body cannot be decoded ({encoding or 'text'}): {exc}"
    return None


def unreadable_envelope(raw: bytes, reason: str, queue: str) -> dict[str, Any]:
    """A kombu envelope that stands for an entry that was not a message.

    It carries the entry's first bytes as its body (base64), the reason in
    :data:`MALFORMED_HEADER` and the entry's size in :data:`RAW_SIZE_HEADER`, and a fresh
    delivery tag, so that it is acknowledged (or put back, unchanged) like any message: the
    entry is not lost if the worker dies before recording it.
    """
    return {
        "body": base64.b64encode(raw[:_CARRIED_BYTES]).decode("ascii"),
        "content-type": UNREADABLE_CONTENT_TYPE,
        "content-encoding": "binary",
        "headers": {MALFORMED_HEADER: reason, RAW_SIZE_HEADER: len(raw)},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }


def read_entry(raw: bytes | str, queue: str) -> dict[str, Any]:
    """A Redis list entry as a kombu envelope: itself when it is one, else
    :func:`unreadable_envelope` saying why not. Never raises.

    Parsed as kombu parses it (``kombu.utils.json.loads``, whose object hook decodes kombu's
    ``{"__type__": …, "__value__": …}`` values and raises on bad ones).
    """
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    try:
        envelope = loads(bytes_to_str(raw))
    except Exception as exc:  # not JSON, bad kombu type values, nesting too deep ...
        reason = f"the broker entry is not JSON: {type(exc).__name__}: {exc}"
        return unreadable_envelope(data, reason[:500], queue)
    problem = envelope_problem(envelope)
    if problem is not None:
        return unreadable_envelope(data, problem, queue)
    return dict(envelope)


# --- the Celery level: one kombu message -------------------------------------------------------
def _recover_payload(body: Any) -> Any:
    """The audit task's one argument, if it can be found in a decoded body of any shape."""
    if isinstance(body, (list, tuple)):  # protocol 2: [args, kwargs, embed]
        args = body[0] if len(body) > 0 else None
        kwargs = body[1] if len(body) > 1 else None
    elif isinstance(body, Mapping):  # protocol 1 / hybrid: {"args": [...], "kwargs": {...}}
        args, kwargs = body.get("args"), body.get("kwargs")
    else:
        return None
    if isinstance(args, (list, tuple)) and args and isinstance(args[0], Mapping):
        return args[0]
    if isinstance(kwargs, Mapping) and isinstance(kwargs.get("message"), Mapping):
        return kwargs["message"]
    return None


def _arity_problem(args: list[Any], kwargs: Mapping[str, Any]) -> str | None:
    if len(args) == 1 and not kwargs:
        return None
    if not args and set(kwargs) == {"message"}:
        return None
    return (
        f"the audit task takes one message (got {len(args)} positional argument(s) and "
        f"keyword(s) {clip(sorted(str(k) for k in kwargs))})"
    )


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, (list, tuple)):
        return f"the body is {json_type(body)}, not [args, kwargs, embed] (Celery protocol 2)"
    if len(body) != 3:
        return f"the body is an array of {len(body)}, not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        return f"args is {json_type(args)}, not an array"
    if not isinstance(kwargs, Mapping):
        return f"kwargs is {json_type(kwargs)}, not an object"
    if embed is not None and not isinstance(embed, Mapping):
        return f"embed is {json_type(embed)}, not an object"
    return _arity_problem(list(args), kwargs)


def broker_dead_letter_reason(headers: Mapping[str, Any]) -> str | None:
    """Why RabbitMQ dead-lettered a message (its ``x-death`` headers), or None if it did not."""
    deaths = headers.get("x-death")
    first = headers.get("x-first-death-reason")
    if not deaths and not first:
        return None
    death = deaths[0] if isinstance(deaths, list) and deaths else {}
    death = death if isinstance(death, Mapping) else {}
    why = str(death.get("reason") or first or "unknown")
    queue = str(death.get("queue") or headers.get("x-first-death-queue") or "?")
    text = f"dead-lettered by the broker ({why}) from queue {queue}"
    if why == "delivery_limit":
        count = headers.get("x-delivery-count")
        seen = f" (x-delivery-count {count})" if count is not None else ""
        text += (
            f": returned to the queue more often than its x-delivery-limit{seen}, each time "
            "because the process or worker holding it died or its connection dropped"
        )
    return text


def check_task_message(message: Any, task_name: str, queue: str | None = None) -> Malformed | None:
    """What is wrong with a kombu message for the audit task, or None when nothing is.

    ``queue`` names the queue when the message's own routing key does not.

    Checked in this order, each a one-line reason: a transport stand-in
    (:data:`MALFORMED_HEADER`); a message RabbitMQ dead-lettered (``x-death``); headers that
    are not an object; no ``task`` string, or another task than ``task_name`` (protocol 1 and
    hybrid messages have none: the producer sends protocol 2); no ``id`` string; an ``eta``
    or ``expires`` (the audit task runs nothing delayed); a content type other than JSON; a
    body that does not decode; a body that is not ``[args, kwargs, embed]`` with ``args`` an
    array, ``kwargs`` an object and ``embed`` an object or null; not exactly one message
    argument; a payload that is not an object or has no usable ``inspection_id``. A usable id
    found anywhere in the body is recovered (the message becomes that inspection's error row).
    Never raises.
    """
    queue = _queue_of(message) or queue
    headers = getattr(message, "headers", None)
    body_bytes = as_bytes(getattr(message, "body", b""))
    base: dict[str, Any] = {"raw": body_bytes, "queue": queue, "headers": headers}
    found: dict[str, Any]

    if not isinstance(headers, Mapping):
        return Malformed("envelope", f"the headers are {json_type(headers)}, not an object", **base)
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    base["task_id"] = task_id

    stand_in = headers.get(MALFORMED_HEADER)
    if stand_in is not None:
        size = headers.get(RAW_SIZE_HEADER)
        return Malformed(
            "transport",
            str(stand_in),
            raw_size=size if isinstance(size, int) else None,
            inspection_id=_recover_from_entry(body_bytes),
            **base,
        )

    payload, decoded, decode_error = None, None, None
    content_type = getattr(message, "content_type", None)
    if content_type == JSON_CONTENT_TYPE:
        try:
            decoded = message.decode()
        except Exception as exc:  # DecodeError, ContentDisallowed, UnicodeDecodeError ...
            decode_error = exc
        else:
            payload = _recover_payload(decoded)
    recovered = usable_inspection_id(payload.get("inspection_id")) if payload else None
    found = {"inspection_id": recovered, "payload": payload}

    dead = broker_dead_letter_reason(headers)
    if dead is not None:
        return Malformed("broker", dead, **found, **base)

    task = headers.get("task")
    if not isinstance(task, str):
        why = "no task" if task is None else f"a task that is {json_type(task)}"
        return Malformed(
            "envelope",
            f"the headers have {why} (not a Celery protocol 2 task message)",
            **found,
            **base,
        )
    if task != task_name:
        return Malformed(
            "envelope", f"task {clip(task)} is not the audit task {task_name!r}", **found, **base
        )
    if task_id is None:
        return Malformed("envelope", "the headers have no task id string", **found, **base)
    for name in ("eta", "expires"):
        if headers.get(name) is not None:
            return Malformed(
                "envelope",
                f"{name} is set ({clip(headers.get(name))}): the audit task runs nothing delayed",
                **found,
                **base,
            )
    if content_type != JSON_CONTENT_TYPE:
        return Malformed(
            "envelope",
            f"content type {clip(content_type)} is refused (the audit task accepts JSON only)",
            **base,
        )
    if decode_error is not None:
        return Malformed(
            "envelope",
            f"the body is not valid JSON: {type(decode_error).__name__}: {decode_error}",
            **base,
        )
    problem = _body_problem(decoded)
    if problem is not None:
        return Malformed("envelope", problem, **found, **base)
    assert isinstance(decoded, (list, tuple))
    args, kwargs = list(decoded[0]), dict(decoded[1])
    payload = args[0] if args else kwargs["message"]
    if not isinstance(payload, Mapping):
        return Malformed("message", f"the message is {json_type(payload)}, not an object", **base)
    if recovered is None:
        return Malformed(
            "message",
            f"{unusable_id_reason(payload.get('inspection_id'))} (nothing to record it under)",
            payload=payload,
            **base,
        )
    return None


def _queue_of(message: Any) -> str | None:
    info = getattr(message, "delivery_info", None)
    if isinstance(info, Mapping):
        rk = info.get("routing_key")
        return rk if isinstance(rk, str) and rk else None
    return None


def _recover_from_entry(raw: bytes) -> str | None:
    """A usable ``inspection_id`` inside the bytes of an entry that was not a valid envelope
    (e.g. an envelope without properties around a good message), else None."""
    try:
        envelope = json.loads(raw)
        if not isinstance(envelope, Mapping):
            return None
        body = envelope.get("body")
        if isinstance(body, str):
            with contextlib.suppress(binascii.Error, ValueError):
                body = base64.b64decode(body.encode("ascii"), validate=True)
        payload = _recover_payload(json.loads(body) if isinstance(body, (str, bytes)) else None)
    except (ValueError, TypeError, RecursionError):
        return None
    return usable_inspection_id(payload.get("inspection_id")) if payload else None


# --- recording (in a pool process) ---------------------------------------------------------------
def record_malformed(bad: Malformed, settings: Settings) -> bool:
    """Record ``bad``: its inspection's ``error`` row when it has a usable ``inspection_id``,
    otherwise a dead letter. Returns True when it is recorded (acknowledge the message), False
    when it should be put back (the database stayed down, or the model cannot be loaded).

    Runs in a pool process (the consumer hands it over), with the pipeline's database retries.
    A row the database refuses (not a connection fault) falls back to a dead letter; when that
    is refused too, the message is given up with an error log line (True: redelivering it
    cannot help).
    """
    from worker.retry import DatabaseUnavailable

    try:
        if bad.inspection_id is not None:
            try:
                _record_error_row(bad, settings)
                return True
            except DatabaseUnavailable:
                raise
            except _RuntimeUnavailable:
                return False
            except Exception as exc:
                log.error(
                    "%s: the error row of a malformed message was refused (%s: %s); "
                    "recording a dead letter instead",
                    bad.inspection_id,
                    type(exc).__name__,
                    exc,
                )
        try:
            _record_dead_letter(bad, settings)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.error(
                "giving up on malformed message %s: its dead letter was refused too: %s: %s",
                bad.task_id or "?",
                type(exc).__name__,
                exc,
            )
        return True
    except DatabaseUnavailable as exc:
        log.error("%s; putting the malformed message back", exc)
        return False


class _RuntimeUnavailable(RuntimeError):
    """The pool process cannot load its model (the worker is being shut down)."""


def _record_error_row(bad: Malformed, s: Settings) -> None:
    from db.repository import upsert_audit, upsert_inspection
    from db.session import session_scope
    from worker.batch import request_worker_shutdown
    from worker.retry import with_db_retries
    from worker.rows import error_row, placeholder_inspection
    from worker.runtime import RuntimeConfigError, get_runtime, worker_host

    assert bad.inspection_id is not None
    try:
        rt = get_runtime(s)
    except RuntimeConfigError as exc:
        request_worker_shutdown(f"cannot load the model in a pool process: {exc}")
        raise _RuntimeUnavailable(str(exc)) from exc
    key = (bad.inspection_id, rt.model_version, rt.method)
    inspection = placeholder_inspection(bad.payload, bad.inspection_id)
    why = bad.reason if bad.stage == "broker" else f"malformed message: {bad.reason}"
    row = error_row(key, why, host=worker_host(), delivery_count=1, params=rt.params)

    def tx() -> None:
        with session_scope(s.resolved_database_url) as session:
            upsert_inspection(session, inspection)
            upsert_audit(session, row)

    with_db_retries(tx, "writing the error row of a malformed message", s)


def _record_dead_letter(bad: Malformed, s: Settings) -> None:
    from db.dead_letters import DeadLetterRow, record_dead_letter
    from db.session import session_scope
    from worker.retry import with_db_retries
    from worker.runtime import worker_host

    row = DeadLetterRow(
        stage=bad.stage,
        reason=bad.reason,
        raw=bad.raw,
        raw_size=bad.raw_size,
        queue=bad.queue,
        task_id=bad.task_id,
        headers=bad.headers,
        worker_host=worker_host(),
    )

    def tx() -> None:
        with session_scope(s.resolved_database_url) as session:
            record_dead_letter(session, row)

    with_db_retries(tx, "recording a dead letter", s)
