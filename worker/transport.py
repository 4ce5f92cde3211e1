"""kombu's Redis transport, reading every list entry safely (the worker's broker transport).

kombu 5.7's Redis channel pops an entry (``BRPOP``) and parses it with ``loads(...)`` in the
worker's main process; an entry that is not JSON, or JSON that is not a message envelope,
raised there and stopped the worker, and the popped entry was gone. :class:`Channel` parses it
with :func:`worker.malformed.read_entry` instead: an entry that is not a valid envelope is
delivered as an envelope that carries its bytes and the reason, which the consumer
(:mod:`worker.consumer`) records as a dead letter before acknowledging it. Until then it sits in
kombu's unacked hash like any message, so a worker killed meanwhile loses nothing.

:func:`worker.app.worker_config` sets ``broker_transport`` to :class:`Transport` for
``redis://`` and ``rediss://`` brokers, in workers only (a producer only sends).
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import redis
from kombu.utils.encoding import bytes_to_str

from worker.malformed import read_entry


class Channel(redis.Channel):
    """A Redis channel whose reads never raise on what the list holds."""

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's ``_brpop_read`` (5.7), with the entry read by :func:`read_entry`."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # a connection error: disconnect so that the next iteration reconnects
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self.connection._deliver(read_entry(item, dest), dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """kombu's ``_get`` (``basic_get``), with the entry read by :func:`read_entry`."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    return read_entry(item, queue)
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
