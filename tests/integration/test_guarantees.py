"""Delivery guarantees under faults, with real processes that are killed and restarted.

Each test here runs its own redis-server, SMTP server and worker processes, because it
breaks them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import EnqueueFailed, MailEvent, MailProducer, Transaction
from tests.support.fleet import RedisServer, WorkerProcess, free_port
from tests.support.smtp import Rule, TestSmtpServer


def config_for(redis_server: RedisServer, smtp: TestSmtpServer, **params: Any) -> dict[str, Any]:
    top = {
        "send_lock_lease_s": 6,  # a killed worker's events wait at most this long
        **{
            k: params.pop(k)
            for k in list(params)
            if k in {"visibility_timeout_s", "send_lock_lease_s"}
        },
    }
    return {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        **top,
        "instances": {
            "Crash": {
                "mailServer": "127.0.0.1",
                "port": smtp.port,
                "sender": "noreply@example.com",
                "retryDelayS": 0.3,
                "retryDelayMaxS": 1.0,
                "maxRetries": 5,
                "timeoutS": 2,
                **params,
            }
        },
    }


def send_through_a_redis_outage(
    own_redis: RedisServer,
    smtp: TestSmtpServer,
    *,
    events: int,
    batch_size: int,
    in_flight: int,
    outage_s: float,
    wait_s: float,
) -> list[Transaction]:
    """Send ``events`` to the Crash instance, stop Redis once ``in_flight`` SMTP transactions
    have begun, start it again after ``outage_s`` and wait for every outcome."""
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    try:
        receipts = producer.send_many(
            [
                MailEvent(
                    instance="Crash", subject=f"outage {i}", message="x", recipients=f"o{i}@x.org"
                )
                for i in range(events)
            ],
            batch_size=batch_size,
        )
        assert smtp.wait_for(lambda s: s.transactions >= in_flight, timeout_s=10)
        own_redis.stop()
        time.sleep(outage_s)
        own_redis.start()
        return [r.wait(timeout_s=wait_s) for r in receipts]
    finally:
        producer.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def smtp() -> Iterator[TestSmtpServer]:
    with TestSmtpServer() as server:
        yield server


def copies_by_message_id(server: TestSmtpServer) -> Counter[str]:
    return Counter(str(m.message()["Message-ID"]) for m in server.received)


def wait_all(producer: MailProducer, ids: list[str], timeout_s: float) -> dict[str, bool]:
    outcomes: dict[str, bool] = {}
    deadline = time.monotonic() + timeout_s
    for event_id in ids:
        left = max(0.1, deadline - time.monotonic())
        outcomes[event_id] = producer.receipt(event_id).wait(left).success
    return outcomes


@pytest.mark.slow
def test_crash_500_events_sigkill_workers_nothing_lost(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    """500 events; worker process groups SIGKILLed four times mid-run and replaced."""
    smtp.add_rule(Rule("data", "", times=None, delay_s=0.01))  # a relay that takes 10 ms
    config = config_for(own_redis, smtp, visibility_timeout_s=3)
    workers = [
        WorkerProcess(tmp_path, config, name=f"w{i}", pool="prefork", concurrency=2).start()
        for i in range(2)
    ]
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    events = [
        MailEvent(
            instance="Crash", subject=f"crash {i}", message="x", recipients=f"r{i}@example.com"
        )
        for i in range(500)
    ]
    ids = [r.event_id for r in producer.send_many(events)]
    kills = 0
    try:
        for round_ in range(4):
            time.sleep(0.7)
            victim = workers[round_ % 2]
            victim.kill()
            kills += 1
            workers[round_ % 2] = WorkerProcess(
                tmp_path,
                config,
                name=f"w{round_ % 2}-r{round_}",
                pool="prefork",
                concurrency=2,
            ).start(wait=False)
        outcomes = wait_all(producer, ids, timeout_s=120)
    finally:
        for worker in workers:
            worker.stop()
        producer.close()

    assert all(outcomes.values()), "every event ends in success"
    copies = copies_by_message_id(smtp)
    lost = [i for i in ids if copies[f"<{i}@example.com>"] == 0]
    duplicates = sum(n - 1 for n in copies.values() if n > 1)
    print(f"crash test: 500 enqueued, {kills} kills, lost {len(lost)}, duplicates {duplicates}")
    assert lost == []
    # Only the window between the server taking the mail and the worker recording its 250 can
    # double a mail: at most one per SMTP conversation in flight when a worker is killed
    # (2 processes x maxConnections 8 per worker). The sink takes 10 ms to answer DATA, so a
    # kill finds most conversations inside that window. Every copy has the same Message-ID.
    assert duplicates <= kills * 2 * 8


def test_a_killed_workers_event_is_handed_on_soon_after_the_visibility_timeout(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    """kombu's Redis transport scans for abandoned messages only every ~100 s by default;
    workers make it scan every visibility_timeout_s / 5, so a killed worker's event is sent by
    another one within about 1.2 x the visibility timeout (and the send lock's lease)."""
    smtp.add_rule(Rule("rcpt", "", times=1, delay_s=30))  # the first worker hangs at RCPT
    config = config_for(own_redis, smtp, visibility_timeout_s=4, send_lock_lease_s=3)
    first = WorkerProcess(tmp_path, config, name="first", pool="prefork", concurrency=1).start()
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    try:
        receipt = producer.send(
            MailEvent(
                instance="Crash", subject="handed on", message="x", recipients="h@example.com"
            )
        )
        assert smtp.wait_for(lambda s: s.transactions >= 1, timeout_s=10)  # it is mid-send
        first.kill()
        killed_at = time.monotonic()
        second = WorkerProcess(
            tmp_path, config, name="second", pool="prefork", concurrency=1
        ).start()
        try:
            tx = receipt.wait(timeout_s=40)
            handed_on_s = time.monotonic() - killed_at
        finally:
            second.stop()
    finally:
        producer.close()
    assert tx.success is True
    assert smtp.accepted_count("h@example.com") == 1
    # Visibility 4 s, scans every 1 s, lease 3 s: well under kombu's default of ~100 s.
    assert handed_on_s < 15, f"handed on after {handed_on_s:.1f} s"


def test_backoff_longer_than_visibility_timeout_is_not_sent_twice(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    smtp.add_rule(Rule("data", "451 4.7.1 Greylisted, retry later", times=1))
    config = config_for(own_redis, smtp, visibility_timeout_s=1, retryDelayS=4, retryDelayMaxS=4)
    workers = [
        WorkerProcess(tmp_path, config, name=f"w{i}", concurrency=2).start() for i in range(2)
    ]
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    try:
        receipt = producer.send(
            MailEvent(
                instance="Crash", subject="slow retry", message="x", recipients="a@example.com"
            )
        )
        tx = receipt.wait(timeout_s=30)
        time.sleep(3.5)  # three visibility timeouts: a restored message would run again
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    assert tx.success is True
    assert tx.attempts == 2
    assert smtp.accepted_count("a@example.com") == 1
    assert smtp.transactions == 2


def test_redis_restart_with_aof_loses_nothing(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    config = config_for(own_redis, smtp)
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    first = producer.send_many(
        [
            MailEvent(
                instance="Crash", subject=f"before {i}", message="x", recipients=f"b{i}@example.com"
            )
            for i in range(20)
        ]
    )
    # Queued while no worker runs, then Redis restarts: AOF keeps them.
    own_redis.stop()
    own_redis.start()
    worker = WorkerProcess(tmp_path, config, name="w", concurrency=2).start()
    try:
        assert all(wait_all(producer, [r.event_id for r in first], 30).values())
        # Now restart Redis under a running worker; it must carry on.
        own_redis.stop()
        time.sleep(1)
        own_redis.start()
        second = producer.send_many(
            [
                MailEvent(
                    instance="Crash",
                    subject=f"after {i}",
                    message="x",
                    recipients=f"a{i}@example.com",
                )
                for i in range(20)
            ]
        )
        assert all(wait_all(producer, [r.event_id for r in second], 60).values())
    finally:
        worker.stop()
        producer.close()
    copies = copies_by_message_id(smtp)
    assert len(copies) == 40
    assert set(copies.values()) == {1}


def test_smtp_outage_events_wait_and_are_delivered_when_it_returns(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    port = free_port()
    config = config_for(
        own_redis, TestSmtpServer(port=port), maxRetries=8, retryDelayS=0.5, retryDelayMaxS=1.0
    )
    worker = WorkerProcess(tmp_path, config, name="w", concurrency=2).start()
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    try:
        receipts = producer.send_many(
            [
                MailEvent(
                    instance="Crash",
                    subject=f"outage {i}",
                    message="x",
                    recipients=f"o{i}@example.com",
                )
                for i in range(10)
            ]
        )
        time.sleep(2.5)  # the server is down: every event is failing and waiting
        assert {r.state for r in receipts} == {"RETRY"}
        with TestSmtpServer(port=port) as smtp:
            outcomes = [r.wait(timeout_s=30) for r in receipts]
            copies = copies_by_message_id(smtp)
    finally:
        worker.stop()
        producer.close()
    assert all(t.success for t in outcomes)
    assert all(t.attempts >= 2 for t in outcomes)
    assert len(copies) == 10 and set(copies.values()) == {1}


def test_smtp_outage_past_the_retry_window_ends_failed(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    config = config_for(
        own_redis,
        TestSmtpServer(port=free_port()),
        maxRetries=2,
        retryDelayS=0.2,
        retryDelayMaxS=0.2,
    )
    worker = WorkerProcess(tmp_path, config, name="w", concurrency=2).start()
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    try:
        tx = producer.send(
            MailEvent(instance="Crash", subject="never", message="x", recipients="n@example.com")
        ).wait(timeout_s=30)
    finally:
        worker.stop()
        producer.close()
    assert tx.success is False
    assert tx.attempts == 3
    assert "connection refused" in tx.message
    assert "gave up after 3 attempts" in tx.message


def test_sigterm_lets_in_flight_mails_finish(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    smtp.add_rule(Rule("data", "", times=None, delay_s=1.0))  # each mail takes a second
    config = config_for(own_redis, smtp, timeoutS=10)
    worker = WorkerProcess(tmp_path, config, name="w", concurrency=2).start()
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    receipts = producer.send_many(
        [
            MailEvent(
                instance="Crash", subject=f"term {i}", message="x", recipients=f"t{i}@example.com"
            )
            for i in range(6)
        ]
    )
    try:
        assert smtp.wait_for(lambda s: s.transactions >= 2, timeout_s=10)
        assert worker.stop(timeout_s=30) == 0  # warm shutdown: in-flight mails finish
        finished = len(smtp.received)
        assert finished >= 2
        replacement = WorkerProcess(tmp_path, config, name="w2", concurrency=2).start()
        try:
            outcomes = [r.wait(timeout_s=30) for r in receipts]
        finally:
            replacement.stop()
    finally:
        producer.close()
    assert all(t.success for t in outcomes)
    copies = copies_by_message_id(smtp)
    assert len(copies) == 6 and set(copies.values()) == {1}


def test_producer_raises_enqueue_failed_when_redis_is_away(tmp_path: Path) -> None:
    port = free_port()
    producer = MailProducer(f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1")
    started = time.monotonic()
    with pytest.raises(EnqueueFailed) as info:
        producer.send(
            MailEvent(instance="Crash", subject="x", message="y", recipients="a@example.com")
        )
    assert time.monotonic() - started < 30
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "nothing was enqueued" in str(info.value)


def test_same_event_enqueued_concurrently_is_sent_once(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    smtp.add_rule(Rule("data", "", times=None, delay_s=0.5))
    config = config_for(own_redis, smtp, send_lock_lease_s=3)
    workers = [
        WorkerProcess(tmp_path, config, name=f"w{i}", concurrency=2).start() for i in range(2)
    ]
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    event = MailEvent(
        instance="Crash",
        subject="twice",
        message="x",
        recipients="a@example.com",
        event_id="same-event-twice",
    )
    try:
        producer.send_many([event, event, event], batch_size=1)
        tx = producer.receipt(event.event_id).wait(timeout_s=30)
        time.sleep(5)  # the waiting copies look again when the lock (3 s) would run out
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    assert tx.success is True
    assert smtp.accepted_count("a@example.com") == 1
    record = redis.Redis.from_url(own_redis.url(1), decode_responses=True).hgetall(
        "mailsender:event:same-event-twice"
    )
    # The copies that found the lock taken waited (not counted as attempts; their waits share
    # one retry entry per event id) and then found the event final.
    assert int(record["attempts"]) >= 2


def test_a_send_longer_than_the_lock_lease_keeps_its_lock(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    """The send lock is renewed while its worker lives: a copy of the event that comes while
    a slow send (5 s) outlasts the lease (3 s) keeps waiting instead of sending it again."""
    smtp.add_rule(Rule("data", "", times=None, delay_s=5))
    config = config_for(own_redis, smtp, send_lock_lease_s=3, timeoutS=10)
    workers = [
        WorkerProcess(tmp_path, config, name=f"w{i}", concurrency=1).start() for i in range(2)
    ]
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    event = MailEvent(
        instance="Crash", subject="slow", message="x", recipients="slow@example.com",
        event_id="slow-send-lease",
    )  # fmt: skip
    try:
        producer.send_many([event, event], batch_size=1)
        tx = producer.receipt(event.event_id).wait(timeout_s=30)
        time.sleep(3)  # let the waiting copy run once more and find the event final
        logs = "".join(worker.log() for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
        producer.close()
    assert tx.success is True
    assert smtp.accepted_count("slow@example.com") == 1
    # The copy found the lock taken at least twice: at about 2 s and again after the lease
    # would have run out (about 4 s) without the renewal.
    assert logs.count("event slow-send-lease: another worker is sending it now") >= 2


def test_an_event_whose_broker_message_was_lost_is_enqueued_again(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    """kombu's Redis transport takes a message (BRPOP) before it records it as unacked; a
    worker killed in between loses it. Producers note events as pending until a worker starts
    them; workers re-enqueue what stays pending for `lost_message_after_s`."""
    config = config_for(own_redis, smtp)
    config["lost_message_after_s"] = 10
    producer = MailProducer(own_redis.url(0), own_redis.url(1))
    receipt = producer.send(
        MailEvent(instance="Crash", subject="lost", message="x", recipients="lost@example.com")
    )
    broker = redis.Redis.from_url(own_redis.url(0))
    assert broker.delete("mailsender") == 1  # the broker message is gone, as in the crash
    worker = WorkerProcess(tmp_path, config, name="w", concurrency=1).start()
    try:
        tx = receipt.wait(timeout_s=40)
    finally:
        worker.stop()
        producer.close()
    assert tx.success is True
    assert smtp.accepted_count("lost@example.com") == 1
    assert f"event {receipt.event_id}: enqueued but never started; enqueued again" in worker.log()
    backend = redis.Redis.from_url(own_redis.url(1))
    assert backend.hlen("mailsender:pending") == 0


def test_redis_restart_while_mails_are_in_flight_the_worker_survives(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    smtp.add_rule(Rule("data", "", times=None, delay_s=0.7))  # tasks are mid-send at the stop
    config = config_for(own_redis, smtp, timeoutS=10)
    worker = WorkerProcess(tmp_path, config, name="w", pool="prefork", concurrency=2).start()
    try:
        outcomes = send_through_a_redis_outage(
            own_redis, smtp, events=6, batch_size=1, in_flight=2, outage_s=1.5, wait_s=60
        )
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
        log = worker.log()
    finally:
        worker.stop()
    assert all(t.success for t in outcomes)
    copies = copies_by_message_id(smtp)
    assert len(copies) == 6
    assert set(copies.values()) == {1}
    assert "Connection to broker lost" in log  # the worker did see the restart
    assert "In Celery 5.1 we introduced an optional breaking change" not in log  # no noise


@pytest.mark.slow
def test_a_redis_outage_longer_than_the_clients_own_retries_sends_nothing_twice(
    tmp_path: Path, own_redis: RedisServer, smtp: TestSmtpServer
) -> None:
    """Redis away for 20 s while mails are being accepted: the Redis client's own retries
    (about 17 s) give up, but a run keeps trying to record what the server accepted (for most
    of the send lock's lease), so no redelivery sends those mails again."""
    smtp.add_rule(Rule("data", "", times=None, delay_s=0.7))  # sends are in flight at the stop
    config = config_for(own_redis, smtp, timeoutS=10, send_lock_lease_s=90)
    worker = WorkerProcess(tmp_path, config, name="w", pool="prefork", concurrency=2).start()
    try:
        outcomes = send_through_a_redis_outage(
            own_redis, smtp, events=4, batch_size=2, in_flight=1, outage_s=20, wait_s=90
        )
        log = worker.log()
    finally:
        worker.stop()
    assert all(t.success for t in outcomes)
    copies = copies_by_message_id(smtp)
    assert len(copies) == 4
    assert set(copies.values()) == {1}, copies
    assert "still trying to record that" in log


def test_instance_events_not_published_because_the_broker_was_away_come_with_the_next_run(
    redis_server: RedisServer,
) -> None:
    """Mails sent, broker gone at the moment of publishing: the run fails and gives its publish
    claims back; the redelivered run finds the events final, sends nothing again and publishes
    their Done events."""
    from kombu.exceptions import OperationalError

    from tests.support.fleet import EventsReader
    from worker.app import create_app, make_store
    from worker.config import parse_config
    from worker.outcomes import Outcomes
    from worker.service import Deliverer, Final

    with TestSmtpServer() as smtp:
        raw = {
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
            "result_backend": redis_server.url(1),
            "instances": {
                "Plain": {"mailServer": smtp.host, "port": smtp.port, "sender": "n@example.com"}
            },
        }
        ids = [f"publish-lost-{i}-{time.time_ns()}" for i in range(2)]
        items: list[tuple[Any, str]] = [
            ({"instance": "Plain", "eventId": i, "recipients": "a@example.com"}, i) for i in ids
        ]
        away = parse_config(raw, {})
        store = make_store(away)
        quick = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}
        first = Deliverer(away, store, Outcomes(create_app(away), retry_policy=quick))
        with pytest.raises((OperationalError, redis.ConnectionError)):
            first.run_many(items, "mailsender")
        first.close()
        assert len(smtp.received) == 2
        for event_id in ids:
            record = store.get(event_id)
            assert record is not None and record.transaction is not None
            assert record.publish_claim_ms == 0 and not record.finalized

        back = parse_config({**raw, "broker_url": redis_server.url(0)}, {})
        events = EventsReader(redis_server.url(0))
        events.purge()
        second = Deliverer(back, make_store(back), Outcomes(create_app(back)))
        outcomes = second.run_many(items, "mailsender")
        second.close()
        assert all(isinstance(o, Final) and o.transaction.success for o in outcomes)
        for event_id in ids:
            body = events.wait_for(event_id, timeout_s=5)
            assert body["name"] == "Plain.Done"
            assert body["transaction"]["eventId"] == event_id
        assert len(smtp.received) == 2  # nothing sent twice
