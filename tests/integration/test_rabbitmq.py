"""The same worker and producer with RabbitMQ (`amqp://`) as the broker; Redis stays the result
backend. Needs the RabbitMQ on 127.0.0.1:5672 (guest/guest) that this machine kind runs: skipped
when it does not answer, except in CI with RabbitMQ installed (.ci/run starts it), where that
is a failure."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from producer import MailEvent, MailProducer
from tests.support.fleet import EventsReader, RedisServer, WorkerProcess
from tests.support.smtp import Rule, TestSmtpServer
from worker.outcomes import EVENTS_QUEUE

AMQP_URL = os.environ.get("MAILSENDER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def require_rabbitmq() -> None:
    """Skip when RabbitMQ does not answer, except in CI with RabbitMQ installed: a failure."""
    if not _rabbitmq_answers():
        if os.environ.get("CI") and shutil.which("rabbitmq-server"):
            pytest.fail("RabbitMQ is installed but does not answer on 127.0.0.1:5672")
        pytest.skip("RabbitMQ does not answer on 127.0.0.1:5672")


@pytest.fixture
def amqp_fleet(tmp_path: Path) -> Iterator[tuple[MailProducer, TestSmtpServer, EventsReader]]:
    require_rabbitmq()
    with Connection(AMQP_URL) as conn:  # leftovers of an earlier run
        channel = conn.default_channel
        EVENTS_QUEUE(channel).declare()
        EVENTS_QUEUE(channel).purge()
    redis_server = RedisServer(tmp_path / "redis").start()
    smtp = TestSmtpServer()
    smtp.start()
    config = {
        "broker_url": AMQP_URL,
        "result_backend": redis_server.url(1),
        "instances": {
            "Rabbit": {
                "mailServer": "127.0.0.1",
                "port": smtp.port,
                "sender": "noreply@example.com",
                "retryDelayS": 0.3,
                "retryDelayMaxS": 1.0,
                "maxRetries": 3,
            },
        },
    }
    worker = WorkerProcess(tmp_path, config, name="amqp", concurrency=2).start()
    producer = MailProducer(AMQP_URL, redis_server.url(1))
    try:
        yield producer, smtp, EventsReader(AMQP_URL)
    finally:
        worker.stop()
        producer.close()
        smtp.stop()
        redis_server.stop()


def test_rabbitmq_broker_delivers_retries_and_publishes_events(
    amqp_fleet: tuple[MailProducer, TestSmtpServer, EventsReader],
) -> None:
    producer, smtp, events = amqp_fleet
    smtp.add_rule(Rule("rcpt", "550 5.1.1 User unknown", times=None, match="gone@example.com"))
    smtp.add_rule(Rule("data", "451 4.7.1 Greylisted, retry later", times=1))
    single = producer.send(
        MailEvent(instance="Rabbit", subject="one", message="x", recipients="one@example.com")
    )
    batch = producer.send_many(
        [
            MailEvent(
                instance="Rabbit", subject=f"many {i}", message="x", recipients=f"m{i}@example.com"
            )
            for i in range(10)
        ]
    )
    refused = producer.send(
        MailEvent(instance="Rabbit", subject="gone", message="x", recipients="gone@example.com")
    )
    outcomes = [r.wait(timeout_s=30) for r in [single, *batch]]
    assert all(t.success for t in outcomes)
    assert sum(t.attempts for t in outcomes) == 12  # one of them was greylisted once
    failed = refused.wait(timeout_s=30)
    assert failed.success is False and "550 5.1.1" in failed.refused["gone@example.com"]
    assert events.wait_for(single.event_id)["name"] == "Rabbit.Done"
    assert events.wait_for(refused.event_id)["name"] == "Rabbit.Failed"
    for receipt in batch:
        assert events.wait_for(receipt.event_id)["transaction"]["success"] is True
    time.sleep(0.5)
    assert {m.rcpt_tos[0] for m in smtp.received} == {
        "one@example.com",
        *(f"m{i}@example.com" for i in range(10)),
    }
    assert len(smtp.received) == 11


def test_rabbitmq_worker_sigkilled_mid_run_loses_nothing(tmp_path: Path) -> None:
    """The crash test on RabbitMQ: 200 events, a worker's process group SIGKILLed twice and
    replaced; RabbitMQ hands the unacknowledged messages on at once, and nothing is lost."""
    require_rabbitmq()
    queue = f"mailsender.crash{os.getpid()}"
    redis_server = RedisServer(tmp_path / "redis").start()
    smtp = TestSmtpServer()
    smtp.start()
    smtp.add_rule(Rule("data", "", times=None, delay_s=0.01))  # a relay that takes 10 ms
    config = {
        "broker_url": AMQP_URL,
        "result_backend": redis_server.url(1),
        "send_lock_lease_s": 3,
        "instances": {
            "Crash": {
                "mailServer": "127.0.0.1",
                "port": smtp.port,
                "sender": "noreply@example.com",
                "queue": queue,
                "timeoutS": 5,
            },
        },
    }

    def start(name: str) -> WorkerProcess:
        return WorkerProcess(
            tmp_path, config, name=name, pool="prefork", concurrency=2, extra_args=["-Q", queue]
        ).start()

    workers = [start("a"), start("b")]
    producer = MailProducer(AMQP_URL, redis_server.url(1), queue=queue)
    try:
        receipts = producer.send_many(
            [
                MailEvent(
                    instance="Crash", subject=f"c{i}", message="x", recipients=f"c{i}@example.com"
                )
                for i in range(200)
            ],
            batch_size=10,
        )
        for round_ in range(2):
            time.sleep(0.5)
            workers[round_].kill()
            workers[round_] = start(f"r{round_}")
        outcomes = [r.wait(timeout_s=60) for r in receipts]
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
        with Connection(AMQP_URL) as conn:
            conn.default_channel.queue_delete(queue)
        smtp.stop()
        redis_server.stop()
    assert all(t.success for t in outcomes)
    copies = Counter(str(m.message()["Message-ID"]) for m in smtp.received)
    assert {f"<{r.event_id}@example.com>" for r in receipts} <= set(copies)
    # Only a mail whose 250 the killed worker never recorded is sent again: at most one per
    # conversation in flight (2 processes x maxConnections 8) per kill.
    assert sum(n - 1 for n in copies.values()) <= 2 * 16


def test_producers_made_and_closed_per_request_do_not_pile_up_rabbitmq_connections() -> None:
    """kombu keeps one connection pool per broker URL and process; a producer made and closed
    per request reuses it instead of leaving a connection open each time."""
    require_rabbitmq()
    import gc

    import amqp

    def open_connections() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, amqp.Connection) and o.connected)

    queue = f"mailsender.close{os.getpid()}"
    event = MailEvent(instance="X", subject="s", message="m", recipients="a@example.com")
    counts = []
    for _ in range(5):
        producer = MailProducer(AMQP_URL, "redis://127.0.0.1:1/0", queue=queue)
        producer.app.send_task(
            "mailsender.send", kwargs={"event": event.to_json()}, queue=queue, ignore_result=True
        )
        producer.close()
        counts.append(open_connections())
    with Connection(AMQP_URL) as conn:
        conn.default_channel.queue_delete(queue)
    assert counts[0] >= 1
    assert counts == [counts[0]] * 5, counts
