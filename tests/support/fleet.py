"""Real processes for integration tests: a private redis-server, a ``mailsender worker``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from kombu import Connection

from worker.outcomes import EVENTS_QUEUE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on a free port (optionally with AOF), started and stopped here."""

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int = 0) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The URL of database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        """Start and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(self.url(), socket_connect_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class WorkerProcess:
    """A real ``mailsender worker`` process with a written YAML configuration."""

    def __init__(
        self,
        directory: Path,
        config: dict[str, Any],
        *,
        env: dict[str, str] | None = None,
        pool: str = "threads",
        concurrency: int = 4,
        name: str = "test",
        extra_args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.env = env or {}
        self.pool = pool
        self.concurrency = concurrency
        self.name = name
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / f"worker-{name}.log"
        self.config_path = directory / f"mailsender-{name}.yaml"

    def start(self, wait: bool = True) -> WorkerProcess:
        """Write the config, start the process and (by default) wait until it is ready."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True))
        env = {**os.environ, **self.env, "MAILSENDER_CONFIG": str(self.config_path)}
        env.pop("MAILSENDER_BROKER_URL", None)
        env.pop("MAILSENDER_RESULT_BACKEND", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "worker",
                "--pool",
                self.pool,
                "--concurrency",
                str(self.concurrency),
                "--hostname",
                f"{self.name}-{os.getpid()}@%h",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
                *self.extra_args,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Until the worker logs that it is ready."""
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"worker exited with {code}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout_s} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (warm shutdown) and wait; returns the exit status."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self.proc = None
        self._log.close()
        return code


class EventsReader:
    """Takes instance events from the events queue, keeping all it has seen by event id."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def purge(self) -> None:
        """Drop every waiting event."""
        with Connection(self.broker_url) as conn:
            queue = EVENTS_QUEUE(conn.default_channel)
            queue.declare()
            queue.purge()
        self.seen.clear()

    def drain(self) -> None:
        """Take whatever is waiting now."""
        with Connection(self.broker_url) as conn:
            queue = EVENTS_QUEUE(conn.default_channel)
            queue.declare()
            while (message := queue.get(no_ack=True, accept=["json"])) is not None:
                body = message.payload
                self.seen.setdefault(str(body.get("eventId")), []).append(body)

    def wait_for(self, event_id: str, timeout_s: float = 20) -> dict[str, Any]:
        """The first event for ``event_id``; raises ``TimeoutError`` when none comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.drain()
            if self.seen.get(event_id):
                return self.seen[event_id][0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no instance event for {event_id} within {timeout_s} s")
            time.sleep(0.05)
