"""The worker's Redis transport (``worker.transport``) against a real Redis."""

from __future__ import annotations

import logging

import pytest
import redis
from kombu import Connection, Queue

from tests.support.fleet import RedisServer
from worker.app import _keep_unreadable_queue_items


def test_a_reject_after_the_connection_was_lost_is_given_up_not_fatal(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Celery requeues a task (Reject) from its event loop; if the broker connection dropped
    in between, kombu raised AttributeError there and the worker exited. Now it logs, and the
    message is still in Redis (restored after the visibility timeout)."""
    _keep_unreadable_queue_items()
    url = redis_server.url(7)
    queue = Queue("transport-test", routing_key="transport-test")
    conn = Connection(url)
    with conn.Producer() as producer:
        producer.publish({"n": 1}, routing_key="transport-test", declare=[queue])
    channel = conn.channel()
    message = queue(channel).get(no_ack=False)
    assert message is not None
    assert type(channel).__name__ == "KeepingChannel"
    conn.close()
    channel._pool = None  # as after the reconnect: the old channel has no pool any more
    with caplog.at_level(logging.WARNING, logger="worker.transport"):
        message.reject(requeue=True)  # raised AttributeError before
    assert "lost with the broker connection" in caplog.text
    client = redis.Redis.from_url(url)
    try:
        kept = client.llen("transport-test") + client.hlen("unacked")
        assert kept == 1, "the message is still in Redis"
    finally:
        client.flushdb()
        client.close()
