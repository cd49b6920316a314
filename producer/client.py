"""Enqueueing mail events and reading their outcomes, by task *name* only.

The producer never imports the worker: it talks to the broker with a client-only Celery app
that knows the task name ``mailsender.send``, JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from producer import names
from producer.errors import (
    BROKER_REFUSALS,
    EnqueueFailed,
    InvalidEvent,
    MailDeliveryFailed,
    ProducerConfigError,
)
from producer.models import BLOB_KEY_PREFIX, Attachment, MailEvent, Transaction

PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 5,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}
"""How long ``send`` keeps trying to reach the broker before it raises ``EnqueueFailed``."""

ROUTES_TTL_S = 30.0
"""How long a producer trusts the instance → queue table it read."""

DEFAULT_BATCH_SIZE = 50
"""Events per broker message in ``send_many``."""

DEFAULT_INLINE_LIMIT_BYTES = 1_000_000
"""Inline attachments larger than this (decoded) travel by reference: see ``MailProducer``."""

DEFAULT_BLOB_TTL_S = 7 * 24 * 3600.0
"""How long an attachment sent by reference is kept for its event (and a replay of it)."""


def summary_of(event: MailEvent) -> str:
    """A redacted one-line summary of an event for Flower: no body, no attachment content."""
    return (
        f"{{'instance': {event.instance!r}, 'eventId': {event.event_id!r}, "
        f"'subject': {event.subject[:80]!r}, 'recipients': {len(event.recipients)}, "
        f"'cc': {len(event.cc)}, 'bcc': {len(event.bcc)}, "
        f"'attachments': {len(event.attachments)}}}"
    )


def batch_summary_of(events: list[MailEvent]) -> str:
    """A redacted summary of a batch for Flower."""
    instances = sorted({e.instance for e in events})
    ids = [e.event_id for e in events[:3]]
    return f"{{'events': {len(events)}, 'instances': {instances!r}, 'eventIds': {ids!r}...}}"


def make_client_app(broker_url: str, result_backend: str) -> Celery:
    """A Celery app that only sends tasks by name and reads results; JSON only."""
    app = Celery("mailsender-producer", broker=broker_url, backend=result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=names.DEFAULT_QUEUE,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
    )
    return app


@dataclass(frozen=True)
class Receipt:
    """What ``send`` returns: the event's id, and a way to wait for its transaction."""

    event_id: str
    _app: Celery

    def wait(self, timeout_s: float) -> Transaction:
        """Wait for the final outcome and return its transaction, success or failure.

        Raises ``TimeoutError`` when there is no final outcome within ``timeout_s`` seconds.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        result = AsyncResult(self.event_id, app=self._app)
        try:
            value = result.get(timeout=timeout_s, propagate=False, interval=0.05)
        except CeleryTimeoutError:
            raise TimeoutError(
                f"no outcome for event {self.event_id} within {timeout_s:g} s"
            ) from None
        finally:
            # Unsubscribe now: left to AsyncResult.__del__, it may run at interpreter exit
            # and print an "Exception ignored" traceback.
            with contextlib.suppress(Exception):
                self._app.backend.remove_pending_result(result)
            result.backend = None
        if isinstance(value, MailDeliveryFailed):
            return value.transaction
        if isinstance(value, BaseException):
            raise MailDeliveryFailed(
                f"event {self.event_id} ended with an unexpected error: {value}"
            ) from value
        return Transaction.model_validate(value)

    @property
    def state(self) -> str:
        """The Celery task state: PENDING, RECEIVED, STARTED, RETRY, SUCCESS or FAILURE."""
        return str(AsyncResult(self.event_id, app=self._app).state)


class MailProducer:
    """Enqueues mail events for the MailSender workers.

    ``broker_url`` defaults to env ``MAILSENDER_BROKER_URL``, else ``redis://localhost:6379/0``;
    ``result_backend`` to env ``MAILSENDER_RESULT_BACKEND``, else the broker URL.

    An inline attachment larger than ``inline_limit_bytes`` (decoded; 0 = never) is stored in
    the result backend's Redis under ``mailsender:blob:<id>`` for ``blob_ttl_s`` and the event
    carries that key instead (``{"filename", "blob", "contentType"}``): the broker, the
    worker's main process and the pending note then move a small message, and the worker
    reads the bytes once, when it builds the mail. The blob is deleted once the mail is sent.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        result_backend: str | None = None,
        *,
        queue: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        inline_limit_bytes: int = DEFAULT_INLINE_LIMIT_BYTES,
        blob_ttl_s: float = DEFAULT_BLOB_TTL_S,
    ) -> None:
        # None means "the default"; an empty URL given on purpose is a mistake, not a default.
        self.broker_url = _url_or_default(
            "broker_url", broker_url, names.ENV_BROKER_URL, names.DEFAULT_BROKER_URL
        )
        self.result_backend = _url_or_default(
            "result_backend",
            result_backend,
            names.ENV_RESULT_BACKEND,
            self.broker_url,
            "the broker URL",
        )
        _check_url("broker", self.broker_url, names.BROKER_SCHEMES)
        _check_url("result backend", self.result_backend, names.BACKEND_SCHEMES)
        self.queue = queue
        self.batch_size = check_batch_size(batch_size)
        self.inline_limit_bytes = inline_limit_bytes
        self.blob_ttl_s = blob_ttl_s
        self.app = make_client_app(self.broker_url, self.result_backend)
        self._client: redis.Redis | None = None
        self._routes: dict[str, str] = {}
        self._routes_read_at = -ROUTES_TTL_S

    def queue_for(self, instance: str) -> str:
        """The queue for ``instance``: the one given to the producer, else the instance's own
        queue as the workers published it (``mailsender:routes``), else ``mailsender``."""
        if self.queue:
            return self.queue
        now = time.monotonic()
        if now - self._routes_read_at > ROUTES_TTL_S:
            self._routes_read_at = now
            self._routes = self._read_routes()
        return self._routes.get(instance, names.DEFAULT_QUEUE)

    def _read_routes(self) -> dict[str, str]:
        client = self._redis()
        if client is None:
            return {}
        try:
            routes = cast(dict[bytes, bytes], client.hgetall(names.ROUTES_KEY))
            return {k.decode(): v.decode() for k, v in routes.items()}
        except redis.RedisError:
            return {}  # workers forward misrouted events to their instance's queue

    def send(self, event: MailEvent | dict[str, Any]) -> Receipt:
        """Validate and enqueue one event.

        Raises ``InvalidEvent`` (nothing enqueued) naming the bad field, or ``EnqueueFailed``
        when the broker cannot be reached within the publish retry policy.
        """
        return self.send_many([event])[0]

    def send_many(
        self,
        events: Iterable[MailEvent | dict[str, Any]],
        *,
        batch_size: int | None = None,
    ) -> list[Receipt]:
        """Validate every event first, then enqueue them all over one broker connection.

        Events travel ``batch_size`` (default ``MailProducer.batch_size``) to a broker message
        (task ``mailsender.send_batch``); each keeps its own id, result and instance event.
        If any event is invalid, none is enqueued.

        Raises ``ProducerConfigError`` when ``batch_size`` is not a positive integer,
        ``InvalidEvent`` naming every bad event, or ``EnqueueFailed``.
        """
        size = self.batch_size if batch_size is None else check_batch_size(batch_size)
        items = list(events)
        parsed: list[MailEvent] = []
        problems: list[str] = []
        for number, item in enumerate(items, start=1):
            try:
                parsed.append(MailEvent.parse(item))
            except InvalidEvent as exc:
                if len(items) == 1:
                    raise
                problems.append(f"event {number} of {len(items)}: {exc}")
        if problems:
            raise InvalidEvent("; ".join(problems))
        parsed, blobs = self._by_reference(parsed)
        by_queue: dict[str, list[MailEvent]] = {}
        for event in parsed:
            by_queue.setdefault(self.queue_for(event.instance), []).append(event)
        chunks = [
            (queue, group[start : start + size])
            for queue, group in by_queue.items()
            for start in range(0, len(group), size)
        ]
        self._store_blobs(blobs)
        self._note_pending(chunks)
        enqueued = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for queue, chunk in chunks:
                    if len(chunk) == 1:
                        self._publish_one(chunk[0], queue, producer)
                    else:
                        self.app.send_task(
                            names.TASK_BATCH_NAME,
                            kwargs={"events": [e.to_json() for e in chunk]},
                            task_id=str(uuid.uuid4()),
                            queue=queue,
                            producer=producer,
                            kwargsrepr=batch_summary_of(chunk),
                            argsrepr="()",
                            retry=True,
                            retry_policy=PUBLISH_RETRY_POLICY,
                            ignore_result=True,
                        )
                    enqueued += len(chunk)
        except (OperationalError, *BROKER_REFUSALS) as exc:
            self._forget_pending([e for _, chunk in chunks for e in chunk][enqueued:])
            if not enqueued:
                self._forget_blobs(list(blobs))
            raise EnqueueFailed(
                f"could not enqueue to the broker at {redact_url(self.broker_url)} "
                f"({enqueued} of {len(parsed)} enqueued): {exc}"
            ) from exc
        return [Receipt(e.event_id, self.app) for e in parsed]

    def _redis(self) -> redis.Redis | None:
        """The result backend's Redis, one client (and connection pool) per producer."""
        if not self.result_backend.startswith(("redis://", "rediss://", "unix://")):
            return None
        if self._client is None:
            self._client = redis.Redis.from_url(self.result_backend, socket_connect_timeout=5)
        return self._client

    def _by_reference(self, events: list[MailEvent]) -> tuple[list[MailEvent], dict[str, bytes]]:
        """The events with every large inline attachment replaced by a blob key, and the blobs
        to store (none without a Redis result backend or with ``inline_limit_bytes`` 0)."""
        if self.inline_limit_bytes <= 0 or self._redis() is None:
            return events, {}
        blobs: dict[str, bytes] = {}
        out: list[MailEvent] = []
        for event in events:
            attachments: list[Attachment] = []
            for attachment in event.attachments:
                if (
                    attachment.content is None
                    or len(attachment.content) * 3 // 4 <= self.inline_limit_bytes
                ):
                    attachments.append(attachment)
                    continue
                key = f"{BLOB_KEY_PREFIX}{uuid.uuid4().hex}"
                blobs[key] = attachment.decoded()
                attachments.append(
                    Attachment(
                        filename=attachment.filename,
                        content_type=attachment.content_type,
                        blob=key,
                    )
                )
            changed = any(a.blob for a in attachments)
            out.append(event.model_copy(update={"attachments": attachments}) if changed else event)
        return out, blobs

    def _store_blobs(self, blobs: dict[str, bytes]) -> None:
        client = self._redis()
        if client is None or not blobs:
            return
        try:
            with client.pipeline(transaction=False) as pipe:
                for key, data in blobs.items():
                    pipe.set(key, data, ex=max(1, int(self.blob_ttl_s)))
                pipe.execute()
        except redis.RedisError as exc:
            raise EnqueueFailed(
                f"could not enqueue: the result backend at {redact_url(self.result_backend)} "
                f"cannot store the large attachments ({exc}); nothing was enqueued"
            ) from exc

    def _forget_blobs(self, keys: list[str]) -> None:
        client = self._redis()
        if client is None or not keys:
            return
        with contextlib.suppress(redis.RedisError):
            client.unlink(*keys)

    def _note_pending(self, chunks: list[tuple[str, list[MailEvent]]]) -> None:
        """Note each event as enqueued-not-started, so that workers can re-enqueue it should
        its broker message get lost; one round trip for the whole call."""
        client = self._redis()
        if client is None:
            return
        now_ms = int(time.time() * 1000)
        try:
            with client.pipeline(transaction=False) as pipe:
                for _, chunk in chunks:
                    for event in chunk:
                        pipe.hset(names.PENDING_KEY, event.event_id, json.dumps(event.to_json()))
                        pipe.zadd(names.PENDING_INDEX_KEY, {event.event_id: now_ms})
                pipe.execute()
        except redis.RedisError as exc:
            raise EnqueueFailed(
                f"could not enqueue: the result backend at {redact_url(self.result_backend)} "
                f"cannot be reached ({exc}); nothing was enqueued"
            ) from exc

    def _forget_pending(self, events: list[MailEvent]) -> None:
        client = self._redis()
        if client is None or not events:
            return
        try:
            with client.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.hdel(names.PENDING_KEY, event.event_id)
                    pipe.zrem(names.PENDING_INDEX_KEY, event.event_id)
                pipe.execute()
        except redis.RedisError:
            pass  # best effort: the broker is away too

    def _publish_one(self, event: MailEvent, queue: str, producer: Any) -> None:
        self.app.send_task(
            names.TASK_NAME,
            kwargs={"event": event.to_json()},
            task_id=event.event_id,
            queue=queue,
            producer=producer,
            kwargsrepr=summary_of(event),
            argsrepr="()",
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
            # Do not subscribe to the result at send time: ``Receipt.wait`` does that, and
            # sending must not depend on the result backend.
            ignore_result=True,
        )

    def receipt(self, event_id: str) -> Receipt:
        """A receipt for an event enqueued earlier (to wait for its outcome)."""
        return Receipt(event_id, self.app)

    def close(self) -> None:
        """Release the broker and result backend connections."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self.app.close()

    def __enter__(self) -> MailProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch_size(batch_size: object) -> int:
    """Return ``batch_size`` if it is a positive integer (not a bool); raise
    ``ProducerConfigError`` naming it otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ProducerConfigError(
            f"batch_size must be a positive integer (events per broker message), "
            f"not {type(batch_size).__name__} {batch_size!r}"
        )
    if batch_size < 1:
        raise ProducerConfigError(
            f"batch_size must be a positive integer (events per broker message), not {batch_size}"
        )
    return batch_size


def _from_env(variable: str) -> str | None:
    """The environment variable's value; unset when empty or blank (as the worker takes it)."""
    value = os.environ.get(variable, "")
    return value if value.strip() else None


def _url_or_default(
    argument: str, given: object, variable: str, fallback: str, fallback_text: str = ""
) -> str:
    """The URL given for ``argument``, or for ``None`` env ``variable``, else ``fallback``."""
    if given is None:
        return _from_env(variable) or fallback
    return _given_url(argument, given, f"env {variable}, else {fallback_text or fallback}")


def _given_url(argument: str, url: object, default: str) -> str:
    """``url`` as given for ``argument``; raise ``ProducerConfigError`` if it is not a string
    or is blank (``None``, not an empty string, asks for the default)."""
    if not isinstance(url, str):
        raise ProducerConfigError(
            f"{argument} must be a URL string, or None for the default, not {type(url).__name__}"
        )
    if not url.strip():
        raise ProducerConfigError(
            f"{argument} is empty: give a URL such as {names.DEFAULT_BROKER_URL!r}, or None "
            f"for the default ({default})"
        )
    return url


def _check_url(what: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ProducerConfigError(
            f"the {what} URL {redact_url(url)!r} is not of a supported kind ({allowed})"
        )


def redact_url(url: str) -> str:
    """A URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"
