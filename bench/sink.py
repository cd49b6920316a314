"""Postfix's ``smtp-sink`` as the receiving end, and the check that every mail arrived once.

Counting: ``smtp-sink -D FILE`` appends every completed mail transaction (after the final
``.``; an aborted or RSET transaction is not written) to one dump file on tmpfs. Every mail of
the benchmark carries a unique token — ``Subject: bench-…`` for the Python rows, a numbered
recipient (``smtp-source -N``) for smtp-source — and after each run the dump written since the
run's start is parsed: a missing token is a lost mail, a token seen twice a doubled mail, and
a token of another run or without one is an unexpected mail. Any of them makes the run an error.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Processes
from tests.support.fleet import free_port

BLOCK_START = b"X-Client-Addr: "
SUBJECT_TOKEN = re.compile(rb"^Subject: (bench-[A-Za-z0-9_.-]+)", re.MULTILINE)
SOURCE_TOKEN = re.compile(rb"^X-Rcpt-Args: <(\d+)bench@", re.MULTILINE)


class LostOrDoubled(Exception):
    """The sink did not receive exactly the mails a run sent."""


@dataclass
class Tally:
    """What the sink received since a mark, by token."""

    counts: Counter[str] = field(default_factory=Counter)
    unidentified: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.unidentified


def tokens_in(data: bytes) -> Tally:
    """Parse dump data (whole transactions) into a tally of tokens."""
    tally = Tally()
    for block in data.split(b"\n" + BLOCK_START):
        if not block.strip():
            continue
        header = block.split(b"\n\n", 1)[0]
        if m := SUBJECT_TOKEN.search(header):
            tally.counts[m.group(1).decode()] += 1
        elif m := SOURCE_TOKEN.search(header):
            tally.counts[f"src-{int(m.group(1))}"] += 1
        else:
            tally.unidentified += 1
    return tally


class Sink:
    """One ``smtp-sink`` on a free loopback port, dumping to a file on tmpfs."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.port = free_port()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = Path(tempfile.mkdtemp(prefix="mailsender-bench-sink-", dir=base))
        self.directory.chmod(0o777)  # smtp-sink drops to 'nobody' when started as root
        self.dump = self.directory / "dump"
        self.proc: subprocess.Popen[bytes] | None = None
        self._mark = 0

    def start(self) -> Sink:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        args = [binary, "-D", str(self.dump), "-t", "300"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [f"127.0.0.1:{self.port}", "1000"]
        self.proc = self.procs.start(args, log=self.directory.parent / f"{self.directory.name}.log")
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(100)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("smtp-sink did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)
        log = self.directory.parent / f"{self.directory.name}.log"
        log.unlink(missing_ok=True)

    def _size(self) -> int:
        try:
            return self.dump.stat().st_size
        except FileNotFoundError:
            return 0

    def mark(self) -> None:
        """Start counting from here (the end of everything received so far)."""
        self._mark = self._size()

    def since_mark(self) -> Tally:
        if not self.dump.exists():
            return Tally()
        with open(self.dump, "rb") as f:
            f.seek(self._mark)
            data = f.read()
        # Only whole transactions: the dump of a mail in progress may be incomplete.
        end = data.rfind(b"\n" + BLOCK_START)
        if not data.endswith(b"\n\n") and end >= 0:
            data = data[: end + 1]
        return tokens_in(data)

    def verify(self, expected: Iterable[str], settle_s: float = 0.3, timeout_s: float = 10) -> int:
        """Wait until the sink has the expected number of mails, then check each arrived once.

        Returns the number of mails; raises ``LostOrDoubled`` otherwise.
        """
        want = set(expected)
        deadline = time.monotonic() + timeout_s
        tally = self.since_mark()
        while tally.total < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
            tally = self.since_mark()
        time.sleep(settle_s)  # a doubled mail may still be on its way
        tally = self.since_mark()
        lost = sorted(want - set(tally.counts))
        doubled = sorted(t for t, n in tally.counts.items() if n > 1 and t in want)
        strays = sorted(t for t in tally.counts if t not in want)
        problems = []
        if lost:
            problems.append(f"{len(lost)} lost (e.g. {', '.join(lost[:3])})")
        if doubled:
            problems.append(f"{len(doubled)} doubled (e.g. {', '.join(doubled[:3])})")
        if strays:
            problems.append(f"{len(strays)} unexpected (e.g. {', '.join(strays[:3])})")
        if tally.unidentified:
            problems.append(f"{tally.unidentified} without a bench token")
        if problems:
            raise LostOrDoubled(
                f"sink got {tally.total} mails for {len(want)} sent: " + "; ".join(problems)
            )
        return tally.total
