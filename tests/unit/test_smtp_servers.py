"""Tests of the SMTP servers themselves: the dev server and the test harness server.

Plain :mod:`smtplib` is the client here: these tests check the servers, not the product.
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.smtp import DROP, Rule, TestSmtpServer
from tests.support.tls import TlsMaterial, tls_material, untrusted_tls_material
from worker.devserver import DevSmtpServer

HOST = "127.0.0.1"
USERS = {"mailer": "s3cret-Passw0rd"}
BODY = (
    b"From: sender@example.org\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BCezi?=\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"Gr\xc3\xbcezi mitenand\r\n"
    b"..two dots\r\n"
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """Trusted TLS material shared by the module (CA generation is not free)."""
    return tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def client_context(tls: TlsMaterial) -> ssl.SSLContext:
    """A verifying client context that trusts the test CA."""
    return ssl.create_default_context(cafile=str(tls.ca_pem_path))


@pytest.fixture
def server() -> Iterator[TestSmtpServer]:
    """A plain (no TLS, no AUTH) harness server."""
    with TestSmtpServer() as srv:
        yield srv


@pytest.fixture
def secure_server(tls: TlsMaterial) -> Iterator[TestSmtpServer]:
    """A harness server with STARTTLS and AUTH."""
    with TestSmtpServer(tls=tls, users=USERS) as srv:
        yield srv


def connect(port: int, host: str = HOST) -> smtplib.SMTP:
    """An smtplib client (fixed local name: ``socket.getfqdn()`` can be slow)."""
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=5)


def secure_session(port: int, context: ssl.SSLContext, host: str = HOST) -> smtplib.SMTP:
    """Connect, STARTTLS, EHLO again and log in."""
    client = connect(port, host)
    client.starttls(context=context)
    client.ehlo()
    client.login("mailer", USERS["mailer"])
    return client


# -- TestSmtpServer ---------------------------------------------------------


def test_starttls_auth_and_byte_exact_storage(
    secure_server: TestSmtpServer, client_context: ssl.SSLContext
) -> None:
    with connect(secure_server.port, "localhost") as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # AUTH only after TLS
        client.starttls(context=client_context)
        client.ehlo()
        assert client.has_extn("auth")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.login("mailer", USERS["mailer"])
        refused = client.sendmail(
            "sender@example.org", ["rcpt@example.org"], BODY, mail_options=["body=8bitmime"]
        )
    assert refused == {}
    [mail] = secure_server.received
    assert mail.data == BODY
    assert mail.mail_from == "sender@example.org"
    assert mail.rcpt_tos == ["rcpt@example.org"]
    assert mail.rcpt_options == [[]]
    assert mail.mail_options == ["BODY=8BITMIME"]  # aiosmtpd upper-cases MAIL parameters
    assert mail.tls is True
    assert mail.auth_user == "mailer"
    assert mail.connection_id == 1
    assert mail.message()["Subject"] == "Grüezi"
    assert secure_server.connections == 1
    assert secure_server.transactions == 1
    assert secure_server.accepted_count("RCPT@example.org") == 1


def test_command_log_has_auth_lines_and_tls_flag(
    secure_server: TestSmtpServer, client_context: ssl.SSLContext
) -> None:
    with secure_session(secure_server.port, client_context) as client:
        client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
    with connect(secure_server.port) as client:  # AUTH LOGIN: continuation lines
        client.starttls(context=client_context)
        client.ehlo()
        client.user, client.password = "mailer", USERS["mailer"]
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
    log = secure_server.commands
    plain = base64.b64encode(b"\0mailer\0" + USERS["mailer"].encode()).decode()
    assert (1, f"AUTH PLAIN {plain}", True) in log
    login_lines = [line for cid, line, _ in log if cid == 2]
    assert base64.b64encode(USERS["mailer"].encode()).decode() in login_lines
    verbs = [(line.split()[0].upper(), tls_on) for cid, line, tls_on in log if cid == 1]
    assert verbs[:3] == [("EHLO", False), ("STARTTLS", False), ("EHLO", True)]
    assert all(tls_on for _, tls_on in verbs[2:])
    assert ("DATA", True) in verbs
    assert not any(b"mitenand" in line.encode("utf-8", "surrogateescape") for _, line, _ in log)


def test_auth_refused_before_starttls(secure_server: TestSmtpServer) -> None:
    with connect(secure_server.port) as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode())
        assert code == 538
        assert client.docmd("MAIL", "FROM:<sender@example.org>")[0] == 530
    assert secure_server.commands[1][2] is False


def test_wrong_password_is_535(
    secure_server: TestSmtpServer, client_context: ssl.SSLContext
) -> None:
    with connect(secure_server.port) as client:
        client.starttls(context=client_context)
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login("mailer", "wrong")
    assert err.value.smtp_code == 535


def test_cram_md5(tls: TlsMaterial, client_context: ssl.SSLContext) -> None:
    with TestSmtpServer(tls=tls, users=USERS, auth_mechanisms=("CRAM-MD5",)) as srv:
        with secure_session(srv.port, client_context) as client:  # smtplib picks CRAM-MD5
            client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        assert [m.auth_user for m in srv.received] == ["mailer"]
        assert any(line == "AUTH CRAM-MD5" for _, line, _ in srv.commands)


def test_untrusted_ca_is_rejected(tmp_path: Path, client_context: ssl.SSLContext) -> None:
    with (
        TestSmtpServer(tls=untrusted_tls_material(tmp_path)) as srv,
        connect(srv.port) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.starttls(context=client_context)


def test_implicit_tls(tls: TlsMaterial, client_context: ssl.SSLContext) -> None:
    with TestSmtpServer(tls=tls, implicit_tls=True, users=USERS) as srv:
        with smtplib.SMTP_SSL(
            HOST, srv.port, local_hostname="client.test", timeout=5, context=client_context
        ) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.login("mailer", USERS["mailer"])
            client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        [mail] = srv.received
        assert mail.tls and mail.auth_user == "mailer"
        assert all(tls_on for _, _, tls_on in srv.commands)


def test_rcpt_rule_refuses_one_address(server: TestSmtpServer) -> None:
    server.add_rule(
        Rule(
            "rcpt", "550 5.1.1 <bad@example.org>: User unknown", times=None, match="BAD@example.org"
        )
    )
    with connect(server.port) as client:
        refused = client.sendmail(
            "sender@example.org", ["good@example.org", "bad@example.org"], BODY
        )
        refused2 = client.sendmail("sender@example.org", ["bad@example.org", "x@example.org"], BODY)
    assert refused == {"bad@example.org": (550, b"5.1.1 <bad@example.org>: User unknown")}
    assert list(refused2) == ["bad@example.org"]
    assert [m.rcpt_tos for m in server.received] == [["good@example.org"], ["x@example.org"]]
    assert server.accepted_count("bad@example.org") == 0
    assert server.accepted_count("good@example.org") == 1
    assert server.rules[0].fired == 2


def test_connect_421_once(server: TestSmtpServer) -> None:
    server.add_rule(Rule("connect", "421 4.7.0 Too many connections, try later"))
    with pytest.raises(smtplib.SMTPConnectError) as err:
        connect(server.port)
    assert err.value.smtp_code == 421
    with connect(server.port) as client:
        assert client.noop()[0] == 250
    assert server.connections == 2


def test_data_451_once_then_250(server: TestSmtpServer) -> None:
    server.add_rule(Rule("data", "451 4.7.1 Greylisted, retry later"))
    with connect(server.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        assert err.value.smtp_code == 451
        assert server.received == []
        client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
    assert len(server.received) == 1
    assert server.transactions == 2


@pytest.mark.parametrize("stage", ["connect", "ehlo", "mail", "rcpt", "data"])
def test_drop(server: TestSmtpServer, stage: str) -> None:
    server.add_rule(Rule(stage, DROP))  # type: ignore[arg-type]
    with pytest.raises(smtplib.SMTPServerDisconnected):  # noqa: SIM117
        with connect(server.port) as client:
            client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
    assert server.received == []
    assert server.wait_for(lambda s: s.open_connections == 0, timeout_s=2)


def test_max_rcpt_per_transaction() -> None:
    with TestSmtpServer(max_rcpt_per_transaction=2) as srv, connect(srv.port) as client:
        rcpts = ["a@example.org", "b@example.org", "c@example.org"]
        refused = client.sendmail("sender@example.org", rcpts, BODY)
        assert refused == {"c@example.org": (452, b"4.5.3 Too many recipients")}
        assert srv.received[0].rcpt_tos == rcpts[:2]


def test_delayed_data_reply(server: TestSmtpServer) -> None:
    server.add_rule(Rule("data", "", delay_s=0.3))
    with connect(server.port) as client:
        started = time.monotonic()
        client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        assert time.monotonic() - started >= 0.3
    assert len(server.received) == 1


def test_ehlo_and_mail_rules_in_order(server: TestSmtpServer) -> None:
    server.add_rule(Rule("mail", "452 4.3.1 Insufficient system storage", times=2))
    server.add_rule(Rule("mail", "550 5.7.1 never reached", times=1))
    with connect(server.port) as client:
        client.ehlo()
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 452
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 452
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 550
        assert client.docmd("MAIL", "FROM:<a@example.org>")[0] == 250
    assert server.transactions == 4


def test_size_limit() -> None:
    with TestSmtpServer(size_limit=100) as srv, connect(srv.port) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "100"
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        assert err.value.smtp_code == 552
        assert srv.received == []


def test_no_auth_advertised_without_users(tls: TlsMaterial, client_context: ssl.SSLContext) -> None:
    with TestSmtpServer(tls=tls) as srv, connect(srv.port) as client:
        client.starttls(context=client_context)
        client.ehlo()
        assert not client.has_extn("auth")
        client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
        assert srv.received[0].auth_user is None


def test_reset_and_wait_for(server: TestSmtpServer) -> None:
    server.add_rule(Rule("rcpt", "550 no", times=None))
    with connect(server.port) as client:
        client.ehlo()
        client.docmd("MAIL", "FROM:<a@example.org>")
    server.reset()
    assert (server.rules, server.commands, server.connections, server.transactions) == (
        [],
        [],
        0,
        0,
    )
    with connect(server.port) as client:
        client.sendmail("sender@example.org", ["rcpt@example.org"], BODY)
    assert server.wait_for(lambda s: len(s.received) == 1, timeout_s=1)
    assert not server.wait_for(lambda s: len(s.received) == 2, timeout_s=0.05)
    assert server.received[0].connection_id == 2  # ids stay unique across reset()


def test_stop_closes_open_connections() -> None:
    srv = TestSmtpServer()
    srv.start()
    client = connect(srv.port)
    try:
        client.ehlo()
        srv.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()
        srv.stop()


# -- DevSmtpServer ----------------------------------------------------------


def test_devserver_writes_eml_and_json(
    tmp_path: Path, tls: TlsMaterial, client_context: ssl.SSLContext
) -> None:
    outbox = tmp_path / "outbox"
    with DevSmtpServer(outbox=outbox, tls=tls, users=USERS) as dev:
        assert dev.port > 0
        with secure_session(dev.port, client_context, "localhost") as client:
            client.sendmail("sender@example.org", ["rcpt@example.org", "cc@example.org"], BODY)
            client.sendmail("sender@example.org", ["rcpt@example.org"], b"Subject: 2\r\n\r\nx\r\n")
    files = sorted(p.name for p in outbox.iterdir())
    assert len(files) == 4
    assert not [name for name in files if name.startswith(".")]  # no temporary files left
    emls = sorted(outbox.glob("*.eml"))
    assert emls[0].read_bytes() == BODY
    assert emls[0].name.endswith("-000001.eml")
    meta = json.loads(emls[0].with_suffix(".json").read_text())
    assert meta == {
        "mail_from": "sender@example.org",
        "rcpt_tos": ["rcpt@example.org", "cc@example.org"],
        "tls": True,
        "auth_user": "mailer",
    }


def test_devserver_refuses_listed_recipient(tmp_path: Path) -> None:
    with (
        DevSmtpServer(outbox=tmp_path, tls=None, users=None, refuse=["Nobody@Example.org"]) as dev,
        connect(dev.port) as client,
    ):
        client.ehlo()
        assert not client.has_extn("auth")
        refused = client.sendmail(
            "sender@example.org", ["nobody@example.org", "rcpt@example.org"], BODY
        )
    assert refused == {
        "nobody@example.org": (
            550,
            b"5.1.1 <nobody@example.org>: Recipient address rejected: User unknown",
        )
    }
    [json_file] = tmp_path.glob("*.json")
    assert json.loads(json_file.read_text())["rcpt_tos"] == ["rcpt@example.org"]
    assert json.loads(json_file.read_text())["tls"] is False


def test_devserver_requires_starttls_then_auth(
    tmp_path: Path, tls: TlsMaterial, client_context: ssl.SSLContext
) -> None:
    with DevSmtpServer(outbox=tmp_path, tls=tls, users=USERS) as dev, connect(dev.port) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        plain = base64.b64encode(b"\0mailer\0" + USERS["mailer"].encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {plain}")[0] == 530
        assert client.docmd("MAIL", "FROM:<sender@example.org>")[0] == 530
        client.starttls(context=client_context)
        client.ehlo()
        assert client.docmd("MAIL", "FROM:<sender@example.org>")[0] == 530  # AUTH first
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("mailer", "wrong")
        client.login("mailer", USERS["mailer"])
        assert client.docmd("MAIL", "FROM:<sender@example.org>")[0] == 250
    assert list(tmp_path.iterdir()) == []


def test_devserver_users_need_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="requires tls"):
        DevSmtpServer(outbox=tmp_path, tls=None, users=USERS)
