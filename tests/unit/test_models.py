"""Table-driven tests of ``producer.models``: mail events, attachments and outcomes.

Contract §2 (mail events: both spellings, addresses, attachments, header safety, eventId) and
§4 (transactions and instance events as camelCase JSON, ``MailDeliveryFailed.transaction``).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from producer import (
    Attachment,
    InstanceEvent,
    InvalidEvent,
    MailDeliveryFailed,
    MailEvent,
    MailSenderError,
    Transaction,
)

HELLO_B64 = base64.b64encode(b"hello").decode("ascii")


def event(**fields: Any) -> dict[str, Any]:
    """A minimal valid event's JSON with ``fields`` on top."""
    return {"instance": "Alerts", **fields}


def invalid(data: Any) -> str:
    """The message of the ``InvalidEvent`` that parsing ``data`` raises."""
    with pytest.raises(InvalidEvent) as info:
        MailEvent.parse(data)
    return str(info.value)


# --- both spellings -----------------------------------------------------------------------


SPELLINGS = [
    # camelCase, snake_case, value, attribute, expected attribute value
    ("instance", "instance", "Alerts", "instance", "Alerts"),
    ("subject", "subject", "Hello", "subject", "Hello"),
    ("message", "message", "Body", "message", "Body"),
    ("isHtml", "is_html", True, "is_html", True),
    ("recipients", "recipients", "a@example.com", "recipients", ["a@example.com"]),
    ("cc", "cc", "c@example.com", "cc", ["c@example.com"]),
    ("bcc", "bcc", "b@example.com", "bcc", ["b@example.com"]),
    ("replyTo", "reply_to", "r@example.com", "reply_to", "r@example.com"),
    ("eventId", "event_id", "evt-1", "event_id", "evt-1"),
]


@pytest.mark.parametrize(("camel", "snake", "value", "attr", "expected"), SPELLINGS)
@pytest.mark.parametrize("spelling", ["camel", "snake"])
def test_event_accepts_both_spellings(
    spelling: str, camel: str, snake: str, value: Any, attr: str, expected: Any
) -> None:
    key = camel if spelling == "camel" else snake
    parsed = MailEvent.parse({**event(), key: value})
    assert getattr(parsed, attr) == expected
    constructed = MailEvent(**{"instance": "Alerts", key: value})
    assert getattr(constructed, attr) == expected


@pytest.mark.parametrize("key", ["contentType", "content_type"])
def test_attachment_accepts_both_spellings(key: str) -> None:
    parsed = MailEvent.parse(
        event(attachments=[{"filename": "a.txt", "content": HELLO_B64, key: "text/plain"}])
    )
    assert parsed.attachments[0].content_type == "text/plain"


def test_event_json_uses_camel_case_keys() -> None:
    parsed = MailEvent.parse(
        event(is_html=True, reply_to="r@example.com", event_id="evt-1", attachments="a.pdf")
    )
    data = parsed.to_json()
    assert set(data) == {
        "instance",
        "subject",
        "message",
        "isHtml",
        "recipients",
        "cc",
        "bcc",
        "replyTo",
        "attachments",
        "eventId",
    }
    # Only the keys that are set: a worker that does not know a newer key still takes it.
    assert data["attachments"][0] == {"path": "a.pdf"}
    assert MailEvent.parse(json.loads(json.dumps(data))) == parsed


# --- addresses ----------------------------------------------------------------------------


ADDRESS_LISTS = [
    ("a@example.com", ["a@example.com"]),
    ("a@example.com, b@example.com", ["a@example.com", "b@example.com"]),
    ("a@example.com,b@example.com", ["a@example.com", "b@example.com"]),
    ('"Doe, Jane" <jane@example.com>', ['"Doe, Jane" <jane@example.com>']),
    (
        '"Doe, Jane" <jane@example.com>, bob@example.com',
        ['"Doe, Jane" <jane@example.com>', "bob@example.com"],
    ),
    ("Oncall <oncall@example.com>", ["Oncall <oncall@example.com>"]),
    ("Jörg Müller <joerg@example.com>", ["Jörg Müller <joerg@example.com>"]),
    (
        ["a@example.com", '"Doe, Jane" <jane@example.com>'],
        ["a@example.com", '"Doe, Jane" <jane@example.com>'],
    ),
    (["a@example.com, b@example.com"], ["a@example.com", "b@example.com"]),
    ("", []),
    ("   ", []),
    (None, []),
    ([], []),
    ("a@example.com, , b@example.com,", ["a@example.com", "b@example.com"]),
    (["", "a@example.com", "  "], ["a@example.com"]),
    ("a@example.com, A@Example.COM", ["a@example.com"]),
    ("Ann <a@example.com>, a@example.com", ["Ann <a@example.com>"]),
    (["a@example.com", "b@example.com", "a@example.com"], ["a@example.com", "b@example.com"]),
]


@pytest.mark.parametrize(("value", "expected"), ADDRESS_LISTS)
@pytest.mark.parametrize("field", ["recipients", "cc", "bcc"])
def test_address_lists_are_parsed(field: str, value: Any, expected: list[str]) -> None:
    parsed = MailEvent.parse(event(**{field: value}))
    assert getattr(parsed, field) == expected


BAD_ADDRESSES = [
    # value, text the message must contain (the entry that is wrong)
    ("not-an-address", "not-an-address"),
    ("a@example.com, nobody", "nobody"),
    (["a@example.com", "broken@"], "broken@"),
    ("@example.com", "@example.com"),
    ("Jane <>", "Jane"),
    (5, "string"),
    ([5], "string"),
    ({"a": "b@example.com"}, "string"),
]


@pytest.mark.parametrize(("value", "entry"), BAD_ADDRESSES)
@pytest.mark.parametrize("field", ["recipients", "cc", "bcc"])
def test_invalid_address_names_field_and_entry(field: str, value: Any, entry: str) -> None:
    message = invalid(event(**{field: value}))
    assert f"{field}:" in message
    assert entry in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("r@example.com", "r@example.com"),
        ("Replies <r@example.com>", "Replies <r@example.com>"),
        ('"Doe, Jane" <jane@example.com>', '"Doe, Jane" <jane@example.com>'),
        ("", None),
        (None, None),
    ],
)
def test_reply_to(value: str | None, expected: str | None) -> None:
    assert MailEvent.parse(event(replyTo=value)).reply_to == expected


def test_reply_to_invalid_names_field() -> None:
    message = invalid(event(replyTo="not-an-address"))
    assert "replyTo:" in message
    assert "not-an-address" in message


# --- header injection ---------------------------------------------------------------------


def _q(text: str) -> str:
    """``text`` as an RFC 2047 B-encoded word."""
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode("ascii") + "?="


INJECTIONS = [
    # event fields, the field the message must name
    ({"subject": "Hi\r\nBcc: x@evil.example"}, "subject"),
    ({"subject": "Hi\nBcc: x@evil.example"}, "subject"),
    ({"subject": "Hi\rthere"}, "subject"),
    ({"subject": "=?UTF-8?Q?Hi=0ABcc:_x@evil.example?="}, "subject"),
    ({"subject": "=?utf-8?q?Hi=0D=0ABcc:_x@evil.example?="}, "subject"),
    ({"subject": "Report " + _q("a\r\nBcc: x@evil.example")}, "subject"),
    ({"replyTo": "r@example.com\r\nBcc: x@evil.example"}, "replyTo"),
    ({"reply_to": "r@example.com\nBcc: x@evil.example"}, "reply"),
    ({"replyTo": "=?UTF-8?Q?a=0Ab?= <r@example.com>"}, "replyTo"),
    ({"recipients": "a@example.com\r\nBcc: x@evil.example"}, "recipients"),
    ({"recipients": ["a@example.com", "b@example.com\nBcc: x@evil.example"]}, "recipients"),
    ({"recipients": '"=?UTF-8?Q?a=0D=0Ab?=" <a@example.com>'}, "recipients"),
    ({"recipients": _q("Eve\nBcc: x@evil.example") + " <a@example.com>"}, "recipients"),
    ({"cc": "c@example.com\nBcc: x@evil.example"}, "cc"),
    ({"bcc": "b@example.com\rX: y"}, "bcc"),
    (
        {"attachments": [{"filename": "a\r\nX: y.txt", "content": HELLO_B64}]},
        "attachments.0.filename",
    ),
    (
        {"attachments": [{"filename": "=?UTF-8?Q?a=0Ab?=.txt", "content": HELLO_B64}]},
        "attachments.0.filename",
    ),
    (
        {"attachments": [{"path": "a.txt", "filename": "b\n.txt"}]},
        "attachments.0.filename",
    ),
]


@pytest.mark.parametrize(("fields", "field"), INJECTIONS)
def test_line_breaks_in_header_fields_are_rejected(fields: dict[str, Any], field: str) -> None:
    message = invalid(event(**fields))
    assert f"{field}" in message
    assert "line break" in message


def test_line_break_in_instance_is_rejected() -> None:
    assert "instance:" in invalid({"instance": "Alerts\r\nX: y"})


# --- attachments --------------------------------------------------------------------------


VALID_ATTACHMENTS = [
    # attachments value, expected (filename, path, decoded content or None) per attachment
    ([{"filename": "a.txt", "content": HELLO_B64}], [("a.txt", None, b"hello")]),
    ([{"filename": "empty.txt", "content": ""}], [("empty.txt", None, b"")]),
    (
        [
            {
                "filename": "Übersicht März.pdf",
                "content": HELLO_B64,
                "contentType": "application/pdf",
            }
        ],
        [("Übersicht März.pdf", None, b"hello")],
    ),
    ([{"path": "reports/a.pdf"}], [(None, "reports/a.pdf", None)]),
    ([{"path": "a.pdf", "filename": "renamed.pdf"}], [("renamed.pdf", "a.pdf", None)]),
    ("a.pdf", [(None, "a.pdf", None)]),
    ("a.pdf;sub/b.txt", [(None, "a.pdf", None), (None, "sub/b.txt", None)]),
    (" a.pdf ; ; sub/b.txt ;", [(None, "a.pdf", None), (None, "sub/b.txt", None)]),
    ("", []),
    (None, []),
    ([], []),
]


@pytest.mark.parametrize(("value", "expected"), VALID_ATTACHMENTS)
def test_valid_attachments(
    value: Any, expected: list[tuple[str | None, str | None, bytes | None]]
) -> None:
    attachments = MailEvent.parse(event(attachments=value)).attachments
    got = [
        (a.filename, a.path, a.decoded() if a.content is not None else None) for a in attachments
    ]
    assert got == expected


INVALID_ATTACHMENTS = [
    # attachments value, texts the message must contain
    ([{"filename": "a.txt"}], ["attachments.0", "filename", "content"]),
    ([{"content": HELLO_B64}], ["attachments.0", "filename", "content"]),
    ([{}], ["attachments.0"]),
    ([{"filename": "a.txt", "content": "not base64!"}], ["attachments.0.content", "base64"]),
    ([{"filename": "a.txt", "content": "aGVsbG8"}], ["attachments.0.content", "base64"]),
    ([{"filename": "a.txt", "content": HELLO_B64, "path": "a.txt"}], ["attachments.0", "not both"]),
    ([{"filename": "dir/a.txt", "content": HELLO_B64}], ["attachments.0.filename", "directory"]),
    ([{"filename": "..\\a.txt", "content": HELLO_B64}], ["attachments.0.filename", "directory"]),
    ([{"filename": "", "content": HELLO_B64}], ["attachments.0.filename", "empty"]),
    (
        [{"filename": "a.txt", "content": HELLO_B64, "contentType": "text"}],
        ["attachments.0.contentType", "MIME type"],
    ),
    ([{"path": ""}], ["attachments.0.path"]),
    (
        [{"filename": "a.txt", "content": HELLO_B64, "size": 3}],
        ["attachments.0.size", "not a known"],
    ),
    (
        [{"filename": "a.txt", "content": HELLO_B64}, {"filename": "b.txt"}],
        ["attachments.1", "content"],
    ),
    ([42], ["attachments.0"]),
    (42, ["attachments"]),
]


@pytest.mark.parametrize(("value", "fragments"), INVALID_ATTACHMENTS)
def test_invalid_attachments_name_the_attachment(value: Any, fragments: list[str]) -> None:
    message = invalid(event(attachments=value))
    for fragment in fragments:
        assert fragment in message


def test_attachment_inline_round_trip() -> None:
    data = bytes(range(256))
    attachment = Attachment.inline("blob.bin", data, "application/octet-stream")
    assert attachment.decoded() == data
    again = Attachment.model_validate(json.loads(json.dumps(attachment.to_json())))
    assert again.decoded() == data


# --- eventId ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_id",
    [
        "evt-1",
        "a",
        "a" * 200,
        "order:42@shop.example",
        "550e8400-e29b-41d4-a716-446655440000",
        "A_b.c-D",
    ],
)
def test_valid_event_ids(event_id: str) -> None:
    assert MailEvent.parse(event(eventId=event_id)).event_id == event_id


@pytest.mark.parametrize(
    "event_id", ["", "has space", "a" * 201, "a/b", "grüezi", "a\nb", "a;b", "<a>"]
)
def test_invalid_event_ids(event_id: str) -> None:
    assert "eventId:" in invalid(event(eventId=event_id))


def test_event_id_is_generated_when_absent() -> None:
    first = MailEvent.parse(event())
    second = MailEvent.parse(event())
    assert first.event_id != second.event_id
    uuid.UUID(first.event_id)  # a UUID: unique, and valid as a Celery task id


# --- InvalidEvent -------------------------------------------------------------------------


INVALID_EVENTS = [
    # data, texts the message must contain
    ({}, ["instance: is required"]),
    ({"instance": "bad name"}, ["instance:"]),
    ({"instance": ""}, ["instance:"]),
    (event(unknown=1), ["unknown: is not a known field"]),
    (event(isHtml="maybe"), ["isHtml:"]),
    (event(subject=5), ["subject:"]),
    (event(subject="x\n", eventId="a b"), ["subject:", "eventId:"]),
    ([1, 2], ["expected a JSON object", "list"]),
    ("Alerts", ["expected a JSON object", "str"]),
    # What str.splitlines (and so the email package) takes for a line break.
    (event(subject="a\u2028Bcc: eve@example.net"), ["subject:", "line separator"]),
    (event(subject="a\x85b"), ["subject:", "line separator"]),
    (event(cc="Eve\u2029 <eve@example.net>"), ["cc:", "line separator"]),
    # Lone surrogates: undecodable bytes (a non-UTF-8 command-line argument), not text.
    (event(subject="a\ud800b"), ["subject:", "not valid Unicode"]),
    (event(message="body \udcff"), ["message:", "not valid Unicode"]),
]


@pytest.mark.parametrize(("data", "fragments"), INVALID_EVENTS)
def test_invalid_event_message_names_the_field(data: Any, fragments: list[str]) -> None:
    message = invalid(data)
    assert message.startswith("invalid mail event: ")
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message  # one sentence
    assert "pydantic" not in message  # no library internals or links


def test_invalid_event_is_a_value_error_and_a_mailsender_error() -> None:
    with pytest.raises(InvalidEvent) as info:
        MailEvent.parse({})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MailSenderError)


# --- outcomes -----------------------------------------------------------------------------


def transaction(**fields: Any) -> Transaction:
    """A failed transaction with every field filled, ``fields`` on top."""
    values: dict[str, Any] = {
        "event_id": "evt-1",
        "instance": "Alerts",
        "interface": "Monitoring",
        "endpoint": "ops-mail",
        "success": False,
        "count": 0,
        "message": "550 5.1.1 mailbox unknown",
        "timestamp": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC),
        "message_id": "<evt-1@example.com>",
        "recipients": ["a@example.com"],
        "refused": {"b@example.com": "550 5.1.1 mailbox unknown"},
        "attempts": 3,
        **fields,
    }
    return Transaction(**values)


TRANSACTION_KEYS = {
    "eventId",
    "instance",
    "interface",
    "endpoint",
    "success",
    "count",
    "message",
    "timestamp",
    "messageId",
    "recipients",
    "refused",
    "attempts",
}


def test_transaction_json_round_trip() -> None:
    tx = transaction()
    data = json.loads(json.dumps(tx.to_json()))
    assert set(data) == TRANSACTION_KEYS
    assert data["eventId"] == "evt-1"
    assert data["messageId"] == "<evt-1@example.com>"
    assert data["refused"] == {"b@example.com": "550 5.1.1 mailbox unknown"}
    assert Transaction.model_validate(data) == tx


def test_transaction_timestamp_is_iso_8601_utc() -> None:
    stamp = transaction().to_json()["timestamp"]
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == UTC.utcoffset(None)
    assert parsed == datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


def test_transaction_default_timestamp_is_now_in_utc() -> None:
    before = datetime.now(UTC)
    tx = Transaction(
        event_id="e", instance="A", interface="A", success=True, count=1, message="sent"
    )
    after = datetime.now(UTC)
    assert before <= tx.timestamp <= after


@pytest.mark.parametrize("spelling", ["camel", "snake"])
def test_transaction_accepts_both_spellings_and_ignores_unknown_keys(spelling: str) -> None:
    data = transaction().model_dump(mode="json", by_alias=spelling == "camel")
    data["addedInALaterVersion"] = True
    assert Transaction.model_validate(data) == transaction()


def test_instance_event_json_round_trip() -> None:
    tx = transaction(success=True, count=1, refused={})
    instance_event = InstanceEvent(
        name="Alerts.Done", instance="Alerts", event_id="evt-1", transaction=tx
    )
    data = json.loads(json.dumps(instance_event.to_json()))
    assert set(data) == {"name", "instance", "eventId", "transaction"}
    assert set(data["transaction"]) == TRANSACTION_KEYS
    assert data["name"] == "Alerts.Done"
    assert InstanceEvent.model_validate(data) == instance_event


def test_mail_delivery_failed_carries_the_transaction() -> None:
    tx = transaction()
    exc = MailDeliveryFailed("550 5.1.1 mailbox unknown", tx.to_json())
    assert exc.transaction == tx
    assert str(exc) == "550 5.1.1 mailbox unknown"
    # What Celery's JSON result backend stores and rebuilds: the args, as JSON.
    rebuilt = MailDeliveryFailed(*json.loads(json.dumps(exc.args)))
    assert rebuilt.transaction == tx
    assert str(rebuilt) == str(exc)
    assert type(exc).__module__ == "producer"
