"""The rows of the table: each measured against its own sink (and relay), Redis and worker."""

from __future__ import annotations

import contextlib
import math
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from celery import Celery
from kombu import Connection

from bench import recipes
from bench.procs import REPO, Processes, wait_for_log, worker_peak_rss
from bench.sink import LostOrDoubled, Sink
from producer import MailProducer
from tests.support.fleet import RedisServer, free_port
from worker.outcomes import EVENTS_QUEUE

WORKER_READY_S = 60.0
LIMIT_SESSIONS = 4
RECIPE_CONCURRENCY = 2
CHUNK = 10
RESULT_WINDOW = 100
MAILSENDER_ARGS = ["worker", "--concurrency", "4"]  # as compose.yaml runs it


class BenchError(Exception):
    """A run that gives no figure: lost, doubled or failed mails, or a timeout."""


@dataclass(frozen=True)
class Scenario:
    """Fast sink (no delay) or real relay (the reply to DATA after ``delay_ms``)."""

    key: str
    title: str
    delay_ms: float
    mails: int


@dataclass(frozen=True)
class Options:
    runs: int
    latency_rate: float
    latency_s: float
    workdir: Path


@dataclass
class RowResult:
    """One row's figures in one scenario."""

    key: str
    title: str
    scenario: Scenario
    rates: list[float] = field(default_factory=list)
    error: str | None = None
    latency_ms: tuple[float, float] | None = None
    rss_mb: tuple[float | None, float | None] | None = None

    @property
    def rate(self) -> float | None:
        """The median of the runs' mails/s; None when any run failed."""
        if self.error or not self.rates:
            return None
        return float(statistics.median(self.rates))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def tokens(scenario: Scenario, row: str, run: int, n: int) -> list[str]:
    return [f"bench-{scenario.key}-{row}-r{run}-{i:06d}" for i in range(n)]


# -- the SMTP side: sink, and the delaying relay in front of it -------------------------------


@dataclass
class Endpoint:
    sink: Sink
    port: int  # where clients connect: the sink, or the relay in front of it


@contextlib.contextmanager
def endpoint(procs: Processes, scenario: Scenario, workdir: Path) -> Iterator[Endpoint]:
    sink = Sink(procs)
    relay = None
    try:
        sink.start()
        port = sink.port
        if scenario.delay_ms > 0:
            port = free_port()
            log = workdir / f"relay-{port}.log"
            relay = procs.start(
                [
                    sys.executable,
                    "-m",
                    "bench.relay",
                    "--port",
                    str(port),
                    "--upstream",
                    f"127.0.0.1:{sink.port}",
                    "--delay-ms",
                    str(scenario.delay_ms),
                ],
                log=log,
            )
            wait_for_log(log, "relay ready", relay, 15)
        yield Endpoint(sink, port)
    finally:
        if relay is not None:
            procs.stop(relay)
        sink.stop()


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="redis-", dir=workdir)))
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def _run_checked(
    result: RowResult, sink: Sink, runs: int, one: Callable[[int], tuple[float, list[str]]]
) -> None:
    """``runs`` runs of ``one(run) -> (seconds, tokens sent)``, each verified at the sink."""
    for run in range(runs):
        sink.mark()
        try:
            elapsed, sent = one(run)
            sink.verify(sent)
        except (BenchError, LostOrDoubled) as exc:
            result.error = f"run {run + 1}: {exc}"
            return
        result.rates.append(len(sent) / elapsed)


# -- 1. the limit -----------------------------------------------------------------------------


def smtp_source(procs: Processes, scenario: Scenario, opts: Options) -> RowResult:
    result = RowResult("smtp-source", f"smtp-source -s {LIMIT_SESSIONS}", scenario)
    n = scenario.mails
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    with endpoint(procs, scenario, opts.workdir) as ep:

        def one(run: int) -> tuple[float, list[str]]:
            args = [binary, "-s", str(LIMIT_SESSIONS), "-m", str(n), "-d", "-N"]
            args += ["-t", "bench@example.com", "-M", "localhost", f"127.0.0.1:{ep.port}"]
            log = opts.workdir / "smtp-source.log"
            start = time.perf_counter()
            proc = procs.start(args, log=log)
            try:
                code = proc.wait(timeout=60 + n / 20)
            except Exception:
                procs.stop(proc)
                raise BenchError("smtp-source timed out") from None
            elapsed = time.perf_counter() - start
            procs.stop(proc)
            if code != 0:
                raise BenchError(f"smtp-source exited with {code}: {log.read_text()[-500:]}")
            return elapsed, [f"src-{i}" for i in range(1, n + 1)]

        _run_checked(result, ep.sink, opts.runs, one)
    return result


def smtplib_loop(procs: Processes, scenario: Scenario, opts: Options) -> RowResult:
    result = RowResult("smtplib", "smtplib, 1 conn.", scenario)
    with endpoint(procs, scenario, opts.workdir) as ep:

        def one(run: int) -> tuple[float, list[str]]:
            sent = tokens(scenario, "loop", run, scenario.mails)
            mails = [recipes.build(t).as_bytes() for t in sent]
            start = time.perf_counter()
            with smtplib.SMTP("127.0.0.1", ep.port, local_hostname="localhost") as smtp:
                for mail in mails:
                    smtp.sendmail(recipes.SENDER, [recipes.RECIPIENT], mail)
            return time.perf_counter() - start, sent

        _run_checked(result, ep.sink, opts.runs, one)
    return result


# -- 2./3. the Celery recipes -----------------------------------------------------------------


def _wait_results(client: redis.Redis, ids: list[str], timeout_s: float) -> None:
    """Until every task in ``ids`` has a SUCCESS result (polling the backend's keys).

    Tasks finish roughly in the order they were sent, so only a window of the oldest pending
    ids is polled at a time: waiting costs Redis little, whatever the number of tasks.
    """
    pending = list(ids)
    deadline = time.monotonic() + timeout_s
    while pending:
        window = pending[:RESULT_WINDOW]
        values = client.mget([f"celery-task-meta-{i}" for i in window])
        still = []
        for task_id, raw in zip(window, values, strict=True):
            if raw is None:
                still.append(task_id)
            elif b'"status": "SUCCESS"' not in raw:
                raise BenchError(f"task {task_id} did not succeed: {raw[:300]!r}")
        pending = still + pending[RESULT_WINDOW:]
        if still or not pending:
            if pending and time.monotonic() > deadline:
                raise BenchError(f"timed out: {len(ids) - len(pending)} of {len(ids)} tasks done")
            if pending:
                time.sleep(0.01)


def celery_recipe(procs: Processes, scenario: Scenario, opts: Options, *, batch: bool) -> RowResult:
    key = "batch" if batch else "common"
    title = f"batch recipe ({CHUNK}/task)" if batch else "common recipe"
    result = RowResult(key, title, scenario)
    task = "bench.send_chunk" if batch else "bench.send_one"
    with endpoint(procs, scenario, opts.workdir) as ep, private_redis(opts.workdir) as rds:
        env = {"BENCH_BROKER_URL": rds.url(0), "BENCH_RESULT_BACKEND": rds.url(1)}
        log = opts.workdir / f"worker-{key}-{scenario.key}.log"
        celery = str(Path(sys.executable).with_name("celery"))
        args = [celery, "-A", "bench.recipes", "worker", "--pool", "prefork"]
        args += ["--concurrency", str(RECIPE_CONCURRENCY), "--without-mingle", "--without-gossip"]
        args += ["--loglevel", "INFO", "--hostname", f"{key}@%h"]
        worker = procs.start(args, log=log, env=env)
        client = Celery("bench-client", broker=rds.url(0), backend=rds.url(1))
        client.conf.update(task_serializer="json", result_serializer="json")
        backend = redis.Redis.from_url(rds.url(1))
        try:
            wait_for_log(log, " ready.", worker, WORKER_READY_S)

            def enqueue(sent: list[str], run: str) -> list[str]:
                ids: list[str] = []
                with client.producer_or_acquire() as producer:
                    if batch:
                        for k in range(0, len(sent), CHUNK):
                            ids.append(f"{run}-chunk-{k}")
                            client.send_task(
                                task,
                                args=[sent[k : k + CHUNK], "127.0.0.1", ep.port],
                                task_id=ids[-1],
                                producer=producer,
                            )
                    else:
                        for token in sent:
                            ids.append(token)
                            client.send_task(
                                task, args=[token, "127.0.0.1", ep.port], task_id=token,
                                producer=producer,
                            )  # fmt: skip
                return ids

            # Warm-up: both pool processes have imported and sent once.
            ep.sink.mark()
            warm = tokens(scenario, key, 99, 2 * RECIPE_CONCURRENCY)
            _wait_results(backend, enqueue(warm, "warm"), WORKER_READY_S)
            ep.sink.verify(warm)

            def one(run: int) -> tuple[float, list[str]]:
                sent = tokens(scenario, key, run, scenario.mails)
                start = time.perf_counter()
                ids = enqueue(sent, f"r{run}")
                _wait_results(backend, ids, 60 + len(sent) / 10)
                return time.perf_counter() - start, sent

            _run_checked(result, ep.sink, opts.runs, one)
            result.rss_mb = worker_peak_rss(worker.pid)
        except RuntimeError as exc:
            result.error = str(exc).splitlines()[0]
        finally:
            client.close()
            backend.close()
            procs.stop(worker, timeout_s=20)
    return result


# -- 4. MailSender ----------------------------------------------------------------------------


class DoneWatcher:
    """Consumes the instance events queue in a thread, timing each event's arrival."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}
        self.problems: list[str] = []
        self._waiting: set[str] = set()
        self._complete = threading.Event()
        self._last = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="done-watcher", daemon=True)

    def __enter__(self) -> DoneWatcher:
        self._thread.start()
        if not self._ready.wait(15):
            raise BenchError("cannot consume the events queue")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        with Connection(self.broker_url) as conn:
            EVENTS_QUEUE(conn.default_channel).declare()
            with conn.Consumer([EVENTS_QUEUE], callbacks=[self._on], accept=["json"], no_ack=True):
                self._ready.set()
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.2)

    def _on(self, body: Any, message: Any) -> None:
        now = time.perf_counter()
        event_id = str(body.get("eventId"))
        name = str(body.get("name"))
        with self.lock:
            if not name.endswith(".Done"):
                message_text = (body.get("transaction") or {}).get("message", "")
                self.problems.append(f"{name} for {event_id}: {message_text}")
            elif event_id in self.arrived:
                self.problems.append(f"a second {name} for {event_id}")
            else:
                self.arrived[event_id] = now
            self._waiting.discard(event_id)
            if not self._waiting:
                self._last = now
                self._complete.set()

    def expect(self, ids: list[str]) -> None:
        with self.lock:
            self._waiting = set(ids) - set(self.arrived)
            self._complete.clear()
            if not self._waiting:
                self._complete.set()

    def wait(self, timeout_s: float) -> float:
        """Until every expected event arrived; the time (perf_counter) of the last one."""
        if not self._complete.wait(timeout_s):
            with self.lock:
                missing = len(self._waiting)
            raise BenchError(f"timed out: {missing} events without an instance event")
        with self.lock:
            if self.problems:
                raise BenchError("; ".join(self.problems[:3]))
            return self._last


def _event(token: str) -> dict[str, Any]:
    return {
        "instance": "Bench",
        "eventId": token,
        "subject": token,
        "message": recipes.BODY,
        "recipients": recipes.RECIPIENT,
    }


def mailsender(procs: Processes, scenario: Scenario, opts: Options) -> RowResult:
    result = RowResult("mailsender", "MailSender", scenario)
    with endpoint(procs, scenario, opts.workdir) as ep, private_redis(opts.workdir) as rds:
        config = {
            "broker_url": rds.url(0),
            "result_backend": rds.url(1),
            "instances": {
                "Bench": {
                    "mailServer": "127.0.0.1",
                    "port": ep.port,
                    "sender": recipes.SENDER,
                    "recipients": recipes.RECIPIENT,
                }
            },
        }
        config_path = opts.workdir / f"mailsender-{scenario.key}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log = opts.workdir / f"worker-mailsender-{scenario.key}.log"
        env = {"MAILSENDER_CONFIG": str(config_path)}
        worker = procs.start(
            [sys.executable, "-m", "worker.cli", *MAILSENDER_ARGS],
            log=log,
            env={
                **env,
                "MAILSENDER_BROKER_URL": rds.url(0),
                "MAILSENDER_RESULT_BACKEND": rds.url(1),
            },
        )
        producer = MailProducer(rds.url(0), rds.url(1))
        try:
            wait_for_log(log, " ready.", worker, WORKER_READY_S)
            with DoneWatcher(rds.url(0)) as watcher:
                ep.sink.mark()
                warm = tokens(scenario, "ms", 99, 8)
                watcher.expect(warm)
                producer.send_many([_event(t) for t in warm])
                watcher.wait(WORKER_READY_S)
                ep.sink.verify(warm)

                def one(run: int) -> tuple[float, list[str]]:
                    sent = tokens(scenario, "ms", run, scenario.mails)
                    events = [_event(t) for t in sent]
                    watcher.expect(sent)
                    start = time.perf_counter()
                    producer.send_many(events)
                    last = watcher.wait(60 + len(sent) / 10)
                    return last - start, sent

                _run_checked(result, ep.sink, opts.runs, one)
                if result.error is None:
                    try:
                        result.latency_ms = _latency(producer, watcher, ep.sink, scenario, opts)
                    except (BenchError, LostOrDoubled) as exc:
                        result.error = f"latency run: {exc}"
            result.rss_mb = worker_peak_rss(worker.pid)
        except (RuntimeError, BenchError) as exc:
            result.error = str(exc).splitlines()[0]
        finally:
            producer.close()
            procs.stop(worker, timeout_s=20)
    return result


def _latency(
    producer: MailProducer, watcher: DoneWatcher, sink: Sink, scenario: Scenario, opts: Options
) -> tuple[float, float]:
    """Events one by one at a light fixed rate; p50 and p99 of send → its Done, in ms."""
    n = max(1, int(opts.latency_rate * opts.latency_s))
    sent = tokens(scenario, "lat", 0, n)
    sink.mark()
    watcher.expect(sent)
    started: dict[str, float] = {}
    begin = time.perf_counter()
    for i, token in enumerate(sent):
        pause = begin + i / opts.latency_rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        started[token] = time.perf_counter()
        producer.send(_event(token))
    watcher.wait(60)
    sink.verify(sent)
    with watcher.lock:
        waits = [(watcher.arrived[t] - started[t]) * 1000 for t in sent]
    return percentile(waits, 50), percentile(waits, 99)


ROWS: dict[str, Callable[[Processes, Scenario, Options], RowResult]] = {
    "smtp-source": smtp_source,
    "smtplib": smtplib_loop,
    "common": lambda p, s, o: celery_recipe(p, s, o, batch=False),
    "batch": lambda p, s, o: celery_recipe(p, s, o, batch=True),
    "mailsender": mailsender,
}

__all__ = ["REPO", "ROWS", "Options", "RowResult", "Scenario"]
