"""`make bench-memory`: a worker's memory for one large attachment, and over a long run.

Starts a private redis-server, Postfix's ``smtp-sink`` and ``mailsender worker --concurrency 1``
(one pool process, so every mail passes through the process measured), then

1. sends a warm-up mail and reads the resident memory of the worker's main and pool process;
2. sends one event with an inline attachment of ``--attachment-mb`` MB and reads their peak
   (VmHWM): the cost is the peak minus the resident memory before, also as a multiple of the
   attachment's size — once as ``MailProducer`` sends it (by reference, a blob in the result
   backend's Redis) and once inline in the task message, as a client in another language
   sends it (each with a fresh worker);
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

console = Console(width=None if Console().is_terminal else 120)


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
        rows = [
            _run(procs, workdir, args.attachment_mb, args.mails, inline=inline)
            for inline in (False, True)
        ]
        return _report(rows, args.attachment_mb, args.mails)
    except (RuntimeError, LostOrDoubled, TimeoutError) as exc:
        console.print(f"[red]bench-memory failed: {str(exc).splitlines()[0]}[/red]")
        return 1
    finally:
        procs.stop_all()


Row = tuple[bool, dict[str, float], dict[str, float], float, list[float]]


def _run(procs: Processes, workdir: Path, attachment_mb: float, mails: int, *, inline: bool) -> Row:
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
        log = workdir / f"worker-{'inline' if inline else 'blob'}.log"
        worker = procs.start(
            [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "1"],
            log=log,
            env={"MAILSENDER_CONFIG": str(config), "MAILSENDER_BROKER_URL": rds.url(0)},
        )
        wait_for_log(log, " ready.", worker, 60)
        [child] = children_of(worker.pid)
        limit = 0 if inline else int(attachment_mb * 1_000_000) // 2
        producer = MailProducer(rds.url(0), rds.url(1), inline_limit_bytes=limit)
        try:
            sink.mark()
            producer.send(_event("bench-mem-warm")).wait(60)
            sink.verify(["bench-mem-warm"])
            pids = {"main": worker.pid, "pool": child}
            before = {name: _status_mb(pid, "VmRSS") for name, pid in pids.items()}

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
            peak = {name: _status_mb(pid, "VmHWM") for name, pid in pids.items()}

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

    return inline, before, peak, took_s, rss_at


def _report(rows: list[Row], attachment_mb: float, mails: int) -> int:
    table = Table(title=f"MailSender worker memory, one {attachment_mb:g} MB attachment")
    table.add_column("attachment sent")
    table.add_column("process")
    table.add_column("resident before MB", justify="right")
    table.add_column("peak MB", justify="right")
    table.add_column("cost MB", justify="right")
    table.add_column("cost / attachment", justify="right")
    table.add_column("sent in s", justify="right")
    worst_by_reference = 0.0
    for inline, before, peak, took_s, _ in rows:
        how = "inline (other clients)" if inline else "by reference (MailProducer)"
        for name in ("main", "pool"):
            cost = peak[name] - before[name]
            ratio = cost / attachment_mb
            if not inline:
                worst_by_reference = max(worst_by_reference, ratio)
            table.add_row(
                how if name == "main" else "",
                name,
                f"{before[name]:.0f}",
                f"{peak[name]:.0f}",
                f"{cost:.0f}",
                f"{ratio:.2f}x",
                f"{took_s:.1f}" if name == "main" else "",
            )
        table.add_section()
    console.print(table)
    rss_at = rows[0][4]
    fifth = max(1, mails // 5)
    growth_kb = (rss_at[-1] - rss_at[0]) * 1024 / max(1, mails - fifth)
    console.print(
        f"{mails} small mails afterwards: pool process resident {rss_at[0]:.1f} MB after "
        f"{fifth}, {rss_at[-1]:.1f} MB after {mails} ({growth_kb:+.2f} KB per mail)"
    )
    verdict = "met" if worst_by_reference < 4 else "missed"
    console.print(
        f"  {verdict}  peak cost < 4x the attachment (MailProducer): {worst_by_reference:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
