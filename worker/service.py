"""Delivering one event: idempotency, build, send, record, and the final outcome.

``Deliverer.run`` is what the Celery task calls. It returns ``Final`` (the transaction, already
recorded, stored as the task result, logged and published) or ``Deferred`` (already scheduled
in the retry set). Nothing after the server's 250 can cause a second send: the accepted
recipients are written to the idempotency record right after it, before anything else.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from producer.errors import InvalidEvent
from producer.models import INSTANCE_NAME_PATTERN, MailEvent, Transaction, utc_now
from worker.classify import backoff_s
from worker.config import Config, InstanceConfig
from worker.errors import PermanentError, TransientError
from worker.message import build_message, message_id_for
from worker.outcomes import Outcomes
from worker.smtp import SmtpConnection, with_connection
from worker.store import EventRecord, Store

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_CONNECTION = 100
IDLE_REOPEN_S = 30.0
LOCK_BUSY_DELAY_S = 2.0


@dataclass(frozen=True)
class Final:
    """The event's final outcome."""

    transaction: Transaction


@dataclass(frozen=True)
class Deferred:
    """The event waits for another attempt."""

    reason: str
    delay_s: float
    attempt: int


Outcome = Final | Deferred


class ConnectionPool:
    """SMTP sessions kept open per thread and instance, reused across events."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._local = threading.local()
        self._all: list[SmtpConnection] = []
        self._lock = threading.Lock()

    def get(self, name: str, instance: InstanceConfig) -> SmtpConnection:
        """This thread's session for ``name`` (opened lazily by ``with_connection``)."""
        conns: dict[str, SmtpConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(name)
        if conn is None:
            conn = conns[name] = SmtpConnection(name, instance)
            with self._lock:
                self._all.append(conn)
        elif conn.is_open and (
            conn.messages_sent >= MAX_MESSAGES_PER_CONNECTION
            or time.monotonic() - conn.last_used > IDLE_REOPEN_S
        ):
            conn.close()
        return conn

    def close_all(self) -> None:
        """QUIT every session (on worker shutdown)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _instance_name_of(raw: Any) -> str:
    value = raw.get("instance") if isinstance(raw, dict) else None
    if isinstance(value, str) and re.match(INSTANCE_NAME_PATTERN, value):
        return value
    return "unknown"


def _event_id_of(raw: Any, task_id: str) -> str:
    if isinstance(raw, dict):
        value = raw.get("eventId", raw.get("event_id"))
        if isinstance(value, str) and value:
            return value
    return task_id


class Deliverer:
    """Runs one event through build, send and the outcome bookkeeping."""

    def __init__(self, config: Config, store: Store, outcomes: Outcomes) -> None:
        self.config = config
        self.store = store
        self.outcomes = outcomes
        self.pool = ConnectionPool(config)

    # -- the whole run -----------------------------------------------------------------------

    def run(self, raw: Any, task_id: str, queue: str) -> Outcome:
        """Deliver the raw event (a JSON object) that arrived as task ``task_id``."""
        event_id = _event_id_of(raw, task_id)
        if isinstance(raw, dict) and "eventId" not in raw and "event_id" not in raw:
            raw = {**raw, "eventId": event_id}
        record = self.store.begin(event_id, raw, queue)
        if record.transaction is not None:
            log.info(
                "event %s: already final (attempt %d); not sent again", event_id, record.attempts
            )
            return self._finish(record.transaction, record.event, already=record.finalized)

        instance_name = _instance_name_of(raw)
        try:
            event = MailEvent.parse(raw)
        except InvalidEvent as exc:
            return self._fail(event_id, instance_name, str(exc), record, raw)
        instance = self.config.instances.get(event.instance)
        if instance is None:
            known = ", ".join(sorted(self.config.instances)) or "none"
            return self._fail(
                event_id,
                event.instance,
                f"unknown instance {event.instance!r} (configured: {known})",
                record,
                raw,
            )

        # Longer than one attempt can take (each SMTP step is bounded by timeoutS); a worker
        # killed while holding it delays the event's redelivery by at most this much.
        lease_s = instance.timeout_s * 4 + 10
        token = self.store.acquire(event_id, lease_s)
        if token is None:
            log.info("event %s: another worker is sending it now; checking again later", event_id)
            return self._defer(
                event_id,
                "another worker is sending this event now",
                LOCK_BUSY_DELAY_S,
                record.attempts,
            )
        try:
            return self._attempt(event_id, event, instance, record, raw)
        finally:
            self.store.release(event_id, token)

    def fail_internal(self, raw: Any, task_id: str, reason: str) -> Outcome:
        """Final failure for an event that hit an unexpected error (kept as a dead letter)."""
        event_id = _event_id_of(raw, task_id)
        record = self.store.get(event_id) or EventRecord(attempts=1)
        if record.transaction is not None:
            return self._finish(record.transaction, record.event, already=record.finalized)
        return self._fail(event_id, _instance_name_of(raw), reason, record, raw)

    def _attempt(
        self,
        event_id: str,
        event: MailEvent,
        instance: InstanceConfig,
        record: EventRecord,
        raw: Any,
    ) -> Outcome:
        accepted = list(record.accepted)
        refused = dict(record.refused)
        try:
            built = build_message(event, instance, attachment_root=self.config.attachment_root)
            todo = [r for r in built.recipients if r not in accepted and r not in refused]
            conn = self.pool.get(event.instance, instance)
            sent = with_connection(conn, lambda c: c.send(built, todo))
        except PermanentError as exc:
            log.warning("event %s: attempt %d failed for good: %s", event_id, record.attempts, exc)
            return self._conclude(
                event_id, event, instance, record, raw, accepted, refused, failure=str(exc)
            )
        except TransientError as exc:
            log.info("event %s: attempt %d failed, may retry: %s", event_id, record.attempts, exc)
            if record.attempts <= instance.max_retries:
                return self._defer_backoff(event_id, instance, str(exc), record.attempts)
            return self._conclude(
                event_id,
                event,
                instance,
                record,
                raw,
                accepted,
                refused,
                failure=f"{exc} (gave up after {record.attempts} attempts)",
            )

        message_id = built.message_id
        accepted += sent.accepted
        refused.update(sent.refused)
        if sent.accepted or sent.refused:
            # The server has the mail now: this write comes before anything else can fail.
            self.store.record_progress(event_id, accepted, refused)
        log.info(
            "event %s: attempt %d: %d accepted, %d refused, %d deferred by %s",
            event_id,
            record.attempts,
            len(sent.accepted),
            len(sent.refused),
            len(sent.deferred),
            conn.where,
        )
        if sent.deferred:
            reason = "deferred: " + "; ".join(f"{a}: {r}" for a, r in sent.deferred.items())
            if record.attempts <= instance.max_retries:
                return self._defer_backoff(event_id, instance, reason, record.attempts)
            refused.update(sent.deferred)
        return self._conclude(
            event_id,
            event,
            instance,
            record,
            raw,
            accepted,
            refused,
            message_id=message_id,
            where=conn.where,
        )

    # -- outcomes --------------------------------------------------------------------------

    def _conclude(
        self,
        event_id: str,
        event: MailEvent,
        instance: InstanceConfig,
        record: EventRecord,
        raw: Any,
        accepted: list[str],
        refused: dict[str, str],
        *,
        failure: str = "",
        message_id: str = "",
        where: str = "",
    ) -> Outcome:
        success = bool(accepted)
        if success:
            text = f"sent to {len(accepted)} recipient(s)" + (f" via {where}" if where else "")
            if refused:
                text += "; refused: " + "; ".join(f"{a}: {r}" for a, r in refused.items())
            if failure:
                text += f"; then: {failure}"
        elif failure:
            text = failure
        else:
            text = "every recipient was refused: " + "; ".join(
                f"{a}: {r}" for a, r in refused.items()
            )
        tx = Transaction(
            event_id=event_id,
            instance=event.instance,
            interface=instance.interface or event.instance,
            endpoint=instance.endpoint,
            success=success,
            count=1 if success else 0,
            message=text,
            timestamp=utc_now(),
            message_id=message_id or message_id_for(event_id, instance.sender_address),
            recipients=accepted,
            refused=refused,
            attempts=record.attempts,
        )
        return self._finish(tx, raw)

    def _fail(
        self, event_id: str, instance: str, reason: str, record: EventRecord, raw: Any
    ) -> Outcome:
        inst = self.config.instances.get(instance)
        tx = Transaction(
            event_id=event_id,
            instance=instance,
            interface=(inst.interface if inst else "") or instance,
            endpoint=inst.endpoint if inst else "",
            success=False,
            count=0,
            message=reason,
            timestamp=utc_now(),
            attempts=record.attempts,
        )
        log.warning("event %s: cannot be sent: %s", event_id, reason)
        return self._finish(tx, raw)

    def _finish(self, tx: Transaction, raw: Any, *, already: bool = False) -> Final:
        """Record, store the result, log and publish; each step safe to repeat."""
        self.store.record_final(tx)
        if tx.success:
            self.outcomes.store_success(tx)
        else:
            self.outcomes.store_failure(tx)
        if not already:
            self.outcomes.publish(tx)
            self.store.log_outcome(tx, raw)
        return Final(tx)

    def _defer_backoff(
        self, event_id: str, instance: InstanceConfig, reason: str, attempt: int
    ) -> Deferred:
        delay = backoff_s(attempt, instance.retry_delay_s, instance.retry_delay_max_s)
        return self._defer(event_id, reason, delay, attempt)

    def _defer(self, event_id: str, reason: str, delay_s: float, attempt: int) -> Deferred:
        due = time.time() + delay_s
        self.store.schedule_retry(event_id, due)
        next_at = datetime.fromtimestamp(due, UTC).isoformat()
        self.outcomes.store_retry(event_id, reason, attempt, next_at)
        return Deferred(reason, delay_s, attempt)
