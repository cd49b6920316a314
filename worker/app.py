"""The Celery app of the worker fleet: ``create_app(config)``, the task, and the retry pump.

The task is a thin shell: it hands the raw event to ``Deliverer.run`` and maps the outcome to
Celery's vocabulary (a result, ``MailDeliveryFailed``, or ``Retry``). Per-process resources
(Redis client, SMTP sessions) are made lazily in the process that uses them, after fork.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, bootsteps, signals
from celery.exceptions import CPendingDeprecationWarning, Reject, Retry
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu import Queue
from kombu.exceptions import OperationalError

from producer import names
from producer.client import summary_of
from producer.errors import InvalidEvent, MailDeliveryDeferred, MailDeliveryFailed
from producer.models import MailEvent
from worker.config import Config
from worker.logs import use_json_logs
from worker.outcomes import Outcomes, declare_events
from worker.service import Deliverer, Final, Outcome
from worker.store import Store, connect

log = logging.getLogger(__name__)

RETRY_POLL_S = 0.2
RETRY_CLAIM_LEASE_S = 30.0
INFRA_BACKOFF_S = 1.0
LOST_SWEEP_EVERY_S = 1.0


@dataclass
class Runtime:
    """What one worker process needs to deliver: built once per process."""

    pid: int
    store: Store
    deliverer: Deliverer


def make_store(config: Config) -> Store:
    """A ``Store`` on the result backend's Redis."""
    return Store(
        connect(config.backend_url),
        blob_client=connect(config.backend_url, decode_responses=False),
        ttl_s=config.idempotency_ttl_s,
        transactions_max=config.transactions_max,
        dead_letter_max=config.dead_letter_max,
    )


def _redacted_summary(raw: Any, event_id: str) -> str:
    try:
        return summary_of(MailEvent.parse(raw))
    except InvalidEvent:
        return f"{{'eventId': {event_id!r}, 'invalid': True}}"


class RetryPump(bootsteps.StartStopStep):  # type: ignore[misc]
    """Moves due retries from the Redis schedule back onto their queue (worker main process)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        app: Celery = worker.app
        config: Config = app.conf.mailsender_config
        try:
            declare_events(app)
        except OperationalError as exc:
            log.error("cannot declare the events queue yet: %s", exc)
        store = make_store(config)
        try:
            store.publish_routes({name: config.queue_of(name) for name in config.instances})
        except redis.RedisError as exc:
            log.error("cannot publish the instance routes yet: %s", exc)
        self._thread = threading.Thread(
            target=self._loop, args=(app, store), name="mailsender-retry-pump", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, app: Celery, store: Store) -> None:
        config: Config = app.conf.mailsender_config
        next_sweep = time.monotonic() + LOST_SWEEP_EVERY_S
        while not self._stop.wait(RETRY_POLL_S):
            try:
                pump_once(app, store)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + LOST_SWEEP_EVERY_S
                    sweep_lost(app, store, config.lost_after_s)
            except Exception as exc:  # keep pumping through Redis or broker outages
                log.warning("retry pump: %s", exc)
                self._stop.wait(INFRA_BACKOFF_S)


def shown_arguments(payload: Any) -> tuple[str, str]:
    """What Flower and Celery's logs show as a task's arguments: a redacted summary of the
    event(s) the message carries (instance, event id, subject), never a body, an address list
    or an attachment. Cheap: no validation, only a few dictionary lookups."""

    def one(raw: Any) -> str:
        if not isinstance(raw, dict):
            return f"<{type(raw).__name__}>"
        fields = {
            "instance": raw.get("instance"),
            "eventId": raw.get("eventId", raw.get("event_id")),
            "subject": raw.get("subject"),
        }
        shown = {k: v[:80] for k, v in fields.items() if isinstance(v, str)}
        return repr({**shown, "redacted": True})

    if not isinstance(payload, list | tuple) or len(payload) < 2:
        return "()", "{'redacted': True}"
    try:
        args, kwargs = payload[0], payload[1]
        if isinstance(kwargs, dict) and isinstance(kwargs.get("events"), list):
            events = kwargs["events"]
            heads = ", ".join(one(raw) for raw in events[:3])
            more = f", ... {len(events) - 3} more" if len(events) > 3 else ""
            return "()", f"{{'events': [{heads}{more}]}}"
        raw = kwargs.get("event") if isinstance(kwargs, dict) else None
        if raw is None and isinstance(args, list | tuple) and args:
            raw = args[0]
        return "()", f"{{'event': {one(raw)}}}"
    except (TypeError, IndexError, KeyError, AttributeError):
        return "()", "{'redacted': True}"


class SafeRequest(Request):  # type: ignore[misc]
    """A task request whose arguments are shown redacted.

    Whatever ``argsrepr``/``kwargsrepr`` a client sent (Celery's own client sends the whole
    keyword arguments, mail body included), the worker replaces them with
    ``shown_arguments``: they go into the task events Flower shows and into Celery's log lines.
    (An ack or a reject that comes after the broker connection was lost is survived one level
    down, in ``worker.transport.KeepingQoS``, whether Celery runs it at once or later on its
    event loop.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shown = shown_arguments(self._payload)  # decoded once by Celery's Request already
        self._argsrepr, self._kwargsrepr = shown
        self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = shown


class KeepingConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, but a message it cannot run is kept as a dead letter, not dropped.

    Celery acknowledges (and so drops) task messages it cannot decode (not JSON, pickle,
    binary garbage), of an unknown format, or with invalid fields. Each of those is first
    recorded as a failed transaction with the raw message (base64) for inspection.
    """

    def _keep(self, message: Any, reason: str) -> None:
        try:
            headers = dict(getattr(message, "headers", None) or {})
            body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
            raw = {
                "rawMessage": base64.b64encode(body[:1_000_000]).decode("ascii"),
                "contentType": getattr(message, "content_type", None),
                "task": str(headers.get("task", "")),
            }
            event_id = str(headers.get("id") or uuid.uuid4())
            config: Config = self.app.conf.mailsender_config
            store = make_store(config)
            Deliverer(config, store, Outcomes(self.app)).fail_internal(raw, event_id, reason)
        except Exception:  # keeping it must never stop the consumer
            log.exception("could not keep a rejected task message")

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, but a message that makes it fail (a body that is JSON but not
        ``[args, kwargs, embed]``, say) is kept and acknowledged instead of stopping the
        worker, which would otherwise meet the same message again after every restart."""
        handler = super().create_task_handler(*args, **kwargs)
        # kombu's Redis transport counts KeyError among its connection errors, but in here a
        # KeyError is a message without a field Celery needs (a task id, say): treating it as
        # a lost connection would restore the message and meet it again, for ever.
        passing = tuple(
            e
            for e in (MemoryError, *self.connection_errors, *self.channel_errors)
            if not issubclass(e, LookupError)
        )

        def on_task_received(message: Any) -> Any:
            headers = getattr(message, "headers", None)
            if isinstance(headers, dict) and "task" in headers and not headers.get("id"):
                # A hand-made message without a task id: one derived from its body, the same
                # on every redelivery (a batch's events are named after it).
                body = message.body if isinstance(message.body, bytes) else str(message.body)
                data = body if isinstance(body, bytes) else body.encode("utf-8", "replace")
                headers["id"] = f"msg-{hashlib.sha256(data).hexdigest()[:32]}"
            try:
                return handler(message)
            except passing:
                raise
            except Exception as exc:
                self._keep(message, f"the task message is malformed ({type(exc).__name__}: {exc})")
                message.ack_log_error(log, self.connection_errors)
                return None

        return on_task_received

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Survive kombu's Redis transport failing to close a connection that is already gone
        (it tries to restore unacked messages through it and raises AttributeError, which
        Celery treats as unrecoverable). Those messages stay unacked in Redis and are restored
        after the visibility timeout; their events are idempotent."""
        try:
            with warnings.catch_warnings():
                # Celery warns on every reconnect that a future default of
                # worker_cancel_long_running_tasks_on_connection_loss will change; we set it
                # (False: a task keeps running, its event is idempotent), so it is only noise.
                warnings.simplefilter("ignore", CPendingDeprecationWarning)
                super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            log.warning("broker connection lost uncleanly (%s); reconnecting", err)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._keep(message, f"the task message cannot be decoded ({exc}); only JSON is accepted")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._keep(message, "the message is not a Celery task message")
        super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._keep(message, f"the task message is invalid: {exc}")
        super().on_invalid_task(body, message, exc)


def enqueue_raw(app: Celery, store: Store, raw: Any, event_id: str, queue: str) -> None:
    """Enqueue a raw event again under its own id (retries, replay, forwarding, lost messages),
    noted as pending first so that a lost broker message is found again; redacted for Flower."""
    store.note_pending([(event_id, raw)])
    try:
        app.send_task(
            names.TASK_NAME,
            kwargs={"event": raw},
            task_id=event_id,
            queue=queue,
            kwargsrepr=_redacted_summary(raw, event_id),
            argsrepr="()",
        )
    except BaseException:
        with contextlib.suppress(redis.RedisError):
            store.forget_pending([event_id])  # not enqueued: the sweep must not send it
        raise


def pump_once(app: Celery, store: Store) -> int:
    """Publish every due retry once; returns how many were published."""
    published = 0
    for due in store.claim_due(RETRY_CLAIM_LEASE_S):
        enqueue_raw(app, store, due.event, due.event_id, due.queue)
        store.confirm_published(due)
        published += 1
    return published


def sweep_lost(app: Celery, store: Store, older_than_s: float) -> int:
    """Re-enqueue events whose broker message was lost; returns how many."""
    config: Config = app.conf.mailsender_config
    lost = store.claim_lost(older_than_s)
    for event_id, raw in lost:
        name = raw.get("instance") if isinstance(raw, dict) else None
        queue = config.queue_of(name) if isinstance(name, str) else names.DEFAULT_QUEUE
        log.warning("event %s: enqueued but never started; enqueued again", event_id)
        enqueue_raw(app, store, raw, event_id, queue)
    return len(lost)


def _keep_unreadable_queue_items() -> None:
    """Make ``redis://``, ``rediss://`` and ``sentinel://`` brokers use the transports of
    ``worker.transport``, which set aside queue items that are not messages instead of
    stopping the worker (kombu resolves broker URL schemes through this table)."""
    from kombu import transport

    ours = {
        "redis": "worker.transport:KeepingTransport",
        "rediss": "worker.transport:KeepingTransport",
        "sentinel": "worker.transport:KeepingSentinelTransport",
    }
    transport.TRANSPORT_ALIASES.update(ours)
    cache = getattr(transport, "_transport_cache", None)
    if isinstance(cache, dict):
        for scheme in ours:
            cache.pop(scheme, None)


def unacked_restore_options(visibility_timeout_s: float) -> dict[str, float]:
    """How often kombu's Redis transport looks for messages whose worker died.

    By default it looks every 10 s, but scans Redis only on every 10th look: a message of a
    killed worker waited up to ~100 s beyond ``visibility_timeout_s``. Here every look scans
    (one ZRANGE), at least every 10 s and five times per visibility timeout, so an event is
    handed to another worker within about 1.2 times ``visibility_timeout_s`` (contract §5).
    The restore mutex of a worker killed while restoring blocks the others for at most 60 s,
    not kombu's 300 s. Other transports ignore these options.
    """
    return {
        "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout_s / 5)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 60,
    }


def create_app(config: Config) -> Celery:
    """The worker's Celery app for ``config``."""
    _keep_unreadable_queue_items()
    app = Celery("mailsender", broker=config.broker_url, backend=config.backend_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=names.DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            **unacked_restore_options(config.visibility_timeout_s),
            **config.broker_transport_options,
            "visibility_timeout": config.visibility_timeout_s,
        },
        result_backend_transport_options={"visibility_timeout": config.visibility_timeout_s},
        worker_hijack_root_logger=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        mailsender_config=config,
        worker_consumer="worker.app:KeepingConsumer",
        task_queues=[Queue(name, routing_key=name) for name in config.queues],
    )
    app.steps["worker"].add(RetryPump)
    if config.log_format == "json":
        use_json_logs()

    state: dict[str, Runtime] = {}
    lock = threading.Lock()

    def runtime() -> Runtime:
        current = state.get("rt")
        if current is None or current.pid != os.getpid():
            with lock:
                current = state.get("rt")
                if current is None or current.pid != os.getpid():
                    store = make_store(config)
                    current = Runtime(os.getpid(), store, Deliverer(config, store, Outcomes(app)))
                    state["rt"] = current
        return current

    def deliver(task: Task, items: list[tuple[Any, str]]) -> list[Outcome]:
        """Run events through the Deliverer, never losing one to an error."""
        request = task.request
        queue = (request.delivery_info or {}).get("routing_key") or names.DEFAULT_QUEUE
        items = forward_misrouted(items, queue)
        if not items:
            return []
        try:
            return runtime().deliverer.run_many(items, queue)
        except (redis.RedisError, OperationalError) as exc:
            # Redis or the broker is away: hand the message back rather than lose it.
            log.warning("task %s: infrastructure unavailable (%s); requeued", request.id, exc)
            time.sleep(INFRA_BACKOFF_S)
            raise Reject(str(exc), requeue=True) from exc
        except Exception as exc:  # a bug must not lose an event: fail it, keep it for replay
            log.exception("task %s: unexpected error", request.id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            return [runtime().deliverer.fail_internal(raw, tid, reason) for raw, tid in items]

    def forward_misrouted(items: list[tuple[Any, str]], queue: str) -> list[tuple[Any, str]]:
        """Events for an instance with its own queue that came on another: move them there."""
        local: list[tuple[Any, str]] = []
        for raw, task_id in items:
            name = raw.get("instance") if isinstance(raw, dict) else None
            target = config.queue_of(name) if isinstance(name, str) else queue
            if target == queue:
                local.append((raw, task_id))
                continue
            event_id = raw.get("eventId") or raw.get("event_id") or task_id
            log.info("event %s: forwarded from queue %s to %s", event_id, queue, target)
            enqueue_raw(app, runtime().store, raw, str(event_id), target)
        return local

    @app.task(  # type: ignore[untyped-decorator]
        name=names.TASK_NAME,
        shared=False,  # only this app runs it: other apps in the process (producers) do not
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Request=SafeRequest,
        throws=(MailDeliveryFailed,),
        typing=False,
    )
    def send(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Deliver one mail event (contract §3: keyword argument ``event``)."""
        raw = kwargs.get("event", args[0] if args else None)
        if isinstance(raw, dict):
            event_id = raw.get("eventId", raw.get("event_id"))
            if isinstance(event_id, str) and event_id and event_id != self.request.id:
                log.warning(
                    "event %s arrived as task %s: its outcome is stored under the event id; "
                    "send events with task id = eventId",
                    event_id,
                    self.request.id,
                )
        outcomes = deliver(self, [(raw, self.request.id)])
        if not outcomes:
            return {"forwarded": True}
        [outcome] = outcomes
        if isinstance(outcome, Final):
            tx = outcome.transaction
            if tx.success:
                return tx.to_json()
            raise MailDeliveryFailed(tx.message, tx.to_json())
        raise Retry(
            outcome.reason,
            exc=MailDeliveryDeferred(outcome.reason, outcome.attempt),
            when=outcome.delay_s,
        )

    @app.task(  # type: ignore[untyped-decorator]
        name=names.TASK_BATCH_NAME,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Request=SafeRequest,
        typing=False,
    )
    def send_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, int]:
        """Deliver several mail events carried by one broker message (keyword ``events``).

        Each event keeps its own id, idempotency record, result, stream entry and instance
        event; an event without ``eventId`` gets ``<task id>-<index>``.
        """
        raws = kwargs.get("events", args[0] if args else None)
        if not isinstance(raws, list):
            raws = [raws]
        items = [(raw, f"{self.request.id}-{i}") for i, raw in enumerate(raws)]
        outcomes = deliver(self, items)
        finals = [o.transaction for o in outcomes if isinstance(o, Final)]
        return {
            "events": len(outcomes),
            "delivered": sum(t.success for t in finals),
            "failed": sum(not t.success for t in finals),
            "deferred": len(outcomes) - len(finals),
        }

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _close_sessions(**_: Any) -> None:
        current = state.get("rt")
        if current is not None and current.pid == os.getpid():
            current.deliverer.close()

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _close_sessions_main(**_: Any) -> None:
        _close_sessions()

    return app
