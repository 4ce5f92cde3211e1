"""Raw broker messages for the malformed-message tests (docs/reliability.md, "No message stops a
worker").

* :func:`task_headers` / :func:`task_body`: the Celery protocol 2 headers and body the producer
  sends for the audit task (built by Celery itself, ``app.amqp.as_task_v2``).
* :class:`Wire`: one message as headers + body bytes + content type; :meth:`Wire.redis_entry`
  is the kombu Redis list entry for it (what ``LPUSH`` puts in the queue).
* :func:`malformed_cases`: every malformed shape the tests push, with the stage it is caught at,
  a piece of its reason and the ``inspection_id`` it must be recorded under (None: a dead
  letter). ``raw`` cases are Redis entries that are not even message envelopes.
* :func:`mutations`: seeded random mutations of a good entry, for the property test.

No torch here.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

TASK_NAME = "inspection_audit.audit"


def good_payload(iid: str, image_path: str = "img-000.png") -> dict[str, Any]:
    """A valid schema-1 inspection message."""
    return {
        "schema_version": 1,
        "inspection_id": iid,
        "image_path": image_path,
        "prediction": "ok",
        "score": 0.2,
        "line": "L1",
        "station": "S1",
        "captured_at": "2026-12-01T08:00:00+00:00",
    }


def task_headers(task_id: str | None = None) -> dict[str, Any]:
    """The protocol 2 headers Celery writes for the audit task (JSON-safe)."""
    from celery import Celery

    app = Celery("probe", set_as_current=False)
    msg = app.amqp.as_task_v2(task_id or str(uuid.uuid4()), TASK_NAME, args=[{}])
    return json.loads(json.dumps(msg.headers, default=str))


def task_body(payload: Any) -> list[Any]:
    """``[args, kwargs, embed]`` for one message argument."""
    return [[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


@dataclass
class Wire:
    """One message as it travels: headers, body bytes, content type and encoding."""

    body: bytes
    headers: dict[str, Any] | Any = field(default_factory=task_headers)
    content_type: str | Any = "application/json"
    content_encoding: str | Any = "utf-8"

    @classmethod
    def task(cls, payload: Any, **headers: Any) -> Wire:
        """The audit task carrying ``payload`` (headers overridden by ``headers``)."""
        return cls(json.dumps(task_body(payload)).encode(), {**task_headers(), **headers})

    def redis_entry(self, queue: str, **envelope: Any) -> bytes:
        """The kombu Redis list entry (JSON envelope, base64 body) for this message."""
        env = {
            "body": base64.b64encode(self.body).decode("ascii"),
            "content-encoding": self.content_encoding,
            "content-type": self.content_type,
            "headers": self.headers,
            "properties": {
                "correlation_id": str(uuid.uuid4()),
                "delivery_mode": 2,
                "delivery_info": {"exchange": queue, "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        env.update(envelope)
        return json.dumps(env).encode()


@dataclass
class Case:
    """A malformed message and how the worker must account for it."""

    name: str
    stage: str
    reason: str  # a piece of the recorded reason
    inspection_id: str | None = None  # recorded as this inspection's error row; None: dead letter
    wire: Wire | None = None  # a message (any broker)
    raw: bytes | None = None  # a Redis entry that is not a message envelope (Redis only)

    def redis_entry(self, queue: str) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.wire is not None
        return self.wire.redis_entry(queue)


def malformed_cases(tag: str, queue: str, image_path: str = "img-000.png") -> list[Case]:
    """Every malformed shape on the way to the batch handler (case names start with ``tag``).

    A case whose bytes still hold a message with a usable ``inspection_id`` (its own name) must
    become that inspection's error row; the others must become dead letters.
    """
    props = json.loads(Wire.task(good_payload("x")).redis_entry(queue))["properties"]

    def own(name: str) -> dict[str, Any]:
        return good_payload(name, image_path)

    def entry(name: str, **over: Any) -> bytes:
        """A good entry for the case's own id, with envelope keys replaced (_DROP removes)."""
        env = json.loads(Wire.task(own(name)).redis_entry(queue))
        for k, v in over.items():
            if v is _DROP:
                env.pop(k, None)
            else:
                env[k] = v
        return json.dumps(env).encode()

    def wire(b: Any, **kw: Any) -> Wire:
        return Wire(b if isinstance(b, bytes) else json.dumps(b).encode(), **kw)

    def hdr(**over: Any) -> dict[str, Any]:
        h = task_headers()
        for k, v in over.items():
            if v is _DROP:
                h.pop(k, None)
            else:
                h[k] = v
        return h

    cases: list[Case] = []

    def add(suffix: str, stage: str, reason: str, *, recovered: bool = False, **kw: Any) -> None:
        name = f"{tag}-{suffix}"
        make = kw.pop("make", None)
        if make is not None:
            kw.update(make(name))
        cases.append(Case(name, stage, reason, name if recovered else None, **kw))

    body = task_body
    # --- the Redis entry is not a message envelope (transport) ---------------------------------
    add("not-json", "transport", "not JSON", raw=b"\x00not json at all \xff\xfe")
    add("empty-entry", "transport", "not JSON", raw=b"")
    add("json-array", "transport", "is an array, not a message envelope", raw=b"[1,2]")
    add("json-null", "transport", "is null, not a message envelope", raw=b"null")
    add("json-string", "transport", "is a string, not a message envelope", raw=b'"hello"')
    add("bad-kombu-type", "transport", "not JSON", raw=b'{"__type__": "datetime", "__value__": 5}')
    add("deep", "transport", "not JSON", raw=b"[" * 100_000)
    add(
        "no-properties",
        "transport",
        "no properties",
        recovered=True,
        make=lambda n: {"raw": entry(n, properties=_DROP)},
    )
    add(
        "properties-string",
        "transport",
        "no properties",
        recovered=True,
        make=lambda n: {"raw": entry(n, properties="x")},
    )
    add(
        "no-delivery-tag",
        "transport",
        "no delivery_tag",
        recovered=True,
        make=lambda n: {"raw": entry(n, properties={**props, "delivery_tag": None})},
    )
    add(
        "no-delivery-info",
        "transport",
        "delivery_info",
        recovered=True,
        make=lambda n: {"raw": entry(n, properties={**props, "delivery_info": None})},
    )
    add("bad-base64", "transport", "body cannot be decoded", raw=entry("x", body="%%%not-base64"))
    add("body-number", "transport", "body is a number", raw=entry("x", body=5))
    add(
        "headers-list",
        "transport",
        "headers are an array",
        recovered=True,
        make=lambda n: {"raw": entry(n, headers=[1, 2])},
    )
    add(
        "body-encoding-rot13",
        "transport",
        "body_encoding",
        recovered=True,
        make=lambda n: {"raw": entry(n, properties={**props, "body_encoding": "rot13"})},
    )
    # --- a message, but not the audit task's protocol 2 message (envelope) ---------------------
    add("headers-null", "envelope", "no task", wire=wire(body(None), headers=None))
    add(
        "no-task",
        "envelope",
        "no task",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(task=_DROP))},
    )
    add(
        "task-list",
        "envelope",
        "task that is an array",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(task=["x"]))},
    )
    add(
        "other-task",
        "envelope",
        "is not the audit task",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(task="other.task"))},
    )
    add(
        "no-id",
        "envelope",
        "no task id",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(id=None))},
    )
    add(
        "eta",
        "envelope",
        "eta is set",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(eta="2999-01-01T00:00:00+00:00"))},
    )
    add(
        "bad-eta",
        "envelope",
        "eta is set",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(eta="not a date"))},
    )
    add(
        "expires",
        "envelope",
        "expires is set",
        recovered=True,
        make=lambda n: {"wire": wire(body(own(n)), headers=hdr(expires=[1]))},
    )
    add(
        "pickle",
        "envelope",
        "content type 'application/x-python-serialize' is refused",
        wire=Wire(b"\x80\x04N.", task_headers(), "application/x-python-serialize", "binary"),
    )
    add(
        "yaml",
        "envelope",
        "content type 'application/x-yaml' is refused",
        wire=Wire(b"- 1\n", task_headers(), "application/x-yaml", "utf-8"),
    )
    add(
        "no-content-type",
        "envelope",
        "content type None is refused",
        wire=Wire(b"[]", task_headers(), None, None),
    )
    add("body-not-json", "envelope", "not valid JSON", wire=wire(b"{not json"))
    add("body-not-utf8", "envelope", "not valid JSON", wire=wire(b"\xff\xfe[1]"))
    add("body-null", "envelope", "the body is null", wire=wire(None))
    add("body-object", "envelope", "the body is an object", wire=wire({}))
    add(
        "body-hybrid",
        "envelope",
        "the body is an object",
        recovered=True,
        make=lambda n: {"wire": wire({"args": [own(n)], "kwargs": {}})},
    )
    add("body-empty-array", "envelope", "array of 0", wire=wire([]))
    add(
        "body-two",
        "envelope",
        "array of 2",
        recovered=True,
        make=lambda n: {"wire": wire([[own(n)], {}])},
    )
    add("args-string", "envelope", "args is a string", wire=wire(["abc", {}, {}]))
    add(
        "kwargs-list",
        "envelope",
        "kwargs is an array",
        recovered=True,
        make=lambda n: {"wire": wire([[own(n)], [], {}])},
    )
    add(
        "embed-string",
        "envelope",
        "embed is a string",
        recovered=True,
        make=lambda n: {"wire": wire([[own(n)], {}, "x"])},
    )
    add("no-args", "envelope", "takes one message (got 0", wire=wire([[], {}, {}]))
    add(
        "two-args",
        "envelope",
        "takes one message (got 2",
        recovered=True,
        make=lambda n: {"wire": wire([[own(n), 1], {}, {}])},
    )
    add(
        "extra-kwarg",
        "envelope",
        "takes one message (got 1",
        recovered=True,
        make=lambda n: {"wire": wire([[own(n)], {"x": 1}, {}])},
    )
    # --- the audit task's message, but nothing to record it under (message) --------------------
    add("payload-string", "message", "is a string, not an object", wire=wire(body("just text")))
    add("payload-null", "message", "is null, not an object", wire=wire(body(None)))
    no_id = {k: v for k, v in own("x").items() if k != "inspection_id"}
    add("no-inspection-id", "message", "has no inspection_id", wire=wire(body(no_id)))
    add(
        "long-id",
        "message",
        "is longer than 128 characters",
        wire=wire(body({**own("x"), "inspection_id": "X" * 5000})),
    )
    add(
        "bad-id",
        "message",
        "not 1-128 characters",
        wire=wire(body({**own("x"), "inspection_id": "../etc\x00"})),
    )
    return cases


class _Drop:
    """Marks an envelope or header key to remove."""


_DROP = _Drop()


# --- random mutations (property test) -------------------------------------------------------------
_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    "",
    "x",
    "\x00",
    "\ud800",
    "a" * 300,
    [],
    {},
    [None],
    {"a": 1},
    ["x", {}, {}],
    [[{}], {}, {}],
    {"__type__": "uuid", "__value__": "nope"},
]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any, drop: bool) -> Any:
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if drop and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return obj


def mutations(queue: str, n: int, seed: int = 0) -> list[bytes]:
    """``n`` seeded mutations of a good entry: random bytes, cut JSON, or one node of the
    envelope or of its decoded body replaced by a random JSON value or removed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        payload = good_payload(f"fuzz-{i}")
        env = json.loads(Wire.task(payload).redis_entry(queue))
        body = task_body(payload)
        roll = rng.random()
        if roll < 0.05:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))))
            continue
        if roll < 0.10:
            text = json.dumps(env).encode()
            out.append(text[: rng.randrange(len(text))])
            continue
        value = rng.choice(_VALUES)
        drop = rng.random() < 0.3
        if roll < 0.55:  # the envelope (properties, headers, content type ...)
            path = rng.choice(_paths(env)[1:])
            env = _set(env, path, json.loads(json.dumps(value)), drop)
        else:  # the decoded body, re-encoded
            path = rng.choice(_paths(body))
            body = _set(body, path, json.loads(json.dumps(value)), drop)
            if isinstance(env, dict):
                env["body"] = base64.b64encode(json.dumps(body).encode()).decode("ascii")
        out.append(json.dumps(env).encode())
    return out
