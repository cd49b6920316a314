"""What a tester found in the ``mailsender`` command, against the session's real fleet: Redis,
aiosmtpd servers and a worker process. Each command runs as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml
from kombu import Connection, Exchange, Queue

from producer import MailEvent, MailProducer, names
from tests.conftest import Servers
from tests.support.fleet import EventsReader, RedisServer
from tests.support.smtp import Rule, TestSmtpServer

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0
DEAD_KEY = "mailsender:deadletters"
MARKUP_REPLY = "550 5.1.1 [/x] no [red]such[/red] user [/bold]"
"""An SMTP reply whose text rich would read as markup if it were not printed literally."""


def mailsender(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """``mailsender ARGS`` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def user_env(config: dict[str, Any], tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user whose configuration file is ``config``: no MailSender
    variables and no SMTP secrets in this shell, only the file."""
    path = tmp_path / f"mailsender-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSENDER_")}
    env.pop("TEST_SMTP_PASSWORD", None)
    return {**env, "MAILSENDER_CONFIG": str(path), "COLUMNS": "400", **extra}


def fleet_env(fleet_config: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """A user of the fleet's configuration, with its secret set."""
    return user_env(fleet_config, tmp_path, TEST_SMTP_PASSWORD="S3cret-Test!")


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert "MarkupError" not in result.stdout + result.stderr


def wait_logged(backend: redis.Redis, event_id: str) -> dict[str, Any]:
    """The transaction-log entry of ``event_id`` (written after the instance event)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        entries = cast(
            list[tuple[str, dict[str, str]]],
            backend.xrevrange(names.TRANSACTIONS_STREAM, count=500),
        )
        for _, fields in entries:
            tx = json.loads(fields["transaction"])
            if tx["eventId"] == event_id:
                return dict(tx)
        assert time.monotonic() < deadline, f"no transaction logged for {event_id}"
        time.sleep(0.05)


# --- 1. text from events, transactions and servers is printed literally --------------------


def test_markup_like_failure_text_is_printed_literally_everywhere(
    fleet: Servers,
    fleet_config: dict[str, Any],
    tmp_path: Path,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    env = fleet_env(fleet_config, tmp_path)
    events.purge()
    fleet.plain.add_rule(Rule("rcpt", MARKUP_REPLY, times=None))

    sent = mailsender(
        "send", "Plain", "-s", "s", "-m", "m", "--to", "gone@example.com", "--wait", env=env
    )
    assert sent.returncode == 1, sent.stdout + sent.stderr
    assert_no_traceback(sent)
    event_id, _, rest = sent.stdout.partition("\n")
    event_id = event_id.strip()
    tx = json.loads(rest)
    assert tx["success"] is False
    assert MARKUP_REPLY in tx["refused"]["gone@example.com"]
    assert MARKUP_REPLY in sent.stdout
    wait_logged(backend, event_id)

    shown = mailsender("events", "--instance", "Plain", env=env, timeout_s=30)
    assert shown.returncode == 0, shown.stderr
    assert_no_traceback(shown)
    [line] = [line for line in shown.stdout.splitlines() if event_id in line]
    assert line.startswith("Plain.Failed ")
    assert MARKUP_REPLY in line

    overview = mailsender("transactions", "--interface", "Plain", "--errors", env=env)
    assert overview.returncode == 0, overview.stderr
    assert_no_traceback(overview)
    [row] = [line for line in overview.stdout.splitlines() if event_id in line]
    assert "FAILED" in row
    assert MARKUP_REPLY in row


def test_check_prints_a_markup_like_user_name_literally(
    fleet: Servers, redis_server: RedisServer, tmp_path: Path
) -> None:
    user = "[/x]ops[red]"
    server = TestSmtpServer(users={user: "pw"}, auth_require_tls=False)
    server.start()
    try:
        config = {
            "broker_url": redis_server.url(0),
            "result_backend": redis_server.url(1),
            "instances": {
                "Odd": {
                    "mailServer": "127.0.0.1",
                    "port": server.port,
                    "userName": user,
                    "password": "pw",
                    "sender": "noreply@example.com",
                }
            },
        }
        result = mailsender("check", env=user_env(config, tmp_path))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    [row] = [line for line in result.stdout.splitlines() if " Odd " in line]
    assert f"ok, AUTH as {user}" in row


# --- 7. check probes every instance at the same time ----------------------------------------


@pytest.fixture
def silent_servers() -> Iterator[list[int]]:
    """Ports that accept connections (the kernel's backlog) and never say a word."""
    sockets = []
    for _ in range(4):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        sockets.append(s)
    yield [int(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()


def test_check_probes_instances_concurrently_in_a_stable_order(
    redis_server: RedisServer, tmp_path: Path, silent_servers: list[int]
) -> None:
    timeout_s = 2
    config = {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        "instances": {
            f"Silent{i}": {
                "mailServer": "127.0.0.1",
                "port": port,
                "sender": "noreply@example.com",
                "timeoutS": timeout_s,
            }
            for i, port in reversed(list(enumerate(silent_servers, 1)))
        },
    }
    started = time.monotonic()
    result = mailsender("check", env=user_env(config, tmp_path))
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_traceback(result)
    # One after another they would take 4 x 2 s; together about 2 s (plus Python's start).
    assert elapsed < 2 * timeout_s + 2.5, f"check took {elapsed:.1f} s"
    rows = [line for line in result.stdout.splitlines() if " Silent" in line]
    assert [r.split()[1] for r in rows] == ["Silent1", "Silent2", "Silent3", "Silent4"]
    assert not any(r.split("│")[3].strip().startswith("ok") for r in rows), result.stdout
    assert result.stderr.strip() == "mailsender: 4 check(s) failed"


# --- 4. clients do not need the worker's secrets --------------------------------------------


def test_client_commands_do_not_need_the_workers_secrets(
    fleet: Servers, fleet_config: dict[str, Any], tmp_path: Path
) -> None:
    config = {
        **fleet_config,
        "instances": {
            **fleet_config["instances"],
            "Auth": {
                "mailServer": "127.0.0.1",
                "sender": "a@example.com",
                "userName": "u",
                "password": "${NU_PW}",
            },
        },
    }
    env = user_env(config, tmp_path)
    assert "NU_PW" not in env

    sent = mailsender(
        "send", "Plain", "-s", "s", "-m", "m", "--to", "a@example.com", "--wait", env=env
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert json.loads(sent.stdout.partition("\n")[2])["success"] is True

    overview = mailsender("transactions", "--interface", "Plain", env=env)
    assert overview.returncode == 0, overview.stderr
    taken = mailsender("events", "--instance", "NoSuchInstance", env=env, timeout_s=30)
    assert taken.returncode == 0, taken.stderr
    replay = mailsender("replay", "no-such-event-" + uuid.uuid4().hex, env=env)
    assert replay.returncode == 1
    assert replay.stderr.startswith("mailsender: no failed event with id no-such-event-")

    # The worker's own commands still insist on every secret.
    check = mailsender("check", env=env)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "instance 'Auth': password: environment variable ${NU_PW} is not set" in check.stderr
    for result in (sent, overview, taken, replay, check):
        assert_no_traceback(result)


# --- 5. a dead letter of an undecodable task message is not replayed -----------------------


def publish_undecodable(broker_url: str, task_id: str) -> None:
    """A ``mailsender.send`` task message whose body is not JSON, as a foreign client might
    send; the worker keeps it as a dead letter with the raw message."""
    exchange = Exchange(names.DEFAULT_QUEUE, type="direct")
    queue = Queue(names.DEFAULT_QUEUE, exchange, routing_key=names.DEFAULT_QUEUE)
    headers: dict[str, Any] = {"lang": "py", "task": names.TASK_NAME, "id": task_id}
    headers |= {"root_id": task_id}
    headers |= {"parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None}
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            b"\xff\xfe\x00\x81 not json",
            exchange=exchange,
            routing_key=names.DEFAULT_QUEUE,
            declare=[queue],
            headers=headers,
            content_type="application/json",
            content_encoding="binary",
            correlation_id=task_id,
        )


def wait_dead_letter(backend: redis.Redis, event_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while (value := backend.hget(DEAD_KEY, event_id)) is None:
        assert time.monotonic() < deadline, f"no dead letter for {event_id}"
        time.sleep(0.05)
    return cast(dict[str, Any], json.loads(cast(str, value)))


def test_replay_refuses_an_undecodable_letter_and_replays_the_others(
    fleet: Servers,
    fleet_config: dict[str, Any],
    tmp_path: Path,
    redis_server: RedisServer,
    producer: MailProducer,
    backend: redis.Redis,
) -> None:
    bad_id = f"trial-undecodable-{uuid.uuid4().hex}"
    publish_undecodable(redis_server.url(0), bad_id)
    assert "rawMessage" in wait_dead_letter(backend, bad_id)["event"]

    fleet.plain.add_rule(Rule("rcpt", "550 5.7.1 Relaying denied", times=None))
    good = producer.send(
        MailEvent(instance="Plain", subject="again", message="m", recipients="a@example.com")
    )
    assert good.wait(timeout_s=WAIT_S).success is False
    wait_dead_letter(backend, good.event_id)
    fleet.plain.reset()

    result = mailsender("replay", bad_id, good.event_id, env=fleet_env(fleet_config, tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_traceback(result)
    assert result.stdout.splitlines() == [f"replayed {good.event_id}"]
    assert result.stderr.strip() == (
        f"mailsender: event {bad_id} cannot be replayed: its task message could not be "
        "decoded; it is kept for inspection"
    )
    assert backend.hexists(DEAD_KEY, bad_id)
    assert not backend.hexists("mailsender:pending", bad_id)
    assert fleet.plain.wait_for(lambda s: len(s.received) == 1, timeout_s=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while good.state != "SUCCESS":  # the first outcome stays until the replay's is final
        assert time.monotonic() < deadline, good.state
        time.sleep(0.05)
    assert good.wait(timeout_s=WAIT_S).success is True
