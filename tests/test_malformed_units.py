"""Malformed messages, without a worker (docs/reliability.md, "No message stops a worker").

Each shape of tests/support/messages.py goes through what the worker's main process does with
a Redis list entry: the transport's :func:`worker.malformed.read_entry`, kombu's virtual
``Message``, the consumer's :func:`worker.malformed.check_task_message`. The stage, the reason
and the recovered ``inspection_id`` are checked per case. A seeded property test then throws
hundreds of random mutations of a good entry at the same path and, for every message that
passes the check, at Celery's ``Request`` and celery-batches' ``SimpleRequest`` as the batch
strategy builds them: nothing may raise anywhere, and what passes reaches the batch with one
object payload that has a usable ``inspection_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.messages import Wire, good_payload, malformed_cases, mutations
from worker.malformed import (
    MALFORMED_HEADER,
    Malformed,
    check_task_message,
    envelope_problem,
    read_entry,
    usable_inspection_id,
)

QUEUE = "ia-unit"
TASK = "inspection_audit.audit"


@pytest.fixture(scope="module")
def channel() -> Iterator[Any]:
    """A kombu virtual channel (memory transport): what builds messages from envelopes."""
    from kombu import Connection

    conn = Connection("memory://")
    try:
        yield conn.default_channel
    finally:
        conn.close()


def _message(channel: Any, entry: bytes) -> Any:
    from kombu.serialization import prepare_accept_content

    envelope = read_entry(entry, QUEUE)
    assert envelope_problem(envelope) is None  # whatever came in, kombu can take this
    message = channel.Message(envelope, channel=channel)
    message.accept = prepare_accept_content(["json"])  # as the worker's consumer sets it
    return message


CASES = malformed_cases("unit", QUEUE)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_malformed_shape_is_named_and_accounted_for(channel: Any, case: Any) -> None:
    message = _message(channel, case.redis_entry(QUEUE))
    bad = check_task_message(message, TASK, QUEUE)
    assert isinstance(bad, Malformed), case.name
    assert bad.stage == case.stage, (case.name, bad)
    assert case.reason in bad.reason, (case.name, bad.reason)
    assert bad.inspection_id == case.inspection_id, (case.name, bad)
    assert bad.queue == QUEUE
    assert len(bad.reason) < 600 and "\n" not in bad.reason  # one line
    if case.name.endswith("long-id"):
        assert "X" * 60 not in bad.reason and "(5000 characters)" in bad.reason


def test_transport_stand_in_carries_the_entry_and_its_size() -> None:
    raw = b"\x00garbage" * 5000  # 40 000 bytes
    envelope = read_entry(raw, QUEUE)
    assert envelope["headers"][MALFORMED_HEADER].startswith("the broker entry is not JSON")
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    import base64

    carried = base64.b64decode(envelope["body"])
    assert carried == raw[: len(carried)] and len(carried) == 16_384
    assert envelope["headers"]["x-inspection-audit-raw-size"] == 40_000


def test_good_messages_pass(channel: Any) -> None:
    for wire in (
        Wire.task(good_payload("ok-1")),
        Wire(
            json.dumps([[], {"message": good_payload("ok-2")}, None]).encode(),
        ),
    ):
        entry = wire.redis_entry(QUEUE)
        assert read_entry(entry, QUEUE) == json.loads(entry)  # a good entry is left as it is
        assert check_task_message(_message(channel, entry), TASK, QUEUE) is None


def test_usable_inspection_id() -> None:
    assert usable_inspection_id("L1-000123") == "L1-000123"
    assert usable_inspection_id("a" * 128) == "a" * 128
    for bad in ("a" * 129, "", "-x", "a b", "a\x00", 5, None, ["a"]):
        assert usable_inspection_id(bad) is None


def _celery_request(app: Any, message: Any) -> Any:
    """The Request celery-batches builds for a protocol 2 message, then its SimpleRequest."""
    from celery.worker.request import Request
    from celery_batches import SimpleRequest

    assert message.payload is not None and "args" not in message.payload  # protocol 2 path
    req = Request(
        message,
        app=app,
        task=app.tasks[TASK],
        hostname="unit@test",
        body=message.body,
        headers=message.headers,
        decoded=False,
        utc=True,
    )
    return SimpleRequest.from_request(req)


def test_random_mutations_never_raise_and_what_passes_reaches_the_batch(channel: Any) -> None:
    """Property test, 1,000 seeded mutations: read_entry, kombu's Message, check_task_message,
    Celery's Request and celery-batches' SimpleRequest never raise; a message the check lets
    through gives the batch exactly one object payload with a usable inspection_id."""
    from inspection_audit.settings import Settings
    from worker.app import create_app
    from worker.batch import _payload_of

    app = create_app(Settings(broker_url="memory://", queue=QUEUE))
    passed = caught = 0
    stages: dict[str, int] = {}
    for entry in mutations(QUEUE, 1000, seed=11):
        message = _message(channel, entry)
        bad = check_task_message(message, TASK, QUEUE)
        if bad is not None:
            caught += 1
            stages[bad.stage] = stages.get(bad.stage, 0) + 1
            assert bad.reason and "\n" not in bad.reason
            continue
        passed += 1
        simple = _celery_request(app, message)
        payload = _payload_of(simple)
        assert isinstance(payload, dict), payload
        assert usable_inspection_id(payload.get("inspection_id")) is not None
    # the mutations reach every stage, and many stay valid for this check (a header nobody
    # reads, a payload field: the schema is the batch's to judge, as an error row)
    assert passed > 100 and caught > 100, (passed, caught)
    assert {"transport", "envelope", "message"} <= set(stages), stages
