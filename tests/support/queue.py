"""Fixtures: queue (a real Redis on 127.0.0.1:6379; docs/design.md §8).

Parallel runs share Redis database 0, so every test gets its own queue name
(``ia-test-<hex>``) and, where a test builds its own Celery app, its own kombu
``global_keyprefix``; teardown deletes exactly those keys. Nothing here imports torch.

* ``redis_url``: ``redis://127.0.0.1:6379/0`` after checking that Redis answers (skips otherwise).
* ``queue_settings``: a :class:`Settings` with that broker, a unique queue, ``image_roots =
  [tmp_path]``, ``home = tmp_path / "home"`` and ``enqueue_timeout_s = 5``.
* ``redis_keyprefix`` / ``queue_app``: a Celery app for ``queue_settings`` whose Redis keys all
  start with a unique prefix (for tests that do not go through the environment).
* helpers :func:`redis_queue_length` and :func:`redis_queue_messages`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inspection_audit.settings import Settings

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"

# kombu's Redis transport keeps messages of priority p > 0 in "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", *(f"\x06\x16{p}" for p in range(1, 10)))


def _redis_client(url: str = REDIS_URL) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def redis_available(url: str = REDIS_URL) -> str | None:
    """``None`` when Redis at ``url`` answers PING, else why not."""
    cli = shutil.which("redis-cli")
    if cli:
        try:
            out = subprocess.run(
                [cli, "-h", REDIS_HOST, "-p", str(REDIS_PORT), "ping"],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return "redis-cli ping timed out"
        if out.stdout.strip() != "PONG":
            return f"redis-cli ping: {out.stdout.strip() or out.stderr.strip()}"
    try:
        client = _redis_client(url)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"cannot connect to {url}: {exc}"
    return None


def redis_queue_length(
    settings_or_queue: Settings | str, prefix: str = "", url: str = REDIS_URL
) -> int:
    """Messages waiting in a queue (``LLEN``, summed over kombu's priority sub-queues)."""
    queue = settings_or_queue if isinstance(settings_or_queue, str) else settings_or_queue.queue
    client = _redis_client(url)
    try:
        return sum(int(client.llen(f"{prefix}{queue}{s}")) for s in _PRIORITY_SUFFIXES)
    finally:
        client.close()


def redis_queue_messages(
    settings_or_queue: Settings | str, prefix: str = "", url: str = REDIS_URL
) -> list[dict[str, Any]]:
    """The messages waiting in a queue, oldest first, without consuming them.

    Each item is the kombu envelope (a dict parsed from JSON) with one key added:
    ``"decoded_body"``, the task body decoded from its ``body_encoding`` (base64) and parsed
    as JSON when ``content-type`` is ``application/json`` (Celery protocol 2:
    ``[args, kwargs, embed]``).
    """
    queue = settings_or_queue if isinstance(settings_or_queue, str) else settings_or_queue.queue
    client = _redis_client(url)
    try:
        raw: list[bytes] = []
        for s in _PRIORITY_SUFFIXES:
            # kombu LPUSHes and BRPOPs: the oldest message is at the right end.
            raw.extend(reversed(client.lrange(f"{prefix}{queue}{s}", 0, -1)))
    finally:
        client.close()
    out = []
    for item in raw:
        env = json.loads(item)
        body: Any = env["body"]
        if env.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if env.get("content-type") == "application/json":
            body = json.loads(body)
        env["decoded_body"] = body
        out.append(env)
    return out


def _delete_matching(*patterns: str) -> None:
    """Delete the keys matching any glob pattern (names here have no glob characters)."""
    try:
        client = _redis_client()
        try:
            keys = {k for p in patterns for k in client.scan_iter(match=p, count=500)}
            if keys:
                client.delete(*keys)
        finally:
            client.close()
    except Exception:  # teardown must not mask the test's own failure
        pass


@pytest.fixture
def redis_url() -> str:
    """``redis://127.0.0.1:6379/0``, after checking that Redis answers; skips otherwise."""
    why = redis_available(REDIS_URL)
    if why is not None:
        pytest.skip(f"Redis is not available ({why}); see docs/design.md §8 to start it")
    return REDIS_URL


@pytest.fixture
def queue_settings(tmp_path: Path, redis_url: str) -> Iterator[Settings]:
    """Settings for a private queue on the real Redis; its keys are deleted afterwards."""
    queue = f"ia-test-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        broker_url=redis_url,
        queue=queue,
        image_roots=[tmp_path],
        home=tmp_path / "home",
        enqueue_timeout_s=5.0,
    )
    yield settings
    try:
        from producer.api import reset_apps

        reset_apps()
    finally:
        # the queue list, its priority sub-queues and kombu's _kombu.binding*.<queue> sets
        _delete_matching(f"*{queue}*")


@pytest.fixture
def redis_keyprefix(redis_url: str) -> Iterator[str]:
    """A unique kombu ``global_keyprefix``; every key starting with it is deleted afterwards."""
    prefix = f"ia-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    _delete_matching(f"{prefix}*")


@pytest.fixture
def queue_app(queue_settings: Settings, redis_keyprefix: str) -> Iterator[Any]:
    """A Celery app for ``queue_settings`` whose Redis keys all carry ``redis_keyprefix``."""
    from worker.app import create_app

    app = create_app(queue_settings, worker=False)
    opts = dict(app.conf.broker_transport_options or {})
    opts["global_keyprefix"] = redis_keyprefix
    app.conf.broker_transport_options = opts
    yield app
    app.close()
