"""Fleet operations: implicit TLS, per-instance queues, rate limits, monitoring."""

from __future__ import annotations

from producer import MailEvent, MailProducer
from tests.conftest import USER, Servers


def test_implicit_tls_delivers_over_tls_from_the_first_byte(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(instance="Implicit", subject="465", message="x", recipients="a@example.com")
    ).wait(timeout_s=20)
    assert tx.success is True
    [mail] = fleet.implicit.received
    assert mail.tls is True
    assert mail.auth_user == USER
    verbs = [cmd.split(" ")[0].upper() for _, cmd, _ in fleet.implicit.commands]
    assert "STARTTLS" not in verbs
    assert all(tls for _, _, tls in fleet.implicit.commands)


def test_implicit_tls_against_a_starttls_port_fails_with_a_clear_error(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(
            instance="ImplicitOnStarttlsPort", subject="x", message="x", recipients="a@example.com"
        )
    ).wait(timeout_s=20)
    assert tx.success is False
    assert tx.attempts == 1
    assert "implicit TLS" in tx.message
    assert "answered in plain text" in tx.message
    assert "tls: starttls" in tx.message
    assert "WRONG_VERSION_NUMBER" not in tx.message
    assert fleet.secure.received == []


def test_starttls_against_an_implicit_tls_port_names_the_fix(
    fleet: Servers, producer: MailProducer
) -> None:
    tx = producer.send(
        MailEvent(
            instance="StarttlsOnImplicitPort", subject="x", message="x", recipients="a@example.com"
        )
    ).wait(timeout_s=20)
    assert tx.success is False
    assert "tls: implicit" in tx.message
    assert fleet.implicit.received == []
