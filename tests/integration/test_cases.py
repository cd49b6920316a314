"""The handed cases (shared/cases/handed-cases.md) end to end, against the real worker fleet.

Every test is named after its case and variant. Baseline of the cases: instance ``Plain``
(127.0.0.1, no TLS, no AUTH, sender ``noreply@example.com``, no default recipients), event
subject ``Test``, body ``Hello``, recipient ``alice@example.com``; retries shortened to
0.3 s first back-off, 1 s cap, 3 retries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from celery.result import AsyncResult

from producer import Attachment, InvalidEvent, MailDeliveryFailed, MailProducer, Transaction
from tests.conftest import PASSWORD, USER, Servers
from tests.support.fleet import EventsReader, RedisServer, WorkerProcess
from tests.support.mail import attachments_sha256, normalised
from tests.support.smtp import Received, Rule, TestSmtpServer

TASK_NAME = "mailsender.send"
QUIET_S = 1.5
"""How long to watch for a further attempt: about 3x the retry interval of the fleet."""
WAIT_S = 20.0

SECRET_FORMS = [
    PASSWORD,
    base64.b64encode(PASSWORD.encode()).decode(),
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
]
"""The password as it could appear: clear text, AUTH LOGIN's base64, AUTH PLAIN's base64."""


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the broker's Redis (to look at waiting task messages)."""
    client = redis.Redis.from_url(redis_server.url(0), decode_responses=True)
    yield client
    client.close()


# --- helpers ---------------------------------------------------------------------------------


def new_id(case: str) -> str:
    """A readable, unique event id for ``case``."""
    return f"{case}-{uuid.uuid4().hex[:12]}"


def case_event(instance: str = "Plain", **fields: Any) -> dict[str, Any]:
    """The cases' baseline event (camelCase JSON) with ``fields`` on top."""
    event: dict[str, Any] = {
        "instance": instance,
        "subject": "Test",
        "message": "Hello",
        "isHtml": False,
        "attachments": [],
        "recipients": "alice@example.com",
    }
    event.update(fields)
    return event


def send_raw(producer: MailProducer, event: dict[str, Any]) -> str:
    """Enqueue ``event`` as any Celery client would: by task name, no validation."""
    event_id = str(event["eventId"])
    producer.app.send_task(TASK_NAME, kwargs={"event": event}, task_id=event_id)
    return event_id


def verbs(server: TestSmtpServer, connection_id: int | None = None) -> list[tuple[str, bool]]:
    """``(VERB, tls_active)`` of every command line the server read (one connection or all)."""
    return [
        (line.split(" ", 1)[0].split(":", 1)[0].upper(), tls)
        for cid, line, tls in server.commands
        if connection_id is None or cid == connection_id
    ]


def rcpt_commands(server: TestSmtpServer) -> list[str]:
    """The address of every RCPT the server read, in order (a malformed line kept whole)."""
    out = []
    for _, line, _ in server.commands:
        if line[:4].upper() != "RCPT":
            continue
        match = re.fullmatch(r"(?i)RCPT TO:<([^<>]*)>", line)
        out.append(match.group(1) if match else line)
    return out


def count_verb(server: TestSmtpServer, verb: str) -> int:
    """How many command lines with ``verb`` the server read."""
    return sum(1 for v, _ in verbs(server) if v == verb)


def stream_transactions(backend: redis.Redis, event_id: str) -> list[dict[str, Any]]:
    """The transaction log's entries for ``event_id`` (contract §4), oldest first."""
    entries = cast(list[tuple[str, dict[str, str]]], backend.xrange("mailsender:transactions"))
    out = []
    for _, fields in entries:
        tx = json.loads(fields["transaction"])
        if tx["eventId"] == event_id:
            out.append(tx)
    return out


def assert_no_secret(text: str) -> None:
    """The password, in clear or in any AUTH base64 form, is not in ``text``."""
    for form in SECRET_FORMS:
        assert form not in text, "the SMTP password (or its base64) leaked"


def assert_clear_error(text: str, *parts: str) -> None:
    """A clear error: code, enhanced code, server text and the affected address or setting."""
    for part in parts:
        assert part in text, f"{part!r} missing from the recorded error {text!r}"
    assert_no_secret(text)


def assert_failed_for_good(
    producer: MailProducer, backend: redis.Redis, tx: Transaction, event_id: str
) -> None:
    """State FAILURE with ``MailDeliveryFailed`` carrying ``tx``; one stream entry."""
    assert tx.event_id == event_id
    assert tx.success is False
    assert tx.count == 0
    result = AsyncResult(event_id, app=producer.app)
    assert result.state == "FAILURE"
    with pytest.raises(MailDeliveryFailed) as info:
        result.get(timeout=5)
    assert info.value.transaction == tx
    # The stream entry is written right after the task result: give it a moment.
    assert wait_until(lambda: bool(stream_transactions(backend, event_id)), timeout_s=5)
    assert stream_transactions(backend, event_id) == [tx.to_json()]


def assert_quiet_afterwards(
    server: TestSmtpServer, producer: MailProducer, backend: redis.Redis, event_id: str
) -> None:
    """No further connection, transaction or outcome within ~3x the retry interval."""
    before = (server.connections, server.transactions, len(server.received))
    time.sleep(QUIET_S)
    assert (server.connections, server.transactions, len(server.received)) == before
    assert AsyncResult(event_id, app=producer.app).state == "FAILURE"
    assert len(stream_transactions(backend, event_id)) == 1


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passed; return it."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def only_mail(server: TestSmtpServer) -> Received:
    """The one mail the server accepted."""
    received = server.received
    assert len(received) == 1, f"expected exactly one accepted mail, got {len(received)}"
    return received[0]


# --- C05: header injection through subject or recipients ------------------------------------

INJECTIONS = [
    pytest.param("subject", "Quarterly report\r\nBcc: eve@example.net", id="S1_subject_crlf_bcc"),
    pytest.param("subject", "Quarterly report\n", id="S2_subject_trailing_lf"),
    pytest.param(
        "subject", "Quarterly report=?UTF-8?Q?=0A?=Bcc: eve@example.net", id="S3_subject_encoded_lf"
    ),
    pytest.param(
        "recipients", "alice@example.com\r\nBcc: eve@example.net", id="S4_recipients_crlf_bcc"
    ),
]
MORE_INJECTIONS = [
    pytest.param("cc", "bob@example.org\r\nBcc: eve@example.net", id="cc_crlf"),
    pytest.param("bcc", "bob@example.org\nTo: eve@example.net", id="bcc_lf"),
    pytest.param("replyTo", "bob@example.org\r\nBcc: eve@example.net", id="replyTo_crlf"),
    pytest.param("subject", "Report\rBcc: eve@example.net", id="subject_bare_cr"),
]


@pytest.mark.parametrize(("field", "value"), INJECTIONS + MORE_INJECTIONS)
def test_C05_producer_rejects_header_injection(
    fleet: Servers, producer: MailProducer, broker: redis.Redis, field: str, value: str
) -> None:
    event_id = new_id("c05-producer")
    with pytest.raises(InvalidEvent) as info:
        producer.send(case_event(eventId=event_id, **{field: value}))
    text = str(info.value)
    assert f"{field}:" in text, f"the error does not name the field {field!r}: {text}"
    assert "line break" in text
    waiting = [json.loads(m)["headers"]["id"] for m in broker.lrange("mailsender", 0, -1)]
    assert event_id not in waiting

    # Nothing was enqueued: a canary sent afterwards is delivered, the rejected id never ran.
    canary = producer.send(case_event(subject="canary", eventId=new_id("c05-canary")))
    assert canary.wait(timeout_s=WAIT_S).success is True
    assert AsyncResult(event_id, app=producer.app).state == "PENDING"
    [mail] = fleet.plain.received
    assert mail.rcpt_tos == ["alice@example.com"]
    assert mail.message()["Subject"] == "canary"
    assert "eve@example.net" not in rcpt_commands(fleet.plain)


def test_C05_producer_rejects_header_injection_in_attachment_filename(
    fleet: Servers, producer: MailProducer
) -> None:
    bad = {"filename": "a.txt\r\nBcc: eve@example.net", "content": "SGVsbG8="}
    with pytest.raises(InvalidEvent) as info:
        producer.send(case_event(attachments=[bad]))
    assert "attachments.0.filename:" in str(info.value)
    assert "line break" in str(info.value)


@pytest.mark.parametrize(("field", "value"), INJECTIONS)
def test_C05_raw_celery_client_header_injection_fails_without_sending(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    field: str,
    value: str,
) -> None:
    event_id = send_raw(producer, case_event(eventId=new_id("c05-raw"), **{field: value}))
    tx = producer.receipt(event_id).wait(timeout_s=WAIT_S)

    assert tx.instance == "Plain"
    assert tx.interface == "Plain"
    assert tx.attempts == 1
    assert tx.recipients == []
    assert tx.refused == {}
    assert f"{field}:" in tx.message, f"the failure does not name {field!r}: {tx.message}"
    assert "line break" in tx.message
    assert_failed_for_good(producer, backend, tx, event_id)
    body = events.wait_for(event_id)
    assert body["name"] == "Plain.Failed"
    assert body["transaction"] == tx.to_json()

    # Nothing was sent: not even a connection, and no retry later.
    assert fleet.plain.connections == 0
    assert fleet.plain.transactions == 0
    assert fleet.plain.received == []
    assert_quiet_afterwards(fleet.plain, producer, backend, event_id)
    assert fleet.plain.connections == 0


# --- C07: binary attachments through the JSON-serialised queue -------------------------------

B1 = bytes(range(256)) * 4
B2 = random.Random(7).randbytes(200 * 1024)
B3 = "café\n".encode("latin-1")


def test_C07_binary_attachments_survive_the_json_queue(
    fleet: Servers, redis_server: RedisServer, broker: redis.Redis
) -> None:
    assert B3 == b"caf\xe9\n"
    hold_queue = new_id("c07-hold")  # a queue no worker reads, to look at the message
    event_id = new_id("c07")
    attachments = [
        Attachment.inline("all-bytes.bin", B1),
        Attachment.inline("photo.jpg", B2),
        Attachment.inline("latin1.txt", B3),
    ]
    with MailProducer(redis_server.url(0), redis_server.url(1), queue=hold_queue) as held:
        receipt = held.send(case_event(eventId=event_id, attachments=attachments))
        assert receipt.event_id == event_id

        [raw_message] = broker.lrange(hold_queue, 0, -1)
        message = json.loads(raw_message)
        assert message["content-type"] == "application/json"
        assert message["headers"]["id"] == event_id
        assert message["headers"]["task"] == TASK_NAME
        assert message["properties"]["body_encoding"] == "base64"
        body = base64.b64decode(message["body"])
        args, kwargs, _embed = json.loads(body)
        assert args == []
        inline = kwargs["event"]["attachments"]
        assert [a["filename"] for a in inline] == ["all-bytes.bin", "photo.jpg", "latin1.txt"]
        assert [base64.b64decode(a["content"]) for a in inline] == [B1, B2, B3]

        # Hand that very message to the workers' queue.
        broker.lmove(hold_queue, "mailsender", "RIGHT", "LEFT")
        tx = receipt.wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.attempts == 1
    assert tx.recipients == ["alice@example.com"]
    msg = only_mail(fleet.plain).message()
    assert attachments_sha256(msg) == {
        "all-bytes.bin": hashlib.sha256(B1).hexdigest(),
        "photo.jpg": hashlib.sha256(B2).hexdigest(),
        "latin1.txt": hashlib.sha256(B3).hexdigest(),
    }
    latin1 = [p for p in msg.iter_attachments() if p.get_filename() == "latin1.txt"]
    assert [p.get_payload(decode=True) for p in latin1] == [b"caf\xe9\n"]
    assert normalised(msg.get_body(("plain",)).get_content()) == "Hello"  # type: ignore[union-attr]


def test_C07_large_attachment_travels_by_reference_and_arrives_intact(
    fleet: Servers, redis_server: RedisServer, broker: redis.Redis
) -> None:
    """C07 SHOULD: a large attachment does not travel inline through the broker."""
    big = random.Random(11).randbytes(3 * 1024 * 1024)
    hold_queue = new_id("c07-ref-hold")
    event_id = new_id("c07-ref")
    backend = redis.Redis.from_url(redis_server.url(1))
    with MailProducer(redis_server.url(0), redis_server.url(1), queue=hold_queue) as held:
        receipt = held.send(
            case_event(eventId=event_id, attachments=[Attachment.inline("big.bin", big)])
        )
        [raw_message] = broker.lrange(hold_queue, 0, -1)
        assert len(raw_message) < 10_000  # the bytes are not in the task message
        _args, kwargs, _embed = json.loads(base64.b64decode(json.loads(raw_message)["body"]))
        [ref] = kwargs["event"]["attachments"]
        assert set(ref) == {"filename", "blob"}
        assert ref["filename"] == "big.bin"
        assert ref["blob"].startswith("mailsender:blob:")
        assert backend.get(ref["blob"]) == big
        assert 0 < backend.ttl(ref["blob"]) <= 7 * 24 * 3600
        broker.lmove(hold_queue, "mailsender", "RIGHT", "LEFT")
        tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.success is True
    msg = only_mail(fleet.plain).message()
    assert attachments_sha256(msg) == {"big.bin": hashlib.sha256(big).hexdigest()}
    # Sent: the blob is not needed any more.
    assert wait_until(lambda: backend.exists(ref["blob"]) == 0, timeout_s=5)
    backend.close()


def test_C07_attachment_by_reference_whose_blob_is_gone_fails_clearly(
    fleet: Servers, producer: MailProducer, redis_server: RedisServer
) -> None:
    event_id = new_id("c07-gone")
    key = f"mailsender:blob:{uuid.uuid4().hex}"
    send_raw(
        producer,
        case_event(eventId=event_id, attachments=[{"filename": "report.pdf", "blob": key}]),
    )
    tx = producer.receipt(event_id).wait(timeout_s=WAIT_S)
    backend = redis.Redis.from_url(redis_server.url(1), decode_responses=True)
    assert_failed_for_good(producer, backend, tx, event_id)
    assert_clear_error(tx.message, "report.pdf", key, "not in the result backend")
    assert fleet.plain.transactions == 0
    backend.close()


# --- C12: recipients parsed address-aware ----------------------------------------------------

R1 = ' "Doe, Jane" <jane@example.com>, bob@example.org , , alice@example.com,bob@example.org '
R2 = ['"Doe, Jane" <jane@example.com>', " bob@example.org", "alice@example.com"]
LONG_NAME = "Doe, Jane - Head of Procurement and Vendor Relations, Region Nord-Ost"
R3 = f'"{LONG_NAME}" <jane@example.com>, bob@example.org'


@pytest.mark.parametrize("recipients", [pytest.param(R1, id="R1"), pytest.param(R2, id="R2")])
def test_C12_recipients_with_quoted_comma_blanks_and_duplicates(
    fleet: Servers, producer: MailProducer, recipients: str | list[str]
) -> None:
    expected = ["jane@example.com", "bob@example.org", "alice@example.com"]
    tx = producer.send(case_event(recipients=recipients)).wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.recipients == expected
    assert tx.refused == {}
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == expected
    # One address per RCPT, no fragments, no empty address, the duplicate collapsed.
    assert rcpt_commands(fleet.plain) == expected
    msg = mail.message()
    to = msg["To"].addresses
    assert [a.addr_spec for a in to] == expected
    assert [a.display_name for a in to] == ["Doe, Jane", "", ""]


def test_C12_R3_long_quoted_display_name_survives_folding(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(case_event(recipients=R3)).wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.recipients == ["jane@example.com", "bob@example.org"]
    mail = only_mail(fleet.plain)
    assert mail.rcpt_tos == ["jane@example.com", "bob@example.org"]
    assert rcpt_commands(fleet.plain) == ["jane@example.com", "bob@example.org"]
    header_lines = mail.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert all(len(line) <= 998 for line in header_lines)
    to = mail.message()["To"].addresses
    assert [a.addr_spec for a in to] == ["jane@example.com", "bob@example.org"]
    assert [a.display_name for a in to] == [LONG_NAME, ""]


def test_C12_entry_that_is_not_an_address_is_a_clear_validation_error(
    fleet: Servers, producer: MailProducer
) -> None:
    with pytest.raises(InvalidEvent) as info:
        producer.send(case_event(recipients="alice@example.com, not-an-address"))
    assert "recipients:" in str(info.value)
    assert "not-an-address" in str(info.value)


# --- C13: mixed RCPT replies ------------------------------------------------------------------


def test_C13_M1_accepted_delivered_refused_reported_deferred_retried(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    fleet.plain.add_rule(
        Rule("rcpt", "550 5.1.1 User unknown", times=None, match="gone@example.com")
    )
    fleet.plain.add_rule(
        Rule("rcpt", "451 4.3.0 Try again later", times=1, match="later@example.com")
    )
    receipt = producer.send(
        case_event(recipients="alice@example.com, gone@example.com, later@example.com")
    )
    tx = receipt.wait(timeout_s=WAIT_S)

    # First attempt: one DATA for alice; second: a transaction for exactly {later}.
    first, second = fleet.plain.received
    assert first.rcpt_tos == ["alice@example.com"]
    assert second.rcpt_tos == ["later@example.com"]
    assert count_verb(fleet.plain, "DATA") == 2
    assert fleet.plain.transactions == 2
    # gone is never tried again; alice and later receive exactly one copy each.
    assert rcpt_commands(fleet.plain) == [
        "alice@example.com",
        "gone@example.com",
        "later@example.com",
        "later@example.com",
    ]
    assert fleet.plain.accepted_count("alice@example.com") == 1
    assert fleet.plain.accepted_count("later@example.com") == 1
    assert fleet.plain.accepted_count("gone@example.com") == 0
    # Both mails are the same message.
    assert first.message()["Message-ID"] == second.message()["Message-ID"] == tx.message_id

    # Per-recipient outcome in the transaction.
    assert tx.success is True
    assert tx.count == 1
    assert tx.attempts == 2
    assert tx.recipients == ["alice@example.com", "later@example.com"]
    assert tx.refused == {"gone@example.com": "550 5.1.1 User unknown"}
    assert_clear_error(tx.message, "gone@example.com", "550 5.1.1 User unknown")
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Done"


def test_C13_M2_too_many_recipients_sent_in_further_transactions(
    fleet: Servers, producer: MailProducer
) -> None:
    rcpts = [f"r{i}@example.org" for i in range(1, 6)]
    tx = producer.send(case_event("Limited", recipients=", ".join(rcpts))).wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.recipients == rcpts
    assert tx.refused == {}
    assert tx.attempts == 1
    received = fleet.limited.received
    assert [m.rcpt_tos for m in received] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
    for address in rcpts:
        assert fleet.limited.accepted_count(address) == 1
    assert len({m.message()["Message-ID"] for m in received}) == 1


# --- C14: reply-code classification -----------------------------------------------------------


def _permanent_row(
    server: TestSmtpServer,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    event: dict[str, Any],
) -> Transaction:
    """Send ``event``; assert one attempt, one connection, one transaction, FAILURE, quiet."""
    receipt = producer.send(event)
    tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.attempts == 1
    assert tx.recipients == []
    assert server.received == []
    assert server.connections == 1
    assert server.transactions == 1
    assert_failed_for_good(producer, backend, tx, receipt.event_id)
    assert events.wait_for(receipt.event_id)["name"] == f"{event['instance']}.Failed"
    assert_quiet_afterwards(server, producer, backend, receipt.event_id)
    return tx


def test_C14_P1_rcpt_550_user_unknown_is_permanent(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    fleet.plain.add_rule(Rule("rcpt", "550 5.1.1 User unknown", times=None))
    tx = _permanent_row(fleet.plain, producer, events, backend, case_event())
    assert tx.refused == {"alice@example.com": "550 5.1.1 User unknown"}
    assert_clear_error(tx.message, "550", "5.1.1", "User unknown", "alice@example.com")
    assert count_verb(fleet.plain, "DATA") == 0


def test_C14_P2_mail_from_553_is_permanent_and_names_the_sender(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    fleet.plain.add_rule(Rule("mail", "553 5.7.1 Sender address rejected", times=None))
    tx = _permanent_row(fleet.plain, producer, events, backend, case_event())
    assert tx.refused == {}
    assert_clear_error(tx.message, "553", "5.7.1", "Sender address rejected", "noreply@example.com")
    assert count_verb(fleet.plain, "RCPT") == 0


def test_C14_P3_end_of_data_554_is_permanent(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    fleet.plain.add_rule(Rule("data", "554 5.7.1 Message rejected by policy", times=None))
    tx = _permanent_row(fleet.plain, producer, events, backend, case_event())
    assert count_verb(fleet.plain, "DATA") == 1
    assert_clear_error(
        tx.message, "554", "5.7.1", "Message rejected by policy", "alice@example.com"
    )


def test_C14_P4_end_of_data_552_with_3_mib_attachment_is_permanent(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    fleet.plain.add_rule(Rule("data", "552 5.3.4 Message size exceeds fixed limit", times=None))
    big = Attachment.inline("big.bin", random.Random(4).randbytes(3 * 1024 * 1024))
    tx = _permanent_row(fleet.plain, producer, events, backend, case_event(attachments=[big]))
    assert count_verb(fleet.plain, "DATA") == 1
    assert_clear_error(
        tx.message, "552", "5.3.4", "Message size exceeds fixed limit", "alice@example.com"
    )


def test_C14_P4_advertised_size_too_small_fails_before_data(
    fleet: Servers, producer: MailProducer, backend: redis.Redis
) -> None:
    big = Attachment.inline("big.bin", random.Random(5).randbytes(3 * 1024 * 1024))
    receipt = producer.send(case_event("Sized", attachments=[big]))
    tx = receipt.wait(timeout_s=WAIT_S)

    assert tx.attempts == 1
    assert_failed_for_good(producer, backend, tx, receipt.event_id)
    assert_clear_error(tx.message, "SIZE", str(1024 * 1024))
    assert fleet.sized.connections == 1
    assert fleet.sized.transactions == 0
    assert count_verb(fleet.sized, "DATA") == 0
    assert fleet.sized.received == []
    assert_quiet_afterwards(fleet.sized, producer, backend, receipt.event_id)


def _transient_row(
    server: TestSmtpServer, producer: MailProducer, events: EventsReader, rule: Rule
) -> Transaction:
    """Fault once, then accept: two attempts, exactly one stored copy."""
    server.add_rule(rule)
    receipt = producer.send(case_event())
    tx = receipt.wait(timeout_s=WAIT_S)
    assert rule.fired == 1
    assert tx.success is True
    assert tx.count == 1
    assert tx.attempts == 2
    assert tx.recipients == ["alice@example.com"]
    assert tx.refused == {}
    mail = only_mail(server)
    assert mail.rcpt_tos == ["alice@example.com"]
    assert mail.message()["Message-ID"] == tx.message_id
    assert server.accepted_count("alice@example.com") == 1
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Done"
    return tx


def test_C14_T1_greeting_421_is_transient_and_delivered_once_on_attempt_2(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    rule = Rule("connect", "421 4.7.0 Too many connections, try later", times=1)
    _transient_row(fleet.plain, producer, events, rule)
    assert fleet.plain.connections == 2
    assert fleet.plain.transactions == 1


def test_C14_T2_rcpt_450_mailbox_busy_is_transient(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    _transient_row(fleet.plain, producer, events, Rule("rcpt", "450 4.2.1 Mailbox busy", times=1))
    assert fleet.plain.transactions == 2
    assert rcpt_commands(fleet.plain) == ["alice@example.com", "alice@example.com"]
    assert count_verb(fleet.plain, "DATA") == 1


def test_C14_T3_end_of_data_451_greylisted_is_transient_one_copy(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    rule = Rule("data", "451 4.7.1 Greylisted, retry later", times=1)
    _transient_row(fleet.plain, producer, events, rule)
    assert fleet.plain.transactions == 2
    assert count_verb(fleet.plain, "DATA") == 2


def test_C14_T4_end_of_data_452_insufficient_storage_is_transient_one_copy(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    rule = Rule("data", "452 4.3.1 Insufficient system storage", times=1)
    _transient_row(fleet.plain, producer, events, rule)
    assert fleet.plain.transactions == 2
    assert count_verb(fleet.plain, "DATA") == 2


def test_C14_T5_rcpt_451_every_attempt_fails_after_retries_with_last_reply(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    fleet.plain.add_rule(Rule("rcpt", "451 4.3.0 Temporary failure", times=None))
    receipt = producer.send(case_event())
    tx = receipt.wait(timeout_s=WAIT_S)

    assert tx.attempts == 4  # the first attempt and maxRetries 3
    assert fleet.plain.transactions == 4
    assert rcpt_commands(fleet.plain) == ["alice@example.com"] * 4
    assert fleet.plain.received == []
    assert tx.recipients == []
    assert tx.refused == {"alice@example.com": "451 4.3.0 Temporary failure"}
    assert_clear_error(tx.message, "451", "4.3.0", "Temporary failure", "alice@example.com")
    assert tx.message == (
        "every recipient was deferred; gave up after 4 attempts: "
        "alice@example.com: 451 4.3.0 Temporary failure"
    )
    assert_failed_for_good(producer, backend, tx, receipt.event_id)
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Failed"
    assert_quiet_afterwards(fleet.plain, producer, backend, receipt.event_id)


def test_C13_M3_a_recipient_deferred_at_every_attempt_is_given_up_and_said_so(
    fleet: Servers, producer: MailProducer, events: EventsReader
) -> None:
    fleet.plain.add_rule(
        Rule("rcpt", "451 4.3.0 Try again later", times=None, match="later@example.com")
    )
    receipt = producer.send(case_event(recipients="alice@example.com, later@example.com"))
    tx = receipt.wait(timeout_s=WAIT_S)

    assert fleet.plain.accepted_count("alice@example.com") == 1
    assert fleet.plain.accepted_count("later@example.com") == 0
    assert rcpt_commands(fleet.plain) == ["alice@example.com"] + ["later@example.com"] * 4
    assert tx.success is True and tx.attempts == 4
    assert tx.recipients == ["alice@example.com"]
    assert tx.refused == {"later@example.com": "451 4.3.0 Try again later"}
    assert tx.message.endswith(
        "; still deferred, gave up after 4 attempts: later@example.com: 451 4.3.0 Try again later"
    )
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Done"


# --- C16 D2: the identical task delivered again after it finished ----------------------------


def test_C16_D2_identical_task_published_twice_is_sent_once(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    event_id = new_id("c16-d2")
    event = case_event(subject=f"D2 {event_id}", eventId=event_id)
    send_raw(producer, event)
    first = producer.receipt(event_id).wait(timeout_s=WAIT_S)
    assert first.success is True
    assert first.attempts == 1
    assert events.wait_for(event_id)["name"] == "Plain.Done"
    mail = only_mail(fleet.plain)
    assert mail.message()["Message-ID"] == first.message_id
    assert event_id in first.message_id

    send_raw(producer, event)  # the same task message again: a redelivery
    line = f"event {event_id}: already final"
    assert wait_until(lambda: line in fleet_worker.log()), "the second run did not log it"
    time.sleep(0.3)

    assert only_mail(fleet.plain) == mail
    assert fleet.plain.transactions == 1
    assert count_verb(fleet.plain, "DATA") == 1
    result = AsyncResult(event_id, app=producer.app)
    assert result.state == "SUCCESS"
    assert Transaction.model_validate(result.get(timeout=5)) == first
    assert stream_transactions(backend, event_id) == [first.to_json()]
    events.drain()
    assert [e["name"] for e in events.seen[event_id]] == ["Plain.Done"]


def test_C16_D2_same_event_id_sent_again_right_after_its_outcome_is_sent_once(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    """Contract §3 through the producer: resent as soon as the first outcome is readable.

    Five events, each sent twice, to catch the moment where the first run has stored its
    result but not yet finished its log entry and instance event.
    """
    firsts: list[Transaction] = []
    for _ in range(5):
        event = case_event(subject="twice", eventId=new_id("c16-d2-producer"))
        first = producer.send(event).wait(timeout_s=WAIT_S)
        second = producer.send(event).wait(timeout_s=WAIT_S)
        assert first.success is True
        assert first.attempts == 1
        assert second == first
        firsts.append(first)
    time.sleep(0.5)

    assert fleet.plain.accepted_count("alice@example.com") == 5
    assert fleet.plain.transactions == 5
    assert sorted(m.message()["Message-ID"] for m in fleet.plain.received) == sorted(
        tx.message_id for tx in firsts
    )
    events.drain()
    for first in firsts:
        assert stream_transactions(backend, first.event_id) == [first.to_json()]
        assert [e["name"] for e in events.seen.get(first.event_id, [])] == ["Plain.Done"]


# --- C17: useSsl enforced, certificates verified, "false" means off --------------------------


def test_C17_S1_starttls_required_but_not_offered_fails_permanently_without_auth(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    receipt = producer.send(case_event("NoStarttls"))
    tx = receipt.wait(timeout_s=WAIT_S)

    assert tx.attempts == 1
    assert_failed_for_good(producer, backend, tx, receipt.event_id)
    assert "STARTTLS" in tx.message
    assert "not offer" in tx.message
    assert_clear_error(tx.message, f"127.0.0.1:{fleet.no_starttls.port}")
    seen = [v for v, _ in verbs(fleet.no_starttls)]
    assert "EHLO" in seen
    assert "AUTH" not in seen
    assert "MAIL" not in seen
    wire = "\n".join(line for _, line, _ in fleet.no_starttls.commands)
    assert_no_secret(wire)
    assert fleet.no_starttls.connections == 1
    body = events.wait_for(receipt.event_id)
    assert body["name"] == "NoStarttls.Failed"
    assert_no_secret(json.dumps(body))
    assert_quiet_afterwards(fleet.no_starttls, producer, backend, receipt.event_id)
    assert_no_secret(fleet_worker.log())


def test_C17_S2_untrusted_certificate_is_refused_before_auth(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    receipt = producer.send(case_event("Untrusted"))
    tx = receipt.wait(timeout_s=WAIT_S)

    assert tx.attempts == 1
    assert_failed_for_good(producer, backend, tx, receipt.event_id)
    assert "certificate verif" in tx.message.lower()
    assert_no_secret(tx.message)
    seen = [v for v, _ in verbs(fleet.untrusted)]
    assert seen[:2] == ["EHLO", "STARTTLS"]
    assert "AUTH" not in seen
    assert "MAIL" not in seen
    assert_no_secret("\n".join(line for _, line, _ in fleet.untrusted.commands))
    assert fleet.untrusted.received == []
    assert events.wait_for(receipt.event_id)["name"] == "Untrusted.Failed"
    assert_quiet_afterwards(fleet.untrusted, producer, backend, receipt.event_id)


def test_C17_S3_trusted_ca_starttls_then_ehlo_then_auth_then_delivery(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(case_event("Secure")).wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.attempts == 1
    mail = only_mail(fleet.secure)
    assert mail.tls is True
    assert mail.auth_user == USER
    assert verbs(fleet.secure, mail.connection_id) == [
        ("EHLO", False),
        ("STARTTLS", False),
        ("EHLO", True),
        ("AUTH", True),
        ("MAIL", True),
        ("RCPT", True),
        ("DATA", True),
    ]
    cleartext = "\n".join(line for _, line, tls in fleet.secure.commands if not tls)
    assert_no_secret(cleartext)


@pytest.mark.parametrize(
    "instance_name",
    [
        pytest.param("SelfSignedOff", id="S4_false"),
        pytest.param("SelfSignedOffString", id="S5_string"),
    ],
)
def test_C17_S4_S5_use_ssl_false_delivers_despite_self_signed_starttls(
    fleet: Servers, producer: MailProducer, instance_name: str
) -> None:
    tx = producer.send(case_event(instance_name)).wait(timeout_s=WAIT_S)

    assert tx.success is True
    assert tx.attempts == 1
    assert tx.recipients == ["alice@example.com"]
    mail = only_mail(fleet.self_signed)
    assert mail.auth_user is None
    assert mail.rcpt_tos == ["alice@example.com"]


def test_C17_S5_string_false_is_handled_like_false(fleet: Servers, producer: MailProducer) -> None:
    def session_of(instance_name: str) -> list[tuple[str, bool]]:
        fleet.self_signed.reset()
        fleet.self_signed.drop_connections()
        tx = producer.send(case_event(instance_name)).wait(timeout_s=WAIT_S)
        assert tx.success is True
        mail = only_mail(fleet.self_signed)
        return verbs(fleet.self_signed, mail.connection_id)

    assert session_of("SelfSignedOffString") == session_of("SelfSignedOff")
