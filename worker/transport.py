"""kombu's Redis and filesystem transports, reading every entry safely (the worker's transports).

kombu 5.7's Redis channel pops an entry (``BRPOP``) and parses it with ``loads(...)`` in the
worker's main process; an entry that is not JSON, or JSON that is not a message envelope,
raised there and stopped the worker, and the popped entry was gone. :class:`Channel` parses it
with :func:`worker.malformed.read_entry` instead: an entry that is not a valid envelope is
delivered as an envelope that carries its bytes and the reason, which the consumer
(:mod:`worker.consumer`) records as a dead letter before acknowledging it. Until then it sits in
kombu's unacked hash like any message, so a worker killed meanwhile loses nothing.

The embedded default's filesystem transport has the same weakness (a message file that is not
JSON); :class:`FilesystemTransport` reads its files the same way.

:func:`worker.app.worker_config` sets ``broker_transport`` to :class:`Transport` for
``redis://`` and ``rediss://`` brokers and to :class:`FilesystemTransport` for
``filesystem://``, in workers only (a producer only sends).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, redis
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


class FilesystemChannel(filesystem.Channel):
    """A filesystem channel whose reads never raise on what a message file holds."""

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """kombu's ``_get`` (5.7), with the file's bytes read by :func:`read_entry`."""
        queue_find = f"{queue}.msg"
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != queue_find:
                continue
            processed = self.processed_folder if self.store_processed else tempfile.gettempdir()
            try:  # move the file away: it could be locked, or taken meanwhile
                shutil.move(os.path.join(self.data_folder_in, filename), processed)
            except OSError:
                continue
            path = os.path.join(processed, filename)
            try:
                with open(path, "rb") as f:
                    payload = f.read()
                if not self.store_processed:
                    os.remove(path)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {path!r} from queue.") from exc
            return read_entry(payload, queue)
        raise Empty()


class FilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport with :class:`FilesystemChannel`."""

    Channel = FilesystemChannel
