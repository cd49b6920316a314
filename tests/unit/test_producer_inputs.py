"""What a tester found in the producer: each input mistake is one clear sentence naming the
field (in the seed's camelCase) or the argument, and valid inputs are not refused.

No broker or Redis is reached: every error here comes before anything is enqueued.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from producer import (
    Attachment,
    InvalidEvent,
    MailEvent,
    MailProducer,
    MailSenderError,
    ProducerConfigError,
    names,
)

UNREACHABLE = "redis://127.0.0.1:1/0"
"""A broker and result backend nobody listens on: reaching it would fail the test."""

DATA = bytes(range(256)) * 3
"""Long enough that line-wrapped base64 has several lines."""


def event(**fields: Any) -> dict[str, Any]:
    """A minimal valid event's JSON with ``fields`` on top."""
    return {"instance": "Alerts", **fields}


def invalid(data: Any) -> str:
    """The message of the ``InvalidEvent`` that ``MailEvent.parse(data)`` raises."""
    with pytest.raises(InvalidEvent) as info:
        MailEvent.parse(data)
    message = str(info.value)
    assert "\n" not in message  # one sentence
    assert "pydantic" not in message
    return message


def config_error(**arguments: Any) -> str:
    """The message of the ``ProducerConfigError`` that ``MailProducer(**arguments)`` raises."""
    with pytest.raises(ProducerConfigError) as info:
        MailProducer(**arguments)
    return str(info.value)


# --- 1. an empty broker_url or result_backend is a mistake, not "the default" --------------


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_blank_broker_url_is_refused_naming_the_argument(
    blank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(names.ENV_BROKER_URL, UNREACHABLE)  # must not be used instead
    message = config_error(broker_url=blank)
    assert message.startswith("broker_url is empty")
    assert "None for the default" in message


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_blank_result_backend_is_refused_naming_the_argument(
    blank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(names.ENV_RESULT_BACKEND, UNREACHABLE)
    message = config_error(broker_url=UNREACHABLE, result_backend=blank)
    assert message.startswith("result_backend is empty")
    assert "None for the default" in message


def test_a_url_that_is_not_a_string_is_refused_naming_the_argument() -> None:
    number: Any = 6379
    assert config_error(broker_url=number).startswith("broker_url must be a URL string")
    message = config_error(broker_url=UNREACHABLE, result_backend=number)
    assert message.startswith("result_backend must be a URL string")


def test_none_still_means_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(names.ENV_BROKER_URL, raising=False)
    monkeypatch.delenv(names.ENV_RESULT_BACKEND, raising=False)
    with MailProducer(None, None) as producer:
        assert producer.broker_url == names.DEFAULT_BROKER_URL
        assert producer.result_backend == names.DEFAULT_BROKER_URL
    monkeypatch.setenv(names.ENV_BROKER_URL, "redis://broker.example:6379/0")
    monkeypatch.setenv(names.ENV_RESULT_BACKEND, "redis://backend.example:6379/1")
    with MailProducer() as producer:
        assert producer.broker_url == "redis://broker.example:6379/0"
        assert producer.result_backend == "redis://backend.example:6379/1"


def test_a_blank_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the worker's configuration takes it.
    monkeypatch.setenv(names.ENV_BROKER_URL, "  ")
    monkeypatch.setenv(names.ENV_RESULT_BACKEND, "")
    with MailProducer() as producer:
        assert producer.broker_url == names.DEFAULT_BROKER_URL
        assert producer.result_backend == names.DEFAULT_BROKER_URL


def test_producer_config_error_is_a_value_error_and_a_mailsender_error() -> None:
    with pytest.raises(ProducerConfigError) as info:
        MailProducer("")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MailSenderError)


# --- 2. base64 content as MIME and the base64 tool write it: wrapped lines -----------------


WRAPPED = [
    base64.encodebytes(DATA).decode("ascii"),  # 76 characters a line, "\n" after each
    base64.encodebytes(DATA).decode("ascii").replace("\n", "\r\n"),  # MIME's CRLF
    base64.encodebytes(DATA).decode("ascii").replace("\n", " \t\n"),
    "  " + base64.b64encode(DATA).decode("ascii") + "\n",  # `base64 -w0 file; echo`
]


@pytest.mark.parametrize("content", WRAPPED)
def test_line_wrapped_base64_is_accepted(content: str) -> None:
    parsed = MailEvent.parse(event(attachments=[{"filename": "a.bin", "content": content}]))
    attachment = parsed.attachments[0]
    assert attachment.decoded() == DATA
    # It travels without the line breaks, so every consumer can decode it strictly.
    assert parsed.to_json()["attachments"][0]["content"] == base64.b64encode(DATA).decode()


def test_line_wrapped_base64_is_accepted_by_the_attachment_constructor() -> None:
    content = base64.encodebytes(DATA).decode("ascii")
    assert Attachment(filename="a.bin", content=content).decoded() == DATA


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode("ascii"),  # "-__-"
            ["is not valid base64", "'-'", "URL-safe", "standard base64 with padding"],
        ),
        (
            base64.b64encode(b"hello").decode("ascii").rstrip("="),  # unpadded
            ["is not valid base64", "multiple of 4", "standard base64 with padding"],
        ),
        ("aGVs!bG8=", ["is not valid base64", "'!'", "standard base64 with padding"]),
        ("aG=sbG8=", ["is not valid base64", "padding", "standard base64 with padding"]),
    ],
)
def test_base64_that_is_refused_says_what_is_expected(content: str, fragments: list[str]) -> None:
    message = invalid(event(attachments=[{"filename": "a.bin", "content": content}]))
    assert message.startswith("invalid mail event: attachments.0.content: is not valid base64")
    for fragment in fragments:
        assert fragment in message


# --- 3. both spellings of one field -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "camel", "snake"),
    [
        ({"isHtml": True, "is_html": False}, "isHtml", "is_html"),
        ({"is_html": False, "isHtml": True}, "isHtml", "is_html"),
        ({"eventId": "e-1", "event_id": "e-2"}, "eventId", "event_id"),
        ({"replyTo": "a@example.com", "reply_to": "b@example.com"}, "replyTo", "reply_to"),
    ],
)
def test_a_field_given_in_both_spellings_is_named_once_with_both(
    fields: dict[str, Any], camel: str, snake: str
) -> None:
    expected = f"{camel}: is given twice, as {camel!r} and {snake!r}"
    message = invalid(event(**fields))
    assert expected in message
    assert "is not a known field" not in message


def test_an_attachment_field_given_in_both_spellings() -> None:
    both = {"path": "a.pdf", "contentType": "application/pdf", "content_type": "text/plain"}
    message = invalid(event(attachments=[both]))
    assert (
        "attachments.0.contentType: is given twice, as 'contentType' and 'content_type'" in message
    )


def test_an_unknown_field_is_still_named_as_given() -> None:
    assert "is_htm: is not a known field" in invalid(event(is_htm=True))
    assert "attachments.0.isHtml: is not a known field" in invalid(
        event(attachments=[{"path": "a.pdf", "isHtml": True}])
    )


# --- 4. a NUL character in a path ---------------------------------------------------------


@pytest.mark.parametrize(
    ("attachments", "where"),
    [
        ([{"path": "reports/a\x00.pdf"}], "attachments.0.path"),
        ("a.pdf;b\x00.pdf", "attachments.1.path"),  # the seed's ';'-separated form
    ],
)
def test_a_nul_character_in_a_path_is_named(attachments: Any, where: str) -> None:
    message = invalid(event(attachments=attachments))
    assert f"{where}: contains a NUL character" in message
    assert "non-empty" not in message


def test_an_empty_path_is_still_called_empty() -> None:
    assert "attachments.0.path: must be a non-empty file path" in invalid(
        event(attachments=[{"path": " "}])
    )


# --- 5. batch_size ------------------------------------------------------------------------


BAD_BATCH_SIZES: list[Any] = [0, -5, "x", True, 2.5, "10"]


@pytest.mark.parametrize("batch_size", BAD_BATCH_SIZES)
def test_send_many_refuses_a_bad_batch_size_before_enqueueing(batch_size: Any) -> None:
    with (
        MailProducer(UNREACHABLE, UNREACHABLE) as producer,
        pytest.raises(ProducerConfigError) as info,
    ):
        producer.send_many([event(), event()], batch_size=batch_size)
    message = str(info.value)
    assert message.startswith("batch_size must be a positive integer")
    assert repr(batch_size) in message or str(batch_size) in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("batch_size", BAD_BATCH_SIZES)
def test_the_producer_refuses_a_bad_batch_size(batch_size: Any) -> None:
    message = config_error(broker_url=UNREACHABLE, batch_size=batch_size)
    assert message.startswith("batch_size must be a positive integer")


def test_a_good_batch_size_is_kept() -> None:
    with MailProducer(UNREACHABLE, batch_size=7) as producer:
        assert producer.batch_size == 7


# --- 6. fields are named in camelCase, whichever spelling the input used ------------------


CAMEL_NAMES = [
    # input (snake_case spelling), the field as the message must name it
    (event(event_id="a b"), "eventId:"),
    (event(is_html="maybe"), "isHtml:"),
    (event(reply_to="not an address@"), "replyTo:"),
    (
        event(attachments=[{"filename": "a", "content": "aGk=", "content_type": "bad"}]),
        "attachments.0.contentType:",
    ),
]


@pytest.mark.parametrize(("data", "named"), CAMEL_NAMES)
def test_fields_are_named_in_camel_case(data: dict[str, Any], named: str) -> None:
    message = invalid(data)
    assert named in message
    snake = named.replace("eventId", "event_id").replace("isHtml", "is_html")
    snake = snake.replace("replyTo", "reply_to").replace("contentType", "content_type")
    assert snake not in message


def test_the_command_line_path_names_event_id_in_camel_case() -> None:
    # `mailsender send --event-id "a b"` builds its fields with snake_case keys.
    fields = {"instance": "Alerts", "subject": "s", "message": "m", "event_id": "a b"}
    message = invalid(fields)
    assert message.startswith("invalid mail event: eventId: must be 1 to 200 characters")
    with (
        MailProducer(UNREACHABLE, UNREACHABLE) as producer,
        pytest.raises(InvalidEvent, match=r"^invalid mail event: eventId: "),
    ):
        producer.send(fields)


def test_parse_names_fields_in_camel_case_whatever_the_spelling() -> None:
    message = invalid(event(event_id="a b", attachments=[{"path": "a", "content_type": "bad"}]))
    assert message == (
        "invalid mail event: attachments.0.contentType: 'bad' is not a MIME type like "
        "'application/pdf'; eventId: must be 1 to 200 characters of letters, digits and "
        "'_.:@-' (no spaces)"
    )


def test_model_validate_is_left_to_pydantic_and_parse_wraps_once() -> None:
    with pytest.raises(ValidationError):
        MailEvent.model_validate(event(eventId="a b"))
    message = invalid(event(attachments=[{"filename": "a.txt"}]))
    assert message == (
        "invalid mail event: attachments.0: an inline attachment needs 'filename' and "
        "'content' (base64)"
    )
