"""What waits in the broker: queue depth and the oldest waiting message (read-only).

Depth is the broker's own count, from a *passive* queue declaration (it never creates a
queue): Redis sums kombu's priority sub-queues (``LLEN``), RabbitMQ answers the declared
message count, kombu's filesystem transport counts the queue's files. A queue that does not
exist yet holds 0 messages. The oldest waiting message is peeked without consuming it on Redis
(``LINDEX``) and the filesystem transport; RabbitMQ cannot peek, so its age is unknown there.
Messages a worker has already received (prefetched, being scored) are not counted: they are
in flight.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from inspection_audit.settings import Settings


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached; the message names it (password hidden)."""


def _connection(settings: Settings) -> Any:
    from kombu import Connection

    from worker.app import celery_config

    conf = celery_config(settings)
    options = dict(conf["broker_transport_options"])
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        options.setdefault("socket_connect_timeout", 2.0)
        options.setdefault("socket_timeout", 5.0)
    return Connection(url, transport_options=options, connect_timeout=3)


def _safe(settings: Settings) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(settings.resolved_broker_url))


def queue_depth(settings: Settings) -> int:
    """Messages waiting in ``settings.queue`` (not counting those a worker holds).

    Raises:
        BrokerUnavailable: the broker does not answer.
    """
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    try:
        with _connection(settings) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            try:
                ok = channel.queue_declare(queue=settings.queue, passive=True)
                return int(ok.message_count)
            except (ChannelError, NotFound):
                return 0
            finally:
                # a channel the broker closed (RabbitMQ's 404) cannot be closed again
                with contextlib.suppress(Exception):
                    channel.close()
    except (ChannelError, NotFound):
        return 0
    except Exception as exc:
        raise BrokerUnavailable(
            f"broker {_safe(settings)} does not answer: {type(exc).__name__}: {exc}"
        ) from exc


def _captured_at(envelope: Any) -> datetime | None:
    """``captured_at`` of the inspection in a kombu envelope (Celery protocol 2), or None for
    anything else (a malformed entry waits there until a worker records it as a dead letter;
    a capture time without an offset is not one the producer sends)."""
    try:
        body: Any = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        value = args[0]["captured_at"]
        when = datetime.fromisoformat(value)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return when if when.tzinfo is not None else None


def _envelope(raw: bytes | str) -> Any:
    """A queue entry parsed as JSON, or None when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def oldest_waiting(settings: Settings) -> datetime | None:
    """``captured_at`` of the oldest message waiting in the queue, or None (empty queue, a
    broker that cannot peek, an unreadable message).

    Raises:
        BrokerUnavailable: the broker does not answer.
    """
    url = settings.resolved_broker_url
    try:
        if url.startswith(("redis://", "rediss://", "redis+socket://")):
            return _oldest_redis(settings)
        if url.startswith("filesystem://"):
            return _oldest_files(settings)
    except BrokerUnavailable:
        raise
    except Exception as exc:
        raise BrokerUnavailable(
            f"broker {_safe(settings)} does not answer: {type(exc).__name__}: {exc}"
        ) from exc
    return None


def _oldest_redis(settings: Settings) -> datetime | None:
    with _connection(settings) as conn:
        channel = conn.channel()
        try:
            client = channel.client
            found: list[datetime] = []
            for pri in channel.priority_steps:
                # kombu LPUSHes and BRPOPs: the oldest message of a list is at its right end
                raw = client.lindex(channel._q_for_pri(settings.queue, pri), -1)
                if raw:
                    when = _captured_at(_envelope(raw))
                    if when is not None:
                        found.append(when)
            return min(found) if found else None
        finally:
            channel.close()


def _oldest_files(settings: Settings) -> datetime | None:
    folder = Path(settings.broker_folder) / "queue"
    suffix = f".{settings.queue}.msg"
    try:
        names = sorted(n for n in os.listdir(folder) if n.partition(".")[2] == suffix[1:])
    except FileNotFoundError:
        return None
    for name in names:  # "<ms>_<uuid>.<queue>.msg": oldest first
        try:
            envelope = json.loads((folder / name).read_bytes())
        except (OSError, ValueError):
            continue  # taken by a worker meanwhile
        return _captured_at(envelope)
    return None


def broker_ok(settings: Settings) -> str | None:
    """None when the broker answers, else why not."""
    try:
        queue_depth(settings)
    except BrokerUnavailable as exc:
        return str(exc)
    return None
