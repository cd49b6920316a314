"""Each seed parameter and each event field, seen from the SMTP server that receives the mail.

Instances used (tests/conftest.py ``fleet_config``): ``Plain`` (plain server, no defaults),
``Alerts`` (plain server with display-name sender, default recipients, subjectPrefix, endpoint
and interface), ``Secure`` (STARTTLS + AUTH), ``NoStarttls``, ``Untrusted``, ``SelfSignedOff``,
``SelfSignedOffString``, ``Limited``, ``PlainEmptyUser`` (userName "") and ``WrongPassword``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import celery
import pytest
import redis
from celery.result import AsyncResult

from producer import MailDeliveryFailed, MailEvent, MailProducer, Transaction
from tests.conftest import USER, Servers
from tests.support.fleet import EventsReader, RedisServer
from tests.support.mail import attachments_sha256, body_text
from tests.support.smtp import Received

WAIT_S = 20.0


def deliver(producer: MailProducer, event: MailEvent | dict[str, Any]) -> Transaction:
    """Enqueue ``event`` and return its final transaction."""
    return producer.send(event).wait(timeout_s=WAIT_S)


def only_mail(server: Any) -> Received:
    """The one mail ``server`` received."""
    received = server.received
    assert len(received) == 1, f"expected exactly one mail, got {len(received)}"
    mail: Received = received[0]
    return mail


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verbs(server: Any) -> list[str]:
    """The SMTP verbs the client sent, in order."""
    return [line.split(" ")[0].upper() for _, line, _ in server.commands]


def nothing_received_anywhere(fleet: Servers) -> bool:
    return all(server.received == [] for server in fleet.all())


# --- instance parameters ------------------------------------------------------------------


def test_mail_server_and_port_choose_the_server(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain", subject="to plain", message="m", recipients="alice@example.com"
        ),
    )
    assert tx.success is True
    assert tx.message.endswith(f"via 127.0.0.1:{fleet.plain.port}")
    only_mail(fleet.plain)

    tx = deliver(
        producer,
        MailEvent(
            instance="Limited", subject="to limited", message="m", recipients="alice@example.com"
        ),
    )
    assert tx.success is True
    assert tx.message.endswith(f"via 127.0.0.1:{fleet.limited.port}")
    assert only_mail(fleet.limited).message()["Subject"] == "to limited"
    assert only_mail(fleet.plain).message()["Subject"] == "to plain"
    for server in (
        fleet.secure,
        fleet.no_starttls,
        fleet.untrusted,
        fleet.self_signed,
        fleet.sized,
    ):
        assert server.received == []


def test_use_ssl_true_sends_over_starttls(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(instance="Secure", subject="tls", message="m", recipients="alice@example.com"),
    )
    assert tx.success is True
    mail = only_mail(fleet.secure)
    assert mail.tls is True
    assert "STARTTLS" in verbs(fleet.secure)


def test_use_ssl_false_sends_in_clear_even_when_starttls_is_offered(
    fleet: Servers, producer: MailProducer
) -> None:
    # The self_signed server offers STARTTLS with a certificate nobody trusts: with useSsl
    # false the worker does not upgrade, so the unknown certificate does not matter.
    for name in ("SelfSignedOff", "SelfSignedOffString"):
        tx = deliver(
            producer,
            MailEvent(instance=name, subject=name, message="m", recipients="alice@example.com"),
        )
        assert tx.success is True, tx.message
    received = fleet.self_signed.received
    assert [m.message()["Subject"] for m in received] == ["SelfSignedOff", "SelfSignedOffString"]
    assert [m.tls for m in received] == [False, False]
    assert "STARTTLS" not in verbs(fleet.self_signed)


def test_use_ssl_without_starttls_offered_fails_at_once_and_sends_nothing(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = deliver(
        producer,
        MailEvent(instance="NoStarttls", subject="x", message="m", recipients="alice@example.com"),
    )
    assert tx.success is False
    assert tx.count == 0
    assert tx.attempts == 1
    assert "STARTTLS" in tx.message
    assert fleet.no_starttls.received == []
    sent = verbs(fleet.no_starttls)
    assert "AUTH" not in sent
    assert "MAIL" not in sent


def test_use_ssl_with_an_untrusted_certificate_fails_at_once(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = deliver(
        producer,
        MailEvent(instance="Untrusted", subject="x", message="m", recipients="alice@example.com"),
    )
    assert tx.success is False
    assert tx.attempts == 1
    assert "certificate verification failed" in tx.message
    assert fleet.untrusted.received == []
    assert "AUTH" not in verbs(fleet.untrusted)


def test_user_name_and_password_authenticate(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(instance="Secure", subject="auth", message="m", recipients="alice@example.com"),
    )
    assert tx.success is True
    mail = only_mail(fleet.secure)
    assert mail.auth_user == USER
    sent = verbs(fleet.secure)
    assert sent.index("STARTTLS") < sent.index("AUTH") < sent.index("MAIL")


def test_wrong_password_fails_at_once_with_the_servers_535(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    receipt = producer.send(
        MailEvent(
            instance="WrongPassword", subject="x", message="m", recipients="alice@example.com"
        )
    )
    tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.success is False
    assert tx.attempts == 1
    assert "535" in tx.message
    assert repr(USER) in tx.message
    assert "wrong-password" not in tx.message
    assert fleet.secure.received == []
    assert "MAIL" not in verbs(fleet.secure)
    assert events.wait_for(receipt.event_id)["name"] == "WrongPassword.Failed"


def test_empty_user_name_means_no_auth(fleet: Servers, producer: MailProducer) -> None:
    # The plain server offers no AUTH at all: an attempt to authenticate would fail the event.
    tx = deliver(
        producer,
        MailEvent(
            instance="PlainEmptyUser",
            subject="no auth",
            message="m",
            recipients="alice@example.com",
        ),
    )
    assert tx.success is True, tx.message
    mail = only_mail(fleet.plain)
    assert mail.auth_user is None
    assert "AUTH" not in verbs(fleet.plain)


def test_instance_recipients_are_used_when_the_event_has_none(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = deliver(producer, MailEvent(instance="Alerts", subject="defaults", message="m"))
    assert tx.success is True
    assert tx.recipients == ["ops@example.com", "oncall@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["ops@example.com", "oncall@example.com"]
    to = mail.message()["To"]
    assert [(a.display_name, a.addr_spec) for a in to.addresses] == [
        ("Ops", "ops@example.com"),
        ("", "oncall@example.com"),
    ]


def test_event_recipients_override_the_instance_recipients(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = deliver(
        producer,
        MailEvent(
            instance="Alerts", subject="override", message="m", recipients="alice@example.com"
        ),
    )
    assert tx.success is True
    assert tx.recipients == ["alice@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["alice@example.com"]
    assert mail.message()["To"] == "alice@example.com"
    assert b"ops@example.com" not in mail.data
    assert b"oncall@example.com" not in mail.data


def test_sender_is_the_from_header_with_display_name_and_the_envelope_sender(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = deliver(producer, MailEvent(instance="Alerts", subject="from", message="m"))
    assert tx.success is True
    mail = only_mail(fleet.plain)
    assert mail.mail_from == "alerts@example.com"
    [sender] = mail.message()["From"].addresses
    assert sender.display_name == "Alerts"
    assert sender.addr_spec == "alerts@example.com"
    assert tx.message_id == f"<{tx.event_id}@example.com>"


def test_subject_prefix_is_put_in_front_of_the_subject(
    fleet: Servers, producer: MailProducer
) -> None:
    deliver(producer, MailEvent(instance="Alerts", subject="Disk full", message="m"))
    deliver(
        producer,
        MailEvent(
            instance="Plain", subject="Disk full", message="m", recipients="alice@example.com"
        ),
    )
    subjects = sorted(str(m.message()["Subject"]) for m in fleet.plain.received)
    assert subjects == ["Disk full", "Test - Disk full"]


def test_endpoint_and_interface_are_named_in_the_transaction(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    receipt = producer.send(MailEvent(instance="Alerts", subject="x", message="m"))
    tx = receipt.wait(timeout_s=WAIT_S)
    assert (tx.instance, tx.interface, tx.endpoint) == ("Alerts", "Monitoring", "ops-mail")
    body = events.wait_for(receipt.event_id)
    assert body["name"] == "Alerts.Done"
    assert body["transaction"]["interface"] == "Monitoring"
    assert body["transaction"]["endpoint"] == "ops-mail"

    # Defaults: the interface is the instance name, the endpoint is empty.
    tx = deliver(
        producer,
        MailEvent(instance="Plain", subject="x", message="m", recipients="alice@example.com"),
    )
    assert (tx.instance, tx.interface, tx.endpoint) == ("Plain", "Plain", "")


# --- event fields -------------------------------------------------------------------------


def test_subject_and_plain_message(fleet: Servers, producer: MailProducer) -> None:
    message = "Hello Jürgen,\nthe job ran.\n.\nA line with only a dot above.\n"
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="Grüße aus Zürich ✓ 日本",
            message=message,
            recipients="alice@example.com",
        ),
    )
    assert tx.success is True
    msg = only_mail(fleet.plain).message()
    assert msg["Subject"] == "Grüße aus Zürich ✓ 日本"
    assert msg.get_content_type() == "text/plain"
    assert body_text(msg) == message.removesuffix("\n")


def test_is_html_sends_multipart_alternative_with_a_derived_plain_part(
    fleet: Servers, producer: MailProducer
) -> None:
    markup = (
        "<h1>Report</h1><p>All <b>green</b> &amp; fine. "
        '<a href="https://example.com/r">Details</a></p><ul><li>one</li><li>two</li></ul>'
    )
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="html",
            message=markup,
            is_html=True,
            recipients="alice@example.com",
        ),
    )
    assert tx.success is True
    msg = only_mail(fleet.plain).message()
    assert msg.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert body_text(msg, "html") == markup
    plain = body_text(msg, "plain")
    assert "<" not in plain.replace("<https://example.com/r>", "")
    assert [line for line in plain.splitlines() if line.strip()] == [
        "Report",
        "All green & fine. Details <https://example.com/r>",
        "- one",
        "- two",
    ]


def test_recipients_as_a_string_with_display_names(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="s",
            message="m",
            recipients='"Doe, Jane" <jane@example.com>, bob@example.com',
        ),
    )
    assert tx.recipients == ["jane@example.com", "bob@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["jane@example.com", "bob@example.com"]
    to = mail.message()["To"]
    assert [(a.display_name, a.addr_spec) for a in to.addresses] == [
        ("Doe, Jane", "jane@example.com"),
        ("", "bob@example.com"),
    ]


def test_recipients_as_a_list(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        {
            "instance": "Plain",
            "subject": "s",
            "message": "m",
            "recipients": ["Alice <alice@example.com>", "bob@example.com"],
        },
    )
    assert tx.recipients == ["alice@example.com", "bob@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["alice@example.com", "bob@example.com"]
    to = mail.message()["To"]
    assert [(a.display_name, a.addr_spec) for a in to.addresses] == [
        ("Alice", "alice@example.com"),
        ("", "bob@example.com"),
    ]


def test_cc_is_a_header_and_a_recipient(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="s",
            message="m",
            recipients="alice@example.com",
            cc="Bob <bob@example.com>, carol@example.com",
        ),
    )
    assert tx.recipients == ["alice@example.com", "bob@example.com", "carol@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["alice@example.com", "bob@example.com", "carol@example.com"]
    msg = mail.message()
    assert msg["To"] == "alice@example.com"
    assert [(a.display_name, a.addr_spec) for a in msg["Cc"].addresses] == [
        ("Bob", "bob@example.com"),
        ("", "carol@example.com"),
    ]


def test_bcc_is_a_recipient_but_never_a_header(fleet: Servers, producer: MailProducer) -> None:
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="s",
            message="m",
            recipients="alice@example.com",
            bcc=["audit@example.com", "Boss <boss@example.com>"],
        ),
    )
    assert tx.recipients == ["alice@example.com", "audit@example.com", "boss@example.com"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["alice@example.com", "audit@example.com", "boss@example.com"]
    msg = mail.message()
    assert msg["Bcc"] is None
    assert msg["Cc"] is None
    assert b"audit@example.com" not in mail.data
    assert b"boss@example.com" not in mail.data


def test_reply_to_header(fleet: Servers, producer: MailProducer) -> None:
    deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="s",
            message="m",
            recipients="alice@example.com",
            reply_to="Helpdesk <help@example.com>",
        ),
    )
    msg = only_mail(fleet.plain).message()
    [address] = msg["Reply-To"].addresses
    assert (address.display_name, address.addr_spec) == ("Helpdesk", "help@example.com")


def test_inline_attachments_with_and_without_content_type(
    fleet: Servers, producer: MailProducer
) -> None:
    blob = bytes(range(256)) * 3
    pdf = b"%PDF-1.4 not really a pdf"
    event = {
        "instance": "Plain",
        "subject": "files",
        "message": "see attached",
        "recipients": "alice@example.com",
        "attachments": [
            {
                "filename": "data.bin",
                "content": base64.b64encode(blob).decode(),
                "contentType": "image/png",
            },
            {"filename": "Bericht März.pdf", "content": base64.b64encode(pdf).decode()},
            {"filename": "raw.unknownext", "content": base64.b64encode(b"xyz").decode()},
        ],
    }
    tx = deliver(producer, event)
    assert tx.success is True, tx.message
    msg = only_mail(fleet.plain).message()
    assert body_text(msg) == "see attached"
    assert attachments_sha256(msg) == {
        "data.bin": sha(blob),
        "Bericht März.pdf": sha(pdf),
        "raw.unknownext": sha(b"xyz"),
    }
    types = {str(p.get_filename()): p.get_content_type() for p in msg.iter_attachments()}
    assert types == {
        "data.bin": "image/png",  # as given, not guessed from the name
        "Bericht März.pdf": "application/pdf",  # guessed from the name
        "raw.unknownext": "application/octet-stream",
    }
    for part in msg.iter_attachments():
        assert part["Content-Transfer-Encoding"] == "base64"


def _unique_dir(root: Path) -> Path:
    directory = root / f"case-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    return directory


def test_path_attachments_inside_the_root(
    fleet: Servers, producer: MailProducer, attachment_root: Path
) -> None:
    directory = _unique_dir(attachment_root)
    (directory / "report.csv").write_bytes(b"id;amount\r\n1;12.50\r\n")
    (directory / "image.bin").write_bytes(bytes(range(256)))
    relative = f"{directory.name}/report.csv"
    absolute = str(directory / "image.bin")
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="paths",
            message="m",
            recipients="alice@example.com",
            attachments=[{"path": relative}, {"path": absolute}],
        ),
    )
    assert tx.success is True, tx.message
    msg = only_mail(fleet.plain).message()
    assert attachments_sha256(msg) == {
        "report.csv": sha(b"id;amount\r\n1;12.50\r\n"),
        "image.bin": sha(bytes(range(256))),
    }


def test_path_attachments_as_one_semicolon_separated_string(
    fleet: Servers, producer: MailProducer, attachment_root: Path
) -> None:
    directory = _unique_dir(attachment_root)
    (directory / "a.txt").write_bytes(b"first\n")
    (directory / "b.txt").write_bytes(b"second\n")
    event = {
        "instance": "Plain",
        "subject": "paths",
        "message": "m",
        "recipients": "alice@example.com",
        "attachments": f"{directory.name}/a.txt; {directory / 'b.txt'}",
    }
    tx = deliver(producer, event)
    assert tx.success is True, tx.message
    msg = only_mail(fleet.plain).message()
    assert attachments_sha256(msg) == {"a.txt": sha(b"first\n"), "b.txt": sha(b"second\n")}


def _escape_path(kind: str, root: Path, outside: Path) -> str:
    if kind == "dotdot":
        return f"../{outside.name}"
    if kind == "absolute":
        return str(outside)
    link = root / f"link-{uuid.uuid4().hex[:8]}.txt"
    link.symlink_to(outside)
    return link.name


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_path_attachments_outside_the_root_are_refused(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    attachment_root: Path,
    kind: str,
) -> None:
    # A real file outside the root, next to it (so that "../name" names an existing file).
    outside = attachment_root.parent / f"outside-{uuid.uuid4().hex[:8]}.txt"
    outside.write_bytes(b"secret\n")
    path = _escape_path(kind, attachment_root, outside)

    receipt = producer.send(
        MailEvent(
            instance="Plain",
            subject="escape",
            message="m",
            recipients="alice@example.com",
            attachments=[{"path": path}],
        )
    )
    tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.success is False
    assert tx.count == 0
    assert tx.attempts == 1
    assert repr(path) in tx.message
    assert "outside the attachment root" in tx.message
    assert fleet.plain.received == []
    assert fleet.plain.transactions == 0
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Failed"


def test_event_id_gives_the_message_id(fleet: Servers, producer: MailProducer) -> None:
    token = uuid.uuid4().hex[:12]
    event_id = f"order-{token}:confirmation"
    tx = deliver(
        producer,
        MailEvent(
            instance="Plain",
            subject="s",
            message="m",
            recipients="alice@example.com",
            event_id=event_id,
        ),
    )
    assert tx.event_id == event_id
    # ':' cannot stand in a Message-ID's left part; the id is the sender's domain's.
    assert tx.message_id == f"<order-{token}-confirmation@example.com>"
    msg = only_mail(fleet.plain).message()
    assert msg["Message-ID"] == tx.message_id
    # Without an eventId one is generated, and the Message-ID still derives from it.
    tx2 = deliver(
        producer,
        MailEvent(instance="Plain", subject="s", message="m", recipients="alice@example.com"),
    )
    assert tx2.event_id != event_id
    assert tx2.message_id == f"<{tx2.event_id}@example.com>"


def test_the_same_event_id_twice_is_delivered_once(
    fleet: Servers, producer: MailProducer, backend: redis.Redis
) -> None:
    event = MailEvent(
        instance="Plain",
        subject="once",
        message="m",
        recipients="alice@example.com",
        event_id=f"once-{uuid.uuid4().hex}",
    )
    first = producer.send(event).wait(timeout_s=WAIT_S)
    assert first.success is True
    second_receipt = producer.send(event)
    # The worker counts every run of an event id in its idempotency record.
    deadline = time.monotonic() + WAIT_S
    key = f"mailsender:event:{event.event_id}"
    while backend.hget(key, "attempts") != "2":
        assert time.monotonic() < deadline, "the duplicate was not run"
        time.sleep(0.05)
    assert second_receipt.wait(timeout_s=WAIT_S) == first
    time.sleep(0.5)
    assert fleet.plain.accepted_count("alice@example.com") == 1
    assert fleet.plain.transactions == 1


# --- other producers, unknown instances ---------------------------------------------------


@pytest.mark.parametrize("queue", ["mailsender"], ids=["queue-mailsender"])
def test_event_from_a_plain_celery_client_with_snake_case_fields_is_delivered(
    fleet: Servers, redis_server: RedisServer, queue: str | None
) -> None:
    # Contract §3: the default queue is `mailsender`; a client names it (a bare Celery app's
    # own default queue is `celery`, which MailSender workers deliberately do not consume).
    # As another application would do it: a bare Celery app that knows only the task name.
    event_id = f"plain-celery-{uuid.uuid4().hex}"
    client = celery.Celery(broker=redis_server.url(0), backend=redis_server.url(1))
    routing: dict[str, Any] = {} if queue is None else {"queue": queue}
    try:
        client.send_task(
            "mailsender.send",
            kwargs={
                "event": {
                    "instance": "Plain",
                    "subject": "from another client",
                    "message": "<p>hi</p>",
                    "is_html": True,
                    "recipients": ["alice@example.com"],
                    "reply_to": "help@example.com",
                    "event_id": event_id,
                }
            },
            task_id=event_id,
            **routing,
        )
        result = AsyncResult(event_id, app=client).get(timeout=WAIT_S)
    finally:
        client.close()
    assert result["eventId"] == event_id
    assert result["success"] is True
    assert result["recipients"] == ["alice@example.com"]
    msg = only_mail(fleet.plain).message()
    assert msg["Subject"] == "from another client"
    assert msg["Reply-To"] == "help@example.com"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Message-ID"] == f"<{event_id}@example.com>"


def test_unknown_instance_fails_with_event_and_dead_letter(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    event = MailEvent(
        instance="NoSuchInstance", subject="s", message="m", recipients="alice@example.com"
    )
    receipt = producer.send(event)
    tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.success is False
    assert tx.count == 0
    assert tx.instance == "NoSuchInstance"
    assert tx.attempts == 1
    assert "unknown instance 'NoSuchInstance'" in tx.message
    assert nothing_received_anywhere(fleet)

    with pytest.raises(MailDeliveryFailed) as info:
        AsyncResult(receipt.event_id, app=producer.app).get(timeout=5)
    assert info.value.transaction == tx

    body = events.wait_for(receipt.event_id)
    assert body["name"] == "NoSuchInstance.Failed"
    assert body["instance"] == "NoSuchInstance"
    assert body["transaction"]["success"] is False

    raw = backend.hget("mailsender:deadletters", receipt.event_id)
    assert raw is not None
    letter = json.loads(raw)
    assert letter["event"] == event.to_json()
    assert "unknown instance 'NoSuchInstance'" in letter["reason"]


def test_the_same_event_id_enqueued_twice_at_once_is_delivered_once(
    fleet: Servers, producer: MailProducer, backend: redis.Redis
) -> None:
    event = MailEvent(
        instance="Plain",
        subject="twice at once",
        message="m",
        recipients="alice@example.com",
        event_id=f"twice-{uuid.uuid4().hex}",
    )
    first, second = producer.send_many([event, event])
    key = f"mailsender:event:{event.event_id}"
    deadline = time.monotonic() + WAIT_S
    # Both runs are over when the record counts two runs and nothing waits for a retry.
    while not (
        int(backend.hget(key, "attempts") or 0) >= 2
        and backend.zscore("mailsender:retries", event.event_id) is None
        and AsyncResult(event.event_id, app=producer.app).state == "SUCCESS"
    ):
        assert time.monotonic() < deadline, "the duplicate runs did not finish"
        time.sleep(0.05)
    tx = first.wait(timeout_s=WAIT_S)
    assert tx.success is True
    assert second.wait(timeout_s=WAIT_S) == tx
    time.sleep(0.5)
    assert fleet.plain.accepted_count("alice@example.com") == 1
    assert fleet.plain.transactions == 1
