"""MailSender's producer: the contract's models and the client that enqueues mail events.

>>> from producer import MailProducer, MailEvent
>>> receipt = MailProducer().send(MailEvent(instance="Alerts", subject="Hi", message="..."))
>>> transaction = receipt.wait(timeout_s=30)
"""

from producer.client import MailProducer, Receipt
from producer.errors import (
    EnqueueFailed,
    InvalidEvent,
    MailDeliveryDeferred,
    MailDeliveryFailed,
    MailSenderError,
    ProducerConfigError,
)
from producer.models import Attachment, InstanceEvent, MailEvent, Transaction

__all__ = [
    "Attachment",
    "EnqueueFailed",
    "InstanceEvent",
    "InvalidEvent",
    "MailDeliveryDeferred",
    "MailDeliveryFailed",
    "MailEvent",
    "MailProducer",
    "MailSenderError",
    "ProducerConfigError",
    "Receipt",
    "Transaction",
]
