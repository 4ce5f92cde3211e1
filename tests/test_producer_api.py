"""enqueue()/enqueue_many() against the real Redis on 127.0.0.1:6379 (no mocks)."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from inspection_audit.settings import Settings
from producer import EnqueueError, InspectionMessage, MessageError, enqueue, enqueue_many
from producer.api import retry_policy
from tests.support.queue import redis_queue_length, redis_queue_messages
from worker.app import TASK_NAME

NOW = datetime(2024, 6, 1, 6, 15, 2, tzinfo=UTC)


def _png(path: Path, value: int = 128, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)
    return path


def _kw(settings: Settings) -> dict[str, Any]:
    return {"line": "L1", "station": "S3", "captured_at": NOW, "settings": settings}


def test_one_path_message_lands_as_json(queue_settings: Settings, tmp_path: Path) -> None:
    img = _png(tmp_path / "imgs" / "a.png")
    iid = enqueue("insp-1", img, "ok", 0.25, model_version="m1", **_kw(queue_settings))
    assert iid == "insp-1"
    assert redis_queue_length(queue_settings) == 1
    [env] = redis_queue_messages(queue_settings)
    assert env["content-type"] == "application/json"
    assert env["properties"]["body_encoding"] == "base64"
    assert env["headers"]["task"] == TASK_NAME
    args, kwargs, _embed = env["decoded_body"]
    assert kwargs == {}
    assert args == [
        {
            "schema_version": 1,
            "inspection_id": "insp-1",
            "image_path": "imgs/a.png",  # relative to the (first) image root
            "image_b64": None,
            "image_sha256": hashlib.sha256(img.read_bytes()).hexdigest(),
            "prediction": "ok",
            "score": 0.25,
            "line": "L1",
            "station": "S3",
            "captured_at": "2024-06-01T06:15:02Z",
            "model_version": "m1",
        }
    ]


def test_inline_bytes_and_relative_path(queue_settings: Settings, tmp_path: Path) -> None:
    img = _png(tmp_path / "b.png")
    data = img.read_bytes()
    enqueue("insp-inline", data, "defect", 0.9, **_kw(queue_settings))
    enqueue("insp-rel", "b.png", "ok", 0, **_kw(queue_settings))  # relative to the root
    envs = redis_queue_messages(queue_settings)
    bodies = [e["decoded_body"][0][0] for e in envs]
    assert [b["inspection_id"] for b in bodies] == ["insp-inline", "insp-rel"]
    assert base64.b64decode(bodies[0]["image_b64"]) == data
    assert bodies[0]["image_path"] is None
    assert bodies[1]["image_path"] == "b.png"
    assert bodies[1]["score"] == 0.0


def test_path_under_second_root_is_sent_absolute(tmp_path: Path, queue_settings: Settings) -> None:
    other = tmp_path.parent / f"{tmp_path.name}-other"
    img = _png(other / "c.png")
    settings = queue_settings.model_copy(update={"image_roots": [tmp_path, other]})
    enqueue("insp-abs", img, "ok", 0.1, **_kw(settings))
    [env] = redis_queue_messages(settings)
    assert env["decoded_body"][0][0]["image_path"] == str(img.resolve())


def test_many_good_messages_land(queue_settings: Settings, tmp_path: Path) -> None:
    msgs = [
        InspectionMessage(
            inspection_id=f"m-{i}",
            image_path=str(_png(tmp_path / f"{i}.png", value=i)),
            prediction="ok",
            score=i / 10,
            line="L1",
            station="S3",
            captured_at=NOW,
        )
        for i in range(5)
    ]
    as_dict = {**msgs[0].to_json_dict(), "inspection_id": "m-dict"}
    seen: list[str] = []
    sent = enqueue_many(
        [*msgs, as_dict], settings=queue_settings, on_sent=lambda m: seen.append(m.inspection_id)
    )
    assert sent == [f"m-{i}" for i in range(5)] + ["m-dict"]
    assert seen == sent
    assert redis_queue_length(queue_settings) == 6
    ids = [e["decoded_body"][0][0]["inspection_id"] for e in redis_queue_messages(queue_settings)]
    assert ids == sent  # in order


def test_given_app_with_key_prefix(
    queue_settings: Settings, queue_app: Any, redis_keyprefix: str, tmp_path: Path
) -> None:
    img = _png(tmp_path / "p.png")
    enqueue("insp-prefixed", img, "ok", 0.5, app=queue_app, **_kw(queue_settings))
    assert redis_queue_length(queue_settings) == 0
    assert redis_queue_length(queue_settings, prefix=redis_keyprefix) == 1


# --- everything bad is refused before anything is sent -----------------------------------------
def _bad_cases(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    good = _png(tmp_path / "good.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    _png(outside / "secret.png")
    link = tmp_path / "escape.png"
    link.symlink_to(outside / "secret.png")
    (tmp_path / "empty.png").write_bytes(b"")
    base: dict[str, Any] = {
        "inspection_id": "bad-1",
        "image": good,
        "prediction": "ok",
        "score": 0.1,
    }
    return {
        "label": ({**base, "prediction": "OK"}, "prediction"),
        "score_high": ({**base, "score": 1.5}, "score"),
        "score_nan": ({**base, "score": float("nan")}, "score"),
        "naive_time": ({**base, "captured_at": datetime(2024, 6, 1, 8, 0)}, "captured_at"),
        "missing_file": ({**base, "image": tmp_path / "nope.png"}, "image_path"),
        "empty_file": ({**base, "image": tmp_path / "empty.png"}, "image_path"),
        "dotdot": ({**base, "image": "../../etc/passwd"}, "image_path"),
        "abs_outside": ({**base, "image": "/etc/passwd"}, "image_path"),
        "symlink_escape": ({**base, "image": link}, "image_path"),
        "inline_too_big": ({**base, "image": b"x" * 101}, "image_b64"),
        "bad_id": ({**base, "inspection_id": "a b"}, "inspection_id"),
        "not_an_image_arg": ({**base, "image": 123}, "image"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "label",
        "score_high",
        "score_nan",
        "naive_time",
        "missing_file",
        "empty_file",
        "dotdot",
        "abs_outside",
        "symlink_escape",
        "inline_too_big",
        "bad_id",
        "not_an_image_arg",
    ],
)
def test_bad_input_raises_before_sending(
    case: str, queue_settings: Settings, tmp_path: Path
) -> None:
    settings = queue_settings.model_copy(update={"max_inline_bytes": 100})
    kwargs, field = _bad_cases(tmp_path)[case]
    call = {"line": "L1", "station": "S3", "captured_at": NOW, **kwargs}
    with pytest.raises(MessageError) as ei:
        enqueue(
            call.pop("inspection_id"),
            call.pop("image"),
            call.pop("prediction"),
            call.pop("score"),
            settings=settings,
            **call,
        )
    assert ei.value.field == field, str(ei.value)
    assert redis_queue_length(settings) == 0


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        (
            {"schema_version": 2},
            "schema_version",
            "unsupported schema_version 2; this worker reads 1",
        ),
        ({"priority": "high"}, "priority", "unknown field"),
    ],
)
def test_bad_dicts_raise_before_sending(
    over: dict[str, Any], field: str, words: str, queue_settings: Settings, tmp_path: Path
) -> None:
    good = {
        "inspection_id": "d-1",
        "image_path": str(_png(tmp_path / "d.png")),
        "prediction": "ok",
        "score": 0.2,
        "line": "L1",
        "station": "S3",
        "captured_at": "2024-06-01T08:00:00+02:00",
    }
    with pytest.raises(MessageError, match=words) as ei:
        enqueue_many([{**good, **over}], settings=queue_settings)
    assert ei.value.field == field
    assert redis_queue_length(queue_settings) == 0


def test_one_bad_message_in_a_batch_sends_nothing(queue_settings: Settings, tmp_path: Path) -> None:
    def m(i: int, **over: Any) -> dict[str, Any]:
        return {
            "inspection_id": f"b-{i}",
            "image_path": f"{i}.png",
            "prediction": "ok",
            "score": 0.1,
            "line": "L1",
            "station": "S3",
            "captured_at": NOW.isoformat(),
            **over,
        }

    for i in range(4):
        _png(tmp_path / f"{i}.png")
    batch = [m(0), m(1), m(2, score=1.5), m(3)]
    with pytest.raises(MessageError) as ei:
        enqueue_many(batch, settings=queue_settings)
    assert ei.value.index == 2 and ei.value.field == "score"
    assert "message 2" in str(ei.value)
    assert redis_queue_length(queue_settings) == 0

    # the last message is the bad one: still nothing sent
    with pytest.raises(MessageError):
        enqueue_many([m(0), m(1), m(3, image_path="missing.png")], settings=queue_settings)
    assert redis_queue_length(queue_settings) == 0

    # duplicate ids in one batch
    with pytest.raises(MessageError, match="duplicate"):
        enqueue_many([m(0), m(1), m(0)], settings=queue_settings)
    assert redis_queue_length(queue_settings) == 0

    assert enqueue_many([m(0), m(1), m(3)], settings=queue_settings) == ["b-0", "b-1", "b-3"]
    assert redis_queue_length(queue_settings) == 3


def test_sha256_mismatch_for_a_file_is_refused(queue_settings: Settings, tmp_path: Path) -> None:
    img = _png(tmp_path / "s.png")
    msg = InspectionMessage(
        inspection_id="s-1",
        image_path=str(img),
        image_sha256="0" * 64,
        prediction="ok",
        score=0.1,
        line="L1",
        station="S3",
        captured_at=NOW,
    )
    with pytest.raises(MessageError) as ei:
        enqueue_many([msg], settings=queue_settings)
    assert ei.value.field == "image_sha256"
    assert redis_queue_length(queue_settings) == 0


def test_no_image_roots_configured(queue_settings: Settings, tmp_path: Path) -> None:
    img = _png(tmp_path / "r.png")
    settings = queue_settings.model_copy(update={"image_roots": []})
    with pytest.raises(MessageError, match="no image roots"):
        enqueue("r-1", img, "ok", 0.1, **_kw(settings))
    assert redis_queue_length(settings) == 0


# --- a broker that is down ----------------------------------------------------------------------
def test_broker_down_raises_within_bounded_time(tmp_path: Path) -> None:
    img = _png(tmp_path / "x.png")
    settings = Settings(
        broker_url="redis://:s3cret-pw@127.0.0.1:6391/0",  # nothing listens there
        queue="ia-test-down",
        image_roots=[tmp_path],
        home=tmp_path / "home",
        enqueue_timeout_s=2.0,
    )
    t0 = time.monotonic()
    with pytest.raises(EnqueueError) as ei:
        enqueue_many(
            [
                {
                    "inspection_id": f"x-{i}",
                    "image_path": "x.png",
                    "prediction": "ok",
                    "score": 0.1,
                    "line": "L1",
                    "station": "S3",
                    "captured_at": NOW.isoformat(),
                }
                for i in range(3)
            ],
            settings=settings,
        )
    elapsed = time.monotonic() - t0
    assert elapsed < 10
    err = ei.value
    assert err.sent_ids == [] and err.total == 3
    assert "0 of 3" in str(err)
    assert "127.0.0.1:6391" in str(err)
    assert "s3cret-pw" not in str(err) and "s3cret-pw" not in err.broker
    assert err.queue == "ia-test-down"

    t0 = time.monotonic()
    with pytest.raises(EnqueueError) as ei1:
        enqueue("x-single", img, "ok", 0.1, **_kw(settings))
    assert time.monotonic() - t0 < 10
    assert ei1.value.sent_ids == []


@pytest.mark.parametrize("timeout", [0.5, 2.0, 10.0, 60.0])
def test_retry_policy_sleeps_fit_the_timeout(timeout: float) -> None:
    p = retry_policy(timeout)
    total = sum(
        min(p["interval_start"] + i * p["interval_step"], p["interval_max"])
        for i in range(int(p["max_retries"]))
    )
    assert total <= timeout
    assert p["max_retries"] >= 1


def test_no_pickle_anywhere(queue_settings: Settings, tmp_path: Path) -> None:
    enqueue("np-1", _png(tmp_path / "np.png"), "ok", 0.1, **_kw(queue_settings))
    [env] = redis_queue_messages(queue_settings)
    assert env["content-type"] == "application/json"
    assert "pickle" not in repr(env)


def test_producer_import_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, producer, producer.api, worker.app; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
