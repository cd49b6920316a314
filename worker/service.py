"""Delivering events: idempotency, build, send, record, and the final outcome.

``Deliverer.run_many`` is what the Celery tasks call, for one event or a batch. Each event
ends ``Final`` (its transaction recorded, stored as its task result, logged and published) or
``Deferred`` (scheduled in the retry set, task state RETRY). The Redis work around the sends
is pipelined per batch; the sends themselves run concurrently on a per-process thread pool,
at most ``maxConnections`` at once per instance.

Nothing after the server's 250 can cause a second send: the accepted recipients are written
to the idempotency record right after it, before anything else.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from producer.errors import InvalidEvent
from producer.models import (
    EVENT_ID_PATTERN,
    INSTANCE_NAME_PATTERN,
    MailEvent,
    Transaction,
    utc_now,
)
from worker.classify import backoff_s
from worker.config import Config, InstanceConfig
from worker.errors import PermanentError, TransientError
from worker.message import build_message, message_id_for
from worker.outcomes import Outcomes
from worker.smtp import SendOutcome, SmtpConnection, with_connection
from worker.store import EventRecord, FinalWrite, RetryWrite, Store

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_CONNECTION = 100
IDLE_REOPEN_S = 30.0
LOCK_BUSY_DELAY_S = 2.0
LOCK_EXPIRY_MARGIN_S = 0.25
PUBLISH_CLAIM_S = 30.0
MAX_TASK_ID = 500
"""The longest task id an outcome is stored under as it is."""
PROGRESS_PATIENCE = 0.8
"""Share of ``send_lock_lease_s`` for which a run keeps trying to record an accepted mail."""
PROGRESS_CALL_S = 20.0
"""How long one write may take with the Redis client's own retries (``store.connect``)."""


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

    def __init__(self) -> None:
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


class LockKeeper:
    """Renews the send locks this process holds, every third of their lease, until released.

    A lock's lease (``send_lock_lease_s``) is then the longest a killed worker's events wait
    for another worker, while a send that takes longer than the lease (a huge message on a slow
    link, many slow recipients) keeps its lock: no redelivery can send it a second time.
    """

    def __init__(self, store: Store, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._held: dict[str, str] = {}
        self._valid_until: dict[str, float] = {}  # monotonic: the lease as last renewed
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, held: list[tuple[str, str]]) -> None:
        """Keep these (event id, token) locks until ``release``."""
        if not held:
            return
        with self._lock:
            self._held.update(held)
            until = time.monotonic() + self.lease_s
            self._valid_until.update((event_id, until) for event_id, _ in held)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="mailsender-lock-keeper", daemon=True
                )
                self._thread.start()

    def release(self, held: list[tuple[str, str]]) -> None:
        """Stop renewing these (event id, token) locks (given back, or left to expire); a
        newer lock of the same event taken meanwhile by another run is kept."""
        with self._lock:
            for event_id, token in held:
                if self._held.get(event_id) == token:
                    del self._held[event_id]
                    self._valid_until.pop(event_id, None)

    def valid_until(self, event_id: str) -> float | None:
        """Until when (monotonic) this process's lock on ``event_id`` surely holds, or None."""
        with self._lock:
            return self._valid_until.get(event_id)

    def _loop(self) -> None:
        while not self._wake.wait(self.lease_s / 3):
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            asked_at = time.monotonic()
            try:
                self.store.extend_locks(held, self.lease_s)
                with self._lock:
                    for event_id, token in held:
                        if self._held.get(event_id) == token:
                            self._valid_until[event_id] = asked_at + self.lease_s
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("cannot renew %d send lock(s): %s", len(held), exc)

    def close(self) -> None:
        """Stop the renewing thread."""
        self._wake.set()


def _instance_name_of(raw: Any) -> str:
    value = raw.get("instance") if isinstance(raw, dict) else None
    if isinstance(value, str) and re.match(INSTANCE_NAME_PATTERN, value):
        return value
    return "unknown"


def _event_id_of(raw: Any, task_id: str | None) -> str:
    """The id an outcome is stored under: the event's own, if it is a valid one, else the
    task's (what a waiting client holds, whatever its form), else one derived from the event
    itself, so that every redelivery of a hand-made message without ids gets the same one."""
    if isinstance(raw, dict):
        value = raw.get("eventId", raw.get("event_id"))
        if isinstance(value, str) and EVENT_ID_PATTERN.match(value):
            return value
    if (
        isinstance(task_id, str)
        and task_id.strip()
        and task_id.isprintable()
        and len(task_id) <= MAX_TASK_ID
    ):
        return task_id
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=repr).encode()).hexdigest()
    return f"event-{digest[:32]}"


@dataclass
class _Job:
    """One event of a batch on its way through ``run_many``."""

    event_id: str
    raw: Any
    record: EventRecord
    event: MailEvent | None = None
    instance: InstanceConfig | None = None
    token: str | None = None
    lock_left_s: float = 0.0
    outcome: Outcome | None = None
    final: FinalWrite | None = None
    already_published: bool = False
    retry: RetryWrite | None = None


class Deliverer:
    """Runs events through build, send and the outcome bookkeeping."""

    def __init__(self, config: Config, store: Store, outcomes: Outcomes) -> None:
        self.config = config
        self.store = store
        self.outcomes = outcomes
        self.pool = ConnectionPool()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.locks = LockKeeper(store, config.send_lock_lease_s)
        self._slots = {
            name: threading.BoundedSemaphore(inst.max_connections)
            for name, inst in config.instances.items()
        }

    # -- entry points ----------------------------------------------------------------------

    def run(self, raw: Any, task_id: str, queue: str) -> Outcome:
        """Deliver one raw event (a JSON object) that arrived as task ``task_id``."""
        return self.run_many([(raw, task_id)], queue)[0]

    def run_many(self, items: list[tuple[Any, str]], queue: str) -> list[Outcome]:
        """Deliver several raw events; returns one outcome each, in order."""
        jobs = self._begin(items, queue)
        held = [(j.event_id, j.token) for j in jobs if j.token]
        self.locks.hold(held)
        try:
            ready = self._within_rate_limits([j for j in jobs if j.outcome is None])
            sending = self._lock_for_sending(ready)
            self._send_all(sending)
            try:
                self._record(jobs)
            except BaseException:
                self.store.release_many(held)
                raise
        finally:
            self.locks.release(held)
        outcomes: list[Outcome] = []
        for job in jobs:
            assert job.outcome is not None
            outcomes.append(job.outcome)
        return outcomes

    def fail_internal(self, raw: Any, task_id: str, reason: str) -> Outcome:
        """Final failure for an event that hit an unexpected error (kept as a dead letter)."""
        event_id = _event_id_of(raw, task_id)
        record = self.store.get(event_id) or EventRecord(attempts=1)
        job = _Job(event_id, raw, record)
        if record.transaction is not None:
            self._final(job, record.transaction, already=True)
        elif record.accepted:
            # The server has it for some recipients already: a success, never a dead letter
            # (a replay would send it again).
            tx = self._failure(event_id, _instance_name_of(raw), reason, record)
            accepted = list(record.accepted)
            tx = tx.model_copy(
                update={
                    "success": True,
                    "count": 1,
                    "recipients": accepted,
                    "refused": dict(record.refused),
                    "message": f"sent to {len(accepted)} recipient(s); then: {reason}",
                }
            )
            self._final(job, tx)
        else:
            self._final(job, self._failure(event_id, _instance_name_of(raw), reason, record))
        self._record([job])
        assert job.outcome is not None
        return job.outcome

    # -- phases ----------------------------------------------------------------------------

    def _begin(self, items: list[tuple[Any, str]], queue: str) -> list[_Job]:
        prepared: list[tuple[str, Any]] = []
        for raw, task_id in items:
            event_id = _event_id_of(raw, task_id)
            if isinstance(raw, dict) and "eventId" not in raw and "event_id" not in raw:
                raw = {**raw, "eventId": event_id}
            prepared.append((event_id, raw))
        leases = [self.config.send_lock_lease_s] * len(prepared)
        begun = self.store.begin_many(prepared, queue, leases)
        jobs: list[_Job] = []
        for (event_id, raw), start in zip(prepared, begun, strict=True):
            record = start.record
            job = _Job(event_id, raw, record, token=start.token, lock_left_s=start.lock_left_s)
            jobs.append(job)
            if record.transaction is not None:
                log.info(
                    "event %s: already final (attempt %d); not sent again",
                    event_id,
                    record.attempts,
                )
                self._final(job, record.transaction, already=True)
                continue
            try:
                job.event = MailEvent.parse(raw)
            except InvalidEvent as exc:
                self._final(job, self._failure(event_id, _instance_name_of(raw), str(exc), record))
                continue
            job.instance = self.config.instances.get(job.event.instance)
            if job.instance is None:
                known = ", ".join(sorted(self.config.instances)) or "none"
                reason = f"unknown instance {job.event.instance!r} (configured: {known})"
                self._final(job, self._failure(event_id, job.event.instance, reason, record))
        return jobs

    def _within_rate_limits(self, jobs: list[_Job]) -> list[_Job]:
        """Jobs the fleet-wide ``rateLimit`` of their instance allows now; the rest wait."""
        by_instance: dict[str, list[_Job]] = {}
        for job in jobs:
            assert job.event is not None
            by_instance.setdefault(job.event.instance, []).append(job)
        ready: list[_Job] = []
        for name, group in by_instance.items():
            rate = self.config.instances[name].rate
            if rate is None:
                ready += group
                continue
            limit, window_s = rate
            granted = self.store.take_tokens(name, len(group), limit, window_s)
            ready += group[:granted]
            wait_s = window_s - (time.time() % window_s)
            for i, job in enumerate(group[granted:]):
                # Spread the waiting ones over the next window instead of a thundering herd.
                delay = wait_s + window_s * (i % limit) / limit
                self._defer(
                    job, f"rate limit {self.config.instances[name].rate_limit}", delay, counts=False
                )
        return ready

    def _lock_for_sending(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs whose send lock this run holds; the others wait for the lock holder."""
        sending: list[_Job] = []
        for job in jobs:
            if job.token is None:
                # Look again when the holder's lock runs out: by then it has recorded the
                # outcome (this run then finds it final) or it died and left the event to us.
                delay_s = max(LOCK_BUSY_DELAY_S, job.lock_left_s + LOCK_EXPIRY_MARGIN_S)
                log.info(
                    "event %s: another worker is sending it now; looking again in %.1f s",
                    job.event_id,
                    delay_s,
                )
                self._defer(job, "another worker is sending this event now", delay_s, counts=False)
            else:
                sending.append(job)
        return sending

    def _send_all(self, jobs: list[_Job]) -> None:
        if len(jobs) <= 1:
            for job in jobs:
                self._attempt(job)
            return
        executor = self._pool_executor()
        futures = [executor.submit(self._attempt, job) for job in jobs]
        concurrent.futures.wait(futures)  # every send has ended before any error goes up
        for future in futures:
            future.result()

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                size = max((i.max_connections for i in self.config.instances.values()), default=1)
                self._executor = ThreadPoolExecutor(size, thread_name_prefix="mailsender-smtp")
            return self._executor

    def _record(self, jobs: list[_Job]) -> None:
        """Finals in one pipeline, then the instance events, then the published marks."""
        finals = [j.final for j in jobs if j.final is not None]
        self.store.record_finals(finals)
        fresh = [j for j in jobs if j.final is not None and not j.already_published]
        try:
            self.outcomes.publish([j.final.transaction for j in fresh if j.final is not None])
        except BaseException:
            # The redelivery of these events must publish them: give the claims back.
            with contextlib.suppress(Exception):
                self.store.unclaim_publishing([j.event_id for j in fresh])
            raise
        for job in fresh:
            assert job.final is not None
            tx = job.final.transaction
            outcome = "Done" if tx.success else "Failed"
            log.info(
                "event %s: %s.%s after %d attempt(s): %s",
                tx.event_id,
                tx.instance,
                outcome,
                tx.attempts,
                tx.message,
                extra={"event_id": tx.event_id, "instance": tx.instance, "outcome": outcome},
            )
        self.store.mark_published(
            [j.event_id for j in fresh], [(j.event_id, j.token) for j in jobs if j.token]
        )
        # Large attachments sent by reference are not needed once their mail was accepted; a
        # failed event keeps them for replay until they expire.
        self.store.drop_blobs(
            [
                a.blob
                for j in fresh
                if j.event is not None and j.final is not None and j.final.transaction.success
                for a in j.event.attachments
                if a.blob
            ]
        )
        self.store.schedule_retries([j.retry for j in jobs if j.retry is not None])

    # -- one event's attempt (runs on a pool thread) --------------------------------------

    def _attempt(self, job: _Job) -> None:
        event, instance, record = job.event, job.instance, job.record
        assert event is not None and instance is not None
        accepted = list(record.accepted)
        refused = dict(record.refused)
        todo: list[str] = []
        with self._slots[event.instance]:
            try:
                blobs = self.store.blobs([a.blob for a in event.attachments if a.blob])
                built = build_message(
                    event, instance, attachment_root=self.config.attachment_root, blobs=blobs
                )
                del blobs  # the message holds the bytes now; do not keep a second copy
                todo = [r for r in built.recipients if r not in accepted and r not in refused]
                conn = self.pool.get(event.instance, instance)
                where = conn.where
                sent = with_connection(conn, _sender(built, todo)) if todo else None
            except PermanentError as exc:
                log.warning(
                    "event %s: attempt %d failed for good: %s",
                    job.event_id,
                    record.attempts,
                    exc,
                    extra=_fields(job, smtp_code=exc.code),
                )
                self._conclude(
                    job, accepted, refused, failure=str(exc), gave_up=_left(todo, accepted, exc)
                )
                return
            except TransientError as exc:
                log.info(
                    "event %s: attempt %d failed, may retry: %s",
                    job.event_id,
                    record.attempts,
                    exc,
                    extra=_fields(job, smtp_code=exc.code),
                )
                if record.attempts <= instance.max_retries:
                    self._defer_backoff(job, str(exc))
                else:
                    failure = f"{exc} (gave up after {record.attempts} attempts)"
                    self._conclude(
                        job, accepted, refused, failure=failure, gave_up=_left(todo, accepted, exc)
                    )
                return
        deferred: dict[str, str] = {}
        if sent is not None:
            accepted += sent.accepted
            refused.update(sent.refused)
            deferred = sent.deferred
            if sent.accepted or sent.refused:
                # The server has the mail now: this write comes before anything else can fail.
                self._record_progress(job.event_id, accepted, refused)
            log.info(
                "event %s: attempt %d: %d accepted, %d refused, %d deferred by %s",
                job.event_id,
                record.attempts,
                len(sent.accepted),
                len(sent.refused),
                len(sent.deferred),
                where,
                extra=_fields(job, smtp_code=_reply_code(sent)),
            )
        if deferred and record.attempts <= instance.max_retries:
            reason = "deferred: " + "; ".join(f"{a}: {r}" for a, r in deferred.items())
            self._defer_backoff(job, reason)
            return
        self._conclude(
            job, accepted, refused, message_id=built.message_id, where=where, gave_up=deferred
        )

    def _record_progress(self, event_id: str, accepted: list[str], refused: dict[str, str]) -> None:
        """Write what the server accepted, retrying through a Redis outage for most of the
        send lock's lease: a redelivery that finds it unrecorded would send the mail again.
        Only an outage longer than that ends the run (its message is requeued)."""
        deadline = time.monotonic() + self.config.send_lock_lease_s * PROGRESS_PATIENCE
        valid_until = self.locks.valid_until(event_id)
        if valid_until is not None:
            # Never past the lock: once it lapses, a waiting copy may take the event, and it
            # must find the progress written or this run must have given up (and requeued).
            deadline = min(deadline, valid_until - PROGRESS_CALL_S)
        pause_s = 0.5
        while True:
            try:
                self.store.record_progress(event_id, accepted, refused)
                return
            except redis.RedisError as exc:
                if time.monotonic() + pause_s > deadline:
                    raise
                log.warning(
                    "event %s: the server accepted it but Redis is away (%s); still trying to "
                    "record that",
                    event_id,
                    exc,
                )
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, 5.0)

    # -- outcomes --------------------------------------------------------------------------

    def _conclude(
        self,
        job: _Job,
        accepted: list[str],
        refused: dict[str, str],
        *,
        failure: str = "",
        message_id: str = "",
        where: str = "",
        gave_up: dict[str, str] | None = None,
    ) -> None:
        """The final transaction; ``gave_up``: recipients still deferred (4xx) after the last
        attempt, counted as refused."""
        event, instance = job.event, job.instance
        assert event is not None and instance is not None
        success = bool(accepted)
        attempts = job.record.attempts
        late = "; ".join(f"{a}: {r}" for a, r in (gave_up or {}).items())
        refused_now = "; ".join(f"{a}: {r}" for a, r in refused.items())
        refused = {**refused, **(gave_up or {})}
        if success:
            text = f"sent to {len(accepted)} recipient(s)" + (f" via {where}" if where else "")
            if refused_now:
                text += f"; refused: {refused_now}"
            if late:
                text += f"; still deferred, gave up after {attempts} attempts: {late}"
            if failure:
                text += f"; then: {failure}"
        elif failure:
            text = failure
        elif late and not refused_now:
            text = f"every recipient was deferred; gave up after {attempts} attempts: {late}"
        elif late:
            text = (
                f"every recipient was refused or deferred: {refused_now}; still deferred, "
                f"gave up after {attempts} attempts: {late}"
            )
        else:
            text = f"every recipient was refused: {refused_now}"
        tx = Transaction(
            event_id=job.event_id,
            instance=event.instance,
            interface=instance.interface or event.instance,
            endpoint=instance.endpoint,
            success=success,
            count=1 if success else 0,
            message=text,
            timestamp=utc_now(),
            message_id=message_id or message_id_for(job.event_id, instance.sender_address),
            recipients=accepted,
            refused=refused,
            attempts=job.record.attempts,
        )
        self._final(job, tx)

    def _failure(
        self, event_id: str, instance: str, reason: str, record: EventRecord
    ) -> Transaction:
        log.warning("event %s: cannot be sent: %s", event_id, reason)
        inst = self.config.instances.get(instance)
        return Transaction(
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

    def _final(self, job: _Job, tx: Transaction, *, already: bool = False) -> None:
        record = job.record
        logged = already and record.logged
        # A run that finds the event final publishes its instance event only if nobody did
        # and nobody is about to (the run that made it final claims that in the same write).
        job.already_published = already and (
            record.finalized or record.publishing_elsewhere(PUBLISH_CLAIM_S)
        )
        job.final = FinalWrite(
            tx,
            job.raw,
            self.outcomes.final_result(tx),
            logged=logged,
            claim_publish=not job.already_published,
        )
        job.outcome = Final(tx)

    def _defer_backoff(self, job: _Job, reason: str) -> None:
        assert job.instance is not None
        attempt = job.record.attempts
        delay = backoff_s(attempt, job.instance.retry_delay_s, job.instance.retry_delay_max_s)
        self._defer(job, reason, delay)

    def _defer(self, job: _Job, reason: str, delay_s: float, *, counts: bool = True) -> None:
        due = time.time() + delay_s
        next_at = datetime.fromtimestamp(due, UTC).isoformat()
        attempt = job.record.attempts
        result = self.outcomes.retry_result(job.event_id, reason, attempt, next_at)
        job.retry = RetryWrite(job.event_id, due, result, job.raw, counts=counts)
        job.outcome = Deferred(reason, delay_s, attempt)

    def close(self) -> None:
        """Close SMTP sessions and the thread pool."""
        self.locks.close()
        self.pool.close_all()
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def _left(todo: list[str], accepted: list[str], exc: Exception) -> dict[str, str]:
    """The recipients an attempt that failed as a whole left without delivery, with why —
    only when others were accepted earlier (else the failure itself says it all)."""
    if not accepted:
        return {}
    return {address: str(exc) for address in todo}


def _reply_code(sent: SendOutcome) -> int:
    """250 when any recipient was accepted, else the first refusal's code."""
    if sent.accepted:
        return 250
    for reply in [*sent.refused.values(), *sent.deferred.values()]:
        head = reply.split(" ", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


def _fields(job: _Job, *, smtp_code: int) -> dict[str, Any]:
    """The structured fields of a log line about one attempt."""
    return {
        "event_id": job.event_id,
        "instance": job.event.instance if job.event else "unknown",
        "attempt": job.record.attempts,
        "smtp_code": smtp_code,
    }


def _sender(built: Any, todo: list[str]) -> Callable[[SmtpConnection], Any]:
    return lambda connection: connection.send(built, todo)
