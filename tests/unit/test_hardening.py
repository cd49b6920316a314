"""Hostile configurations and inputs a new user found: each is one clear error, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import InvalidEvent, MailEvent, MailProducer, ProducerConfigError
from worker.config import load_config, parse_config
from worker.errors import ConfigError

GOOD = {"mailServer": "h", "sender": "a@example.com"}


def problems(raw: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value.problems


def test_empty_broker_variable_counts_as_unset() -> None:
    config = parse_config(
        {"broker_url": "redis://127.0.0.1:6379/9", "instances": {"A": GOOD}},
        {"MAILSENDER_BROKER_URL": "", "MAILSENDER_RESULT_BACKEND": "  "},
    )
    assert config.broker_url == "redis://127.0.0.1:6379/9"
    assert config.backend_url == "redis://127.0.0.1:6379/9"


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("broker_url", "http://127.0.0.1:6379/9"),
        ("broker_url", "127.0.0.1:6379"),
        ("result_backend", "not a url"),
        ("result_backend", "amqp://guest@localhost//"),
    ],
)
def test_urls_of_unknown_kinds_are_configuration_errors(key: str, url: str) -> None:
    [problem] = problems({key: url, "instances": {"A": GOOD}})
    assert problem.startswith(f"{key}: ")
    assert "not a URL of a supported kind" in problem


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"timeoutS": 1e308}, "timeoutS"),
        ({"retryDelayS": 1e308}, "retryDelayS"),
        ({"retryDelayMaxS": 1e308}, "retryDelayMaxS"),
        ({"maxMessageBytes": 10**12}, "maxMessageBytes"),
    ],
)
def test_huge_numbers_are_refused(params: dict[str, float], key: str) -> None:
    [problem] = problems({"instances": {"A": {**GOOD, **params}}})
    assert problem.startswith(f"instance 'A': {key}: ")


@pytest.mark.parametrize("key", ["visibility_timeout_s", "dead_letter_max", "idempotency_ttl_s"])
def test_huge_top_level_numbers_are_refused(key: str) -> None:
    [problem] = problems({key: 1e29, "instances": {"A": GOOD}})
    assert problem.startswith(f"{key}: ")


@pytest.mark.parametrize("name", [None, True, 123])
def test_instance_names_must_be_text(name: object) -> None:
    [problem] = problems({"instances": {name: GOOD}})
    assert "the name must be text" in problem


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nc: [*b, *b]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "aliases like *name are not allowed" in str(info.value)


def test_a_config_that_is_not_utf8_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)) * 10)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [f"configuration file {str(path)!r} is not UTF-8 text"]


def test_a_directory_as_config_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert len(info.value.problems) == 1
    assert "cannot be read" in info.value.problems[0]


@pytest.mark.parametrize("text", ["a\x00b", "a\x1bb", "a\x7fb"])
def test_control_characters_are_refused_in_headers(text: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        MailEvent.parse({"instance": "A", "subject": text})
    assert "subject: contains a control character" in str(info.value)


def test_producer_refuses_urls_of_unknown_kinds() -> None:
    with pytest.raises(ProducerConfigError, match="broker URL 'http://x'"):
        MailProducer("http://x")
    with pytest.raises(ProducerConfigError, match="result backend URL"):
        MailProducer("redis://127.0.0.1:6379/0", "not a url")


def test_send_many_names_the_position_of_the_bad_event() -> None:
    producer = MailProducer("redis://127.0.0.1:1/0")  # never reached: validation comes first
    with pytest.raises(InvalidEvent) as info:
        producer.send_many(
            [{"instance": "A"}, {"instance": "A", "subject": "x\ny"}, {"instance": "bad name"}]
        )
    message = str(info.value)
    assert message.startswith("event 2 of 3: invalid mail event: subject:")  # counted from 1
    assert "; event 3 of 3: invalid mail event: instance:" in message  # every bad one named


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        (
            [
                [],
                {"event": {"instance": "A", "eventId": "e1", "subject": "s", "message": "BODY"}},
                {},
            ],
            "{'event': {'instance': 'A', 'eventId': 'e1', 'subject': 's', 'redacted': True}}",
        ),
        (
            [
                [{"instance": "A", "event_id": "e2", "message": "BODY", "attachments": ["x"]}],
                {},
                {},
            ],
            "{'event': {'instance': 'A', 'eventId': 'e2', 'redacted': True}}",
        ),
        (
            [
                [],
                {
                    "events": [
                        {"instance": "A", "eventId": f"e{i}", "message": "BODY"} for i in range(5)
                    ]
                },
                {},
            ],
            "{'events': [{'instance': 'A', 'eventId': 'e0', 'redacted': True}, "
            "{'instance': 'A', 'eventId': 'e1', 'redacted': True}, "
            "{'instance': 'A', 'eventId': 'e2', 'redacted': True}, ... 2 more]}",
        ),
        ([[], {"event": "BODY as a string"}, {}], "{'event': <str>}"),
        (
            [[], {"event": {"instance": 7, "subject": "x" * 200}}, {}],
            "{'event': {'subject': '" + "x" * 80 + "', 'redacted': True}}",
        ),
        ("not a payload", "{'redacted': True}"),
        (None, "{'redacted': True}"),
    ],
)
def test_task_arguments_are_shown_redacted(payload: object, shown: str) -> None:
    """What Flower and Celery's logs show for any task message: never the body."""
    from worker.app import shown_arguments

    assert shown_arguments(payload) == ("()", shown)


def test_an_outcome_is_stored_under_the_task_id_whatever_its_form() -> None:
    """A client waits on the task id it sent: an event id the event itself cannot use (not
    of the pattern) still stores the outcome there; without any id, one derived from the
    event, the same on every redelivery."""
    from worker.service import _event_id_of

    assert _event_id_of({"eventId": "ok-1"}, "task") == "ok-1"
    assert _event_id_of({"eventId": "invoice/2024/17"}, "invoice/2024/17") == "invoice/2024/17"
    raw = {"instance": "A", "subject": "s"}
    derived = _event_id_of(raw, None)
    assert derived.startswith("event-") and derived == _event_id_of(dict(raw), "")
    assert _event_id_of(raw, "bad\nid") == derived  # never a line break into a log line
    assert _event_id_of({"instance": "B"}, None) != derived
