"""Hostile or broken input through a real worker (docs/reliability.md).

One worker (``-c 1``, B=4) on a Redis server of the module's own audits everything a careless
or hostile producer can send: images that cannot be read, decoded or accepted (each an
``error`` row saying why), unusual images that must decode and score (finite numbers, EXIF
orientation applied), malformed messages (an ``error`` row when there is an inspection id to
record it under, a dead letter otherwise) and a pickle message (refused before it is
deserialised: a dead letter holding its bytes, no row, no side effect). Messages are sent raw with the Celery app, bypassing the producer's
validation, as an attacker would. The worker keeps going throughout.

A second worker proves that one inspection sent twice, or one message delivered twice, gives
one row with the duplicates counted.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import struct
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support.models import tiny_checkpoint
from tests.support.workers import (
    WorkerProc,
    audit_rows,
    make_images,
    start_worker,
    stop_workers,
    wait_ready,
    wait_rows,
    worker_env,
)
from tests.test_faults_services import RedisServer

pytestmark = pytest.mark.slow

QUEUE = "ia-faults-input"
MAX_PIXELS = 100_000
MAX_INLINE = 2_000
NUMBERS = (
    "p_defect",
    "energy",
    "iou_defect",
    "iou_ok",
    "iou_gap",
    "p_defect_adv",
    "iou_defect_adv",
    "iou_ok_adv",
    "iou_gap_adv",
    "decision_score",
)


def _msg(iid: str, image_path: str | None = None, **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "inspection_id": iid,
        "image_path": image_path,
        "prediction": "ok",
        "score": 0.2,
        "line": "L1",
        "station": "S1",
        "captured_at": datetime.now(UTC).isoformat(),
    }
    m.update(over)
    return m


PICKLE_REFUSED = "content type 'application/x-python-serialize' is refused"


def _dead_letters(url: str) -> list[dict[str, Any]]:
    from db.dead_letters import dead_letters
    from db.session import session_scope

    with session_scope(url) as s:
        return dead_letters(s, limit=None)


def _send_raw(broker: str, payloads: list[Any], **options: Any) -> None:
    """Send task messages with no validation at all (JSON unless ``serializer`` says otherwise)."""
    from inspection_audit.settings import Settings
    from worker.app import TASK_NAME, create_app

    app = create_app(Settings(broker_url=broker, queue=QUEUE), worker=False)
    options.setdefault("serializer", "json")
    try:
        for p in payloads:
            app.send_task(TASK_NAME, args=[p], queue=QUEUE, **options)
    finally:
        app.close()


class _TouchOnUnpickle:
    """Pickles to ``pathlib.Path.touch(path)``: unpickling it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


# --- the images -------------------------------------------------------------------------------------
def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw: Any) -> str:
    img.save(path, fmt, **kw)
    return path.name


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` (1-bit gray) with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _hostile_images(img: Path, outside: Path) -> dict[str, str]:
    """inspection id -> image path (relative to the root) of every image that must be refused."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "JPEG")
    (img / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "empty.png").write_bytes(b"")
    (img / "notes.png").write_text("this is a text file, not an image\n" * 10)
    Image.new("L", (48, 48), 120).save(outside / "secret.png")
    (img / "escape.png").symlink_to(outside / "secret.png")
    Image.fromarray(rng.integers(0, 256, (400, 400), dtype=np.uint8)).save(img / "big.png")
    (img / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # 10 Gpx in ~100 bytes
    Image.new("L", (1, 1), 100).save(img / "one.png")
    Image.new("L", (10000, 8), 100).save(img / "strip.png")
    return {
        "bad-truncated-jpeg": "truncated.jpg",
        "bad-zero-bytes": "empty.png",
        "bad-not-an-image": "notes.png",
        "bad-missing-file": "does-not-exist.png",
        "bad-dotdot-passwd": "../../etc/passwd",
        "bad-symlink-escape": "escape.png",
        "bad-pixels-over-limit": "big.png",
        "bad-decompression-bomb": "bomb.png",
        "bad-1x1": "one.png",
        "bad-10000x8": "strip.png",
    }


HOSTILE_ERRORS = {
    "bad-truncated-jpeg": "image is truncated or corrupt",
    "bad-zero-bytes": "image file is empty (0 bytes)",
    "bad-not-an-image": "bytes are not a recognised image format",
    "bad-missing-file": "image file not found",
    "bad-dotdot-passwd": "'../../etc/passwd' resolves outside the configured image roots",
    "bad-symlink-escape": "'escape.png' resolves outside the configured image roots",
    "bad-pixels-over-limit": (
        f"image is 400x400 = 160000 pixels, over the limit of {MAX_PIXELS} "
        "(possible decompression bomb)"
    ),
    "bad-decompression-bomb": "decompression bomb",
    "bad-1x1": "image is 1x1, smaller than the minimum side of 16 px",
    "bad-10000x8": "image is 10000x8, smaller than the minimum side of 16 px",
}


def _decodable_images(img: Path) -> dict[str, str]:
    """inspection id -> image of every unusual image that must decode and score."""
    yy, xx = np.mgrid[0:48, 0:48]
    blob = np.exp(-((yy - 30) ** 2 + (xx - 14) ** 2) / 60.0)
    g16 = (20000 + 40000 * blob).astype(np.uint16)
    rgba = np.zeros((48, 48, 4), dtype=np.uint8)
    rgba[..., 0] = (255 * blob).astype(np.uint8)
    rgba[..., 1] = 90
    rgba[..., 2] = (xx * 5).astype(np.uint8)
    rgba[..., 3] = (255 - yy * 4).astype(np.uint8)
    cmyk = Image.new("CMYK", (48, 48), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 40), (24, 0, 48, 48))
    # EXIF orientation 6: stored 32 wide × 48 tall, displayed (upright) 48 wide × 32 tall
    upright = np.full((32, 48), 110, dtype=np.uint8)
    upright[4:14, 4:16] = 250
    upright[20:30, 30:46] = 10
    stored = Image.fromarray(upright, mode="L").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(img / "exif6.jpg", "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(img / "exif6.jpg") as im:
        im.load()
        decoded_stored = im.copy()
        as_displayed = ImageOps.exif_transpose(im)
    assert as_displayed.size == (48, 32)
    as_displayed.save(img / "exif6-upright.png")  # the same pixels, saved upright
    decoded_stored.save(img / "exif6-as-stored.png")  # the same pixels, orientation ignored
    return {
        "ok-16bit-png": _save(Image.fromarray(g16), img / "g16.png"),
        "ok-rgba-png": _save(Image.fromarray(rgba, mode="RGBA"), img / "rgba.png"),
        "ok-cmyk-jpeg": _save(cmyk, img / "cmyk.jpg", "JPEG", quality=95),
        "ok-exif-rotated-jpeg": "exif6.jpg",
        "ok-exif-upright-png": "exif6-upright.png",
        "ok-exif-as-stored-png": "exif6-as-stored.png",
        "ok-all-black": _save(Image.new("L", (48, 48), 0), img / "black.png"),
        "ok-all-white": _save(Image.new("L", (48, 48), 255), img / "white.png"),
    }


def _hostile_messages(img: Path, good: str) -> tuple[list[Any], dict[str, str]]:
    """Malformed payloads and, per inspection id, the text its error row must hold."""
    big = io.BytesIO()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > MAX_INLINE
    inline = base64.b64encode(big.getvalue()).decode("ascii")
    payloads: list[Any] = [
        _msg("msg-bad-label", good, prediction="maybe"),
        _msg("msg-nan-score", good, score=float("nan")),  # JSON "NaN" literal on the wire
        _msg("msg-nan-string", good, score="NaN"),
        _msg("msg-score-high", good, score=1.5),
        _msg("msg-score-negative", good, score=-0.1),
        _msg("msg-inline-too-big", None, image_b64=inline),
        {**_msg("msg-schema-v2", good), "schema_version": 2},
        {k: v for k, v in _msg("ignored", good).items() if k != "inspection_id"},
        "not even a JSON object",
    ]
    expect = {
        "msg-bad-label": "prediction: Input should be 'ok' or 'defect' (got 'maybe')",
        "msg-nan-score": "score: score must be a finite number in [0, 1], got nan",
        "msg-nan-string": "score: Input should be a valid number (got 'NaN')",
        "msg-score-high": "score: Input should be less than or equal to 1 (got 1.5)",
        "msg-score-negative": "score: Input should be greater than or equal to 0 (got -0.1)",
        "msg-inline-too-big": (
            f"image_b64: inline image is {len(big.getvalue())} bytes, over the limit of "
            f"{MAX_INLINE}"
        ),
        "msg-schema-v2": "schema_version: unsupported schema_version 2; this worker reads 1",
    }
    return payloads, expect


# --- one worker audits all of it ------------------------------------------------------------------
@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from db.migrate import upgrade
    from db.session import dispose_engines

    tmp = tmp_path_factory.mktemp("faults-input")
    img, outside = tmp / "img" / "a" / "b", tmp / "outside"
    img.mkdir(parents=True)
    outside.mkdir()
    good = make_images(img, 2)
    hostile = _hostile_images(img, outside)
    decodable = _decodable_images(img)
    payloads, msg_errors = _hostile_messages(img, good[0].name)
    url = f"sqlite:///{(tmp / 'audit.sqlite3').as_posix()}"
    upgrade(url)
    dispose_engines(url)
    redis = RedisServer(tmp / "redis")
    redis.start()
    ckpt = tiny_checkpoint(tmp, size=(48, 48))
    env = worker_env(
        {
            "broker_url": redis.url,
            "queue": QUEUE,
            "database_url": url,
            "model": ckpt,
            "image_roots": img,  # deep, so that ../../etc/passwd stays a relative escape
            "home": tmp / "home",
            "torch_threads": 1,
            "batch_size": 4,
            "batch_wait_ms": 100,
            "max_image_pixels": MAX_PIXELS,
            "max_inline_bytes": MAX_INLINE,
        }
    )
    marker = tmp / "pickle-was-loaded"
    w: WorkerProc | None = None
    try:
        w = start_worker(env, "hostile", tmp)
        wait_ready([w])
        # 1. a pickle message first: refused before deserialisation, the worker goes on
        evil = {**_msg("pickled", good[0].name), "payload": _TouchOnUnpickle(marker)}
        _send_raw(redis.url, [evil], serializer="pickle")
        deadline = time.monotonic() + 30
        while PICKLE_REFUSED not in w.text():
            assert time.monotonic() < deadline, f"pickle message not refused:\n{w.tail()}"
            assert w.proc.poll() is None, w.tail()
            time.sleep(0.1)
        # 2. everything else, raw
        raw = [_msg("after-pickle", good[0].name), _msg("good-1", good[1].name)]
        raw += [_msg(iid, path) for iid, path in {**hostile, **decodable}.items()]
        raw += payloads
        _send_raw(redis.url, raw)
        ids = ["after-pickle", "good-1", *hostile, *decodable, *msg_errors]
        rows = {r["inspection_id"]: r for r in wait_rows(url, ids, [w], timeout=90)}
        deadline = time.monotonic() + 15
        while len(_dead_letters(url)) < 3:  # the pickle and the two without an inspection_id
            assert time.monotonic() < deadline, f"messages without an id not recorded:\n{w.tail()}"
            time.sleep(0.1)
        time.sleep(0.5)
        alive = w.proc.poll() is None
        all_rows = audit_rows(url)
        letters = _dead_letters(url)
        yield {
            "rows": rows,
            "all_rows": all_rows,
            "ids": ids,
            "log": w.text(),
            "alive": alive,
            "marker": marker,
            "msg_errors": msg_errors,
            "dead_letters": letters,
        }
    finally:
        if w is not None:
            stop_workers([w])
        redis.kill()
        dispose_engines(url)


def _finite_numbers(row: dict[str, Any]) -> None:
    for name in NUMBERS:
        v = row[name]
        assert v is not None and math.isfinite(v), (row["inspection_id"], name, v)


def test_one_row_per_inspection_and_the_worker_goes_on(audited: dict[str, Any]) -> None:
    ids = audited["ids"]
    assert sorted(r["inspection_id"] for r in audited["all_rows"]) == sorted(ids)
    assert audited["alive"], audited["log"][-3000:]
    for iid in ("after-pickle", "good-1"):
        row = audited["rows"][iid]
        assert row["status"] == "done", row
        _finite_numbers(row)


@pytest.mark.parametrize("iid", sorted(HOSTILE_ERRORS))
def test_hostile_image_becomes_error_row(audited: dict[str, Any], iid: str) -> None:
    row = audited["rows"][iid]
    assert row["status"] == "error", row
    assert HOSTILE_ERRORS[iid] in row["error"], row["error"]
    assert row["suspected_false_negative"] is False and row["p_defect"] is None


@pytest.mark.parametrize(
    "iid",
    [
        "ok-16bit-png",
        "ok-rgba-png",
        "ok-cmyk-jpeg",
        "ok-exif-rotated-jpeg",
        "ok-all-black",
        "ok-all-white",
    ],
)
def test_unusual_image_decodes_and_scores_finite(audited: dict[str, Any], iid: str) -> None:
    row = audited["rows"][iid]
    assert row["status"] == "done" and row["error"] is None, row
    _finite_numbers(row)
    assert 0.0 <= row["p_defect"] <= 1.0 and -1.0 <= row["iou_gap"] <= 1.0


def test_exif_rotated_jpeg_is_scored_upright(audited: dict[str, Any]) -> None:
    rows = audited["rows"]
    rotated = rows["ok-exif-rotated-jpeg"]
    upright = rows["ok-exif-upright-png"]
    as_stored = rows["ok-exif-as-stored-png"]
    assert abs(rotated["p_defect"] - upright["p_defect"]) <= 1e-4
    assert abs(rotated["iou_gap"] - upright["iou_gap"]) <= 1e-4
    # the orientation matters to this model: ignoring the tag would have scored otherwise
    assert abs(rotated["p_defect"] - as_stored["p_defect"]) > 1e-4


@pytest.mark.parametrize(
    "iid",
    [
        "msg-bad-label",
        "msg-nan-score",
        "msg-nan-string",
        "msg-score-high",
        "msg-score-negative",
        "msg-inline-too-big",
        "msg-schema-v2",
    ],
)
def test_hostile_message_becomes_error_row(audited: dict[str, Any], iid: str) -> None:
    row = audited["rows"][iid]
    assert row["status"] == "error", row
    assert audited["msg_errors"][iid] in row["error"], row["error"]
    assert row["suspected_false_negative"] is False


def test_message_without_inspection_id_becomes_a_dead_letter(audited: dict[str, Any]) -> None:
    log = audited["log"]
    reasons = {d["reason"]: d for d in audited["dead_letters"]}
    no_id = "the message has no inspection_id (nothing to record it under)"
    not_object = "the message is a string, not an object"
    assert set(reasons) >= {no_id, not_object}
    assert reasons[not_object]["raw"].startswith(b'[["not even a JSON object"], {}')  # the body
    assert all(d["stage"] == "message" for d in (reasons[no_id], reasons[not_object]))
    assert f"{no_id}; recording it as a dead letter" in log
    assert "ignored" not in {r["inspection_id"] for r in audited["all_rows"]}


def test_pickle_message_is_never_deserialised(audited: dict[str, Any], tmp_path: Path) -> None:
    # the payload is live: unpickling it here creates its marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists()
    # the worker refused it before loading it: no marker, no row, a dead letter with its
    # bytes (never loaded), and it went on
    assert not audited["marker"].exists()
    assert "pickled" not in {r["inspection_id"] for r in audited["all_rows"]}
    assert PICKLE_REFUSED in audited["log"]
    letter = next(d for d in audited["dead_letters"] if PICKLE_REFUSED in d["reason"])
    assert letter["stage"] == "envelope" and letter["raw"].startswith(b"\x80")  # pickle bytes
    assert audited["rows"]["after-pickle"]["status"] == "done"


# --- case 3: duplicates -------------------------------------------------------------------------------
def test_enqueued_twice_or_delivered_twice_gives_one_row_with_duplicates_counted(
    tmp_path: Path, migrated_sqlite_url: str
) -> None:
    """Before the worker starts (so they form one micro-batch of 8): ``dup-a`` enqueued twice
    through the producer, ``dup-b`` published twice as the very same task message (same task
    id and body, as a broker redelivery looks), and 4 others. Later ``dup-a`` once more, when
    its row is done. One row per inspection; ``duplicate_count`` counts the extra copies."""
    from inspection_audit.settings import Settings
    from producer.api import enqueue, reset_apps

    images = make_images(tmp_path / "img", 6)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    s = Settings(broker_url=redis.url, queue=QUEUE, image_roots=[tmp_path / "img"], home=tmp_path)

    def send_a() -> None:
        enqueue("dup-a", images[0].name, "ok", 0.1, line="L1", station="S1", settings=s)

    w: WorkerProc | None = None
    try:
        send_a()
        send_a()
        same = _msg("dup-b", images[1].name)
        _send_raw(redis.url, [same, same], task_id="one-message-two-deliveries")
        _send_raw(redis.url, [_msg(f"dup-{c}", images[i].name) for i, c in enumerate("cdef", 2)])
        assert len(redis.queue(QUEUE)) == 8
        env = worker_env(
            {
                "broker_url": redis.url,
                "queue": QUEUE,
                "database_url": migrated_sqlite_url,
                "model": ckpt,
                "image_roots": tmp_path / "img",
                "home": tmp_path / "home",
                "torch_threads": 1,
                "batch_size": 8,
                "batch_wait_ms": 1000,
            }
        )
        w = start_worker(env, "dups", tmp_path)
        wait_ready([w])
        ids = ["dup-a", "dup-b", "dup-c", "dup-d", "dup-e", "dup-f"]
        wait_rows(migrated_sqlite_url, ids, [w], timeout=60)
        send_a()
        deadline = time.monotonic() + 20
        while audit_rows(migrated_sqlite_url, ["dup-a"])[0]["duplicate_count"] < 2:
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.2)
        time.sleep(0.5)
        rows = audit_rows(migrated_sqlite_url)
    finally:
        reset_apps()
        if w is not None:
            stop_workers([w])
        redis.kill()
    assert sorted(r["inspection_id"] for r in rows) == ids  # exactly one row each
    by_id = {r["inspection_id"]: r for r in rows}
    assert all(r["status"] == "done" for r in rows)
    assert by_id["dup-a"]["duplicate_count"] == 2
    assert by_id["dup-b"]["duplicate_count"] == 1
    assert all(by_id[i]["duplicate_count"] == 0 for i in ids[2:])
    assert "batch of 8 message(s): 6 done, 0 error, 2 duplicate" in w.text(), w.tail()
