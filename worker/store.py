"""Redis state of the worker fleet, in the result backend's Redis.

Keys (all under ``mailsender:``):

- ``event:<id>`` hash — the idempotency record: ``attempts``, the raw ``event`` (only while it
  waits for a retry), the ``queue`` it came from, recipients ``accepted`` and ``refused`` so
  far, the final ``transaction``, whether it was ``logged`` (stream entry, dead letter), who
  claimed ``publishing`` its instance event and when, and ``finalized`` (event published).
  Expires ``idempotency_ttl_s`` after the last attempt.
- ``lock:<id>`` — held while one worker talks SMTP for the event; its lease is renewed while
  the worker lives, so it outlives a killed worker by at most ``send_lock_lease_s``.
- ``pending`` hash + ``pending:index`` sorted set — written by producers, removed when a worker
  starts the event; what stays too long had its broker message lost and is enqueued again.
- ``rate:<instance>:<window>`` — fleet-wide send counts for ``rateLimit``.
- ``routes`` hash — instance → queue, published by workers for producers.
- ``retries`` sorted set — event ids waiting for their next attempt, scored by due time (ms).
  Retries wait here, not as unacked ETA messages, so a long back-off can never be handed out
  twice by the broker's visibility timeout.
- ``deadletters`` hash + ``deadletters:index`` sorted set — failed events for inspection and
  replay, bounded.
- ``transactions`` stream — the transaction log (contract §4).
- ``blob:<id>`` — the bytes of a large attachment that ``MailProducer`` sent by reference;
  deleted once its event was sent, else it expires with the producer's ``blob_ttl_s``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer import names
from producer.models import Transaction

P = names.KEY_PREFIX
RETRIES_KEY = f"{P}retries"
ROUTES_KEY = f"{P}routes"
DEAD_KEY = f"{P}deadletters"
DEAD_INDEX_KEY = f"{P}deadletters:index"

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""
_UNCLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.max(0, math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used))
if granted > 0 then
  redis.call('INCRBY', KEYS[1], granted)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return granted
"""
_CLAIM_STALE = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(stale) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return stale
"""
_FORGET_LETTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
# KEYS: record and result key per retry, then the retry schedule. ARGV per retry: id, raw
# event, due (ms), counts ('1': an attempt; '0': waiting for a lock or a rate limit), the RETRY
# result and its expiry (s). An event that became final meanwhile (another run finished it
# between this run's start and now) is left alone: its final result is not overwritten.
_SCHEDULE = """
local n = (#KEYS - 1) / 2
for i = 1, n do
  local key, result = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 6 * (i - 1)
  if redis.call('HEXISTS', key, 'transaction') == 0 then
    redis.call('HSET', key, 'event', ARGV[a + 2])
    redis.call('ZADD', KEYS[#KEYS], ARGV[a + 3], ARGV[a + 1])
    if ARGV[a + 4] == '0' then redis.call('HINCRBY', key, 'attempts', -1) end
    redis.call('SETEX', result, ARGV[a + 6], ARGV[a + 5])
    redis.call('PUBLISH', result, ARGV[a + 5])
  end
end
return n
"""
# KEYS: lock key per lock; ARGV: lease (ms), then the token of each lock.
_EXTEND = """
local extended = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    extended = extended + 1
  end
end
return extended
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The per-event steps of a batch run in one script call each, instead of a pipeline of several
# commands per event: the client packs and parses one command per batch, not hundreds.
# KEYS: record and lock key per event, then the pending hash and its index.
# ARGV: queue, record TTL (ms), then id, token ('' = no lock) and lease (ms) per event.
_BEGIN = """
local n = (#KEYS - 2) / 2
local out = {}
for i = 1, n do
  local key, lock = KEYS[2 * i - 1], KEYS[2 * i]
  local id, token, lease = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
  local locked = 0
  if token ~= '' then
    if redis.call('SET', lock, token, 'NX', 'PX', lease) then
      locked = 1
    else
      locked = -1 - math.max(redis.call('PTTL', lock), 0)  -- held: -1 - its time left (ms)
    end
  end
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSETNX', key, 'queue', ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
  out[2 * i - 1] = locked
  out[2 * i] = redis.call('HGETALL', key)
  redis.call('HDEL', KEYS[#KEYS - 1], id)
  redis.call('ZREM', KEYS[#KEYS], id)
end
return out
"""
# KEYS: record key, result key per event, then the stream, the dead letters and their index.
# ARGV: record TTL (ms), stream length, now (ms), then per event: id, transaction JSON,
# claim ('1': this run publishes), result value ('' = none), its expiry (s), log ('1': stream
# entry and, with a letter, the dead letter), dead letter JSON ('' = none).
_FINALS = """
local n = (#KEYS - 3) / 2
local stream, dead, index = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, n do
  local key, result = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 3 + 7 * (i - 1)
  local id, tx, claim, value, expires, log, letter =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  redis.call('HSET', key, 'transaction', tx)
  if claim == '1' then redis.call('HSET', key, 'publishing', ARGV[3]) end
  redis.call('PEXPIRE', key, ARGV[1])
  if value ~= '' then
    redis.call('SETEX', result, expires, value)
    redis.call('PUBLISH', result, value)
  end
  if log == '1' then
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*', 'transaction', tx)
    if letter ~= '' then
      redis.call('HSET', dead, id, letter)
      redis.call('ZADD', index, tonumber(ARGV[3]) / 1000, id)
    end
    redis.call('HSET', key, 'logged', '1')
  end
end
return n
"""
# KEYS: record key per published event, then lock key per lock to give back.
# ARGV: how many published, then the token of each lock.
_PUBLISHED = """
local published = tonumber(ARGV[1])
for i = 1, published do redis.call('HSET', KEYS[i], 'finalized', '1') end
for i = published + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i - published + 1] then redis.call('DEL', KEYS[i]) end
end
return #KEYS
"""


def connect(url: str, *, decode_responses: bool = True) -> redis.Redis:
    """A client that retries lost connections on its own (about 10 s in all)."""
    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 12),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=30,
    )


def event_key(event_id: str) -> str:
    """The idempotency record's key."""
    return f"{P}event:{event_id}"


def lock_key(event_id: str) -> str:
    """The send lock's key."""
    return f"{P}lock:{event_id}"


@dataclass
class EventRecord:
    """What the fleet knows about one event id."""

    attempts: int = 0
    event: Any = None
    queue: str = names.DEFAULT_QUEUE
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    transaction: Transaction | None = None
    logged: bool = False
    finalized: bool = False
    publish_claim_ms: int = 0

    def publishing_elsewhere(self, lease_s: float) -> bool:
        """Another run claimed publishing the instance event less than ``lease_s`` ago."""
        return time.time() * 1000 - self.publish_claim_ms < lease_s * 1000


ResultWrite = tuple[str, str, int]
"""A task result to store: (key, encoded meta, expiry in seconds)."""


@dataclass(frozen=True)
class FinalWrite:
    """A final outcome to record."""

    transaction: Transaction
    raw_event: Any
    result: ResultWrite | None
    logged: bool = False
    claim_publish: bool = True


@dataclass(frozen=True)
class RetryWrite:
    """A deferred event to schedule."""

    event_id: str
    due_s: float
    result: ResultWrite
    raw_event: Any
    counts: bool = True


@dataclass(frozen=True)
class DueRetry:
    """A retry taken from the schedule, to publish and then confirm."""

    event_id: str
    claim_ms: int
    event: Any
    queue: str


@dataclass(frozen=True)
class Begun:
    """An event at the start of a run: its record, the send lock's token if this run holds
    it, and otherwise how long the lock still has to run (s; 0 when it was not asked for)."""

    record: EventRecord
    token: str | None
    lock_left_s: float


class Store:
    """The Redis side of delivery: idempotency, locks, retries, log and dead letters."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: float,
        transactions_max: int,
        dead_letter_max: int,
        blob_client: redis.Redis | None = None,
    ) -> None:
        self.r = client
        self._blob_client = blob_client
        self.ttl_ms = int(ttl_s * 1000)
        self.transactions_max = transactions_max
        self.dead_letter_max = dead_letter_max
        self._claim = self.r.register_script(_CLAIM)
        self._unclaim = self.r.register_script(_UNCLAIM)
        self._release = self.r.register_script(_RELEASE)
        self._take = self.r.register_script(_TAKE)
        self._claim_stale = self.r.register_script(_CLAIM_STALE)
        self._begin = self.r.register_script(_BEGIN)
        self._forget_letter = self.r.register_script(_FORGET_LETTER)
        self._extend = self.r.register_script(_EXTEND)
        self._schedule = self.r.register_script(_SCHEDULE)
        self._finals = self.r.register_script(_FINALS)
        self._published = self.r.register_script(_PUBLISHED)

    # -- idempotency record ----------------------------------------------------------------

    def begin_many(
        self, events: list[tuple[str, Any]], queue: str, leases_s: list[float]
    ) -> list[Begun]:
        """For each event in one round trip: count this run as an attempt, take its send lock
        for ``lease_s`` (0 = do not lock), and read its record. The raw event is kept in the
        record only when it has to wait for a retry."""
        tokens = [uuid.uuid4().hex if lease else None for lease in leases_s]
        keys: list[str] = []
        args: list[str | int] = [queue, self.ttl_ms]
        for (event_id, _raw), token, lease_s in zip(events, tokens, leases_s, strict=True):
            keys += [event_key(event_id), lock_key(event_id)]
            args += [event_id, token or "", int(lease_s * 1000)]
        keys += [names.PENDING_KEY, names.PENDING_INDEX_KEY]
        reply = cast(list[Any], self._begin(keys=keys, args=args))
        out: list[Begun] = []
        for i, token in enumerate(tokens):
            locked, flat = int(reply[2 * i]), reply[2 * i + 1]
            data = dict(zip(flat[::2], flat[1::2], strict=True))
            held_s = (-locked - 1) / 1000 if locked < 0 else 0.0
            out.append(Begun(self._record(data), token if locked == 1 else None, held_s))
        return out

    def get(self, event_id: str) -> EventRecord | None:
        """The record of ``event_id``, or None."""
        data = cast(dict[str, str], self.r.hgetall(event_key(event_id)))
        return self._record(data) if data else None

    @staticmethod
    def _record(data: dict[str, str]) -> EventRecord:
        tx = data.get("transaction")
        return EventRecord(
            attempts=int(data.get("attempts", 0)),
            event=json.loads(data["event"]) if "event" in data else None,
            queue=data.get("queue", names.DEFAULT_QUEUE),
            accepted=json.loads(data.get("accepted", "[]")),
            refused=json.loads(data.get("refused", "{}")),
            transaction=Transaction.model_validate_json(tx) if tx else None,
            logged=data.get("logged") == "1",
            finalized=data.get("finalized") == "1",
            publish_claim_ms=int(data.get("publishing", 0)),
        )

    def record_progress(self, event_id: str, accepted: list[str], refused: dict[str, str]) -> None:
        """Remember which recipients the server accepted or refused for good."""
        self.r.hset(
            event_key(event_id),
            mapping={"accepted": json.dumps(accepted), "refused": json.dumps(refused)},
        )

    def record_finals(self, finals: list[FinalWrite]) -> None:
        """Write final outcomes in one round trip: the transaction into the record (from now on
        the event is never sent again), the task result, and — once per event — the stream
        entry and, for a failure, the dead letter."""
        if not finals:
            return
        now_ms = int(time.time() * 1000)
        keys: list[str] = []
        args: list[str | int] = [self.ttl_ms, self.transactions_max, now_ms]
        failures = False
        for final in finals:
            tx = final.transaction
            tx_json = tx.model_dump_json(by_alias=True)
            result_key, value, expires_s = final.result or ("", "", 0)
            letter = ""
            if not final.logged and not tx.success:
                failures = True
                letter = json.dumps(
                    {
                        "eventId": tx.event_id,
                        "instance": tx.instance,
                        "reason": tx.message,
                        "attempts": tx.attempts,
                        "failedAt": tx.timestamp.isoformat(),
                        "event": final.raw_event,
                        "transaction": json.loads(tx_json),
                    }
                )
            keys += [event_key(tx.event_id), result_key or event_key(tx.event_id)]
            args += [tx.event_id, tx_json, int(final.claim_publish), value, expires_s]
            args += [int(not final.logged), letter]
        keys += [names.TRANSACTIONS_STREAM, DEAD_KEY, DEAD_INDEX_KEY]
        self._finals(keys=keys, args=args)
        if failures:
            self._trim_dead_letters()

    def mark_published(self, event_ids: list[str], release: list[tuple[str, str]]) -> None:
        """The instance events of these events are out (nothing is left to repeat), and the
        send locks in ``release`` are given back if still ours, in one round trip."""
        if not event_ids and not release:
            return
        keys = [event_key(e) for e in event_ids] + [lock_key(e) for e, _ in release]
        self._published(keys=keys, args=[len(event_ids), *(token for _, token in release)])

    def unclaim_publishing(self, event_ids: list[str]) -> None:
        """Withdraw this run's claim to publish the instance events of ``event_ids`` (its
        publish failed), so that the next run of each event publishes it at once."""
        if event_ids:
            pipe = self.r.pipeline(transaction=False)
            for event_id in event_ids:
                pipe.hdel(event_key(event_id), "publishing")
            pipe.execute()

    def _trim_dead_letters(self) -> None:
        excess = int(self.r.zcard(DEAD_INDEX_KEY)) - self.dead_letter_max
        if excess > 0:
            oldest = cast(list[str], self.r.zrange(DEAD_INDEX_KEY, 0, excess - 1))
            if oldest:
                pipe = self.r.pipeline(transaction=True)
                pipe.hdel(DEAD_KEY, *oldest)
                pipe.zrem(DEAD_INDEX_KEY, *oldest)
                pipe.execute()

    # -- the send lock ---------------------------------------------------------------------

    def extend_locks(self, held: list[tuple[str, str]], lease_s: float) -> int:
        """Extend the send locks in ``held`` that are still ours to ``lease_s`` from now, in
        one round trip; returns how many were."""
        if not held:
            return 0
        keys = [lock_key(event_id) for event_id, _ in held]
        args: list[str | int] = [int(lease_s * 1000), *(token for _, token in held)]
        return int(self._extend(keys=keys, args=args))

    def release_many(self, held: list[tuple[str, str]]) -> None:
        """Give send locks back (those still ours), in one round trip."""
        if not held:
            return
        pipe = self.r.pipeline(transaction=False)
        for event_id, token in held:
            self._release(keys=[lock_key(event_id)], args=[token], client=pipe)
        pipe.execute()

    # -- rate limits and routes -------------------------------------------------------------

    def take_tokens(self, instance: str, wanted: int, limit: int, window_s: float) -> int:
        """Take up to ``wanted`` sends from the fleet-wide allowance of the current window."""
        window_ms = int(window_s * 1000)
        window = int(time.time() * 1000) // window_ms
        key = f"{P}rate:{instance}:{window}"
        return int(self._take(keys=[key], args=[wanted, limit, window_ms * 2]))

    def publish_routes(self, routes: Mapping[str, str]) -> None:
        """Tell producers which queue each instance's events go to."""
        if routes:
            pipe = self.r.pipeline(transaction=True)
            for instance, queue in routes.items():
                pipe.hset(ROUTES_KEY, instance, queue)
            pipe.execute()

    # -- retries -----------------------------------------------------------------------------

    def schedule_retries(self, retries: list[RetryWrite]) -> None:
        """Let each event wait until its due time (epoch seconds) for its next attempt, with the
        task state RETRY, in one round trip."""
        if not retries:
            return
        keys: list[str] = []
        args: list[str | int] = []
        for retry in retries:
            result_key, value, expires_s = retry.result
            keys += [event_key(retry.event_id), result_key]
            args += [
                retry.event_id,
                json.dumps(retry.raw_event),
                int(retry.due_s * 1000),
                "1" if retry.counts else "0",
                value,
                int(expires_s),
            ]
        keys.append(RETRIES_KEY)
        self._schedule(keys=keys, args=args)

    def claim_due(self, lease_s: float, limit: int = 100) -> list[DueRetry]:
        """Take due retries for publishing; each stays claimed ``lease_s`` until confirmed."""
        now_ms = int(time.time() * 1000)
        claim_ms = now_ms + int(lease_s * 1000)
        ids = cast(list[str], self._claim(keys=[RETRIES_KEY], args=[now_ms, claim_ms, limit]))
        due: list[DueRetry] = []
        for event_id in ids:
            record = self.get(event_id)
            if record is None or record.event is None:
                self.r.zrem(RETRIES_KEY, event_id)  # expired record: nothing left to send
                continue
            due.append(DueRetry(event_id, claim_ms, record.event, record.queue))
        return due

    def confirm_published(self, retry: DueRetry) -> None:
        """Drop a published retry, unless it was scheduled again meanwhile."""
        self._unclaim(keys=[RETRIES_KEY], args=[retry.event_id, retry.claim_ms])

    # -- events whose broker message was lost ------------------------------------------------

    def claim_lost(self, older_than_s: float, limit: int = 100) -> list[tuple[str, Any]]:
        """Events enqueued more than ``older_than_s`` ago that no worker has started.

        Each is claimed (its age reset) so that one worker re-enqueues it; most are simply
        lost messages, a few may still wait in a long queue (their second copy then finds the
        event started or final and is not sent twice).
        """
        now_ms = int(time.time() * 1000)
        cutoff = now_ms - int(older_than_s * 1000)
        ids = cast(
            list[str],
            self._claim_stale(keys=[names.PENDING_INDEX_KEY], args=[cutoff, now_ms, limit]),
        )
        lost: list[tuple[str, Any]] = []
        for event_id in ids:
            # A run removes the note when it begins, so a note still here means no run began
            # since the event was (re-)enqueued.
            raw = cast(str | None, self.r.hget(names.PENDING_KEY, event_id))
            if raw is None:
                self.r.zrem(names.PENDING_INDEX_KEY, event_id)
                continue
            lost.append((event_id, json.loads(raw)))
        return lost

    def note_pending(self, events: list[tuple[str, Any]]) -> None:
        """Note events as enqueued-not-started (as producers do), before publishing them."""
        if not events:
            return
        now_ms = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=False)
        for event_id, raw in events:
            pipe.hset(names.PENDING_KEY, event_id, json.dumps(raw))
            pipe.zadd(names.PENDING_INDEX_KEY, {event_id: now_ms})
        pipe.execute()

    def forget_pending(self, event_ids: list[str]) -> None:
        """Drop the pending notes of events that were not enqueued after all."""
        if event_ids:
            pipe = self.r.pipeline(transaction=False)
            pipe.hdel(names.PENDING_KEY, *event_ids)
            pipe.zrem(names.PENDING_INDEX_KEY, *event_ids)
            pipe.execute()

    # -- attachments by reference ------------------------------------------------------------

    def blobs(self, keys: list[str]) -> dict[str, bytes]:
        """The bytes stored under each of ``keys`` (a missing one is left out), one round trip."""
        if not keys:
            return {}
        if self._blob_client is None:
            raise RuntimeError("this store has no client for attachment blobs")
        values = cast(list[bytes | None], self._blob_client.mget(keys))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    def drop_blobs(self, keys: list[str]) -> None:
        """Delete attachment blobs that are not needed any more (their event was sent)."""
        if keys:
            self.r.unlink(*keys)

    # -- dead letters ----------------------------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest dead letters first."""
        ids = cast(list[str], self.r.zrevrange(DEAD_INDEX_KEY, 0, limit - 1))
        if not ids:
            return []
        values = cast(list[str | None], self.r.hmget(DEAD_KEY, ids))
        return [json.loads(v) for v in values if v]

    def take_for_replay(self, event_id: str) -> tuple[dict[str, Any], str] | None:
        """A dead letter to replay, and its stored form for ``forget_dead_letter``; the event's
        record is reset so that it can be sent again. The letter itself stays until the replay
        is enqueued."""
        value = cast(str | None, self.r.hget(DEAD_KEY, event_id))
        if value is None:
            return None
        self.r.delete(event_key(event_id))
        return cast(dict[str, Any], json.loads(value)), value

    def forget_dead_letter(self, event_id: str, stored: str) -> None:
        """Remove a replayed dead letter, unless a newer failure of the event replaced it."""
        self._forget_letter(keys=[DEAD_KEY, DEAD_INDEX_KEY], args=[event_id, stored])

    def latest_transactions(
        self,
        per_group: int,
        *,
        interface: str | None = None,
        failures_only: bool = False,
        page: int = 2000,
    ) -> list[Transaction]:
        """Up to ``per_group`` newest transactions of every (interface, endpoint), newest first,
        from the whole log (read backwards a page at a time): a failure or a quiet interface
        far back in the log is still found."""
        out: list[Transaction] = []
        counts: dict[tuple[str, str], int] = {}
        upper, seen = "+", None
        while True:
            # The bound is inclusive (Redis before 6.2 has no exclusive one): skip the entry
            # the previous page ended with.
            entries = cast(
                list[tuple[str, dict[str, str]]],
                self.r.xrevrange(names.TRANSACTIONS_STREAM, max=upper, count=page + 1),
            )
            fresh = [e for e in entries if e[0] != seen]
            for _id, fields in fresh:
                raw = fields.get("transaction")
                if not raw:
                    continue
                data = json.loads(raw)
                if interface is not None and data.get("interface") != interface:
                    continue
                if failures_only and data.get("success"):
                    continue
                group = (str(data.get("interface")), str(data.get("endpoint")))
                if counts.get(group, 0) >= per_group:
                    continue
                counts[group] = counts.get(group, 0) + 1
                out.append(Transaction.model_validate(data))
            if not fresh or len(entries) < page + 1:
                return out
            upper = seen = entries[-1][0]
