"""The ``mailsender`` command (contract §6). Errors: one sentence on stderr, non-zero exit."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import redis
from kombu import Connection
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from producer import names
from producer.client import MailProducer, redact_url
from producer.errors import BROKER_REFUSALS, InvalidEvent, MailSenderError, ProducerConfigError
from producer.models import (
    Attachment,
    InstanceEvent,
    MailEvent,
    Transaction,
    describe_validation_error,
)
from worker.config import ENV_CONFIG, Config, InstanceConfig, load_config, parse_config
from worker.errors import ConfigError, DeliveryError, WorkerError

if TYPE_CHECKING:
    from worker.smtp import ServerInfo

F = TypeVar("F", bound=Callable[..., Any])

# Everything these print that comes from data (events, transactions, server replies, file
# names) is shown literally: as Text, or with markup=False. Emoji codes stay text too.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

MAX_CHECK_THREADS = 16
"""How many instances ``mailsender check`` probes at the same time."""

UNDECODABLE_KEYS = frozenset({"rawMessage", "contentType", "task"})
"""The keys of what a worker keeps for a task message it could not decode (``worker.app``)."""


def fail(message: str, status: int = 1) -> NoReturn:
    """Print one sentence to stderr and exit."""
    warn(message)
    raise SystemExit(status)


def warn(message: str) -> None:
    """Print one sentence to stderr."""
    err.print(f"mailsender: {message}", markup=False, soft_wrap=True)


def shown(value: str) -> str:
    """``value`` as it can be shown on one line: quoted when it is empty or not printable."""
    return value if value.isprintable() and value.strip() == value and value else repr(value)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn every expected error into one sentence and an exit status."""
    try:
        yield
    except (ConfigError, InvalidEvent, ProducerConfigError) as exc:
        fail(str(exc), 2)
    except ValidationError as exc:  # a value the producer's models refuse, not an event
        fail(f"invalid value: {describe_validation_error(exc)}", 2)
    except (MailSenderError, WorkerError) as exc:
        fail(str(exc))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"cannot reach Redis: {exc}")
    except redis.RedisError as exc:
        fail(f"Redis refused a command: {exc}")
    except OperationalError as exc:
        fail(f"cannot reach the broker: {exc}")
    except BROKER_REFUSALS as exc:
        fail(f"the broker refused the connection: {exc}")
    except TimeoutError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def client_config() -> Config:
    """The configuration a client command needs (errors exit 2): the file's, if it exists,
    read leniently — an instance's ``${NAME}`` that is not set in this shell (the worker's
    secrets) is not needed to enqueue — with the environment's URLs on top; without a file,
    the URLs from the environment or the defaults."""
    path = Path(os.environ.get(ENV_CONFIG) or "./mailsender.yaml")
    try:
        if path.exists():
            return load_config(path, lenient=True)
        if os.environ.get(ENV_CONFIG):
            fail(f"configuration file {str(path)!r} not found ({ENV_CONFIG})", 2)
        url_variables = (names.ENV_BROKER_URL, names.ENV_RESULT_BACKEND)
        return parse_config({}, {k: os.environ[k] for k in url_variables if k in os.environ})
    except ConfigError as exc:
        fail(str(exc), 2)


def urls() -> tuple[str, str]:
    """Broker and result backend URLs: environment, else the config file, else defaults."""
    config = client_config()
    return config.broker_url, config.backend_url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """MailSender: queued e-mail over SMTP with Celery workers."""


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker (the same as `celery -A worker worker`); celery worker options follow."""
    from worker.app import create_app

    try:
        config = load_config()
    except ConfigError as exc:
        fail(str(exc), 2)
    if not config.instances:
        fail("the configuration has no instances: a worker would have nothing to send", 2)
    refused = broker_refusal(config.broker_url)
    if refused:
        fail(refused, 2)
    app = create_app(config)
    args = list(ctx.args)
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["--loglevel", "INFO"]
    app.worker_main(["worker", *args])


def broker_refusal(url: str) -> str | None:
    """Why the broker refuses us for good (a login refused), or None. A broker that is merely
    not reachable yet is not a refusal: the worker keeps trying to connect, as Celery does."""
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.connect()
    except BROKER_REFUSALS as exc:
        return f"the broker at {redact_url(url)} refused the connection: {exc}"
    except Exception:  # not reachable now: Celery's own retries take over
        return None
    return None


def _check_services(config: Config) -> list[tuple[str, str, str | None]]:
    """Can the broker and the result backend be reached? (role, url, problem or None)."""
    out: list[tuple[str, str, str | None]] = []
    try:
        with Connection(config.broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        out.append(("broker", config.broker_url, None))
    except Exception as exc:  # any transport error is a finding here, not a crash
        out.append(("broker", config.broker_url, f"cannot connect: {exc}"))
    try:
        client = redis.Redis.from_url(config.backend_url, socket_connect_timeout=3)
        with client:
            client.ping()
        out.append(("result backend", config.backend_url, None))
    except redis.RedisError as exc:
        out.append(("result backend", config.backend_url, f"cannot connect: {exc}"))
    return out


def _a_number(value: float) -> float:
    """``value`` unless it is NaN, which every range check lets through."""
    if math.isnan(value):
        raise click.BadParameter("must be a number of seconds, not nan")
    return value


def _print_transaction(tx: Transaction) -> None:
    out.print_json(json.dumps(tx.to_json()))  # JSON is highlighted, never read as markup


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _not_a_regular_file(mode: int) -> str | None:
    """Why a file of this mode cannot be attached, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"it is {kind}, not a regular file"


def read_attachment(path: str) -> Attachment:
    """A local file as an inline attachment. Only a regular file is read: a named pipe would
    block for ever and a device like /dev/zero never ends. Exits 2 with one sentence."""
    where = repr(path)
    try:
        why = _not_a_regular_file(os.stat(path).st_mode)
        if why is None:
            # Opened without blocking (a file swapped for a pipe meanwhile is refused below).
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
            with open(fd, "rb") as file:
                why = _not_a_regular_file(os.fstat(file.fileno()).st_mode)
                data = file.read() if why is None else b""
    except OSError as exc:
        fail(f"cannot read attachment {where}: {exc.strerror or exc}", 2)
    if why is not None:
        fail(f"cannot attach {where}: {why}", 2)
    try:  # model_validate: pydantic's errors, whatever the model's constructor raises
        return Attachment.model_validate(
            {"filename": Path(path).name, "content": base64.b64encode(data).decode("ascii")}
        )
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        fail(f"cannot attach {where}: its file name {reasons}", 2)


@main.command()
@click.argument("instance")
@click.option("--subject", "-s", required=True, help="Subject line.")
@click.option("--message", "-m", required=True, help="Body text (HTML with --html).")
@click.option("--html", "is_html", is_flag=True, help="The message is HTML.")
@click.option("--to", "recipients", default="", help="Recipients, comma-separated.")
@click.option("--cc", default="", help="Cc, comma-separated.")
@click.option("--bcc", default="", help="Bcc, comma-separated.")
@click.option("--reply-to", default=None, help="Reply-To address.")
@click.option(
    "--attach",
    "attach",
    multiple=True,
    type=click.Path(),
    help="A local file, sent inline (repeatable).",
)
@click.option("--event-id", default=None, help="Idempotency key (generated when absent).")
@click.option(
    "--wait", is_flag=True, help="Wait for the transaction; exit 1 if it failed, 3 on time-out."
)
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=86400),
    callback=lambda _ctx, _param, value: _a_number(value),
    help="Seconds to wait with --wait.",
)
def send(
    instance: str,
    subject: str,
    message: str,
    is_html: bool,
    recipients: str,
    cc: str,
    bcc: str,
    reply_to: str | None,
    attach: tuple[str, ...],
    event_id: str | None,
    wait: bool,
    timeout_s: float,
) -> None:
    """Enqueue one mail event; print its id."""
    with friendly_errors():
        attachments = [read_attachment(path) for path in attach]
        fields: dict[str, Any] = {
            "instance": instance,
            "subject": subject,
            "message": message,
            "is_html": is_html,
            "recipients": recipients,
            "cc": cc,
            "bcc": bcc,
            "reply_to": reply_to,
            "attachments": attachments,
        }
        if event_id:
            fields["event_id"] = event_id
        event = MailEvent.parse(fields)
        broker, backend = urls()
        producer = MailProducer(broker, backend)
        receipt = producer.send(event)
        out.print(receipt.event_id, markup=False)
        if wait:
            try:
                tx = receipt.wait(timeout_s)
            except TimeoutError as exc:
                fail(str(exc), 3)
            _print_transaction(tx)
            if not tx.success:
                raise SystemExit(1)


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep reading new events.")
@click.option("--instance", default=None, help="Only this instance's events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(follow: bool, instance: str | None, as_json: bool) -> None:
    """Take the instance events waiting on the events queue and print them."""
    from worker.outcomes import EVENTS_QUEUE

    with friendly_errors():
        broker, _ = urls()
        pause_s = 1.0
        while True:
            started = time.monotonic()
            try:
                _take_events(broker, EVENTS_QUEUE, follow, instance, as_json)
                return
            except (OperationalError, redis.RedisError, OSError) as exc:
                if not follow:
                    raise
                if time.monotonic() - started > 30:  # it ran a while: a new loss, not a retry
                    pause_s = 1.0
                # --follow outlives a broker restart: say so, then reconnect.
                warn(f"lost the broker connection ({exc}); reconnecting in {pause_s:g} s")
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, 30.0)


def _take_events(
    broker: str, events_queue: Any, follow: bool, instance: str | None, as_json: bool
) -> None:
    """Print and acknowledge the events waiting on the events queue (with ``follow``, for
    ever); events of other instances than ``instance`` are put back."""
    held: list[Any] = []
    with Connection(broker, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=2)
        queue = events_queue(conn.default_channel)
        queue.declare()
        try:
            while True:
                message = queue.get(no_ack=False, accept=["json"])
                if message is None:
                    if not follow:
                        return
                    time.sleep(0.2)
                    continue
                body = message.payload
                if instance and isinstance(body, dict) and body.get("instance") != instance:
                    held.append(message)  # put back when this command ends
                    continue
                _print_event(body, as_json)
                message.ack()
        finally:
            for message in held:
                with contextlib.suppress(Exception):  # a lost connection gives them back too
                    message.requeue()


def _print_event(body: Any, as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(body), markup=False, soft_wrap=True)
        return
    try:
        event = InstanceEvent.model_validate(body)
    except Exception:
        out.print(f"(unreadable event) {json.dumps(body)[:200]}", markup=False)
        return
    tx = event.transaction
    line = Text(event.name, style="green" if tx.success else "red")
    line.append(f" {event.event_id} {tx.timestamp:%Y-%m-%d %H:%M:%S} {tx.message}")
    out.print(line, soft_wrap=True)


@main.command()
@click.option("--interface", default=None, help="Only this interface.")
@click.option("--errors", "errors_only", is_flag=True, help="Failures only.")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1, max=10000),
    help="Latest N per endpoint.",
)
def transactions(interface: str | None, errors_only: bool, limit: int) -> None:
    """The monitoring overview: latest transactions per interface and endpoint."""
    from worker.app import make_store

    with friendly_errors():
        _, backend = urls()
        config = Config(broker_url=backend, result_backend=backend)
        store = make_store(config)
        txs = store.latest_transactions(limit, interface=interface, failures_only=errors_only)
        render_overview(txs, limit)


def render_overview(txs: list[Transaction], limit: int) -> None:
    """Group by interface, then endpoint; failures first, then newest first."""
    if not txs:
        out.print("no transactions")
        return
    groups: dict[tuple[str, str], list[Transaction]] = {}
    for tx in txs:  # newest first already
        groups.setdefault((tx.interface, tx.endpoint), []).append(tx)
    for (iface, endpoint), items in sorted(groups.items()):
        items = sorted(items[:limit], key=lambda t: (t.success, -t.timestamp.timestamp()))
        failed = sum(not t.success for t in items)
        title = Text(f"{iface} / {endpoint or '(no endpoint)'}")
        if failed:
            title.append(f"  {failed} failed", style="red")
        table = Table(title=title, title_justify="left", expand=False)
        for col in ("time (UTC)", "", "event", "attempts", "message"):
            table.add_column(col, overflow="fold")
        for tx in items:
            mark = Text("ok", style="green") if tx.success else Text("FAILED", style="red")
            table.add_row(
                f"{tx.timestamp:%Y-%m-%d %H:%M:%S}",
                mark,
                Text(tx.event_id),
                str(tx.attempts),
                Text(tx.message),
            )
        out.print(table)


def probe(name: str, instance: InstanceConfig) -> ServerInfo | str:
    """Connect, EHLO, STARTTLS and AUTH as configured, then QUIT: what the server offers, or
    why that failed. Sends nothing."""
    from worker.smtp import SmtpConnection

    conn = SmtpConnection(name, instance)
    try:
        conn.open()
        return conn.server_info()
    except DeliveryError as exc:
        return str(exc)
    except Exception as exc:  # one instance's surprise is its finding, not the end of check
        return f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _ok(detail: str = "") -> Text:
    text = Text("ok", style="green")
    text.append(detail)
    return text


@main.command()
def check() -> None:
    """Validate the configuration; connect, EHLO, STARTTLS and AUTH per instance; send nothing.

    The broker, the result backend and every instance are probed at the same time (at most
    ``MAX_CHECK_THREADS`` at once), so a check takes about as long as its slowest server; the
    rows stay in the order of the instances' names.
    """
    try:
        config = load_config()
    except ConfigError as exc:
        for problem in exc.problems:
            warn(problem)
        raise SystemExit(2) from None
    if not config.instances:
        fail("the configuration has no instances", 2)
    table = Table(title="MailSender check")
    for col in ("instance", "server", "result", "TLS", "AUTH offered", "SIZE", "SMTPUTF8"):
        table.add_column(col, overflow="fold")
    instances = sorted(config.instances.items())
    pool = ThreadPoolExecutor(max_workers=min(MAX_CHECK_THREADS, len(instances) + 1))
    try:
        services = pool.submit(_check_services, config)
        probes = [pool.submit(probe, name, instance) for name, instance in instances]
        findings = [p.result() for p in probes]
        service_findings = services.result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        fail("interrupted", 130)
    pool.shutdown()
    failures = 0
    for role, url, finding in service_findings:
        failures += finding is not None
        verdict = _ok() if finding is None else Text(finding, style="red")
        table.add_row(f"({role})", Text(redact_url(url)), verdict, "", "", "", "")
    for (name, instance), info in zip(instances, findings, strict=True):
        server = Text(f"{instance.mail_server}:{instance.port}")
        if isinstance(info, str):
            failures += 1
            table.add_row(Text(name), server, Text(info, style="red"), "", "", "", "")
            continue
        auth = f", AUTH as {info.authenticated_as}" if info.authenticated_as else ""
        table.add_row(
            Text(name),
            server,
            _ok(auth),
            "yes" if info.tls else "no",
            Text(" ".join(info.auth_mechanisms) or "-"),
            str(info.size_limit) if info.size_limit else "-",
            "yes" if info.smtputf8 else "no",
        )
    out.print(table)
    if failures:
        fail(f"{failures} check(s) failed")


@main.command()
@click.argument("event_ids", nargs=-1)
def replay(event_ids: tuple[str, ...]) -> None:
    """Enqueue failed events again (all dead letters when no id is given)."""
    from worker.app import enqueue_raw, make_store
    from worker.store import DEAD_KEY

    if any(not event_id.strip() for event_id in event_ids):
        fail("an event id must not be empty", 2)
    with friendly_errors():
        broker, backend = urls()
        store = make_store(Config(broker_url=broker, result_backend=backend))
        ids = list(event_ids) or [d["eventId"] for d in store.dead_letters()]
        if not ids:
            out.print("no failed events to replay")
            return
        producer = MailProducer(broker, backend)
        missing: list[str] = []
        undecodable: list[str] = []
        for event_id in ids:
            # Looked at before take_for_replay, which resets the event's record.
            kept = store.r.hget(DEAD_KEY, event_id)
            if isinstance(kept, str | bytes) and is_undecodable(json.loads(kept)):
                undecodable.append(event_id)
                continue
            taken = store.take_for_replay(event_id)
            if taken is None:
                missing.append(event_id)
                continue
            letter, stored = taken
            enqueue_raw(
                producer.app,
                store,
                letter["event"],
                event_id,
                producer.queue_for(str(letter.get("instance", ""))),
            )
            store.forget_dead_letter(event_id, stored)  # only once it is enqueued
            out.print(f"replayed {event_id}", markup=False)
        for event_id in undecodable:
            warn(
                f"event {shown(event_id)} cannot be replayed: its task message could not be "
                "decoded; it is kept for inspection"
            )
        if missing:
            fail(f"no failed event with id {', '.join(shown(i) for i in missing)}")
        if undecodable:
            raise SystemExit(1)


def is_undecodable(letter: Any) -> bool:
    """Whether a dead letter keeps a task message the worker could not decode (pickle, not
    UTF-8, not a task): its ``event`` is then the raw message, which no worker can send."""
    event = letter.get("event") if isinstance(letter, dict) else None
    return isinstance(event, dict) and "rawMessage" in event and set(event) <= UNDECODABLE_KEYS


@main.command()
@click.option("--events", "count", default=20, show_default=True, help="How many mails.")
@click.option("--outbox", default="demo-outbox", show_default=True, type=click.Path())
def demo(count: int, outbox: str) -> None:
    """The whole pipeline on this machine: Redis, SMTP server, worker, events, checks."""
    from worker.demo import run_demo

    with friendly_errors():
        raise SystemExit(run_demo(count=count, outbox=Path(outbox)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
