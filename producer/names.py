"""Every name that crosses a process boundary, in one place (contract §3 and §4)."""

from __future__ import annotations

from typing import Final

TASK_NAME: Final = "mailsender.send"
"""The Celery task that delivers one mail event."""

TASK_BATCH_NAME: Final = "mailsender.send_batch"
"""The Celery task that delivers several events carried by one broker message (``events``)."""

DEFAULT_QUEUE: Final = "mailsender"
"""The Celery queue the task is routed to unless an instance names another."""

EVENTS_EXCHANGE: Final = "mailsender.events"
"""Durable topic exchange on the broker for `<instance>.Done` / `<instance>.Failed`."""

EVENTS_QUEUE: Final = "mailsender.events"
"""Durable queue bound to EVENTS_EXCHANGE with `#`."""

TRANSACTIONS_STREAM: Final = "mailsender:transactions"
"""Redis stream (in the result backend's Redis) with one entry per final outcome."""

KEY_PREFIX: Final = "mailsender:"
"""Prefix of every other Redis key the worker keeps (idempotency, retries, dead letters)."""

PENDING_KEY: Final = "mailsender:pending"
"""Redis hash (result backend) event id → the enqueued event, until a worker starts it; with
``PENDING_INDEX_KEY`` (sorted set by enqueue time) it lets workers re-enqueue an event whose
broker message was lost (a worker killed between taking it and recording it as unacked)."""

PENDING_INDEX_KEY: Final = "mailsender:pending:index"

ROUTES_KEY: Final = "mailsender:routes"
"""Redis hash (result backend) instance → queue, written by workers, read by producers."""


DEFAULT_BROKER_URL: Final = "redis://localhost:6379/0"
ENV_BROKER_URL: Final = "MAILSENDER_BROKER_URL"
ENV_RESULT_BACKEND: Final = "MAILSENDER_RESULT_BACKEND"

BROKER_SCHEMES: Final = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "unix")
"""URL schemes a broker URL may have (Celery's Redis and AMQP transports)."""

BACKEND_SCHEMES: Final = ("redis", "rediss", "unix")
"""URL schemes of the result backend: a Redis, which also keeps MailSender's own state."""

DONE: Final = "Done"
FAILED: Final = "Failed"


def event_name(instance: str, success: bool) -> str:
    """The instance event's name and routing key, e.g. ``Alerts.Done``."""
    return f"{instance}.{DONE if success else FAILED}"
