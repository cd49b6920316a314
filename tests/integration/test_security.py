"""Security properties of issue 3, item 8, each proved with the hostile input as test data.

Against the session's real worker process (``fleet``), real aiosmtpd servers and Redis:

- CR/LF header injection in every header-bound field, plain and RFC 2047-encoded, through the
  producer (``InvalidEvent``, nothing enqueued) and through a raw Celery client (a failed
  transaction naming the field, nothing at the SMTP server);
- path attachments that try to leave the attachment root;
- STARTTLS that is missing or stripped, certificates of an unknown CA or for another name,
  and the loopback rule for AUTH without TLS;
- task messages that are not JSON (pickle, binary garbage);
- the SMTP password in every log, result, event and Redis key;
- what Flower shows of a task's arguments.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection, Exchange, Queue

from producer import InvalidEvent, MailDeliveryFailed, MailProducer, Transaction
from tests.conftest import PASSWORD, USER, Servers
from tests.support.fleet import EventsReader, RedisServer, WorkerProcess
from tests.support.smtp import Rule, TestSmtpServer
from tests.support.tls import MISNAMED_IDENTITY, TlsMaterial
from worker.smtp import _is_loopback

TASK_NAME = "mailsender.send"
QUEUE = "mailsender"
WAIT_S = 20.0
EVE = "eve@example.net"
"""The address every injection tries to smuggle in."""

SECRET_FORMS = {
    "clear text": PASSWORD,
    "AUTH LOGIN base64": base64.b64encode(PASSWORD.encode()).decode(),
    "AUTH PLAIN base64": base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
    "AUTH PLAIN base64 (WrongUser)": base64.b64encode(f"\0intruder\0{PASSWORD}".encode()).decode(),
    "URL-encoded": PASSWORD.replace("!", "%21"),
}
"""The session's SMTP password as it could appear anywhere."""
assert SECRET_FORMS["AUTH PLAIN base64"] == "AG1haWxlcgBTM2NyZXQtVGVzdCE="


# --- helpers ---------------------------------------------------------------------------------


def new_id(case: str) -> str:
    """A readable, unique event id for ``case``."""
    return f"sec-{case}-{uuid.uuid4().hex[:12]}"


def event(instance: str = "Plain", **fields: Any) -> dict[str, Any]:
    """A sendable baseline event (camelCase JSON) with ``fields`` on top."""
    out: dict[str, Any] = {
        "instance": instance,
        "subject": "Security",
        "message": "Hello",
        "recipients": "alice@example.com",
        "eventId": new_id(instance.lower()),
    }
    out.update(fields)
    return out


def send_raw(producer: MailProducer, raw: dict[str, Any]) -> str:
    """Enqueue ``raw`` the way any Celery client can: by task name, nothing validated."""
    event_id = str(raw["eventId"])
    producer.app.send_task(TASK_NAME, kwargs={"event": raw}, task_id=event_id, queue=QUEUE)
    return event_id


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed; return it."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def verbs(server: TestSmtpServer) -> list[str]:
    """The verb of every command line the server read."""
    return [line.split(" ", 1)[0].split(":", 1)[0].upper() for _, line, _ in server.commands]


def wire(server: TestSmtpServer, *, cleartext_only: bool = False) -> str:
    """Every command line the server read (optionally only those before TLS), one a line."""
    return "\n".join(line for _, line, tls in server.commands if not (cleartext_only and tls))


def rcpt_addresses(server: TestSmtpServer) -> list[str]:
    """The address of every RCPT the server read (a malformed line kept whole)."""
    out = []
    for _, line, _ in server.commands:
        if line[:4].upper() == "RCPT":
            match = re.fullmatch(r"(?i)RCPT TO:<([^<>]*)>.*", line)
            out.append(match.group(1) if match else line)
    return out


def stream_transactions(backend: redis.Redis, event_id: str) -> list[dict[str, Any]]:
    """The transaction log's entries for ``event_id``."""
    entries = cast(list[tuple[str, dict[str, str]]], backend.xrange("mailsender:transactions"))
    return [
        tx
        for _, fields in entries
        if (tx := json.loads(fields["transaction"]))["eventId"] == event_id
    ]


def dead_letter(backend: redis.Redis, event_id: str) -> dict[str, Any] | None:
    """The dead letter kept for ``event_id``, if any."""
    value = cast(str | None, backend.hget("mailsender:deadletters", event_id))
    return json.loads(value) if value else None


def secrets_in(text: str) -> list[str]:
    """The names of the password forms found in ``text``."""
    return [name for name, form in SECRET_FORMS.items() if form in text]


def assert_failed_at_once(
    producer: MailProducer, backend: redis.Redis, events: EventsReader, tx: Transaction
) -> None:
    """A final failure on the first attempt: FAILURE result, one stream entry, dead letter,
    ``<instance>.Failed`` event."""
    assert tx.success is False
    assert tx.count == 0
    assert tx.attempts == 1
    assert tx.recipients == []
    result = AsyncResult(tx.event_id, app=producer.app)
    assert result.state == "FAILURE"
    with pytest.raises(MailDeliveryFailed) as info:
        result.get(timeout=5)
    assert info.value.transaction == tx
    assert wait_until(lambda: bool(stream_transactions(backend, tx.event_id)), timeout_s=5)
    assert stream_transactions(backend, tx.event_id) == [tx.to_json()]
    letter = dead_letter(backend, tx.event_id)
    assert letter is not None and letter["reason"] == tx.message
    assert events.wait_for(tx.event_id)["name"] == f"{tx.instance}.Failed"


def assert_nothing_reached(server: TestSmtpServer) -> None:
    """Not a mail, not a transaction, not a RCPT for the injected address."""
    assert server.received == []
    assert server.transactions == 0
    assert EVE not in rcpt_addresses(server)
    assert "bcc" not in wire(server).lower()


@pytest.fixture
def idle_producer(redis_server: RedisServer) -> Iterator[tuple[MailProducer, redis.Redis]]:
    """A producer on a Redis database no worker consumes, and a client of that database.

    What it enqueues stays in the list ``mailsender`` for the test to read.
    """
    client = redis.Redis.from_url(redis_server.url(5))
    client.flushdb()
    p = MailProducer(redis_server.url(5), redis_server.url(5))
    yield p, client
    p.close()
    client.flushdb()
    client.close()


# --- 1. header injection ---------------------------------------------------------------------

ENCODED_CRLF_BCC = "=?UTF-8?Q?=0D=0ABcc:_eve@example.net?="
B64_CRLF_BCC = "=?UTF-8?B?" + base64.b64encode(b"\r\nBcc: eve@example.net").decode() + "?="

HEADER_INJECTIONS = [
    # (field named in the error, fields of the event)
    pytest.param("subject", {"subject": "Report\r\nBcc: eve@example.net"}, id="subject-crlf"),
    pytest.param("subject", {"subject": "Report\nBcc: eve@example.net"}, id="subject-lf"),
    pytest.param("subject", {"subject": "Report\rBcc: eve@example.net"}, id="subject-cr"),
    pytest.param("subject", {"subject": f"Report {ENCODED_CRLF_BCC}"}, id="subject-rfc2047-q"),
    pytest.param("subject", {"subject": f"Report {B64_CRLF_BCC}"}, id="subject-rfc2047-b"),
    pytest.param("subject", {"subject": "=?UTF-8?Q?=0D=0A?="}, id="subject-rfc2047-only-crlf"),
    pytest.param(
        "recipients", {"recipients": "alice@example.com\r\nBcc: eve@example.net"}, id="to-crlf"
    ),
    pytest.param(
        "recipients",
        {"recipients": ["alice@example.com", "bob@example.org\nBcc: eve@example.net"]},
        id="to-list-item-lf",
    ),
    pytest.param(
        "recipients",
        {"recipients": '"Alice\r\nBcc: eve@example.net" <alice@example.com>'},
        id="to-display-name-crlf",
    ),
    pytest.param(
        "recipients",
        {"recipients": f"{ENCODED_CRLF_BCC} <alice@example.com>"},
        id="to-display-name-rfc2047",
    ),
    pytest.param(
        "recipients",
        {"recipients": f'"Alice {ENCODED_CRLF_BCC}" <alice@example.com>'},
        id="to-quoted-display-name-rfc2047",
    ),
    pytest.param("cc", {"cc": "bob@example.org\r\nBcc: eve@example.net"}, id="cc-crlf"),
    pytest.param("cc", {"cc": f"{B64_CRLF_BCC} <bob@example.org>"}, id="cc-display-name-rfc2047"),
    pytest.param("bcc", {"bcc": "bob@example.org\nTo: eve@example.net"}, id="bcc-lf"),
    pytest.param(
        "bcc", {"bcc": f"{ENCODED_CRLF_BCC} <bob@example.org>"}, id="bcc-display-name-rfc2047"
    ),
    pytest.param("replyTo", {"replyTo": "bob@example.org\r\nBcc: eve@example.net"}, id="rt-crlf"),
    pytest.param(
        "replyTo",
        {"replyTo": '"Bob\nBcc: eve@example.net" <bob@example.org>'},
        id="rt-display-name-lf",
    ),
    pytest.param("replyTo", {"replyTo": f"{ENCODED_CRLF_BCC} <bob@example.org>"}, id="rt-rfc2047"),
    pytest.param(
        "attachments.0.filename",
        {"attachments": [{"filename": "a.txt\r\nBcc: eve@example.net", "content": "SGk="}]},
        id="filename-crlf",
    ),
    pytest.param(
        "attachments.0.filename",
        {"attachments": [{"filename": "a.txt\nBcc: eve@example.net", "content": "SGk="}]},
        id="filename-lf",
    ),
    pytest.param(
        "attachments.0.filename",
        {"attachments": [{"filename": f"{ENCODED_CRLF_BCC}.txt", "content": "SGk="}]},
        id="filename-rfc2047-q",
    ),
    pytest.param(
        "attachments.0.filename",
        {"attachments": [{"filename": "=?UTF-8?Q?=0D=0A?=", "content": "SGk="}]},
        id="filename-rfc2047-only-crlf",
    ),
    pytest.param(
        "attachments.1.filename",
        {
            "attachments": [
                {"filename": "ok.txt", "content": "SGk="},
                {"filename": f"{B64_CRLF_BCC}.pdf", "content": "SGk="},
            ]
        },
        id="second-filename-rfc2047-b",
    ),
]


@pytest.mark.parametrize(("field", "fields"), HEADER_INJECTIONS)
def test_producer_refuses_header_injection_and_enqueues_nothing(
    idle_producer: tuple[MailProducer, redis.Redis], field: str, fields: dict[str, Any]
) -> None:
    producer, broker = idle_producer
    hostile = event(**fields)
    with pytest.raises(InvalidEvent) as info:
        producer.send(hostile)
    text = str(info.value)
    assert f"{field}:" in text, f"the error does not name {field!r}: {text}"
    assert "line break" in text, text
    # Nothing was enqueued: the producer's database holds no message at all.
    assert broker.llen(QUEUE) == 0
    assert broker.dbsize() == 0
    # A batch with one hostile event enqueues none of the batch either.
    with pytest.raises(InvalidEvent):
        producer.send_many([event(), hostile])
    assert broker.llen(QUEUE) == 0


@pytest.mark.parametrize(("field", "fields"), HEADER_INJECTIONS)
def test_raw_client_header_injection_fails_naming_the_field_and_sends_nothing(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    field: str,
    fields: dict[str, Any],
) -> None:
    event_id = send_raw(producer, event(**fields))
    tx = producer.receipt(event_id).wait(timeout_s=WAIT_S)

    assert f"{field}:" in tx.message, f"the failure does not name {field!r}: {tx.message}"
    assert "line break" in tx.message, tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert fleet.plain.connections == 0, "the worker connected for an event it must refuse"
    assert_nothing_reached(fleet.plain)


def test_file_name_with_line_break_on_disk_is_not_sent(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    attachment_root: Path,
) -> None:
    """A path attachment inside the root whose *file name* carries CR/LF (the name goes into
    Content-Disposition): the producer cannot see it, the worker must refuse it."""
    name = f"report-{uuid.uuid4().hex[:6]}.txt\r\nBcc: eve@example.net"
    (attachment_root / name).write_bytes(b"quarterly figures\n")
    receipt = producer.send(event(attachments=[{"path": name}]))
    tx = receipt.wait(timeout_s=WAIT_S)

    assert "attachment" in tx.message, tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert_nothing_reached(fleet.plain)


# --- 2. attachment paths stay inside the root ------------------------------------------------


def _escape(kind: str, root: Path) -> str:
    """A path attachment of ``kind`` that names /etc/passwd from inside ``root``."""
    tag = uuid.uuid4().hex[:8]
    if kind == "dotdot":
        return "../" * (len(root.parts) + 2) + "etc/passwd"
    if kind == "dotdot-through-subdir":
        (root / f"sub-{tag}").mkdir()
        return f"sub-{tag}/" + "../" * (len(root.parts) + 3) + "etc/passwd"
    if kind == "absolute":
        return "/etc/passwd"
    if kind == "absolute-through-root":
        return f"{root}/../../../../../../../../etc/passwd"
    if kind == "symlink-file":
        (root / f"passwd-{tag}.txt").symlink_to("/etc/passwd")
        return f"passwd-{tag}.txt"
    if kind == "symlink-dir":
        (root / f"etc-{tag}").symlink_to("/etc", target_is_directory=True)
        return f"etc-{tag}/passwd"
    if kind == "symlink-relative":
        (root / f"up-{tag}").symlink_to("../" * (len(root.parts) + 2) + "etc")
        return f"up-{tag}/passwd"
    raise AssertionError(kind)


ESCAPES = [
    "dotdot",
    "dotdot-through-subdir",
    "absolute",
    "absolute-through-root",
    "symlink-file",
    "symlink-dir",
    "symlink-relative",
]


@pytest.mark.parametrize("kind", ESCAPES)
def test_path_attachment_cannot_escape_the_root(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    attachment_root: Path,
    kind: str,
) -> None:
    assert Path("/etc/passwd").is_file()  # the target exists: only the root check can stop it
    path = _escape(kind, attachment_root)
    tx = producer.send(event(attachments=[{"path": path}])).wait(timeout_s=WAIT_S)

    assert repr(path) in tx.message, tx.message
    assert "outside the attachment root" in tx.message
    assert "root:" not in tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert fleet.plain.connections == 0
    assert_nothing_reached(fleet.plain)


def test_one_escaping_path_in_a_semicolon_list_fails_the_whole_event(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    attachment_root: Path,
) -> None:
    inside = f"inside-{uuid.uuid4().hex[:8]}.txt"
    (attachment_root / inside).write_bytes(b"fine\n")
    tx = producer.send(event(attachments=f"{inside};/etc/passwd")).wait(timeout_s=WAIT_S)

    assert "'/etc/passwd'" in tx.message
    assert "outside the attachment root" in tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert_nothing_reached(fleet.plain)


NUL_PATHS = [
    pytest.param("report.txt\x00../../../../etc/passwd", id="nul-then-dotdot"),
    pytest.param("/etc/passwd\x00.txt", id="absolute-nul-suffix"),
    pytest.param("\x00", id="nul-only"),
]


@pytest.mark.parametrize("path", NUL_PATHS)
def test_producer_refuses_nul_bytes_in_paths(
    idle_producer: tuple[MailProducer, redis.Redis], path: str
) -> None:
    producer, broker = idle_producer
    with pytest.raises(InvalidEvent) as info:
        producer.send(event(attachments=[{"path": path}]))
    assert "attachments.0.path:" in str(info.value)
    assert broker.dbsize() == 0


@pytest.mark.parametrize("path", NUL_PATHS)
def test_raw_client_nul_bytes_in_paths_fail_without_sending(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    path: str,
) -> None:
    event_id = send_raw(producer, event(attachments=[{"path": path}]))
    tx = producer.receipt(event_id).wait(timeout_s=WAIT_S)

    assert "attachments.0.path:" in tx.message, tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert_nothing_reached(fleet.plain)


# --- 3. STARTTLS, certificates, AUTH in clear ------------------------------------------------


def assert_no_auth_no_mail_no_secret(server: TestSmtpServer) -> None:
    """The client stopped before AUTH and MAIL; no form of the password crossed the wire."""
    seen = verbs(server)
    assert "EHLO" in seen
    assert "AUTH" not in seen
    assert "MAIL" not in seen
    assert server.received == []
    assert secrets_in(wire(server)) == []


def test_use_ssl_against_a_server_without_starttls_never_falls_back(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    """The server offers AUTH in clear text but no STARTTLS: the worker must not take it."""
    tx = producer.send(event("NoStarttls")).wait(timeout_s=WAIT_S)

    assert "STARTTLS" in tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert_no_auth_no_mail_no_secret(fleet.no_starttls)
    assert fleet.no_starttls.connections == 1, "retried a permanent failure"
    assert secrets_in(fleet_worker.log()) == []


def test_starttls_stripped_from_the_ehlo_reply_is_not_a_downgrade(
    fleet: Servers, producer: MailProducer, events: EventsReader, backend: redis.Redis
) -> None:
    """A man in the middle removes STARTTLS from the EHLO reply of the real (secure) server
    and advertises AUTH instead: the worker must stop before AUTH."""
    fleet.secure.add_rule(Rule("ehlo", "250-mail.example\r\n250 AUTH PLAIN LOGIN", times=None))
    tx = producer.send(event("Secure")).wait(timeout_s=WAIT_S)

    assert "STARTTLS" in tx.message
    assert_failed_at_once(producer, backend, events, tx)
    assert_no_auth_no_mail_no_secret(fleet.secure)
    assert "STARTTLS" not in verbs(fleet.secure)


@pytest.mark.parametrize(
    ("instance_name", "why"),
    [
        pytest.param("Untrusted", "unknown CA", id="unknown-ca"),
        pytest.param("Misnamed", "name mismatch", id="host-name-mismatch"),
    ],
)
def test_certificate_and_host_name_are_verified_before_auth(
    fleet: Servers,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    instance_name: str,
    why: str,
) -> None:
    server = fleet.untrusted if instance_name == "Untrusted" else fleet.misnamed
    tx = producer.send(event(instance_name)).wait(timeout_s=WAIT_S)

    assert "certificate verification failed" in tx.message, f"{why}: {tx.message}"
    assert_failed_at_once(producer, backend, events, tx)
    assert verbs(server)[:2] == ["EHLO", "STARTTLS"]
    assert_no_auth_no_mail_no_secret(server)


def _socket_after_starttls(port: int) -> socket.socket:
    """A plain socket to 127.0.0.1:``port`` that has said EHLO and STARTTLS (reply 220)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    reader = sock.makefile("rb")

    def reply() -> bytes:
        while (line := reader.readline())[3:4] == b"-":
            pass
        return line

    assert reply().startswith(b"220")
    sock.sendall(b"EHLO client.example\r\n")
    assert reply().startswith(b"250")
    sock.sendall(b"STARTTLS\r\n")
    assert reply().startswith(b"220")
    reader.close()
    return sock


def test_the_misnamed_certificate_is_valid_for_its_own_name(
    fleet: Servers, misnamed_tls: TlsMaterial
) -> None:
    """Control for the host-name case: the CA is trusted and the certificate is good for
    ``mail.example.test``; only the name the instance connects by (127.0.0.1) is wrong."""
    context = ssl.create_default_context(cafile=str(misnamed_tls.ca_pem_path))
    with context.wrap_socket(
        _socket_after_starttls(fleet.misnamed.port), server_hostname=MISNAMED_IDENTITY
    ) as tls:
        assert tls.version() is not None
    with (
        _socket_after_starttls(fleet.misnamed.port) as sock,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        context.wrap_socket(sock, server_hostname="127.0.0.1")


LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "0:0:0:0:0:0:0:1", "::1%lo"]
NOT_LOOPBACK = [
    "10.0.0.5",
    "192.168.1.20",
    "172.16.0.1",
    "8.8.8.8",
    "0.0.0.0",
    "::",
    "fe80::1%eth0",
    "2001:db8::1",
    "::ffff:10.0.0.5",
    "128.0.0.1",
    "",
    "localhost",  # a name, not the peer's address: never trusted as loopback
    "127.0.0.1.evil.example",
    "2130706433",  # 127.0.0.1 as an integer string
    "127.1",
    "0x7f.0.0.1",
]


@pytest.mark.parametrize("address", LOOPBACK)
def test_auth_without_tls_is_allowed_only_to_a_loopback_peer(address: str) -> None:
    """Unit level: ``SmtpConnection._authenticate`` sends credentials without TLS only when
    ``_is_loopback(peer address)``. A non-loopback SMTP server cannot be reached from the test
    machine, so the rule is pinned on the predicate with hostile peer strings."""
    assert _is_loopback(address) is True


@pytest.mark.parametrize("address", NOT_LOOPBACK)
def test_auth_without_tls_is_refused_to_any_other_peer(address: str) -> None:
    assert _is_loopback(address) is False


# --- 4. only JSON --------------------------------------------------------------------------


class _Hostile:
    """Unpickling this creates ``self.marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def publish_raw(broker_url: str, task_id: str, body: bytes, content_type: str) -> None:
    """Publish a task message for ``mailsender.send`` with kombu, bypassing Celery's encoder."""
    exchange = Exchange(QUEUE, type="direct")
    queue = Queue(QUEUE, exchange, routing_key=QUEUE)
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "shadow": None,
        "eta": None,
        "expires": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test_security",
        "ignore_result": False,
    }
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            body,
            exchange=exchange,
            routing_key=QUEUE,
            declare=[queue],
            headers=headers,
            content_type=content_type,
            content_encoding="binary" if "json" not in content_type else "utf-8",
            correlation_id=task_id,
            delivery_mode=2,
        )


def pickled_task_body(marker: Path) -> bytes:
    """A Celery protocol 2 body ``(args, kwargs, embed)`` as a hostile pickle."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return pickle.dumps(((), {"event": _Hostile(marker)}, embed))


@pytest.mark.parametrize("kind", ["pickle", "binary-garbage"])
def test_only_json_task_messages_are_run(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    redis_server: RedisServer,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
    tmp_path: Path,
    kind: str,
) -> None:
    marker = tmp_path / "pickle-was-loaded"
    task_id = new_id(kind)
    if kind == "pickle":
        body = pickled_task_body(marker)
        publish_raw(redis_server.url(0), task_id, body, "application/x-python-serialize")
    else:
        body = b"\xff\xfe\x00\x81garbage\xc3(" + bytes(range(256))
        publish_raw(redis_server.url(0), task_id, body, "application/json")

    # Each ends as a failed transaction in the stream and a dead letter.
    assert wait_until(lambda: bool(stream_transactions(backend, task_id))), (
        f"no transaction for the {kind} message; worker log:\n{fleet_worker.log()[-3000:]}"
    )
    [tx] = stream_transactions(backend, task_id)
    assert tx["success"] is False
    assert tx["count"] == 0
    reason = str(tx["message"]).lower()
    assert "json" in reason or "pickle" in reason, tx["message"]
    letter = dead_letter(backend, task_id)
    assert letter is not None, "the rejected message is not kept as a dead letter"
    assert letter["reason"] == tx["message"]
    assert base64.b64decode(letter["event"]["rawMessage"]) == body  # kept for inspection
    assert AsyncResult(task_id, app=producer.app).state == "FAILURE"
    assert events.wait_for(task_id)["name"].endswith(".Failed")

    # Not executed: the pickle never ran, nothing reached an SMTP server.
    assert not marker.exists(), "the worker unpickled a task message"
    assert all(server.transactions == 0 for server in fleet.all())
    # Not requeued for ever: the message left the queue and the unacked set.
    broker = redis.Redis.from_url(redis_server.url(0), decode_responses=True)
    assert wait_until(
        lambda: task_id not in "".join(cast(list[str], broker.lrange(QUEUE, 0, -1))), 5
    )
    assert wait_until(lambda: task_id not in "".join(cast(list[str], broker.hvals("unacked"))), 5)
    broker.close()

    # The worker keeps running and delivers the next event.
    assert fleet_worker.proc is not None and fleet_worker.proc.poll() is None
    assert producer.send(event()).wait(timeout_s=WAIT_S).success is True


def _envelope(body: bytes, headers: dict[str, Any]) -> bytes:
    """A kombu message envelope as the Redis transport keeps it on the queue list."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "delivery_mode": 2,
            },
        }
    ).encode()


HOSTILE_ITEMS = [
    pytest.param(b"this is not json at all", id="not-json"),
    pytest.param(b"\xff\xfe\x00binary", id="binary"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(b'{"body": "!!!", "headers": {}}', id="no-properties"),
]


@pytest.mark.parametrize("item", HOSTILE_ITEMS)
def test_a_queue_item_that_is_not_a_message_is_set_aside_and_the_worker_goes_on(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    redis_server: RedisServer,
    producer: MailProducer,
    item: bytes,
) -> None:
    broker = redis.Redis.from_url(redis_server.url(0))
    broker.delete("mailsender:unreadable")
    broker.lpush(QUEUE, item)
    assert wait_until(lambda: broker.lrange("mailsender:unreadable", 0, -1) == [item], 10), (
        f"not set aside; worker log:\n{fleet_worker.log()[-3000:]}"
    )
    assert "moved to mailsender:unreadable" in fleet_worker.log()
    broker.close()
    assert fleet_worker.proc is not None and fleet_worker.proc.poll() is None
    assert producer.send(event()).wait(timeout_s=WAIT_S).success is True


def test_a_task_message_whose_body_is_not_args_kwargs_embed_is_kept_not_fatal(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    redis_server: RedisServer,
    producer: MailProducer,
    backend: redis.Redis,
) -> None:
    task_id = new_id("bad-body")
    broker = redis.Redis.from_url(redis_server.url(0))
    headers = {"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id}
    broker.lpush(QUEUE, _envelope(b'{"not": "a list"}', headers))
    assert wait_until(lambda: bool(stream_transactions(backend, task_id))), (
        f"no transaction; worker log:\n{fleet_worker.log()[-3000:]}"
    )
    [tx] = stream_transactions(backend, task_id)
    assert tx["success"] is False
    assert "malformed" in tx["message"]
    assert dead_letter(backend, task_id) is not None
    # Acknowledged: not met again by this worker or the next one.
    assert wait_until(lambda: task_id not in repr(broker.hvals("unacked")), 5)
    assert task_id not in repr(broker.lrange(QUEUE, 0, -1))
    broker.close()
    assert fleet_worker.proc is not None and fleet_worker.proc.poll() is None
    assert producer.send(event()).wait(timeout_s=WAIT_S).success is True


@pytest.mark.parametrize("id_header", ["null", "absent"])
def test_a_task_message_without_a_task_id_ends_once_and_does_not_loop(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    redis_server: RedisServer,
    id_header: str,
) -> None:
    broker = redis.Redis.from_url(redis_server.url(0))
    headers: dict[str, Any] = {"lang": "py", "task": TASK_NAME, "id": None, "root_id": None}
    if id_header == "absent":
        del headers["id"]
    subject = new_id("no-task-id")
    body = json.dumps([[], {"event": event(subject=subject)}, {}]).encode()
    broker.lpush(QUEUE, _envelope(body, headers))
    broker.close()
    assert fleet.plain.wait_for(lambda s: len(s.received) == 1, timeout_s=WAIT_S)
    time.sleep(1.5)  # no second copy: the message is not requeued for ever
    [mail] = fleet.plain.received
    assert mail.message()["subject"] == subject
    assert "infrastructure unavailable" not in fleet_worker.log()


def test_hand_made_batches_without_ids_are_not_taken_for_each_other(
    fleet: Servers, fleet_worker: WorkerProcess, redis_server: RedisServer
) -> None:
    """Two `mailsender.send_batch` messages without a task id, whose events have no eventId:
    each event gets an id derived from its own message, so none is found "already final"."""
    broker = redis.Redis.from_url(redis_server.url(0))
    subjects = [new_id(f"batch-no-id-{i}") for i in range(4)]
    for pair in (subjects[:2], subjects[2:]):
        events = []
        for subject in pair:
            one = event(subject=subject, recipients=f"{subject}@example.com")
            del one["eventId"]
            events.append(one)
        body = json.dumps([[], {"events": events}, {}]).encode()
        headers = {"lang": "py", "task": "mailsender.send_batch", "root_id": None}
        broker.lpush(QUEUE, _envelope(body, headers))
    broker.close()
    assert fleet.plain.wait_for(lambda s: len(s.received) == 4, timeout_s=WAIT_S)
    time.sleep(1)
    assert sorted(m.message()["subject"] for m in fleet.plain.received) == sorted(subjects)


# --- 5. the password is nowhere -------------------------------------------------------------

_B64_RUN = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def _expand(blob: bytes) -> bytes:
    """``blob`` plus whatever its base64 runs decode to (two levels: kombu wraps bodies)."""
    out = [blob]
    frontier = [blob]
    for _ in range(2):
        found = []
        for chunk in frontier:
            for run in _B64_RUN.findall(chunk):
                try:
                    found.append(base64.b64decode(run + b"=" * (-len(run) % 4)))
                except ValueError:
                    continue
        out += found
        frontier = found
    return b"\n".join(out)


def dump_redis(url: str) -> dict[str, bytes]:
    """Every key of every database of the Redis at ``url`` → its whole value, as bytes."""
    dumped: dict[str, bytes] = {}
    base = url.rsplit("/", 1)[0]
    for db in range(16):
        client = redis.Redis.from_url(f"{base}/{db}")
        for key in client.scan_iter(count=1000):
            kind = cast(bytes, client.type(key)).decode()
            value: Any
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            dumped[f"db{db}:{key.decode(errors='replace')}"] = _expand(repr(value).encode())
        client.close()
    return dumped


def test_the_password_appears_in_no_log_result_event_or_redis_key(
    fleet: Servers,
    fleet_worker: WorkerProcess,
    redis_server: RedisServer,
    producer: MailProducer,
    events: EventsReader,
    backend: redis.Redis,
) -> None:
    """After a rejected password (535), a refused STARTTLS and a success, the password is not
    in the worker log, the task results, the instance events, the dead letters, the stream,
    the event records, or any other key of the broker's and the backend's Redis."""
    wrong = producer.send(event("WrongUser"))
    no_tls = producer.send(event("NoStarttls"))
    good = producer.send(event("Secure"))
    wrong_tx = wrong.wait(timeout_s=WAIT_S)
    no_tls_tx = no_tls.wait(timeout_s=WAIT_S)
    good_tx = good.wait(timeout_s=WAIT_S)
    assert wrong_tx.success is False and "535" in wrong_tx.message
    assert no_tls_tx.success is False
    assert good_tx.success is True
    # The password did go to the secure server, inside TLS only.
    assert fleet.secure.received and fleet.secure.received[0].auth_user == USER
    assert secrets_in(wire(fleet.secure, cleartext_only=True)) == []
    assert secrets_in(wire(fleet.no_starttls)) == []

    places: dict[str, str] = {"worker log": fleet_worker.log()}
    for receipt in (wrong, no_tls, good):
        result = AsyncResult(receipt.event_id, app=producer.app)
        try:
            places[f"result {receipt.event_id}"] = json.dumps(result.get(timeout=5))
        except MailDeliveryFailed as exc:
            places[f"result {receipt.event_id}"] = f"{exc} {exc.args!r} {result.traceback}"
        places[f"instance event {receipt.event_id}"] = json.dumps(events.wait_for(receipt.event_id))
    for key, blob in dump_redis(redis_server.url(0)).items():
        places[f"redis {key}"] = blob.decode("utf-8", errors="replace")

    # The scan saw what it had to see: the dead letter, the stream and the event records.
    every_key = " ".join(places)
    assert "mailsender:deadletters" in every_key
    assert "mailsender:transactions" in every_key
    assert f"mailsender:event:{wrong.event_id}" in every_key
    assert wrong.event_id in places["redis db1:mailsender:deadletters"]

    leaks = {where: found for where, text in places.items() if (found := secrets_in(text))}
    assert leaks == {}, f"the password leaked: {leaks}"


# --- 6. Flower shows no bodies ---------------------------------------------------------------


def _shown_in_flower(message: dict[str, Any]) -> str:
    """What Flower shows as a task's arguments: the ``argsrepr`` and ``kwargsrepr`` headers."""
    headers = message["headers"]
    return f"{headers['argsrepr']} {headers['kwargsrepr']}"


def _events_in(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a raw task message carries (``event`` or a batch's ``events``)."""
    kwargs = json.loads(base64.b64decode(message["body"]))[1]
    return [kwargs["event"]] if "event" in kwargs else list(kwargs["events"])


def test_task_arguments_shown_in_flower_are_a_redacted_summary(
    idle_producer: tuple[MailProducer, redis.Redis],
) -> None:
    """The raw task messages, read from the queue before any worker takes them: the body and
    the attachment content travel in the message, but not in what Flower shows."""
    producer, broker = idle_producer
    tag = uuid.uuid4().hex
    attachment = f"ATTACHMENT-{tag} salary list".encode()
    attachment_b64 = base64.b64encode(attachment).decode()
    secrets = [
        f"BODY-{tag} Dear customer, your IBAN is DE02 1203 0000 0000 2020",
        f"<p>HTML-{tag}</p>",
        attachment_b64,
        attachment.decode(),
    ]
    with_attachment = [{"filename": "pay.txt", "content": attachment_b64}]
    single = producer.send(event(message=secrets[0], attachments=with_attachment))
    producer.send(event(message=secrets[1], isHtml=True, subject="html"))
    producer.send_many(
        [
            event(message=secrets[0], attachments=with_attachment),
            event(message=secrets[1], isHtml=True),
            event(message=secrets[0], cc="bob@example.org"),
        ]
    )
    messages = [json.loads(m) for m in broker.lrange(QUEUE, 0, -1)]
    carried = [e for m in messages for e in _events_in(m)]
    assert len(carried) == 5, "the test must read every message it enqueued"
    # The messages do carry the bodies and the attachment (so this reads the right thing) ...
    assert {e["message"] for e in carried} == set(secrets[:2])
    assert sum(1 for e in carried if e.get("attachments")) == 2

    # ... but what Flower shows carries none of it.
    for message in messages:
        shown = _shown_in_flower(message)
        for secret in secrets:
            assert secret not in shown
            assert secret[:16] not in shown
        assert tag not in shown
        assert "Plain" in shown
        assert len(shown) < 400

    [one] = [m for m in messages if m["headers"]["id"] == single.event_id]
    shown = _shown_in_flower(one)
    assert single.event_id in shown
    assert "'attachments': 1" in shown
