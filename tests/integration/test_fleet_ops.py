"""Fleet operations: implicit TLS, per-instance queues, rate limits, monitoring."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from producer import MailEvent, MailProducer
from tests.conftest import PASSWORD, USER, Servers
from tests.support.fleet import RedisServer, WorkerProcess, free_port
from tests.support.smtp import Rule, TestSmtpServer


def test_implicit_tls_delivers_over_tls_from_the_first_byte(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(instance="Implicit", subject="465", message="x", recipients="a@example.com")
    ).wait(timeout_s=20)
    assert tx.success is True
    [mail] = fleet.implicit.received
    assert mail.tls is True
    assert mail.auth_user == USER
    verbs = [cmd.split(" ")[0].upper() for _, cmd, _ in fleet.implicit.commands]
    assert "STARTTLS" not in verbs
    assert all(tls for _, _, tls in fleet.implicit.commands)


def test_implicit_tls_against_a_starttls_port_fails_with_a_clear_error(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(
            instance="ImplicitOnStarttlsPort", subject="x", message="x", recipients="a@example.com"
        )
    ).wait(timeout_s=20)
    assert tx.success is False
    assert tx.attempts == 1
    assert "implicit TLS" in tx.message
    assert "answered in plain text" in tx.message
    assert "tls: starttls" in tx.message
    assert "WRONG_VERSION_NUMBER" not in tx.message
    assert fleet.secure.received == []


def test_starttls_against_an_implicit_tls_port_names_the_fix(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(
            instance="StarttlsOnImplicitPort", subject="x", message="x", recipients="a@example.com"
        )
    ).wait(timeout_s=20)
    assert tx.success is False
    assert "tls: implicit" in tx.message
    assert fleet.implicit.received == []


# --- per-instance queues and rate limits (own Redis, servers and workers) ---------------


def _queued_config(
    redis_server: RedisServer, slow: TestSmtpServer, fast: TestSmtpServer, **extra: Any
) -> dict[str, Any]:
    base = {
        "sender": "noreply@example.com",
        "mailServer": "127.0.0.1",
        "timeoutS": 30,
        "retryDelayS": 0.3,
        "retryDelayMaxS": 1.0,
    }
    return {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        "instances": {
            "Slow": {**base, "port": slow.port, "queue": "mailsender.slow"},
            "Fast": {**base, "port": fast.port},
            "Limited": {**base, "port": fast.port, "rateLimit": "5/s"},
            **extra,
        },
    }


@pytest.fixture
def queue_fleet(tmp_path: Path) -> Iterator[tuple[RedisServer, TestSmtpServer, TestSmtpServer]]:
    redis_server = RedisServer(tmp_path / "redis").start()
    with TestSmtpServer() as slow, TestSmtpServer() as fast:
        yield redis_server, slow, fast
    redis_server.stop()


def test_a_stalled_instance_on_its_own_queue_does_not_hold_up_the_others(
    tmp_path: Path, queue_fleet: tuple[RedisServer, TestSmtpServer, TestSmtpServer]
) -> None:
    redis_server, slow, fast = queue_fleet
    slow.add_rule(Rule("data", "", times=None, delay_s=8))  # instance Slow's server stalls
    config = _queued_config(redis_server, slow, fast)
    slow_worker = WorkerProcess(
        tmp_path, config, name="slow", concurrency=2, extra_args=["-Q", "mailsender.slow"]
    ).start()
    main_worker = WorkerProcess(
        tmp_path, config, name="main", concurrency=2, extra_args=["-Q", "mailsender"]
    ).start()
    producer = MailProducer(redis_server.url(0), redis_server.url(1))
    try:
        assert producer.queue_for("Slow") == "mailsender.slow"
        assert producer.queue_for("Fast") == "mailsender"
        stalled = producer.send_many(
            [
                MailEvent(
                    instance="Slow",
                    subject=f"slow {i}",
                    message="x",
                    recipients=f"s{i}@example.com",
                )
                for i in range(4)
            ],
            batch_size=1,
        )
        started = time.monotonic()
        flowing = producer.send_many(
            [
                MailEvent(
                    instance="Fast",
                    subject=f"fast {i}",
                    message="x",
                    recipients=f"f{i}@example.com",
                )
                for i in range(10)
            ]
        )
        outcomes = [r.wait(timeout_s=10) for r in flowing]
        elapsed = time.monotonic() - started
        assert all(t.success for t in outcomes)
        assert elapsed < 5, f"Fast waited {elapsed:.1f} s behind Slow"
        assert slow.received == []  # Slow's mails are still stuck in its server
        assert {r.state for r in stalled} <= {"PENDING", "STARTED"}
        assert "Slow" not in main_worker.log()
    finally:
        slow.rules.clear()
        main_worker.stop()
        slow_worker.kill()
        producer.close()


def test_an_event_on_the_default_queue_is_forwarded_to_its_instance_queue(
    tmp_path: Path, queue_fleet: tuple[RedisServer, TestSmtpServer, TestSmtpServer]
) -> None:
    redis_server, slow, fast = queue_fleet
    config = _queued_config(redis_server, slow, fast)
    slow_worker = WorkerProcess(
        tmp_path, config, name="slow", concurrency=1, extra_args=["-Q", "mailsender.slow"]
    ).start()
    main_worker = WorkerProcess(
        tmp_path, config, name="main", concurrency=1, extra_args=["-Q", "mailsender"]
    ).start()
    client = Celery(broker=redis_server.url(0), backend=redis_server.url(1))
    try:
        client.send_task(
            "mailsender.send",
            kwargs={
                "event": {
                    "instance": "Slow",
                    "subject": "routed",
                    "message": "x",
                    "recipients": "r@example.com",
                    "eventId": "routed-1",
                }
            },
            task_id="routed-1",
            queue="mailsender",
        )
        tx = MailProducer(redis_server.url(0), redis_server.url(1)).receipt("routed-1").wait(20)
        assert tx.success is True
        assert slow.accepted_count("r@example.com") == 1
        assert "event routed-1: forwarded from queue mailsender to mailsender.slow" in (
            main_worker.log()
        )
        assert "routed-1: attempt 1: 1 accepted" in slow_worker.log()
    finally:
        main_worker.stop()
        slow_worker.stop()
        client.close()


def test_rate_limit_holds_across_the_fleet(
    tmp_path: Path, queue_fleet: tuple[RedisServer, TestSmtpServer, TestSmtpServer]
) -> None:
    redis_server, slow, fast = queue_fleet
    config = _queued_config(redis_server, slow, fast)
    workers = [
        WorkerProcess(tmp_path, config, name=f"w{i}", concurrency=2).start() for i in range(2)
    ]
    producer = MailProducer(redis_server.url(0), redis_server.url(1))
    arrivals: list[float] = []
    try:
        started = time.monotonic()
        receipts = producer.send_many(
            [
                MailEvent(
                    instance="Limited",
                    subject=f"rate {i}",
                    message="x",
                    recipients=f"l{i}@example.com",
                )
                for i in range(20)
            ],
            batch_size=2,
        )
        while len(arrivals) < 20 and time.monotonic() - started < 30:
            arrivals += [time.time()] * (len(fast.received) - len(arrivals))
            time.sleep(0.02)
        outcomes = [r.wait(timeout_s=30) for r in receipts]
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    assert all(t.success for t in outcomes)
    assert all(t.attempts == 1 for t in outcomes), "waiting for the limit is not an attempt"
    # 5 per one-second window (aligned to the epoch second), fleet-wide: 20 mails span at
    # least 4 windows. Arrival times are polled every 20 ms, so one mail sent at the very end
    # of a window may be seen in the next: allow one over.
    per_window = Counter(int(t) for t in arrivals)
    assert len(per_window) >= 4
    assert max(per_window.values()) <= 6, per_window


def test_json_logs_carry_event_instance_and_smtp_code(
    tmp_path: Path, queue_fleet: tuple[RedisServer, TestSmtpServer, TestSmtpServer]
) -> None:
    redis_server, slow, fast = queue_fleet
    fast.add_rule(Rule("rcpt", "550 5.1.1 User unknown", times=None, match="gone@example.com"))
    config = {**_queued_config(redis_server, slow, fast), "log_format": "json"}
    worker = WorkerProcess(tmp_path, config, name="json", concurrency=1).start()
    producer = MailProducer(redis_server.url(0), redis_server.url(1))
    try:
        ok = producer.send(
            MailEvent(instance="Fast", subject="j", message="x", recipients="ok@example.com")
        )
        bad = producer.send(
            MailEvent(instance="Fast", subject="j", message="x", recipients="gone@example.com")
        )
        ok.wait(timeout_s=20)
        bad.wait(timeout_s=20)
    finally:
        worker.stop()
        producer.close()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines"
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("event_id") in {ok.event_id, bad.event_id}]
    attempt_ok = [x for x in mine if x["event_id"] == ok.event_id and "smtp_code" in x]
    assert attempt_ok and attempt_ok[0]["smtp_code"] == 250
    assert attempt_ok[0]["instance"] == "Fast" and attempt_ok[0]["attempt"] == 1
    attempt_bad = [x for x in mine if x["event_id"] == bad.event_id and "smtp_code" in x]
    assert attempt_bad and attempt_bad[0]["smtp_code"] == 550
    outcomes = {(x["event_id"], x["outcome"]) for x in mine if "outcome" in x}
    assert outcomes == {(ok.event_id, "Done"), (bad.event_id, "Failed")}
    assert "x" not in {x.get("message") for x in mine}  # never the body


# --- NTLM -----------------------------------------------------------------------------


@pytest.fixture
def ntlm_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The credentials pyspnego uses on both sides: the server verifies against this file,
    and the worker takes its own identity (useDefaultCredentials) from it."""
    path = tmp_path / "ntlm-users.txt"
    path.write_text(f"CORP:mailer:{PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(path))
    return path


def test_ntlm_with_service_identity_and_with_user_name(
    tmp_path: Path, ntlm_user_file: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    server = TestSmtpServer(
        users={"unused": "unused"}, auth_mechanisms=("NTLM",), auth_require_tls=False
    )
    server.start()
    base = {
        "mailServer": "127.0.0.1",
        "port": server.port,
        "sender": "noreply@example.com",
        "maxRetries": 0,
    }
    config = {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        "instances": {
            "NtlmDefault": {**base, "useDefaultCredentials": True},
            "NtlmUser": {**base, "userName": "CORP\\mailer", "password": "${NTLM_PASSWORD}"},
            "NtlmWrong": {**base, "userName": "CORP\\mailer", "password": "wrong"},
        },
    }
    worker = WorkerProcess(
        tmp_path,
        config,
        name="ntlm",
        concurrency=1,
        env={"NTLM_USER_FILE": str(ntlm_user_file), "NTLM_PASSWORD": PASSWORD},
    ).start()
    producer = MailProducer(redis_server.url(0), redis_server.url(1))
    try:
        outcomes = {
            name: producer.send(
                MailEvent(
                    instance=name,
                    subject=name,
                    message="x",
                    recipients=f"{name.lower()}@example.com",
                )
            ).wait(20)
            for name in ("NtlmDefault", "NtlmUser", "NtlmWrong")
        }
        log = worker.log()
    finally:
        worker.stop()
        producer.close()
        server.stop()
        redis_server.stop()
    assert outcomes["NtlmDefault"].success is True
    assert outcomes["NtlmUser"].success is True
    by_rcpt = {m.rcpt_tos[0]: m for m in server.received}
    assert by_rcpt["ntlmdefault@example.com"].auth_user == "CORP\\mailer"
    assert by_rcpt["ntlmuser@example.com"].auth_user == "CORP\\mailer"
    wrong = outcomes["NtlmWrong"]
    assert wrong.success is False and wrong.attempts == 1
    assert "AUTH NTLM" in wrong.message and "535" in wrong.message
    assert "ntlmwrong@example.com" not in by_rcpt
    verbs = {cmd.split(" ")[:2] == ["AUTH", "NTLM"] for _, cmd, _ in server.commands}
    assert True in verbs
    assert PASSWORD not in log and "wrong" not in wrong.message.replace("NtlmWrong", "")


# --- Flower -----------------------------------------------------------------------------


def test_flower_shows_the_task_with_a_redacted_summary(
    fleet: Servers, fleet_worker: WorkerProcess, producer: MailProducer, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MAILSENDER_CONFIG": str(fleet_worker.config_path),
        "TEST_SMTP_PASSWORD": PASSWORD,
    }
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--basic-auth=ops:flower-secret",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    auth = base64.b64encode(b"ops:flower-secret").decode()

    def get(path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {auth}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get("/api/workers?refresh=false")
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline or flower.poll() is not None:
                    raise AssertionError((tmp_path / "flower.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        time.sleep(1)  # Flower's event receiver is connected
        secret_body = "the body Flower must not show"
        receipt = producer.send(
            MailEvent(
                instance="Plain",
                subject="for flower",
                message=secret_body,
                recipients="f@example.com",
            )
        )
        # A plain Celery client puts the whole keyword arguments, body included, into the
        # kwargsrepr header; the worker shows its own redacted summary instead.
        client = Celery(broker=producer.broker_url, backend=producer.result_backend)
        plain_body = "the body a plain Celery client sent"
        raw_id = f"plain-{receipt.event_id}"
        try:
            client.send_task(
                "mailsender.send",
                kwargs={
                    "event": {
                        "instance": "Plain",
                        "subject": "plain client",
                        "message": plain_body,
                        "recipients": "f@example.com",
                        "eventId": raw_id,
                    }
                },
                task_id=raw_id,
                queue="mailsender",
            )
        finally:
            client.close()
        assert receipt.wait(timeout_s=20).success
        assert producer.receipt(raw_id).wait(timeout_s=20).success
        task: dict[str, Any] = {}
        raw_task: dict[str, Any] = {}
        while time.monotonic() < deadline + 30:
            tasks = get("/api/tasks")
            task = tasks.get(receipt.event_id) or {}
            raw_task = tasks.get(raw_id) or {}
            if task.get("state") == "SUCCESS" and raw_task.get("state") == "SUCCESS":
                break
            time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError):  # basic auth is enforced
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=5)
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(10)
        log.close()
    assert task.get("state") == "SUCCESS", task
    assert task["name"] == "mailsender.send"
    assert "'instance': 'Plain'" in task["kwargs"]
    assert receipt.event_id in task["kwargs"]
    assert secret_body not in json.dumps(task)
    assert raw_task.get("state") == "SUCCESS", raw_task
    shown = {"instance": "Plain", "eventId": raw_id, "subject": "plain client", "redacted": True}
    assert raw_task["kwargs"] == repr({"event": shown})
    assert plain_body not in json.dumps(raw_task)
