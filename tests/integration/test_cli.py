"""The ``mailsender`` command as a user runs it: real subprocesses against the session's fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml
from celery.result import AsyncResult

from producer import MailEvent, MailProducer
from tests.conftest import PASSWORD, USER, Servers
from tests.support.fleet import EventsReader, RedisServer, free_port
from tests.support.smtp import Rule
from worker.devserver import TlsMaterial

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0


def run(
    args: list[str], env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` from the project directory and capture its output as text."""
    return subprocess.run(
        args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def mailsender(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """``mailsender ARGS`` as a user types it."""
    return run([sys.executable, "-m", "worker.cli", *args], env, timeout_s)


def base_env(config_path: Path, redis_server: RedisServer) -> dict[str, str]:
    env = {
        **os.environ,
        "MAILSENDER_CONFIG": str(config_path),
        "MAILSENDER_BROKER_URL": redis_server.url(0),
        "MAILSENDER_RESULT_BACKEND": redis_server.url(1),
        "TEST_SMTP_PASSWORD": PASSWORD,
        "COLUMNS": "400",  # rich: no wrapped table cells
    }
    env.pop("MAILSENDER_ATTACHMENT_ROOT", None)
    return env


@pytest.fixture
def cli_env(
    tmp_path: Path, fleet_config: dict[str, Any], redis_server: RedisServer
) -> dict[str, str]:
    """The environment of a user whose config is the fleet's."""
    path = tmp_path / "mailsender.yaml"
    path.write_text(yaml.safe_dump(fleet_config, allow_unicode=True))
    return base_env(path, redis_server)


def wait_logged(backend: redis.Redis, event_id: str) -> dict[str, Any]:
    """The transaction-log entry of ``event_id`` (written after the instance event)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        entries = cast(
            list[tuple[str, dict[str, str]]],
            backend.xrevrange("mailsender:transactions", count=200),
        )
        for _, fields in entries:
            tx = json.loads(fields["transaction"])
            if tx["eventId"] == event_id:
                return dict(tx)
        assert time.monotonic() < deadline, f"no transaction logged for {event_id}"
        time.sleep(0.05)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


# --- configuration errors -----------------------------------------------------------------


def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "instances": {
                    "Typo": {"mailServer": "127.0.0.1", "sender": "a@example.com", "colour": "red"},
                    "NoSender": {"mailServer": "127.0.0.1"},
                    "Secret": {
                        "mailServer": "127.0.0.1",
                        "sender": "a@example.com",
                        "userName": "u",
                        "password": "${MAILSENDER_TEST_NEVER_SET}",
                    },
                },
            }
        )
    )
    return path


def test_check_reports_every_configuration_problem_and_exits_2(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = base_env(bad_config(tmp_path), redis_server)
    env.pop("MAILSENDER_TEST_NEVER_SET", None)
    result = mailsender("check", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr

    def line_with(*words: str) -> str:
        found = [line for line in lines if all(w in line for w in words)]
        assert len(found) == 1, f"no single line with {words} in:\n{result.stderr}"
        return found[0]

    assert "not a known key" in line_with("'Typo'", "colour")
    assert "required" in line_with("'NoSender'", "sender")
    assert "not set" in line_with("'Secret'", "password", "${MAILSENDER_TEST_NEVER_SET}")


def test_worker_command_with_a_bad_config_exits_2_with_one_sentence(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = base_env(bad_config(tmp_path), redis_server)
    result = mailsender("worker", "--pool", "solo", env=env, timeout_s=30)
    assert result.returncode == 2
    assert_no_traceback(result)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("mailsender: invalid configuration")
    for word in ("'Typo'", "colour", "'NoSender'", "sender", "'Secret'", "password"):
        assert word in message


def test_celery_worker_with_a_bad_config_exits_2(tmp_path: Path, redis_server: RedisServer) -> None:
    env = base_env(bad_config(tmp_path), redis_server)
    result = run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "solo"],
        env,
        timeout_s=30,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert "invalid configuration" in result.stderr
    assert "'Typo'" in result.stderr


# --- check against the real servers ---------------------------------------------------------


def test_check_against_real_servers(
    tmp_path: Path, fleet: Servers, redis_server: RedisServer, trusted_tls: TlsMaterial
) -> None:
    secure = {
        "mailServer": "localhost",
        "port": fleet.secure.port,
        "useSsl": True,
        "caFile": str(trusted_tls.ca_pem_path),
        "userName": USER,
        "sender": "noreply@example.com",
    }
    path = tmp_path / "check.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "instances": {
                    "Good": {**secure, "password": "${TEST_SMTP_PASSWORD}"},
                    "BadPassword": {**secure, "password": "not-the-password"},
                    "PlainOk": {
                        "mailServer": "127.0.0.1",
                        "port": fleet.plain.port,
                        "sender": "noreply@example.com",
                    },
                }
            }
        )
    )
    result = mailsender("check", env=base_env(path, redis_server))
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_traceback(result)

    def row(name: str) -> str:
        found = [line for line in result.stdout.splitlines() if f" {name} " in line]
        assert len(found) == 1, result.stdout
        return found[0]

    assert "ok, AUTH as mailer" in row("Good")
    assert "ok" in row("PlainOk")
    bad = row("BadPassword")
    assert "ok" not in bad.split("BadPassword", 1)[1].split("│")[2]
    assert "535" in bad
    assert "not-the-password" not in result.stdout + result.stderr
    assert result.stderr.strip() == "mailsender: 1 check(s) failed"
    # check sends nothing
    assert fleet.secure.received == [] and fleet.secure.transactions == 0
    assert fleet.plain.received == [] and fleet.plain.transactions == 0


# --- send -----------------------------------------------------------------------------------


def test_send_with_attachment_and_wait_prints_id_and_transaction(
    tmp_path: Path, fleet: Servers, cli_env: dict[str, str]
) -> None:
    attachment = tmp_path / "Bericht März.csv"
    attachment.write_bytes(b"id;amount\n1;12.50\n")
    result = mailsender(
        "send",
        "Plain",
        "--subject",
        "From the command line",
        "--message",
        "Hello CLI",
        "--to",
        "alice@example.com, Bob <bob@example.com>",
        "--attach",
        str(attachment),
        "--wait",
        env=cli_env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    event_id, _, rest = result.stdout.partition("\n")
    uuid.UUID(event_id.strip())
    tx = json.loads(rest)
    assert tx["eventId"] == event_id.strip()
    assert tx["success"] is True
    assert tx["instance"] == "Plain"
    assert tx["recipients"] == ["alice@example.com", "bob@example.com"]
    [mail] = fleet.plain.received
    assert mail.rcpt_tos == ["alice@example.com", "bob@example.com"]
    msg = mail.message()
    assert msg["Subject"] == "From the command line"
    assert msg["Message-ID"] == tx["messageId"]
    [part] = list(msg.iter_attachments())
    assert part.get_filename() == "Bericht März.csv"
    assert part.get_payload(decode=True) == b"id;amount\n1;12.50\n"


def test_send_wait_exits_1_when_the_send_fails(fleet: Servers, cli_env: dict[str, str]) -> None:
    fleet.plain.add_rule(Rule("rcpt", "550 5.1.1 User unknown", times=None))
    result = mailsender(
        "send",
        "Plain",
        "--subject",
        "s",
        "--message",
        "m",
        "--to",
        "gone@example.com",
        "--wait",
        env=cli_env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert_no_traceback(result)
    event_id, _, rest = result.stdout.partition("\n")
    tx = json.loads(rest)
    assert tx["eventId"] == event_id.strip()
    assert tx["success"] is False
    assert tx["refused"] == {"gone@example.com": "550 5.1.1 User unknown"}
    assert fleet.plain.received == []


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--subject", "s", "--to", "not an address"], "recipients"),
        (["--to", "alice@example.com", "--subject", "a\nBcc: evil@example.com"], "subject"),
        (["--subject", "s", "--to", "alice@example.com", "--reply-to", "@@"], "replyTo"),
    ],
    ids=["recipients", "subject-with-newline", "reply-to"],
)
def test_send_with_an_invalid_event_names_the_field_and_enqueues_nothing(
    fleet: Servers,
    cli_env: dict[str, str],
    producer: MailProducer,
    backend: redis.Redis,
    args: list[str],
    field: str,
) -> None:
    event_id = f"cli-invalid-{uuid.uuid4().hex}"
    result = mailsender(
        "send", "Plain", "--message", "m", "--event-id", event_id, *args, env=cli_env
    )
    assert result.returncode != 0
    assert_no_traceback(result)
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("mailsender: invalid mail event")
    snake = {"replyTo": "reply_to"}.get(field, field)
    assert field in message or snake in message, message
    time.sleep(1.0)
    assert AsyncResult(event_id, app=producer.app).state == "PENDING"
    assert not backend.exists(f"mailsender:event:{event_id}")
    assert fleet.plain.transactions == 0


# --- events ---------------------------------------------------------------------------------


def test_events_prints_the_done_event_and_exits(
    fleet: Servers,
    cli_env: dict[str, str],
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    events.purge()
    receipt = producer.send(
        MailEvent(instance="Plain", subject="s", message="m", recipients="alice@example.com")
    )
    assert receipt.wait(timeout_s=WAIT_S).success is True
    wait_logged(backend, receipt.event_id)

    result = mailsender("events", env=cli_env, timeout_s=30)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if receipt.event_id in line]
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("Plain.Done ")
    assert "sent to 1 recipient(s)" in lines[0]

    # Taken from the queue: a second run does not print it again.
    again = mailsender("events", env=cli_env, timeout_s=30)
    assert again.returncode == 0
    assert receipt.event_id not in again.stdout


def test_events_for_one_instance_leaves_the_others_on_the_queue(
    fleet: Servers,
    cli_env: dict[str, str],
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    events.purge()
    plain = producer.send(
        MailEvent(instance="Plain", subject="s", message="m", recipients="alice@example.com")
    )
    alerts = producer.send(MailEvent(instance="Alerts", subject="s", message="m"))
    for receipt in (plain, alerts):
        assert receipt.wait(timeout_s=WAIT_S).success is True
        wait_logged(backend, receipt.event_id)

    result = mailsender("events", "--instance", "Alerts", env=cli_env, timeout_s=30)
    assert result.returncode == 0, result.stderr
    assert alerts.event_id in result.stdout
    assert "Alerts.Done" in result.stdout
    assert plain.event_id not in result.stdout

    events.drain()
    assert [e["name"] for e in events.seen.get(plain.event_id, [])] == ["Plain.Done"]
    assert alerts.event_id not in events.seen


def test_events_follow_outlives_a_broker_restart(tmp_path: Path) -> None:
    """`mailsender events --follow` reconnects when Redis goes away and comes back."""
    from kombu import Connection

    from worker.outcomes import EVENTS_EXCHANGE, EVENTS_QUEUE

    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    env = {
        **os.environ,
        "MAILSENDER_CONFIG": str(tmp_path / "none.yaml"),
        "MAILSENDER_BROKER_URL": server.url(0),
        "MAILSENDER_RESULT_BACKEND": server.url(1),
    }
    (tmp_path / "none.yaml").write_text("instances: {}\n")

    def publish(event_id: str) -> None:
        with Connection(server.url(0)) as conn:
            conn.Producer().publish(
                {"name": "X.Done", "instance": "X", "eventId": event_id, "transaction": {}},
                exchange=EVENTS_EXCHANGE,
                routing_key="X.Done",
                declare=[EVENTS_QUEUE],
                serializer="json",
            )

    follow = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "events", "--follow", "--json"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        publish("before-restart")
        time.sleep(1.5)
        server.stop()
        time.sleep(2)
        server.start()
        publish("after-restart")
        time.sleep(4)
    finally:
        follow.terminate()
        out, err = follow.communicate(timeout=10)
        server.stop()
    assert '"eventId": "before-restart"' in out
    assert '"eventId": "after-restart"' in out, err
    assert "lost the broker connection" in err
    assert "Traceback" not in err


# --- transactions ---------------------------------------------------------------------------


def test_transactions_overview_and_errors_only(
    fleet: Servers, cli_env: dict[str, str], producer: MailProducer, backend: redis.Redis
) -> None:
    ok = producer.send(MailEvent(instance="Alerts", subject="fine", message="m"))
    fleet.plain.add_rule(
        Rule("rcpt", "550 5.1.1 User unknown", match="gone@example.com", times=None)
    )
    bad = producer.send(
        MailEvent(instance="Plain", subject="bad", message="m", recipients="gone@example.com")
    )
    assert ok.wait(timeout_s=WAIT_S).success is True
    assert bad.wait(timeout_s=WAIT_S).success is False
    wait_logged(backend, ok.event_id)
    wait_logged(backend, bad.event_id)

    result = mailsender("transactions", env=cli_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Monitoring / ops-mail" in out
    assert "Plain / (no endpoint)" in out
    [ok_row] = [line for line in out.splitlines() if ok.event_id in line]
    [bad_row] = [line for line in out.splitlines() if bad.event_id in line]
    assert " ok " in ok_row
    assert "FAILED" in bad_row
    assert "550 5.1.1 User unknown" in bad_row
    # The Monitoring group comes before Plain's, and the Alerts row sits in it.
    assert out.index("Monitoring / ops-mail") < out.index(ok.event_id)
    assert out.index("Plain / (no endpoint)") < out.index(bad.event_id)

    errors = mailsender("transactions", "--errors", env=cli_env)
    assert errors.returncode == 0, errors.stderr
    assert bad.event_id in errors.stdout
    assert ok.event_id not in errors.stdout
    assert " ok " not in errors.stdout

    only = mailsender("transactions", "--interface", "Monitoring", env=cli_env)
    assert only.returncode == 0, only.stderr
    assert ok.event_id in only.stdout
    assert bad.event_id not in only.stdout


def test_transactions_finds_failures_and_quiet_interfaces_far_back_in_the_log(
    tmp_path: Path,
) -> None:
    """The overview reads the whole log, not only its newest few thousand entries: a failure
    and a quiet interface behind 5000 newer successes are still shown."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url(1))

        def tx(event_id: str, interface: str, success: bool) -> str:
            return json.dumps(
                {
                    "eventId": event_id, "instance": interface, "interface": interface,
                    "endpoint": "", "success": success, "count": int(success),
                    "message": "sent" if success else "550 5.1.1 gone@example.com: User unknown",
                    "timestamp": "2026-12-04T08:00:00+00:00", "messageId": "",
                    "recipients": [], "refused": {}, "attempts": 1,
                }
            )  # fmt: skip

        client.xadd("mailsender:transactions", {"transaction": tx("old-failure", "Busy", False)})
        client.xadd("mailsender:transactions", {"transaction": tx("quiet-1", "Quiet", True)})
        pipe = client.pipeline()
        for i in range(5000):
            pipe.xadd("mailsender:transactions", {"transaction": tx(f"new-{i}", "Busy", True)})
        pipe.execute()
        env = {
            **os.environ,
            "MAILSENDER_CONFIG": str(tmp_path / "none.yaml"),
            "MAILSENDER_BROKER_URL": server.url(0),
            "MAILSENDER_RESULT_BACKEND": server.url(1),
            "COLUMNS": "400",
        }
        (tmp_path / "none.yaml").write_text("instances: {}\n")
        errors = mailsender("transactions", "--errors", env=env)
        quiet = mailsender("transactions", "--interface", "Quiet", env=env)
        overview = mailsender("transactions", env=env)
    finally:
        server.stop()
    assert errors.returncode == 0, errors.stderr
    assert "old-failure" in errors.stdout and "new-" not in errors.stdout
    assert quiet.returncode == 0, quiet.stderr
    assert "quiet-1" in quiet.stdout
    assert "Busy / (no endpoint)" in overview.stdout and "Quiet / (no endpoint)" in overview.stdout
    # The latest 20 per group by default: Busy's newest 20 (the old failure is the 5001st).
    busy_rows = [line for line in overview.stdout.splitlines() if "new-" in line]
    assert len(busy_rows) == 20
    assert "new-4999" in overview.stdout and "old-failure" not in overview.stdout


# --- replay ---------------------------------------------------------------------------------


def test_replay_delivers_a_dead_lettered_event(
    fleet: Servers,
    cli_env: dict[str, str],
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    events.purge()
    fleet.plain.add_rule(Rule("rcpt", "550 5.7.1 Relaying denied", times=None))
    receipt = producer.send(
        MailEvent(
            instance="Plain", subject="replay me", message="m", recipients="alice@example.com"
        )
    )
    assert receipt.wait(timeout_s=WAIT_S).success is False
    wait_logged(backend, receipt.event_id)
    assert backend.hexists("mailsender:deadletters", receipt.event_id)
    assert events.wait_for(receipt.event_id)["name"] == "Plain.Failed"

    fleet.plain.reset()  # the server's rule is cleared
    # A replay that cannot reach the broker keeps the dead letter and leaves nothing pending.
    away = {**cli_env, "MAILSENDER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    failed = mailsender("replay", receipt.event_id, env=away)
    assert failed.returncode == 1
    assert_no_traceback(failed)
    assert backend.hexists("mailsender:deadletters", receipt.event_id)
    assert not backend.hexists("mailsender:pending", receipt.event_id)

    result = mailsender("replay", receipt.event_id, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert f"replayed {receipt.event_id}" in result.stdout

    assert fleet.plain.wait_for(lambda s: len(s.received) == 1, timeout_s=WAIT_S)
    mail = fleet.plain.received[0]
    assert mail.rcpt_tos == ["alice@example.com"]
    assert mail.message()["Subject"] == "replay me"
    deadline = time.monotonic() + WAIT_S
    result_state = AsyncResult(receipt.event_id, app=producer.app)
    while result_state.state != "SUCCESS":
        assert time.monotonic() < deadline, result_state.state
        time.sleep(0.05)
    tx = receipt.wait(timeout_s=WAIT_S)
    assert tx.success is True
    assert tx.recipients == ["alice@example.com"]
    names: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while "Plain.Done" not in names:
        assert time.monotonic() < deadline, names
        events.drain()
        names = [e["name"] for e in events.seen.get(receipt.event_id, [])]
        time.sleep(0.05)
    assert names == ["Plain.Failed", "Plain.Done"]
    assert not backend.hexists("mailsender:deadletters", receipt.event_id)

    # Nothing left to replay under that id.
    again = mailsender("replay", receipt.event_id, env=cli_env)
    assert again.returncode != 0
    assert_no_traceback(again)
    assert receipt.event_id in again.stderr


# --- demo and packaging ---------------------------------------------------------------------


def test_demo_runs_the_whole_pipeline(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {**os.environ, "MAILSENDER_BROKER_URL": redis_server.url(7), "COLUMNS": "200"}
    for name in ("MAILSENDER_CONFIG", "MAILSENDER_RESULT_BACKEND", "MAILSENDER_ATTACHMENT_ROOT"):
        env.pop(name, None)
    outbox = tmp_path / "outbox"
    result = mailsender("demo", "--outbox", str(outbox), env=env, timeout_s=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_no_traceback(result)
    assert len(list(outbox.glob("*.eml"))) == 19


def test_the_producer_never_imports_the_worker() -> None:
    code = (
        "import sys\n"
        "import producer\n"
        "from producer import MailEvent, MailProducer, Transaction, MailDeliveryFailed\n"
        "import producer.client, producer.models, producer.errors, producer.names\n"
        "p = MailProducer('redis://127.0.0.1:1/0')\n"
        "MailEvent(instance='X', subject='s', message='m', recipients='a@example.com')\n"
        "p.close()\n"
        "bad = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSENDER_")}
    result = run([sys.executable, "-c", code], env, timeout_s=30)
    assert result.returncode == 0, f"producer imported: {result.stdout} {result.stderr}"
    assert result.stdout.strip() == ""


def test_send_wait_time_out_is_exit_3_and_one_sentence(
    fleet: Servers, cli_env: dict[str, str]
) -> None:
    fleet.plain.add_rule(Rule("data", "", times=1, delay_s=3))  # slower than --timeout
    result = mailsender(
        "send",
        "Plain",
        "--subject",
        "s",
        "--message",
        "m",
        "--to",
        "a@example.com",
        "--wait",
        "--timeout",
        "1",
        env=cli_env,
    )
    assert result.returncode == 3
    assert_no_traceback(result)
    assert "Exception ignored" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mailsender: no outcome for event ") and line.endswith("within 1 s")


@pytest.mark.parametrize("timeout", ["0", "-5"])
def test_send_refuses_a_timeout_that_is_not_positive(
    fleet: Servers, cli_env: dict[str, str], timeout: str
) -> None:
    result = mailsender(
        "send",
        "Plain",
        "--subject",
        "s",
        "--message",
        "m",
        "--wait",
        "--timeout",
        timeout,
        env=cli_env,
    )
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "--timeout" in result.stderr
