"""The inspection message schema (no broker needed)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from inspection_audit.settings import Settings
from producer.schema import InspectionMessage, MessageError, parse_message


def _msg(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "inspection_id": "L1-000123",
        "image_path": "2024/06/01/000123.png",
        "prediction": "ok",
        "score": 0.031,
        "line": "L1",
        "station": "S3",
        "captured_at": datetime(2024, 6, 1, 8, 15, 2, 123000, tzinfo=timezone(timedelta(hours=2))),
        "model_version": "resnet18-0a1b2c3d4e5f",
    }
    d.update(over)
    return d


def test_round_trip_through_json() -> None:
    m = InspectionMessage(**_msg())
    wire = m.to_json_dict()
    assert json.loads(json.dumps(wire)) == wire  # JSON-safe
    assert wire["schema_version"] == 1
    assert wire["captured_at"] == "2024-06-01T08:15:02.123000+02:00"
    back = parse_message(json.loads(json.dumps(wire)))
    assert back == m
    assert back.captured_at.utcoffset() == timedelta(hours=2)


def test_inline_round_trip_and_image_bytes() -> None:
    data = b"\x89PNG fake bytes"
    b64 = base64.b64encode(data).decode()
    sha = hashlib.sha256(data).hexdigest()
    m = parse_message(_msg(image_path=None, image_b64=b64, image_sha256=sha))
    assert m.image_bytes() == data
    assert parse_message(m.to_json_dict()) == m


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"prediction": "maybe"}, "prediction", "'ok' or 'defect'"),
        ({"score": 1.5}, "score", "less than or equal to 1"),
        ({"score": -0.1}, "score", "greater than or equal to 0"),
        ({"score": float("nan")}, "score", "finite"),
        ({"score": float("inf")}, "score", "finite"),
        ({"score": True}, "score", "boolean"),
        ({"score": "0.5"}, "score", "valid number"),
        ({"captured_at": datetime(2024, 6, 1, 8, 0)}, "captured_at", "timezone-aware"),
        ({"captured_at": "2024-06-01T08:00:00"}, "captured_at", "timezone-aware"),
        ({"inspection_id": "../etc"}, "inspection_id", "pattern"),
        ({"inspection_id": ""}, "inspection_id", "at least 1"),
        ({"inspection_id": "a" * 129}, "inspection_id", "at most 128"),
        ({"line": ""}, "line", "at least 1"),
        ({"station": "   "}, "station", "whitespace"),
        ({"station": "s" * 65}, "station", "at most 64"),
        ({"image_path": None}, "image_path|image_b64", "neither"),
        ({"image_b64": "aGVsbG8="}, "image_path|image_b64", "both"),
        ({"image_path": None, "image_b64": "not base64!"}, "image_b64", "base64"),
        ({"image_sha256": "XYZ"}, "image_sha256", "pattern"),
        ({"extra": 1}, "extra", "unknown field"),
        ({"prediction": None}, "prediction", "'ok' or 'defect'"),
    ],
)
def test_bad_fields_are_named(over: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(MessageError) as ei:
        parse_message(_msg(**over))
    err = ei.value
    assert err.field == field, str(err)
    assert words in str(err)
    assert field in str(err)


def test_missing_field_is_named() -> None:
    d = _msg()
    del d["score"]
    with pytest.raises(MessageError) as ei:
        parse_message(d)
    assert ei.value.field == "score"
    assert "required" in str(ei.value)


def test_unknown_schema_version() -> None:
    with pytest.raises(MessageError, match=r"unsupported schema_version 2; this worker reads 1"):
        parse_message({**_msg(), "schema_version": 2})


def test_not_a_dict() -> None:
    with pytest.raises(MessageError, match="JSON object"):
        parse_message([1, 2])


def test_inline_limit_with_context_and_explicit_call() -> None:
    settings = Settings(max_inline_bytes=10)
    b64 = base64.b64encode(b"x" * 11).decode()
    msg = _msg(image_path=None, image_b64=b64)
    m = parse_message(msg)  # no settings: no deployment limit
    with pytest.raises(MessageError, match="over the limit of 10") as ei:
        m.validate_limits(settings)
    assert ei.value.field == "image_b64"
    with pytest.raises(MessageError, match="over the limit of 10"):
        parse_message(msg, settings)
    ok = base64.b64encode(b"x" * 10).decode()
    assert parse_message(_msg(image_path=None, image_b64=ok), settings).image_bytes() == b"x" * 10


def test_inline_sha256_mismatch() -> None:
    b64 = base64.b64encode(b"abc").decode()
    with pytest.raises(MessageError) as ei:
        parse_message(_msg(image_path=None, image_b64=b64, image_sha256="0" * 64))
    assert ei.value.field == "image_sha256"


def test_frozen_and_utc_default_serialisation() -> None:
    m = InspectionMessage(**_msg(captured_at=datetime(2024, 1, 1, tzinfo=UTC)))
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        m.score = 0.5  # type: ignore[misc]
    assert parse_message(m.to_json_dict()).captured_at == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("model_version", "v1\x00", "contains a NUL character at position 2"),
        ("image_path", "a\x00.png", "contains a NUL character at position 1"),
        ("line", "L\x00", "contains a NUL character at position 1"),
        ("station", "S\ud800", "contains an unpaired surrogate U+D800 at position 1"),
        ("model_version", json.loads('"\\udc80v"'), "contains an unpaired surrogate U+DC80"),
        ("image_path", "img-\udfff.png", "contains an unpaired surrogate U+DFFF at position 4"),
    ],
)
def test_text_a_database_cannot_store_is_refused_naming_the_field(
    field: str, value: str, words: str
) -> None:
    """Refused where the message is parsed, naming the field, not later by PostgreSQL (which
    refuses NUL in text, and cannot encode an unpaired surrogate) when the row is written."""
    with pytest.raises(MessageError) as ei:
        parse_message(
            json.loads(json.dumps({**_msg(), "captured_at": "2024-06-01T08:00:00Z"}))
            | {field: value}
        )
    assert ei.value.field == field and words in ei.value.reason, str(ei.value)
    text = str(ei.value)
    assert "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text)
    text.encode("utf-8")  # the error itself can be stored and printed


def test_an_over_long_inspection_id_is_not_repeated_whole() -> None:
    from producer.api import enqueue

    long_id = "A" * 10_000
    with pytest.raises(MessageError) as ei:
        enqueue(long_id, b"\x89PNG", "ok", 0.1, line="L", station="S")
    text = str(ei.value)
    assert "inspection_id: String should have at most 128 characters" in text
    assert "(10000 characters)" in text and len(text) < 300, text
    with pytest.raises(MessageError) as ei2:
        parse_message({**_msg(), "inspection_id": long_id})
    assert len(str(ei2.value)) < 300
