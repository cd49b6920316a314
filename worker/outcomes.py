"""Where final outcomes go besides the idempotency record: task results and instance events.

Task results are written in the format of Celery's Redis result backend (``celery-task-meta-<id>``
with a PUBLISH for waiting clients), but as part of the store's pipelines, so that recording an
outcome costs one round trip for a whole batch of events instead of two per event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import redis
from celery import Celery, states
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from producer import names
from producer.errors import MailDeliveryDeferred, MailDeliveryFailed
from producer.models import InstanceEvent, Transaction
from worker.store import ResultWrite

log = logging.getLogger(__name__)

EVENTS_EXCHANGE = Exchange(names.EVENTS_EXCHANGE, type="topic", durable=True)
EVENTS_QUEUE = Queue(names.EVENTS_QUEUE, EVENTS_EXCHANGE, routing_key="#", durable=True)

PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 20,
    "interval_start": 0.1,
    "interval_step": 0.5,
    "interval_max": 3.0,
}

DEFAULT_RESULT_EXPIRES_S = 24 * 3600


def declare_events(app: Celery) -> None:
    """Declare the events exchange and queue (workers do this at start)."""
    with app.connection_for_write() as conn:
        EVENTS_QUEUE(conn.default_channel).declare()


@contextlib.contextmanager
def _bindings_read_once(producer: Any) -> Iterator[None]:
    """Within one batch, read the events exchange's bindings once instead of per event.

    kombu's virtual transports (Redis) look the topic exchange's binding table up in the broker
    on every publish — a round trip and about a sixth of a worker's CPU per mail. The table
    cannot meaningfully change within one batch, so the channel's lookup is memoised for the
    duration of the batch only (other transports have no such method and are left alone).
    """
    channel = getattr(producer, "channel", None)
    original = getattr(channel, "get_table", None)
    if channel is None or original is None:
        yield
        return
    tables: dict[str, Any] = {}

    def get_table(exchange: str) -> Any:
        if exchange not in tables:
            tables[exchange] = original(exchange)
        return tables[exchange]

    channel.get_table = get_table
    try:
        yield
    finally:
        del channel.get_table  # back to the class's method


def _batched(producer: Any, size: int) -> contextlib.AbstractContextManager[Any]:
    """kombu ≥ 5.7 can buffer a batch's publishes in one Redis pipeline; older kombu and other
    transports publish each message at once."""
    batch = getattr(producer, "batch", None)
    if batch is None or size < 2:
        return contextlib.nullcontext()
    return cast(contextlib.AbstractContextManager[Any], batch(max_size=max(size * 2, 2)))


class Outcomes:
    """Encodes task results and publishes instance events through a Celery app."""

    def __init__(self, app: Celery, *, retry_policy: dict[str, Any] | None = None) -> None:
        self.app = app
        self.retry_policy = PUBLISH_RETRY_POLICY if retry_policy is None else retry_policy
        backend = app.backend
        expires = getattr(backend, "expires", None)
        self._expires_s = int(expires) if expires else DEFAULT_RESULT_EXPIRES_S

    def _write(self, event_id: str, state: str, result: Any) -> ResultWrite:
        backend = self.app.backend
        meta = {
            "status": state,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": datetime.now(UTC).isoformat() if state in states.READY_STATES else None,
            "task_id": event_id,
        }
        key = backend.get_key_for_task(event_id)
        value = backend.encode(meta)
        key_text = key.decode() if isinstance(key, bytes) else str(key)
        value_text = value.decode() if isinstance(value, bytes) else str(value)
        return key_text, value_text, self._expires_s

    def final_result(self, transaction: Transaction) -> ResultWrite:
        """SUCCESS with the transaction, or FAILURE with ``MailDeliveryFailed`` carrying it."""
        if transaction.success:
            return self._write(transaction.event_id, states.SUCCESS, transaction.to_json())
        exc = MailDeliveryFailed(transaction.message, transaction.to_json())
        return self._write(
            transaction.event_id, states.FAILURE, self.app.backend.prepare_exception(exc)
        )

    def retry_result(self, event_id: str, reason: str, attempt: int, next_at: str) -> ResultWrite:
        """RETRY with ``MailDeliveryDeferred`` while the event waits for its next attempt."""
        exc = MailDeliveryDeferred(reason, attempt, next_at)
        return self._write(event_id, states.RETRY, self.app.backend.prepare_exception(exc))

    def publish(self, transactions: list[Transaction]) -> None:
        """``<instance>.Done`` or ``<instance>.Failed`` for each, over one broker connection.

        The batch goes out in one pipeline; should that fail (a broker connection lost at the
        flush, where kombu does not retry), each event is published again on its own with
        the publish retry policy. An event may then be published twice, never not at all.
        """
        if not transactions:
            return
        messages = [
            (
                names.event_name(tx.instance, tx.success),
                InstanceEvent(
                    name=names.event_name(tx.instance, tx.success),
                    instance=tx.instance,
                    event_id=tx.event_id,
                    transaction=tx,
                ).to_json(),
            )
            for tx in transactions
        ]
        try:
            with (
                self.app.producer_or_acquire() as producer,
                _bindings_read_once(producer),
                _batched(producer, len(messages)),
            ):
                for name, body in messages:
                    self._publish(producer, name, body)
        except (OperationalError, redis.RedisError, ConnectionError) as exc:
            if len(messages) < 2:
                raise
            log.warning(
                "publishing %d instance events at once failed (%s); one by one", len(messages), exc
            )
            with self.app.producer_or_acquire() as producer:
                for name, body in messages:
                    self._publish(producer, name, body)

    def _publish(self, producer: Any, name: str, body: dict[str, Any]) -> None:
        producer.publish(
            body,
            exchange=EVENTS_EXCHANGE,
            routing_key=name,
            serializer="json",
            declare=[EVENTS_QUEUE],
            delivery_mode=2,
            retry=True,
            retry_policy=self.retry_policy,
        )
