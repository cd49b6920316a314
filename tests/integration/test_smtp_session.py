"""``SmtpConnection`` against a real aiosmtpd server, with and without PIPELINING (RFC 2920).

Every reply case runs both ways: a server that offers PIPELINING gets MAIL, the RCPTs and DATA
in one write; one that does not gets them one by one. The outcome must be the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producer import MailEvent
from tests.support.smtp import DROP, Rule, TestSmtpServer
from worker.config import InstanceConfig
from worker.errors import PermanentError, TransientError
from worker.message import BuiltMessage, build_message
from worker.smtp import SmtpConnection, StaleSession, with_connection

SENDER = "noreply@example.com"


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def server(request: pytest.FixtureRequest) -> Iterator[TestSmtpServer]:
    with TestSmtpServer(pipelining=request.param, max_rcpt_per_transaction=3) as srv:
        yield srv


def session(srv: TestSmtpServer) -> SmtpConnection:
    instance = InstanceConfig.model_validate(
        {"mailServer": srv.host, "port": srv.port, "sender": SENDER, "timeoutS": 5}
    )
    conn = SmtpConnection("Plain", instance)
    conn.open()
    return conn


def message(*recipients: str, body: str = "Hello\n") -> BuiltMessage:
    event = MailEvent.parse(
        {"instance": "Plain", "subject": "Test", "message": body, "recipients": list(recipients)}
    )
    instance = InstanceConfig.model_validate({"mailServer": "localhost", "sender": SENDER})
    return build_message(event, instance)


def test_pipelined_commands_go_out_in_one_write(server: TestSmtpServer) -> None:
    conn = session(server)
    built = message("a@example.com", "b@example.com")
    outcome = conn.send(built, built.recipients)
    conn.close()
    assert outcome.accepted == ["a@example.com", "b@example.com"]
    lines = [line.upper() for _, line, _ in server.commands]
    assert lines[-5:-1] == [
        f"MAIL FROM:<{SENDER.upper()}>",
        "RCPT TO:<A@EXAMPLE.COM>",
        "RCPT TO:<B@EXAMPLE.COM>",
        "DATA",
    ]
    together = server.followed
    if server.pipelining:
        assert together == [
            f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<a@example.com>",
            "RCPT TO:<b@example.com>",
        ]
    else:
        assert together == []
    [mail] = server.received
    assert mail.rcpt_tos == ["a@example.com", "b@example.com"]


def test_dot_stuffing_and_bytes_arrive_exactly(server: TestSmtpServer) -> None:
    conn = session(server)
    built = message("a@example.com", body=".\n..two\n.\nend without newline")
    conn.send(built, built.recipients)
    conn.close()
    [mail] = server.received
    assert mail.data.replace(b"\r\n", b"\n").rstrip(b"\n") == built.data.replace(
        b"\r\n", b"\n"
    ).rstrip(b"\n")


def test_some_recipients_refused_others_deferred(server: TestSmtpServer) -> None:
    server.add_rule(Rule("rcpt", "550 5.1.1 no such user", match="bad@example.com"))
    server.add_rule(Rule("rcpt", "451 4.7.1 try later", match="later@example.com"))
    conn = session(server)
    built = message("a@example.com", "bad@example.com", "later@example.com")
    outcome = conn.send(built, built.recipients)
    assert outcome.accepted == ["a@example.com"]
    assert outcome.refused == {"bad@example.com": "550 5.1.1 no such user"}
    assert outcome.deferred == {"later@example.com": "451 4.7.1 try later"}
    # The session stays usable for the next mail.
    again = message("c@example.com")
    assert conn.send(again, again.recipients).accepted == ["c@example.com"]
    conn.close()
    assert [m.rcpt_tos for m in server.received] == [["a@example.com"], ["c@example.com"]]


def test_every_recipient_refused_sends_no_message(server: TestSmtpServer) -> None:
    server.add_rule(Rule("rcpt", "550 5.1.1 no such user", times=None))
    conn = session(server)
    built = message("a@example.com", "b@example.com")
    outcome = conn.send(built, built.recipients)
    assert outcome.accepted == []
    assert set(outcome.refused) == {"a@example.com", "b@example.com"}
    server.rules.clear()
    again = message("c@example.com")
    assert conn.send(again, again.recipients).accepted == ["c@example.com"]
    conn.close()
    assert [m.rcpt_tos for m in server.received] == [["c@example.com"]]


def test_mail_from_refused_is_final_and_names_the_sender(server: TestSmtpServer) -> None:
    server.add_rule(Rule("mail", "553 5.7.1 sender not allowed"))
    conn = session(server)
    built = message("a@example.com")
    with pytest.raises(PermanentError, match=r"MAIL FROM <noreply@example.com>.*553 5\.7\.1"):
        conn.send(built, built.recipients)
    assert server.received == []
    # The failed session was closed; the next mail gets a new one.
    assert not conn.is_open
    assert with_connection(conn, lambda c: c.send(built, built.recipients)).accepted == [
        "a@example.com"
    ]
    conn.close()


def test_mail_from_deferred_is_transient(server: TestSmtpServer) -> None:
    server.add_rule(Rule("mail", "451 4.3.0 queue full"))
    conn = session(server)
    built = message("a@example.com")
    with pytest.raises(TransientError, match=r"451 4\.3\.0 queue full"):
        conn.send(built, built.recipients)
    conn.close()
    assert server.received == []


def test_too_many_recipients_continue_in_a_further_transaction(server: TestSmtpServer) -> None:
    conn = session(server)
    names = [f"r{i}@example.com" for i in range(7)]
    built = message(*names)
    outcome = conn.send(built, built.recipients)
    conn.close()
    assert outcome.accepted == names
    assert [m.rcpt_tos for m in server.received] == [names[:3], names[3:6], names[6:]]


def test_end_of_data_deferred_is_transient_and_nothing_is_stored(server: TestSmtpServer) -> None:
    server.add_rule(Rule("data", "451 4.7.1 greylisted"))
    conn = session(server)
    built = message("a@example.com")
    with pytest.raises(TransientError, match=r"end of DATA for a@example.com.*451 4\.7\.1"):
        conn.send(built, built.recipients)
    conn.close()
    assert server.received == []


def test_a_reused_session_the_server_closed_is_reopened_once(server: TestSmtpServer) -> None:
    conn = session(server)
    first = message("a@example.com")
    conn.send(first, first.recipients)
    server.add_rule(Rule("mail", "421 4.4.2 idle too long, closing"))
    second = message("b@example.com")
    with pytest.raises(StaleSession):
        conn.send(second, second.recipients)
    outcome = with_connection(conn, lambda c: c.send(second, second.recipients))
    conn.close()
    assert outcome.accepted == ["b@example.com"]
    assert [m.rcpt_tos for m in server.received] == [["a@example.com"], ["b@example.com"]]


def test_connection_dropped_before_the_reply_to_data_is_transient(
    server: TestSmtpServer,
) -> None:
    server.add_rule(Rule("data", DROP))
    conn = session(server)
    built = message("a@example.com")
    with pytest.raises(TransientError) as info:
        conn.send(built, built.recipients)
    assert not conn.is_open
    # Named by the step it happened in, the one where the server may have the mail already.
    assert str(info.value) == (
        f"end of DATA for a@example.com at {conn.where}: the server closed the connection "
        "(Connection unexpectedly closed); the server may have the mail already; a retry may "
        "deliver it twice"
    )


@pytest.mark.parametrize(
    ("stage", "named"),
    [("mail", "MAIL FROM"), ("rcpt", "RCPT TO <a@example.com>"), ("data", "end of DATA")],
)
def test_a_server_that_stops_answering_is_a_time_out_named_by_its_step(
    server: TestSmtpServer, stage: str, named: str
) -> None:
    server.add_rule(Rule(stage, "", delay_s=2))  # type: ignore[arg-type]
    instance = InstanceConfig.model_validate(
        {"mailServer": server.host, "port": server.port, "sender": SENDER, "timeoutS": 0.5}
    )
    conn = SmtpConnection("Plain", instance)
    conn.open()
    built = message("a@example.com")
    with pytest.raises(TransientError) as info:
        conn.send(built, built.recipients)
    note = "; the server may have the mail already; a retry may deliver it twice"
    if stage == "data":
        named, tail = "end of DATA for a@example.com", note
    else:
        tail = ""
    assert str(info.value) == f"{named} at {conn.where}: no reply within 0.5 s (timeoutS){tail}"


def test_data_accepted_without_recipients_is_ended_empty(server: TestSmtpServer) -> None:
    """RFC 2920 §3.1: a pipelining client must not assume DATA fails when every RCPT did."""
    server.add_rule(Rule("rcpt", "550 5.1.1 no such user", times=None))
    data_cmd = server.add_rule(Rule("data_cmd", "354 go ahead"))
    conn = session(server)
    built = message("a@example.com")
    outcome = conn.send(built, built.recipients)
    assert outcome.accepted == [] and list(outcome.refused) == ["a@example.com"]
    # Only a pipelining client sends DATA before it knows that every RCPT failed.
    assert data_cmd.fired == (1 if server.pipelining else 0)
    server.rules.clear()
    again = message("c@example.com")
    assert conn.send(again, again.recipients).accepted == ["c@example.com"]
    conn.close()
    assert [m.rcpt_tos for m in server.received] == [["c@example.com"]]


def test_a_non_ascii_address_without_smtputf8_names_the_address() -> None:
    with TestSmtpServer(smtputf8=False) as srv:
        conn = session(srv)
        built = message("jörg@example.com", "ok@example.com")
        with pytest.raises(PermanentError) as info:
            conn.send(built, built.recipients)
        conn.close()
        assert srv.received == []
    assert str(info.value) == (
        f"jörg@example.com: not ASCII, but the server {conn.where} does not offer SMTPUTF8 "
        "(RFC 6531); nothing was sent"
    )
