"""Errors of the producer package, and the ones that travel through the result backend.

    MailSenderError                 root of everything MailSender raises on purpose
    ├── InvalidEvent (ValueError)   an event that cannot be sent: fix the event
    ├── ProducerConfigError (ValueError)  a bad producer setting: a URL, batch_size
    ├── EnqueueFailed               the broker could not be reached: nothing was enqueued
    ├── MailDeliveryFailed          the final outcome of an event was a failure (.transaction)
    └── MailDeliveryDeferred        a transient failure; the event waits for its next attempt

``MailDeliveryFailed`` and ``MailDeliveryDeferred`` are stored by Celery in the result backend
as ``{"exc_module": "producer", "exc_type": ..., "exc_message": [...]}``; their arguments are
JSON only, so any client can read them back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import amqp.exceptions
import redis.exceptions

if TYPE_CHECKING:
    from producer.models import Transaction

BROKER_REFUSALS: tuple[type[BaseException], ...] = (
    amqp.exceptions.AccessRefused,  # RabbitMQ: login refused
    amqp.exceptions.NotAllowed,  # RabbitMQ: no access to the virtual host
    amqp.exceptions.IrrecoverableConnectionError,
    redis.exceptions.AuthenticationError,  # Redis: wrong or missing password
    redis.exceptions.AuthorizationError,
)
"""Broker replies that no retry can change: the credentials or permissions are wrong."""


class MailSenderError(Exception):
    """Root of every error MailSender raises on purpose."""


class InvalidEvent(MailSenderError, ValueError):
    """The mail event is not valid; the message names the field and the problem."""


class ProducerConfigError(MailSenderError, ValueError):
    """The producer cannot work with a setting it was given: an empty broker or result backend
    URL or one of an unknown kind, or a ``batch_size`` that is not a positive integer; the
    message names the argument."""


class EnqueueFailed(MailSenderError):
    """The event could not be handed to the broker; nothing was enqueued."""


class MailDeliveryFailed(MailSenderError):
    """The final outcome of an event was a failure.

    ``args`` are ``(message, transaction_json)`` so that the exception survives Celery's JSON
    result backend; ``.transaction`` is the whole failed transaction.
    """

    __module__ = "producer"

    def __init__(self, message: str, transaction: dict[str, Any] | None = None) -> None:
        super().__init__(message, transaction or {})

    @property
    def transaction(self) -> Transaction:
        """The failed transaction (``success`` is false, ``refused`` filled where it applies)."""
        from producer.models import Transaction

        return Transaction.model_validate(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])


class MailDeliveryDeferred(MailSenderError):
    """A transient failure: the event is scheduled for another attempt (task state RETRY)."""

    __module__ = "producer"

    def __init__(self, message: str, attempt: int = 0, next_attempt_at: str = "") -> None:
        super().__init__(message, attempt, next_attempt_at)

    def __str__(self) -> str:
        return str(self.args[0])
