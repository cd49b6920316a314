"""Where final outcomes go besides Redis state: the Celery result backend and the events queue."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from producer import names
from producer.errors import MailDeliveryDeferred, MailDeliveryFailed
from producer.models import InstanceEvent, Transaction

log = logging.getLogger(__name__)

EVENTS_EXCHANGE = Exchange(names.EVENTS_EXCHANGE, type="topic", durable=True)
EVENTS_QUEUE = Queue(names.EVENTS_QUEUE, EVENTS_EXCHANGE, routing_key="#", durable=True)

PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 20,
    "interval_start": 0.1,
    "interval_step": 0.5,
    "interval_max": 3.0,
}


def declare_events(app: Celery) -> None:
    """Declare the events exchange and queue (workers do this at start)."""
    with app.connection_for_write() as conn:
        EVENTS_QUEUE(conn.default_channel).declare()


class Outcomes:
    """Writes task results and publishes instance events through a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def store_success(self, transaction: Transaction) -> None:
        """The task result: SUCCESS with the transaction."""
        self.app.backend.mark_as_done(transaction.event_id, transaction.to_json())

    def store_failure(self, transaction: Transaction) -> MailDeliveryFailed:
        """The task result: FAILURE with ``MailDeliveryFailed`` carrying the transaction."""
        exc = MailDeliveryFailed(transaction.message, transaction.to_json())
        self.app.backend.mark_as_failure(transaction.event_id, exc, call_errbacks=False)
        return exc

    def store_retry(self, event_id: str, reason: str, attempt: int, next_at: str) -> None:
        """The task state RETRY while the event waits for its next attempt."""
        self.app.backend.mark_as_retry(event_id, MailDeliveryDeferred(reason, attempt, next_at))

    def publish(self, transaction: Transaction) -> None:
        """``<instance>.Done`` or ``<instance>.Failed`` on the events exchange."""
        name = names.event_name(transaction.instance, transaction.success)
        body = InstanceEvent(
            name=name,
            instance=transaction.instance,
            event_id=transaction.event_id,
            transaction=transaction,
        ).to_json()
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange=EVENTS_EXCHANGE,
                routing_key=name,
                serializer="json",
                declare=[EVENTS_QUEUE],
                delivery_mode=2,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
