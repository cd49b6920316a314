"""``bench/chaos``: the crash test, longer and nastier, with a table of what happened.

It starts its own ``redis-server`` (AOF on) on a free port, an aiosmtpd sink that answers
``421`` after DATA to a share of the transactions at random (10% by default), and two
``mailsender worker`` processes (prefork, 2 children each). It enqueues N events, SIGKILLs a
worker's whole process group every few seconds and starts a replacement, restarts Redis once
when about half of the mails have arrived, then waits for every outcome and prints:
enqueued, delivered, duplicates, lost, failed, kills, redis restarts, seconds.

Delivered and duplicates are counted at the sink by Message-ID (one per event id). An event is
*lost* when the sink never got it and it has no failed transaction either. The exit status is
1 when anything is lost or an outcome is missing, 0 otherwise. Every process it started is
stopped on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import redis
from rich.console import Console
from rich.table import Table

from producer import MailEvent, MailProducer
from tests.support.fleet import RedisServer, WorkerProcess
from tests.support.smtp import Rule, Stage, TestSmtpServer

INSTANCE = "Chaos"
SENDER_DOMAIN = "example.com"
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


class ChanceSmtpServer(TestSmtpServer):
    """A sink that answers ``reply`` after DATA to a random share (``chance``) of transactions.

    ``TestSmtpServer``'s rules fire a fixed number of times; this one draws for every DATA.
    A refused DATA is not stored, so the client must retry it. ``delay_s`` slows every
    accepted DATA a little, like a real relay, so that kills land inside transactions.
    """

    __test__ = False

    def __init__(
        self,
        *,
        chance: float,
        reply: str = "421 4.3.2 Service busy, try again later",
        delay_s: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chance = chance
        self.reply = reply
        self.delay_s = delay_s
        self._rng = random.Random(seed)
        self._chance_lock = threading.Lock()
        self.refused = 0

    def _take_rule(self, stage: Stage, address: str | None) -> Rule | None:
        if stage == "data":
            with self._chance_lock:
                hit = self._rng.random() < self.chance
                self.refused += hit
            if hit:
                return Rule("data", self.reply, times=None)
            if self.delay_s > 0:
                return Rule("data", "", times=None, delay_s=self.delay_s)
        return super()._take_rule(stage, address)

    def copies_by_message_id(self) -> Counter[str]:
        """How many times each Message-ID was accepted."""
        counts: Counter[str] = Counter()
        for mail in self.received:
            header_end = mail.data.find(b"\r\n\r\n")
            match = _MESSAGE_ID.search(mail.data[: header_end if header_end >= 0 else None])
            counts[match.group(1).decode() if match else "(none)"] += 1
        return counts


@dataclass
class Figures:
    """What the run did."""

    enqueued: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    failed: int = 0
    no_outcome: int = 0
    kills: int = 0
    redis_restarts: int = 0
    replies_421: int = 0
    seconds: float = 0.0
    left_in_broker: int = 0
    left_in_retries: int = 0
    lost_ids: list[str] = field(default_factory=list)
    failure_reasons: Counter[str] = field(default_factory=Counter)


def worker_config(redis_server: RedisServer, smtp: TestSmtpServer, visibility_s: float) -> Any:
    """The fleet's configuration: one instance on the sink, quick retries."""
    return {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        "visibility_timeout_s": visibility_s,
        "send_lock_lease_s": 15,  # killed workers' events come back within 15 s
        "instances": {
            INSTANCE: {
                "mailServer": "127.0.0.1",
                "port": smtp.port,
                "sender": f"noreply@{SENDER_DOMAIN}",
                "retryDelayS": 0.3,
                "retryDelayMaxS": 2.0,
                "maxRetries": 10,
                "timeoutS": 5,
            }
        },
    }


def outcome_states(backend: redis.Redis, ids: list[str]) -> dict[str, str]:
    """Event id → final task state (SUCCESS or FAILURE), for those that have one."""
    states: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        values = cast(list[str | None], backend.mget([f"celery-task-meta-{i}" for i in chunk]))
        for event_id, value in zip(chunk, values, strict=True):
            if value:
                status = str(json.loads(value).get("status"))
                if status in ("SUCCESS", "FAILURE"):
                    states[event_id] = status
    return states


class _Stop(Exception):
    """SIGTERM: stop like on Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run(args: argparse.Namespace, console: Console) -> Figures:
    """Run the chaos and return the figures; every process started here is stopped here."""
    figures = Figures()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="mailsender-chaos-"))
    redis_server = RedisServer(workdir / "redis", appendonly=True)
    smtp = ChanceSmtpServer(chance=args.chance_421, delay_s=0.01, seed=args.seed)
    workers: list[WorkerProcess] = []
    producer: MailProducer | None = None
    backend: redis.Redis | None = None
    generation = 0
    try:
        redis_server.start()
        smtp.start()
        config = worker_config(redis_server, smtp, args.visibility_timeout_s)

        def new_worker(slot: int) -> WorkerProcess:
            nonlocal generation
            generation += 1
            return WorkerProcess(
                workdir / "workers",
                config,
                name=f"w{slot}-g{generation}",
                pool="prefork",
                concurrency=2,
            )

        workers = [new_worker(slot).start() for slot in range(2)]
        producer = MailProducer(redis_server.url(0), redis_server.url(1))
        backend = redis.Redis.from_url(redis_server.url(1), decode_responses=True)

        events = [
            MailEvent(
                instance=INSTANCE,
                subject=f"chaos {i}",
                message=f"event {i}",
                recipients=f"r{i}@example.org",
            )
            for i in range(args.events)
        ]
        started = time.monotonic()
        ids = [r.event_id for r in producer.send_many(events)]
        figures.enqueued = len(ids)
        console.print(f"enqueued {len(ids)} events; chaos begins (logs in {workdir})")

        next_kill = time.monotonic() + args.kill_every_s
        deadline = time.monotonic() + args.timeout_s
        states: dict[str, str] = {}
        last_report = 0.0
        progress = (0, 0)
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            arrived = len(smtp.copies_by_message_id())
            with contextlib.suppress(redis.RedisError):  # Redis may be restarting
                states = outcome_states(backend, ids)
            if len(states) == len(ids):
                break
            if now > deadline:
                console.print(f"[red]timed out with {len(ids) - len(states)} outcomes missing")
                break
            chaos_on = arrived < len(ids) * args.chaos_until
            if (arrived, len(states)) != progress:
                progress, last_progress = (arrived, len(states)), now
            elif not chaos_on and now - last_progress > args.stall_s:
                console.print(
                    f"[red]no progress for {args.stall_s:g} s with "
                    f"{len(ids) - len(states)} outcomes missing; giving up"
                )
                break
            if chaos_on and now >= next_kill:
                slot = rng.randrange(len(workers))
                workers[slot].kill()
                figures.kills += 1
                workers[slot] = new_worker(slot).start(wait=False)
                next_kill = now + args.kill_every_s
            if figures.redis_restarts == 0 and arrived >= len(ids) // 2:
                console.print("restarting redis-server")
                redis_server.stop()
                time.sleep(1.0)
                redis_server.start()
                figures.redis_restarts += 1
            if now - last_report > 5:
                console.print(
                    f"  {now - started:5.0f} s: {arrived} arrived, {len(states)} outcomes, "
                    f"{figures.kills} kills"
                )
                last_report = now
            time.sleep(0.2)
        figures.seconds = time.monotonic() - started

        copies = smtp.copies_by_message_id()
        expected = {i: f"<{i}@{SENDER_DOMAIN}>" for i in ids}
        figures.delivered = sum(1 for mid in expected.values() if copies[mid] > 0)
        figures.duplicates = sum(copies[mid] - 1 for mid in expected.values() if copies[mid] > 1)
        figures.failed = sum(1 for s in states.values() if s == "FAILURE")
        figures.no_outcome = len(ids) - len(states)
        figures.lost_ids = [
            i for i, mid in expected.items() if copies[mid] == 0 and states.get(i) != "FAILURE"
        ]
        figures.lost = len(figures.lost_ids)
        figures.replies_421 = smtp.refused
        broker = redis.Redis.from_url(redis_server.url(0))
        figures.left_in_broker = int(broker.llen("mailsender")) + int(broker.hlen("unacked"))
        figures.left_in_retries = int(backend.zcard("mailsender:retries"))
        broker.close()
        for value in cast(dict[str, str], backend.hgetall("mailsender:deadletters")).values():
            reason = str(json.loads(value).get("reason", ""))
            figures.failure_reasons[re.sub(r"[0-9a-f-]{36}", "<id>", reason)[:160]] += 1
        for worker in workers:
            worker.stop()
        workers = []
        if figures.lost or figures.no_outcome:
            console.print(f"logs and the AOF kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        return figures
    finally:
        for worker in workers:
            worker.kill()
        if producer is not None:
            producer.close()
        if backend is not None:
            backend.close()
        smtp.stop()
        redis_server.stop()


def table(figures: Figures, args: argparse.Namespace) -> Table:
    """The figures as a rich table."""
    out = Table(title=f"bench/chaos: {args.events} events, {args.chance_421:.0%} 421 replies")
    out.add_column("figure")
    out.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("enqueued", str(figures.enqueued)),
        ("delivered", str(figures.delivered)),
        ("duplicates", str(figures.duplicates)),
        ("lost", f"[{'red' if figures.lost else 'green'}]{figures.lost}"),
        ("failed", str(figures.failed)),
        ("no outcome", str(figures.no_outcome)),
        ("kills", str(figures.kills)),
        ("redis restarts", str(figures.redis_restarts)),
        ("421 replies", str(figures.replies_421)),
        ("seconds", f"{figures.seconds:.1f}"),
        ("left in queue + unacked", str(figures.left_in_broker)),
        ("left in retry schedule", str(figures.left_in_retries)),
    ]
    for name, value in rows:
        out.add_row(name, value)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="bench/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events to enqueue (2000)")
    parser.add_argument(
        "--kill-every-s", type=float, default=2.0, help="seconds between SIGKILLs (2)"
    )
    parser.add_argument(
        "--chance-421", type=float, default=0.10, help="share of DATA answered 421 (0.10)"
    )
    parser.add_argument(
        "--chaos-until",
        type=float,
        default=0.9,
        help="stop killing once this share of the mails arrived (0.9)",
    )
    parser.add_argument(
        "--visibility-timeout-s", type=float, default=5.0, help="broker visibility timeout (5)"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after (900)")
    parser.add_argument(
        "--stall-s",
        type=float,
        default=240.0,
        help="after the chaos, give up when nothing moved for this long (240)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table; 1 if anything was lost or an outcome is missing."""
    args = parse_args(argv)
    console = Console()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        figures = run(args, console)
    except (KeyboardInterrupt, _Stop):
        console.print("[yellow]interrupted; every process started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(table(figures, args))
    for reason, count in figures.failure_reasons.most_common(10):
        console.print(f"failed x{count}: {reason}")
    if figures.lost_ids:
        console.print(f"lost event ids (first 20): {figures.lost_ids[:20]}")
    return 1 if figures.lost or figures.no_outcome else 0


if __name__ == "__main__":
    sys.exit(main())
