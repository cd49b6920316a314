"""The pipeline end to end: producer → Redis → real worker → real SMTP server → outcomes."""

from __future__ import annotations

import json

import pytest
import redis
from celery.result import AsyncResult

from producer import MailDeliveryFailed, MailEvent, MailProducer
from tests.conftest import USER, Servers
from tests.support.fleet import EventsReader
from tests.support.mail import body_text


def test_secure_instance_delivers_with_starttls_then_auth(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    receipt = producer.send(
        MailEvent(
            instance="Secure", subject="Hello", message="Body text", recipients="alice@example.com"
        )
    )
    tx = receipt.wait(timeout_s=20)

    assert tx.success is True
    assert tx.count == 1
    assert tx.event_id == receipt.event_id
    assert tx.instance == "Secure"
    assert tx.interface == "Secure"
    assert tx.recipients == ["alice@example.com"]
    assert tx.refused == {}
    assert tx.attempts == 1
    assert tx.message_id == f"<{receipt.event_id}@example.com>"

    [mail] = fleet.secure.received
    assert mail.tls is True
    assert mail.auth_user == USER
    assert mail.mail_from == "noreply@example.com"
    assert mail.rcpt_tos == ["alice@example.com"]
    msg = mail.message()
    assert msg["Subject"] == "Hello"
    assert msg["Message-ID"] == tx.message_id
    assert body_text(msg) == "Body text"

    # STARTTLS came before AUTH, and AUTH only under TLS.
    lines = [(cmd.split(" ")[0].upper(), tls) for _, cmd, tls in fleet.secure.commands]
    verbs = [v for v, _ in lines]
    assert verbs.index("STARTTLS") < verbs.index("AUTH")
    assert all(tls for verb, tls in lines if verb in {"AUTH", "MAIL", "RCPT", "DATA"})

    # The same transaction via Celery's own API.
    result = AsyncResult(receipt.event_id, app=producer.app)
    assert result.state == "SUCCESS"
    assert result.get(timeout=5)["eventId"] == receipt.event_id

    # The Done event on the events queue.
    body = events.wait_for(receipt.event_id)
    assert body["name"] == "Secure.Done"
    assert body["instance"] == "Secure"
    assert body["eventId"] == receipt.event_id
    assert body["transaction"] == result.get(timeout=5)

    # The stream entry.
    entries: list[tuple[str, dict[str, str]]] = backend.xrange("mailsender:transactions")  # type: ignore[assignment]
    logged = [json.loads(fields["transaction"]) for _, fields in entries]
    mine = [t for t in logged if t["eventId"] == receipt.event_id]
    assert mine == [body["transaction"]]


def test_all_recipients_refused_fails_at_once_with_failed_event(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    from tests.support.smtp import Rule

    fleet.plain.add_rule(Rule("rcpt", "550 5.1.1 User unknown", times=None))
    receipt = producer.send(
        {"instance": "Plain", "subject": "x", "message": "y", "recipients": "gone@example.com"}
    )
    tx = receipt.wait(timeout_s=20)
    assert tx.success is False
    assert tx.count == 0
    assert tx.attempts == 1
    assert tx.refused == {"gone@example.com": "550 5.1.1 User unknown"}
    assert "550 5.1.1 User unknown" in tx.message
    assert fleet.plain.received == []
    assert fleet.plain.transactions == 1

    result = AsyncResult(receipt.event_id, app=producer.app)
    assert result.state == "FAILURE"
    with pytest.raises(MailDeliveryFailed) as info:
        result.get(timeout=5)
    assert info.value.transaction == tx
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Failed"


def test_greylisting_twice_then_accepted_is_delivered_once_in_three_attempts(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    from tests.support.smtp import Rule

    fleet.plain.add_rule(Rule("data", "451 4.7.1 Greylisted, retry later", times=2))
    receipt = producer.send(
        {"instance": "Plain", "subject": "grey", "message": "y", "recipients": "alice@example.com"}
    )
    tx = receipt.wait(timeout_s=30)
    assert tx.success is True
    assert tx.attempts == 3
    assert fleet.plain.accepted_count("alice@example.com") == 1
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Done"
