"""What a tester found in the ``mailsender`` command and the configuration it reads.

Configuration cases are table-driven on ``parse_config`` (pure); command cases run the command
as a user does, in a subprocess, with nothing listening where the broker would be (each of
them fails before it needs one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer import names
from producer.models import InstanceEvent, Transaction
from tests.support.fleet import free_port
from worker import cli
from worker.config import load_config, parse_config
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GOOD: dict[str, Any] = {"mailServer": "smtp.example.com", "sender": "alerts@example.com"}
MARKUP = "[red]x[/red] and [/x] and [/bold] and :thumbs_up:"
"""Text that rich would read as markup (or emoji) if it were not printed literally."""


def problems(raw: Any, env: dict[str, str] | None = None, *, lenient: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {}, lenient=lenient)
    return info.value.problems


def one_problem(params: dict[str, Any]) -> str:
    [problem] = problems({"instances": {"A": {**GOOD, **params}}})
    return problem


# --- 9. numbers are not booleans ----------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["port", "maxRetries", "retryDelayS", "retryDelayMaxS", "timeoutS", "maxConnections"]
)
@pytest.mark.parametrize("value", [True, False])
def test_a_yaml_bool_is_not_a_number(key: str, value: bool) -> None:
    problem = one_problem({key: value})
    assert problem == f"instance 'A': {key}: must be a number, not {str(value).lower()}"


@pytest.mark.parametrize(
    "key", ["visibility_timeout_s", "dead_letter_max", "transactions_max", "send_lock_lease_s"]
)
def test_a_yaml_bool_is_not_a_top_level_number(key: str) -> None:
    [problem] = problems({key: True, "instances": {"A": GOOD}})
    assert problem == f"{key}: must be a number, not true"


def test_numbers_written_as_text_still_count() -> None:
    config = parse_config({"instances": {"A": {**GOOD, "port": "${PORT}"}}}, {"PORT": "587"})
    assert config.instances["A"].port == 587


# --- 9. retry delays ----------------------------------------------------------------------


def test_a_first_delay_longer_than_the_cap_names_both_keys() -> None:
    problem = one_problem({"retryDelayS": 100, "retryDelayMaxS": 1})
    assert problem.startswith("instance 'A': retryDelayS (100) is larger than retryDelayMaxS (1)")


def test_a_first_delay_longer_than_the_default_cap_says_so() -> None:
    problem = one_problem({"retryDelayS": 1000})
    assert "retryDelayS (1000) is larger than retryDelayMaxS (600, the default)" in problem


def test_equal_delays_are_fine() -> None:
    config = parse_config({"instances": {"A": {**GOOD, "retryDelayS": 4, "retryDelayMaxS": 4}}}, {})
    assert config.instances["A"].retry_delay_s == config.instances["A"].retry_delay_max_s == 4


# --- 9. readable sentences ----------------------------------------------------------------


@pytest.mark.parametrize("value", [5, [1, "a@example.com"], {"a": "b"}, True, None])
def test_recipients_of_the_wrong_type_are_one_readable_sentence(value: Any) -> None:
    problem = one_problem({"recipients": value})
    assert problem == "instance 'A': recipients: must be a string or a list of strings"


@pytest.mark.parametrize("reference", ["${}", "${ }"])
def test_an_empty_variable_reference_is_called_so(reference: str) -> None:
    problem = one_problem({"password": reference})
    assert problem.startswith(f"instance 'A': password: {reference} is an empty variable reference")
    assert "not set" not in problem


@pytest.mark.parametrize(
    ("recipients", "bad"),
    [
        ("a@example.com, ;b@example.com", "';b@example.com'"),
        ("a@example.com, nobody, c@example.com", "'nobody'"),
        ('"Doe, Jane" <jane@example.com>, bad@', "'bad@'"),
    ],
)
def test_the_bad_part_of_a_recipient_list_is_named(recipients: str, bad: str) -> None:
    problem = one_problem({"recipients": recipients})
    assert problem.startswith(f"instance 'A': recipients: {bad} is not a valid")
    assert recipients not in problem


def test_a_semicolon_between_recipients_gets_a_hint() -> None:
    problem = one_problem({"recipients": "a@example.com, ;b@example.com"})
    assert problem.endswith("separate addresses with ',', not ';'")


def test_a_valid_list_with_a_quoted_comma_is_fine() -> None:
    recipients = '"Doe, Jane" <jane@example.com>, ops@example.com'
    config = parse_config({"instances": {"A": {**GOOD, "recipients": recipients}}}, {})
    assert config.instances["A"].recipients == recipients


# --- 8. queue names that belong to someone else -------------------------------------------


@pytest.mark.parametrize(
    ("queue", "why"),
    [
        (names.EVENTS_QUEUE, "events queue"),
        ("unacked", "kombu"),
        ("unacked_index", "kombu"),
        ("unacked_mutex", "kombu"),
        ("_kombu.binding.mailsender", "kombu"),
        ("mailsender:transactions", "MailSender's own Redis keys"),
        ("mailsender:deadletters", "MailSender's own Redis keys"),
        ("celery-task-meta-x", "Celery's result keys"),
        ("celeryev", "Celery's monitoring"),
        ("w1.celery.pidbox", "remote-control"),
    ],
)
def test_a_queue_that_clashes_is_refused(queue: str, why: str) -> None:
    problem = one_problem({"queue": queue})
    assert problem.startswith(f"instance 'A': queue: {queue!r} cannot be used: ")
    assert why in problem


@pytest.mark.parametrize("queue", [names.DEFAULT_QUEUE, "mailsender.slow", "bulk", "unacked2"])
def test_other_queues_are_fine(queue: str) -> None:
    config = parse_config({"instances": {"A": {**GOOD, "queue": queue}}}, {})
    assert config.queue_of("A") == queue


# --- 4. clients do not need the worker's secrets ------------------------------------------

SECRETS: dict[str, Any] = {
    "broker_url": "redis://127.0.0.1:6390/3",
    "instances": {
        "Plain": GOOD,
        "Auth": {**GOOD, "userName": "u", "password": "${NU_PW}"},
        "Hidden": {"mailServer": "${NU_HOST}", "sender": "a@example.com"},
    },
}


def test_lenient_parsing_tolerates_unset_instance_variables() -> None:
    config = parse_config(SECRETS, {}, lenient=True)
    assert config.broker_url == "redis://127.0.0.1:6390/3"
    assert sorted(config.instances) == ["Auth", "Plain"]  # Hidden cannot be built without it
    assert config.instances["Auth"].password.get_secret_value() == ""


def test_strict_parsing_reports_each_unset_variable_once() -> None:
    found = problems(SECRETS)
    assert found == [
        "instance 'Auth': password: environment variable ${NU_PW} is not set",
        "instance 'Hidden': mailServer: environment variable ${NU_HOST} is not set",
    ]


def test_lenient_parsing_still_reports_other_problems() -> None:
    raw = {
        "result_backend": "${NU_BACKEND}",
        "instances": {
            "Auth": {**GOOD, "password": "${NU_PW}", "port": "abc", "colour": "red"},
            "Empty": {**GOOD, "password": "${}"},
        },
    }
    found = problems(raw, lenient=True)
    assert "result_backend: environment variable ${NU_BACKEND} is not set" in found
    assert any(p.startswith("instance 'Auth': port: ") for p in found)
    assert "instance 'Auth': colour: is not a known key" in found
    assert any("'Empty'" in p and "empty variable reference" in p for p in found)
    assert not any("NU_PW" in p for p in found)


def test_lenient_parsing_ignores_paths_only_workers_read() -> None:
    raw = {
        "attachment_root": "/no/such/root",
        "instances": {"A": {**GOOD, "caFile": "/no/such/ca.pem"}},
    }
    env = {"MAILSENDER_ATTACHMENT_ROOT": "/no/such/root/either"}
    config = parse_config(raw, env, lenient=True)
    assert config.attachment_root is None
    assert config.instances["A"].ca_file is None
    found = problems(raw, env)
    assert any(p.startswith("attachment_root: ") for p in found)
    assert any(p.startswith("instance 'A': caFile: ") for p in found)


def test_load_config_lenient(tmp_path: Path) -> None:
    path = tmp_path / "mailsender.yaml"
    path.write_text(yaml.safe_dump(SECRETS))
    assert sorted(load_config(path, {}, lenient=True).instances) == ["Auth", "Plain"]
    with pytest.raises(ConfigError, match=r"\$\{NU_PW\} is not set"):
        load_config(path, {})


# --- 1. data is printed literally ---------------------------------------------------------


def transaction(success: bool, message: str) -> Transaction:
    return Transaction(
        event_id="ev-1",
        instance="Plain",
        interface="Plain",
        endpoint="[/x]",
        success=success,
        count=int(success),
        message=message,
        timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's console as wide as the tests' COLUMNS, so that no cell is folded."""
    monkeypatch.setattr(cli.out, "_width", 400)


@pytest.mark.usefixtures("wide")
@pytest.mark.parametrize("success", [True, False])
def test_the_overview_shows_markup_like_text_literally(success: bool) -> None:
    with cli.out.capture() as captured:
        cli.render_overview([transaction(success, MARKUP)], limit=20)
    text = captured.get()
    assert MARKUP in text
    assert "Plain / [/x]" in text


@pytest.mark.usefixtures("wide")
@pytest.mark.parametrize("as_json", [False, True])
def test_an_event_with_markup_like_text_is_printed_literally(as_json: bool) -> None:
    tx = transaction(False, MARKUP)
    event = InstanceEvent(name="Plain.Failed", instance="Plain", event_id="ev-1", transaction=tx)
    with cli.out.capture() as captured:
        cli._print_event(event.to_json(), as_json)
    assert MARKUP in captured.get()


# --- 5. dead letters of undecodable task messages ------------------------------------------


@pytest.mark.parametrize(
    ("letter", "undecodable"),
    [
        ({"event": {"rawMessage": "gAR=", "contentType": "application/x-python-serialize"}}, True),
        ({"event": {"rawMessage": "", "contentType": None, "task": "mailsender.send"}}, True),
        ({"event": {"instance": "Plain", "subject": "s"}}, False),
        ({"event": {"instance": "Plain", "rawMessage": "x"}}, False),
        ({"event": "a string"}, False),
        ({}, False),
        ([], False),
    ],
)
def test_undecodable_letters_are_recognised(letter: Any, undecodable: bool) -> None:
    assert cli.is_undecodable(letter) is undecodable


# --- the command as a user runs it -----------------------------------------------------------


def mailsender(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mailsender ARGS`` with no configuration file and nothing listening at the broker."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILSENDER_")}
    full = {**base, "MAILSENDER_BROKER_URL": closed, "COLUMNS": "400", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def one_sentence(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The single stderr line of a refused command (no traceback, nothing on stdout)."""
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mailsender: ")
    return line


SEND = ("send", "Plain", "--subject", "s", "--message", "m")


def test_send_refuses_a_named_pipe_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    started = time.monotonic()
    line = one_sentence(mailsender(*SEND, "--attach", str(fifo)))
    assert time.monotonic() - started < 20
    assert (
        line == f"mailsender: cannot attach {str(fifo)!r}: it is a named pipe, not a regular file"
    )


@pytest.mark.parametrize(
    ("path", "kind"), [("/dev/zero", "a character device"), ("/", "a directory")]
)
def test_send_refuses_what_is_not_a_regular_file(path: str, kind: str) -> None:
    line = one_sentence(mailsender(*SEND, "--attach", path))
    assert line == f"mailsender: cannot attach {path!r}: it is {kind}, not a regular file"


def test_send_refuses_a_file_name_with_a_line_break(tmp_path: Path) -> None:
    bad = tmp_path / "bad\nname.txt"
    bad.write_text("x")
    line = one_sentence(mailsender(*SEND, "--attach", str(bad)))
    assert line.startswith(f"mailsender: cannot attach {str(bad)!r}: its file name contains")
    assert "line break" in line


def test_send_reads_a_missing_attachment_as_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    line = one_sentence(mailsender(*SEND, "--attach", str(missing)))
    assert line == f"mailsender: cannot read attachment {str(missing)!r}: No such file or directory"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--to", "not an address"), "recipients"),
        (("--to", "a@example.com\udcff"), "recipients"),
        (("--cc", "@@"), "cc"),
        (("--event-id", "has spaces"), "eventId"),
        (("--event-id", "x" * 201), "eventId"),
        (("--reply-to", "a@example.com\nBcc: evil@example.com"), "replyTo"),
        (("--message", "\udcff"), "message"),
    ],
)
def test_send_refuses_invalid_input_with_one_sentence(args: tuple[str, ...], words: str) -> None:
    line = one_sentence(mailsender(*SEND, *args))
    assert line.startswith("mailsender: invalid mail event: ")
    assert words in line or words.lower() in line


def test_send_refuses_a_bad_instance_name() -> None:
    line = one_sentence(mailsender("send", "Not/An/Instance", "-s", "s", "-m", "m"))
    assert line.startswith("mailsender: invalid mail event: instance: ")


def test_a_broker_url_of_an_unknown_kind_is_a_configuration_error() -> None:
    line = one_sentence(mailsender(*SEND, env={"MAILSENDER_BROKER_URL": "http://example.com"}))
    assert line.startswith("mailsender: invalid configuration: broker_url: ")


def test_send_refuses_a_timeout_that_is_not_a_number() -> None:
    result = mailsender(*SEND, "--wait", "--timeout", "nan")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value for '--timeout': must be a number of seconds, not nan" in result.stderr


@pytest.mark.parametrize("ids", [("",), ("  ",), ("some-id", "")])
def test_replay_refuses_an_empty_id(ids: tuple[str, ...]) -> None:
    assert one_sentence(mailsender("replay", *ids)) == "mailsender: an event id must not be empty"


def test_check_and_worker_stay_strict_about_unset_variables(tmp_path: Path) -> None:
    path = tmp_path / "mailsender.yaml"
    path.write_text(yaml.safe_dump(SECRETS))
    env = {"MAILSENDER_CONFIG": str(path)}
    check = mailsender("check", env=env)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "environment variable ${NU_PW} is not set" in check.stderr
    line = one_sentence(mailsender("worker", "--pool", "solo", env=env))
    assert line.startswith("mailsender: invalid configuration: ")
    assert "${NU_PW}" in line
