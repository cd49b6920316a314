"""`make bench-memory`: a worker's memory for one large attachment, and over a long run.

Starts a private redis-server, Postfix's ``smtp-sink`` and ``mailsender worker --concurrency 1``
(one pool process, so every mail passes through the process measured), then

1. sends a warm-up mail and reads the resident memory of the worker's main and pool process;
2. sends one event with an inline attachment of ``--attachment-mb`` MB and reads their peak
   (VmHWM): the cost is the peak minus the resident memory before, also as a multiple of the
   attachment's size;
3. sends ``--mails`` small mails in batches and reads the resident memory after the first
   fifth and at the end: the growth per mail shows whether memory stays flat.

Every mail is counted at the sink; a lost or doubled one is an error.

    python -m bench.memory [--attachment-mb 25] [--mails 5000]
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench.procs import Processes, children_of, wait_for_log
from bench.rows import private_redis
from bench.sink import LostOrDoubled, Sink
from producer import MailProducer

console = Console()


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _event(token: str, **extra: object) -> dict[str, object]:
    return {
        "instance": "Bench",
        "eventId": token,
        "subject": token,
        "message": "Memory benchmark mail.\n",
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--attachment-mb", type=float, default=25.0)
    parser.add_argument("--mails", type=int, default=5000)
    args = parser.parse_args()
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="mailsender-memory-"))
    try:
        return _run(procs, workdir, args.attachment_mb, args.mails)
    except (RuntimeError, LostOrDoubled, TimeoutError) as exc:
        console.print(f"[red]bench-memory failed: {str(exc).splitlines()[0]}[/red]")
        return 1
    finally:
        procs.stop_all()


def _run(procs: Processes, workdir: Path, attachment_mb: float, mails: int) -> int:
    sink = Sink(procs).start()
    with private_redis(workdir) as rds:
        config = workdir / "mailsender.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "broker_url": rds.url(0),
                    "result_backend": rds.url(1),
                    "instances": {
                        "Bench": {
                            "mailServer": "127.0.0.1",
                            "port": sink.port,
                            "sender": "bench@example.com",
                            "recipients": "bench-rcpt@example.com",
                            "maxMessageBytes": int(attachment_mb * 1_000_000 * 1.5) + 100_000,
                        }
                    },
                }
            )
        )
        log = workdir / "worker.log"
        worker = procs.start(
            [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "1"],
            log=log,
            env={"MAILSENDER_CONFIG": str(config), "MAILSENDER_BROKER_URL": rds.url(0)},
        )
        wait_for_log(log, " ready.", worker, 60)
        [child] = children_of(worker.pid)
        producer = MailProducer(rds.url(0), rds.url(1))
        try:
            sink.mark()
            producer.send(_event("bench-mem-warm")).wait(60)
            sink.verify(["bench-mem-warm"])
            before = {p: _status_mb(p, "VmRSS") for p in (worker.pid, child)}

            size = int(attachment_mb * 1_000_000)
            content = base64.b64encode(os.urandom(size)).decode("ascii")
            big = _event(
                "bench-mem-big",
                attachments=[{"filename": "big.bin", "content": content}],
            )
            del content
            sink.mark()
            start = time.perf_counter()
            tx = producer.send(big).wait(300)
            took_s = time.perf_counter() - start
            del big
            if not tx.success:
                raise RuntimeError(f"the large mail failed: {tx.message}")
            sink.verify(["bench-mem-big"], timeout_s=60)
            peak = {p: _status_mb(p, "VmHWM") for p in (worker.pid, child)}

            sink.mark()
            fifth = max(1, mails // 5)
            sent: list[str] = []
            rss_at: list[float] = []
            for start_at in range(0, mails, fifth):
                chunk = [
                    f"bench-mem-{i:06d}" for i in range(start_at, min(mails, start_at + fifth))
                ]
                receipts = producer.send_many([_event(t) for t in chunk])
                for receipt in receipts:
                    receipt.wait(120)
                sent += chunk
                rss_at.append(_status_mb(child, "VmRSS"))
            sink.verify(sent, timeout_s=60)
        finally:
            producer.close()
            procs.stop(worker, timeout_s=20)
            sink.stop()

    table = Table(
        title=f"MailSender worker memory (one pool process), {attachment_mb:g} MB attachment"
    )
    table.add_column("process")
    table.add_column("resident before MB", justify="right")
    table.add_column("peak with the attachment MB", justify="right")
    table.add_column("cost MB", justify="right")
    table.add_column("cost / attachment", justify="right")
    for name, pid in (("main", worker.pid), ("pool", child)):
        cost = peak[pid] - before[pid]
        table.add_row(
            name,
            f"{before[pid]:.0f}",
            f"{peak[pid]:.0f}",
            f"{cost:.0f}",
            f"{cost / attachment_mb:.2f}x",
        )
    console.print(table)
    growth_kb = (rss_at[-1] - rss_at[0]) * 1024 / max(1, mails - fifth)
    console.print(
        f"large mail delivered in {took_s:.1f} s; {mails} small mails afterwards: pool process "
        f"resident {rss_at[0]:.1f} MB after {fifth}, {rss_at[-1]:.1f} MB after {mails} "
        f"({growth_kb:+.2f} KB per mail)"
    )
    worst = max((peak[p] - before[p]) / attachment_mb for p in (worker.pid, child))
    console.print(
        f"  {'met' if worst < 4 else 'missed'}  peak cost < 4x the attachment: {worst:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
