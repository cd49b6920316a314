"""``mailsender demo``: the real pipeline end to end on this machine.

A Redis (``MAILSENDER_BROKER_URL``, else 127.0.0.1:6379 database 15, else a private
``redis-server``), an embedded SMTP server with STARTTLS (a throw-away CA) and AUTH that
writes every mail to ``demo-outbox/``, a real worker process, about 20 varied events, the
Done/Failed events with a progress bar, the transactions table, and a check of every mail in
the outbox against what was sent. Returns 0 only if all of that holds.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import redis
import yaml
from kombu import Connection
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer import Attachment, MailEvent, MailProducer, Transaction, names
from worker.devserver import DevSmtpServer, make_tls_material, quiet_aiosmtpd_log
from worker.outcomes import EVENTS_QUEUE

console = Console(highlight=False)
if not console.is_terminal:  # a log or CI: wide enough that table cells do not wrap
    console.width = max(console.width, 140)

REFUSED = "nobody@demo.invalid"
DEMO_DB = 15
WAIT_S = 90.0


@dataclass
class Expected:
    """What the outbox must hold for one event."""

    event: MailEvent
    subject: str
    rcpts: set[str]
    success: bool = True
    attachments: dict[str, str] = field(default_factory=dict)  # filename -> sha256
    html: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def redis_url(workdir: Path) -> Iterator[str]:
    """The broker URL to use, starting a private redis-server when nothing else answers."""
    env_url = os.environ.get(names.ENV_BROKER_URL)
    if env_url:
        if not _redis_answers(env_url):
            raise SystemExit(
                f"mailsender: the broker at {env_url} ({names.ENV_BROKER_URL}) does not answer"
            )
        yield env_url
        return
    shared = f"redis://127.0.0.1:6379/{DEMO_DB}"
    if _redis_answers(shared):
        console.print(f"Redis: the one on 127.0.0.1:6379 (database {DEMO_DB})")
        yield shared
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "mailsender: no Redis answers on 127.0.0.1:6379 and redis-server is not installed; "
            "install it (apt-get install redis-server) or set MAILSENDER_BROKER_URL"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("mailsender: the private redis-server did not start")
            time.sleep(0.05)
        console.print(f"Redis: a private redis-server on port {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def demo_events(count: int, root: Path) -> list[Expected]:
    """About ``count`` varied events and what each must produce."""
    blob = bytes(range(256)) * 4
    latin = "café\n".encode("latin-1")
    report = root / "report.csv"
    report.write_bytes(b"id;amount\n1;12.50\n2;7.00\n")

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    plans: list[Expected] = []

    def add(
        success: bool = True,
        rcpts: set[str] | None = None,
        attachments: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        event = MailEvent(**fields)
        plans.append(
            Expected(
                event,
                "Demo - " + event.subject,
                rcpts or {"ops@demo.example"},
                success,
                attachments or {},
                event.is_html,
            )
        )

    add(
        instance="Demo",
        subject="Plain text to the default recipients",
        message="Hello from MailSender.\nSecond line.\n.\nA line with only a dot above.",
    )
    add(
        instance="Demo",
        subject="HTML with a plain-text alternative",
        is_html=True,
        message="<h1>Weekly report</h1><p>All <b>green</b>. <a href='https://example.com'>"
        "Details</a></p><ul><li>one</li><li>two</li></ul>",
    )
    add(
        instance="Demo",
        subject="Grüße aus Zürich \u2013 日本語の件名 ✓",
        message="Nicht-ASCII im Betreff und im Text: äöü ß €.",
    )
    add(
        instance="Demo",
        subject="Display names",
        message="To two people with names.",
        recipients='"Doe, Jane" <jane@demo.example>, Jürgen Müller <juergen@demo.example>',
        rcpts={"jane@demo.example", "juergen@demo.example"},
    )
    add(
        instance="Demo",
        subject="Cc and Bcc",
        message="Bcc must not show.",
        recipients="alice@demo.example",
        cc="bob@demo.example",
        bcc="audit@demo.example",
        reply_to="Helpdesk <help@demo.example>",
        rcpts={"alice@demo.example", "bob@demo.example", "audit@demo.example"},
    )
    plans.append(
        Expected(
            MailEvent(
                instance="Demo",
                subject="Binary and Latin-1 attachments",
                message="See attached.",
                attachments=[
                    Attachment.inline("all-bytes.bin", blob),
                    Attachment.inline("latin1.txt", latin, "text/plain"),
                    Attachment.inline("Bericht März.pdf", b"%PDF-1.4 demo"),
                ],
            ),
            "Demo - Binary and Latin-1 attachments",
            {"ops@demo.example"},
            True,
            {
                "all-bytes.bin": sha(blob),
                "latin1.txt": sha(latin),
                "Bericht März.pdf": sha(b"%PDF-1.4 demo"),
            },
        )
    )
    plans.append(
        Expected(
            MailEvent(
                instance="Demo",
                subject="A file from the attachment root",
                message="Read by the worker at send time.",
                attachments=[Attachment(path="report.csv")],
            ),
            "Demo - A file from the attachment root",
            {"ops@demo.example"},
            True,
            {"report.csv": sha(report.read_bytes())},
        )
    )
    add(
        instance="Demo",
        subject="One recipient refused, one accepted",
        message="Partial success.",
        recipients=f"carol@demo.example, {REFUSED}",
        rcpts={"carol@demo.example"},
    )
    plans.append(
        Expected(
            MailEvent(
                instance="Demo",
                subject="Only a refused recipient",
                message="This one fails.",
                recipients=REFUSED,
            ),
            "Demo - Only a refused recipient",
            set(),
            success=False,
        )
    )
    n = 0
    while len(plans) < count:
        n += 1
        add(
            instance="Demo",
            subject=f"Batch mail {n}",
            message=f"Mail number {n}.",
            recipients=f"user{n}@demo.example",
            rcpts={f"user{n}@demo.example"},
        )
    return plans


def _drain_events(url: str) -> None:
    with Connection(url) as conn:
        queue = EVENTS_QUEUE(conn.default_channel)
        queue.declare()
        queue.purge()


def collect_events(url: str, ids: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Take instance events until every id has one; shows a progress bar."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with (
        Connection(url) as conn,
        Progress(
            TextColumn("[bold]events"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("events", total=len(ids), last="")
        queue = EVENTS_QUEUE(conn.default_channel)
        while len(seen) < len(ids) and time.monotonic() < deadline:
            message = queue.get(no_ack=True, accept=["json"])
            if message is None:
                time.sleep(0.05)
                continue
            body = message.payload
            if isinstance(body, dict) and body.get("eventId") in ids:
                seen[body["eventId"]] = body
                progress.update(task, completed=len(seen), last=body.get("name", ""))
    return seen


def check_outbox(outbox: Path, plans: list[Expected]) -> list[str]:
    """Compare every mail in the outbox with what was sent; returns the problems."""
    problems: list[str] = []
    by_event: dict[str, list[tuple[EmailMessage, dict[str, Any]]]] = {}
    for eml in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        meta = json.loads(eml.with_suffix(".json").read_text())
        by_event.setdefault(str(msg["X-MailSender-Event-Id"]), []).append((msg, meta))
    for plan in plans:
        got = by_event.get(plan.event.event_id, [])
        label = f"{plan.subject!r}"
        if not plan.success:
            if got:
                problems.append(f"{label}: should have failed but reached the outbox")
            continue
        if len(got) != 1:
            problems.append(f"{label}: {len(got)} copies in the outbox, expected 1")
            continue
        msg, meta = got[0]
        if str(msg["Subject"]) != plan.subject:
            problems.append(f"{label}: subject arrived as {str(msg['Subject'])!r}")
        if set(meta["rcpt_tos"]) != plan.rcpts:
            problems.append(
                f"{label}: RCPT TO {sorted(meta['rcpt_tos'])}, expected {sorted(plan.rcpts)}"
            )
        if msg["Bcc"] is not None:
            problems.append(f"{label}: a Bcc header was sent")
        if not meta.get("tls") or meta.get("auth_user") != "demo":
            problems.append(f"{label}: not sent over STARTTLS with AUTH")
        if plan.html and msg.get_body(("html",)) is None:
            problems.append(f"{label}: no HTML part")
        if plan.html and msg.get_body(("plain",)) is None:
            problems.append(f"{label}: no plain-text alternative")
        got_files = {
            str(part.get_filename()): hashlib.sha256(_payload(part)).hexdigest()
            for part in msg.iter_attachments()
        }
        if got_files != plan.attachments:
            problems.append(f"{label}: attachments differ: {sorted(got_files)}")
    return problems


def _payload(part: object) -> bytes:
    payload = part.get_payload(decode=True) if isinstance(part, EmailMessage) else None
    return payload if isinstance(payload, bytes) else b""


def transactions_table(txs: list[Transaction]) -> Table:
    """The transactions of this run as a table."""
    table = Table(title="Transactions")
    for col in ("", "event", "outcome", "recipients", "refused", "attempts"):
        table.add_column(col, overflow="fold")
    for tx in txs:
        table.add_row(
            "[green]Done[/green]" if tx.success else "[red]Failed[/red]",
            tx.event_id[:8],
            tx.message,
            ", ".join(tx.recipients),
            ", ".join(tx.refused),
            str(tx.attempts),
        )
    return table


def run_demo(count: int = 20, outbox: Path = Path("demo-outbox")) -> int:
    """Run the demo; 0 when every check holds."""
    quiet_aiosmtpd_log()
    if outbox.exists():
        shutil.rmtree(outbox)
    outbox.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="mailsender-demo-") as tmp:
        work = Path(tmp)
        root = work / "attachments"
        root.mkdir()
        tls = make_tls_material(work)
        password = secrets.token_urlsafe(12)
        with (
            redis_url(work) as url,
            DevSmtpServer(
                outbox=outbox, tls=tls, users={"demo": password}, refuse=[REFUSED]
            ) as smtpd,
        ):
            console.print(
                f"SMTP: embedded server on localhost:{smtpd.port} "
                f"(STARTTLS, AUTH), mails go to {outbox}/"
            )
            config = {
                "broker_url": url,
                "instances": {
                    "Demo": {
                        "mailServer": "localhost",
                        "port": smtpd.port,
                        "useSsl": True,
                        "caFile": str(tls.ca_pem_path),
                        "userName": "demo",
                        "password": "${DEMO_SMTP_PASSWORD}",
                        "sender": "MailSender Demo <demo@demo.example>",
                        "recipients": "Ops <ops@demo.example>",
                        "subjectPrefix": "Demo - ",
                        "endpoint": "demo-outbox",
                        "interface": "Demo",
                        "retryDelayS": 0.5,
                        "maxRetries": 3,
                    }
                },
            }
            config_path = work / "mailsender.yaml"
            config_path.write_text(yaml.safe_dump(config))
            env = {
                **os.environ,
                "MAILSENDER_CONFIG": str(config_path),
                "DEMO_SMTP_PASSWORD": password,
                "MAILSENDER_ATTACHMENT_ROOT": str(root),
                names.ENV_BROKER_URL: url,
            }
            env.pop(names.ENV_RESULT_BACKEND, None)
            _drain_events(url)
            log_path = work / "worker.log"
            with open(log_path, "wb") as log_file:
                worker = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "worker.cli",
                        "worker",
                        "--concurrency",
                        "2",
                        "--hostname",
                        f"demo-{os.getpid()}@%h",
                        "--without-mingle",
                        "--without-gossip",
                    ],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
                console.print(f"Worker: process {worker.pid} (prefork, 2 processes)")
                try:
                    return _exercise(url, count, root, outbox, worker, log_path)
                finally:
                    worker.send_signal(signal.SIGTERM)
                    try:
                        worker.wait(20)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait()


def _exercise(
    url: str, count: int, root: Path, outbox: Path, worker: subprocess.Popen[bytes], log_path: Path
) -> int:
    plans = demo_events(count, root)
    with MailProducer(url, url) as producer:
        receipts = producer.send_many([p.event for p in plans])
        console.print(f"Enqueued {len(receipts)} events on {url}")
        ids = {r.event_id for r in receipts}
        events = collect_events(url, ids, WAIT_S)
    if worker.poll() is not None:
        console.print(log_path.read_text()[-3000:], markup=False)
    problems: list[str] = []
    missing = ids - set(events)
    if missing:
        problems.append(f"{len(missing)} event(s) got no Done/Failed event within {WAIT_S:g} s")
    txs = [Transaction.model_validate(b["transaction"]) for b in events.values()]
    console.print(transactions_table(txs))
    for plan in plans:
        body = events.get(plan.event.event_id)
        if body is None:
            continue
        want = f"Demo.{'Done' if plan.success else 'Failed'}"
        if body["name"] != want:
            problems.append(f"{plan.subject!r}: got {body['name']}, expected {want}")
    problems += check_outbox(outbox, plans)
    mails = len(list(outbox.glob("*.eml")))
    if problems:
        for p in problems:
            console.print(f"[red]✗[/red] {p}", markup=True)
        console.print(f"[red]demo failed[/red]: {len(problems)} problem(s); worker log: {log_path}")
        return 1
    done = sum(t.success for t in txs)
    console.print(
        f"[green]✓[/green] {done} Done, {len(txs) - done} Failed as planned; "
        f"{mails} mails in {outbox}/ match what was sent."
    )
    return 0
