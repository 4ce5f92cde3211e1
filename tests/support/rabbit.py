"""Fixtures: RabbitMQ (the machine's server on 127.0.0.1:5672, guest/guest; `.ci/run` starts it).

Nothing here restarts or reconfigures the shared server: every test gets its own virtual host
(``rabbitmqctl add_vhost ia-test-<hex>``, deleted afterwards with everything in it). Where
``rabbitmqctl`` cannot be used (not root), the test runs on the default virtual host with its
own queue names, deleted afterwards.

* ``rabbit_url``: ``amqp://guest:guest@127.0.0.1:5672/<vhost>`` (skips when RabbitMQ does not
  answer).
* helpers :func:`queue_depth` (ready messages, passive declare) and :func:`publish_raw`
  (py-amqp ``basic_publish`` of exact bytes, headers and content type).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672
RABBIT_ROOT_URL = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}//"


def rabbit_available(url: str = RABBIT_ROOT_URL) -> str | None:
    """None when RabbitMQ at ``url`` answers an AMQP handshake, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"cannot connect to {url}: {type(exc).__name__}: {exc}"
    return None


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _own_vhost() -> str | None:
    """A new virtual host with full rights for guest, or None when rabbitmqctl cannot."""
    if shutil.which("rabbitmqctl") is None:
        return None
    name = f"ia-test-{uuid.uuid4().hex[:12]}"
    if _ctl("add_vhost", name).returncode != 0:
        return None
    if _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*").returncode != 0:
        _ctl("delete_vhost", name)
        return None
    return name


@pytest.fixture
def rabbit_url() -> Iterator[str]:
    """An AMQP URL on a virtual host of the test's own (deleted afterwards)."""
    why = rabbit_available()
    if why is not None:
        pytest.skip(f"RabbitMQ is not available ({why}); `.ci/run` starts it")
    vhost = _own_vhost()
    if vhost is None:  # pragma: no cover - rabbitmqctl not usable: the default vhost
        yield RABBIT_ROOT_URL
        return
    try:
        yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    finally:
        _ctl("delete_vhost", vhost)


def queue_depth(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (not the unacknowledged ones): a passive declare."""
    from kombu import Connection

    with Connection(url) as conn:
        _, ready, _ = conn.default_channel.queue_declare(queue, passive=True)
        return int(ready)


def queue_info(vhost: str, queue: str) -> dict[str, str]:
    """``rabbitmqctl list_queues`` columns of ``queue`` (type, arguments, messages)."""
    out = _ctl("list_queues", "-p", vhost, "name", "type", "arguments", "messages").stdout
    for line in out.splitlines():
        parts = line.split("\t")
        if parts and parts[0] == queue:
            return dict(zip(("name", "type", "arguments", "messages"), parts, strict=False))
    return {}


def vhost_of(url: str) -> str:
    """The virtual host of an AMQP URL."""
    return url.rsplit("/", 1)[1] or "/"


def publish_raw(
    url: str,
    queue: str,
    body: bytes,
    *,
    headers: Any = None,
    content_type: Any = "application/json",
    content_encoding: Any = "utf-8",
) -> None:
    """Publish exactly these bytes, headers and content type to ``queue`` (its direct exchange,
    routing key = queue name), as a hostile client would, with py-amqp itself."""
    import amqp

    host = f"{RABBIT_HOST}:{RABBIT_PORT}"
    conn = amqp.Connection(host, userid="guest", password="guest", virtual_host=vhost_of(url))
    conn.connect()
    try:
        ch = conn.channel()
        props: dict[str, Any] = {"delivery_mode": 2}
        if content_type is not None:
            props["content_type"] = content_type
        if content_encoding is not None:
            props["content_encoding"] = content_encoding
        if headers is not None:
            props["application_headers"] = headers
        ch.basic_publish(amqp.Message(body, **props), exchange=queue, routing_key=queue)
        ch.close()
    finally:
        conn.close()
