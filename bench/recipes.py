"""The baselines: how Celery mail sending is usually written, for comparison with MailSender.

Run as ``celery -A bench.recipes worker --pool prefork --concurrency 2``; the broker and the
result backend come from ``BENCH_BROKER_URL`` and ``BENCH_RESULT_BACKEND``.

- ``bench.send_one`` — the common recipe: one task per mail, a new SMTP connection per task.
- ``bench.send_chunk`` — the batch recipe: one task per chunk of mails over one connection.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage

from celery import Celery

SENDER = "bench@example.com"
RECIPIENT = "bench-rcpt@example.com"
BODY = "MailSender benchmark mail.\n\nA few lines of text, as a notification would have.\n" * 4

app = Celery(
    "bench-recipes",
    broker=os.environ.get("BENCH_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("BENCH_RESULT_BACKEND", "redis://localhost:6379/1"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


def build(token: str) -> EmailMessage:
    """The mail for ``token`` (its subject, so the sink can tell the mails apart)."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = token
    msg.set_content(BODY)
    return msg


@app.task(name="bench.send_one")  # type: ignore[untyped-decorator]
def send_one(token: str, host: str, port: int) -> str:
    """The common recipe: connect, send one mail, quit."""
    with smtplib.SMTP(host, port, local_hostname="localhost", timeout=60) as smtp:
        smtp.send_message(build(token))
    return token


@app.task(name="bench.send_chunk")  # type: ignore[untyped-decorator]
def send_chunk(tokens: list[str], host: str, port: int) -> int:
    """The batch recipe: several mails over one connection."""
    with smtplib.SMTP(host, port, local_hostname="localhost", timeout=60) as smtp:
        for token in tokens:
            smtp.send_message(build(token))
    return len(tokens)
