"""kombu's Redis transport, but an item on a queue that is not a kombu message is kept aside
instead of stopping the worker.

kombu decodes each item it pops from a queue list (``BRPOP``) as JSON; an item that is not
JSON, or not a message envelope, raises inside the worker's event loop, which Celery treats as
unrecoverable: the worker exits and the item, already popped, is gone. Such items come from
clients that push to the list by hand, not from any Celery client. This channel moves them to
the list ``mailsender:unreadable`` on the broker (bounded) and logs one line; the worker goes on.

The worker's app uses it for ``redis://`` and ``rediss://`` brokers (``worker.app``).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

UNREADABLE_KEY = "mailsender:unreadable"
UNREADABLE_MAX = 1000


def readable_envelope(item: bytes | str) -> dict[str, Any] | str:
    """The decoded message envelope, or why ``item`` is not one."""
    try:
        message = loads(bytes_to_str(item))
    except (ValueError, TypeError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not a message envelope"
    properties = message.get("properties")
    if not isinstance(properties, dict) or "body" not in message:
        return "a JSON object without the 'body' and 'properties' of a message envelope"
    if not isinstance(message.get("headers", {}), dict):
        return "a message envelope whose 'headers' is not an object"
    return message


class KeepingQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's Redis QoS, but an ack or reject that comes after its channel lost the broker
    connection is given up with a warning instead of raising.

    Celery runs acks and rejects (a requeue after an infrastructure error, say) as callbacks
    on the worker's event loop; when one runs against a channel whose connection dropped
    meanwhile, kombu raises AttributeError from deep inside, which Celery treats as
    unrecoverable: the whole worker exits. The message itself is safe: it stays in kombu's
    unacked set in Redis and is restored after the visibility timeout, and its event is
    idempotent.
    """

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except AttributeError as exc:
            log.warning("ack of %s lost with the broker connection (%s)", delivery_tag, exc)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            log.warning(
                "reject of %s lost with the broker connection (%s); the message is restored "
                "after the visibility timeout",
                delivery_tag,
                exc,
            )


class KeepingChannel(kombu_redis.Channel):  # type: ignore[misc]
    """A Redis channel that sets unreadable queue items aside (see the module), and survives
    acks and rejects that come after its connection was lost (``KeepingQoS``)."""

    QoS = KeepingQoS

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own _brpop_read, with the decoding checked before delivery.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = readable_envelope(item)
            if isinstance(message, str):
                self._set_aside(dest, item, message)
            else:
                self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _set_aside(self, queue: str, item: bytes | str, why: str) -> None:
        log.error(
            "an item on queue %s is %s; it is not a task and was moved to %s on the broker",
            queue,
            why,
            UNREADABLE_KEY,
        )
        try:
            with self.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.lpush(UNREADABLE_KEY, item)
                pipe.ltrim(UNREADABLE_KEY, 0, UNREADABLE_MAX - 1)
                pipe.execute()
        except self.connection_errors as exc:
            log.error("could not keep the unreadable item: %s", exc)


class KeepingTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with ``KeepingChannel``."""

    Channel = KeepingChannel


class KeepingSentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    """kombu's Redis Sentinel transport, keeping unreadable items aside the same way."""

    class Channel(KeepingChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
        pass
