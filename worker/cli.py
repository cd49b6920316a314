"""The ``mailsender`` command (contract §6). Errors: one sentence on stderr, non-zero exit."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import redis
from kombu import Connection
from kombu.exceptions import OperationalError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer import names
from producer.client import MailProducer, redact_url
from producer.errors import BROKER_REFUSALS, InvalidEvent, MailSenderError
from producer.models import Attachment, InstanceEvent, MailEvent, Transaction
from worker.config import ENV_CONFIG, Config, load_config
from worker.errors import ConfigError, DeliveryError, WorkerError

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, status: int = 1) -> NoReturn:
    """Print one sentence to stderr and exit."""
    err.print(f"mailsender: {message}", markup=False, soft_wrap=True)
    raise SystemExit(status)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn every expected error into one sentence and an exit status."""
    try:
        yield
    except (ConfigError, InvalidEvent) as exc:
        fail(str(exc), 2)
    except (MailSenderError, WorkerError) as exc:
        fail(str(exc))
    except redis.ConnectionError as exc:
        fail(f"cannot reach Redis: {exc}")
    except OperationalError as exc:
        fail(f"cannot reach the broker: {exc}")
    except BROKER_REFUSALS as exc:
        fail(f"the broker refused the connection: {exc}")
    except TimeoutError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def optional_config() -> Config | None:
    """The configuration if its file exists (errors exit 2); None without a file."""
    import os

    path = Path(os.environ.get(ENV_CONFIG) or "./mailsender.yaml")
    if not path.exists():
        if os.environ.get(ENV_CONFIG):
            fail(f"configuration file {str(path)!r} not found ({ENV_CONFIG})", 2)
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), 2)


def urls() -> tuple[str, str]:
    """Broker and result backend URLs: environment, else the config file, else defaults."""
    import os

    config = optional_config()
    broker = os.environ.get(names.ENV_BROKER_URL) or (
        config.broker_url if config else names.DEFAULT_BROKER_URL
    )
    backend = os.environ.get(names.ENV_RESULT_BACKEND) or (config.backend_url if config else broker)
    return broker, backend


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


def _print_transaction(tx: Transaction) -> None:
    out.print_json(json.dumps(tx.to_json()))


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
    type=click.Path(dir_okay=False),
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
        attachments = []
        for path in attach:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                fail(f"cannot read attachment {path!r}: {exc.strerror}")
            attachments.append(Attachment.inline(Path(path).name, data))
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
        out.print(receipt.event_id)
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
        held: list[Any] = []
        with Connection(broker, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=2)
            queue = EVENTS_QUEUE(conn.default_channel)
            queue.declare()
            try:
                while True:
                    message = queue.get(no_ack=False, accept=["json"])
                    if message is None:
                        if not follow:
                            break
                        time.sleep(0.2)
                        continue
                    body = message.payload
                    if instance and isinstance(body, dict) and body.get("instance") != instance:
                        held.append(message)
                        continue
                    _print_event(body, as_json)
                    message.ack()
            finally:
                for message in held:
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
    style = "green" if tx.success else "red"
    out.print(
        f"[{style}]{event.name}[/{style}] {event.event_id} "
        f"{tx.timestamp:%Y-%m-%d %H:%M:%S} {tx.message}",
        soft_wrap=True,
    )


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
        txs = store.transactions()
        if interface:
            txs = [t for t in txs if t.interface == interface]
        if errors_only:
            txs = [t for t in txs if not t.success]
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
        title = f"{iface} / {endpoint or '(no endpoint)'}"
        if failed:
            title += f"  [red]{failed} failed[/red]"
        table = Table(title=title, title_justify="left", expand=False)
        for col in ("time (UTC)", "", "event", "attempts", "message"):
            table.add_column(col, overflow="fold")
        for tx in items:
            mark = "[green]ok[/green]" if tx.success else "[red]FAILED[/red]"
            table.add_row(
                f"{tx.timestamp:%Y-%m-%d %H:%M:%S}",
                mark,
                tx.event_id,
                str(tx.attempts),
                tx.message,
            )
        out.print(table)


@main.command()
def check() -> None:
    """Validate the configuration; connect, EHLO, STARTTLS and AUTH per instance; send nothing."""
    from worker.smtp import SmtpConnection

    try:
        config = load_config()
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"mailsender: {problem}", markup=False, soft_wrap=True)
        raise SystemExit(2) from None
    if not config.instances:
        fail("the configuration has no instances", 2)
    table = Table(title="MailSender check")
    for col in ("instance", "server", "result", "TLS", "AUTH offered", "SIZE", "SMTPUTF8"):
        table.add_column(col, overflow="fold")
    failures = 0
    for role, url, finding in _check_services(config):
        failures += finding is not None
        verdict = "[green]ok[/green]" if finding is None else f"[red]{escape(finding)}[/red]"
        table.add_row(f"({role})", redact_url(url), verdict, "", "", "", "")
    for name, instance in sorted(config.instances.items()):
        conn = SmtpConnection(name, instance)
        server = f"{instance.mail_server}:{instance.port}"
        try:
            conn.open()
            info = conn.server_info()
        except DeliveryError as exc:
            failures += 1
            table.add_row(name, server, f"[red]{escape(str(exc))}[/red]", "", "", "", "")
            continue
        finally:
            conn.close()
        result = "[green]ok[/green]" + (
            f", AUTH as {info.authenticated_as}" if info.authenticated_as else ""
        )
        table.add_row(
            name,
            server,
            result,
            "yes" if info.tls else "no",
            " ".join(info.auth_mechanisms) or "-",
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

    with friendly_errors():
        broker, backend = urls()
        store = make_store(Config(broker_url=broker, result_backend=backend))
        ids = list(event_ids) or [d["eventId"] for d in store.dead_letters()]
        if not ids:
            out.print("no failed events to replay")
            return
        producer = MailProducer(broker, backend)
        missing = []
        for event_id in ids:
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
            out.print(f"replayed {event_id}")
        if missing:
            fail(f"no failed event with id {', '.join(missing)}")


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
