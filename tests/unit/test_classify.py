"""Table-driven tests of ``worker.classify``: what is retried, and how long to wait (§5)."""

from __future__ import annotations

import pytest

from worker.classify import (
    Reply,
    backoff_s,
    format_reply,
    is_accepted,
    is_too_many_recipients,
    is_transient_reply,
)

REPLIES = [
    # code, stage, transient
    (421, "", True),
    (421, "connect", True),
    (450, "rcpt", True),
    (451, "data", True),
    (452, "rcpt", True),
    (454, "auth", True),
    (499, "", True),
    (500, "", False),
    (501, "mail", False),
    (530, "mail", False),
    (535, "auth", False),
    (550, "rcpt", False),
    (551, "rcpt", False),
    (552, "rcpt", True),  # RFC 5321 §4.5.3.1.10: treat as temporary at RCPT
    (552, "data", False),
    (552, "mail", False),
    (552, "", False),
    (553, "rcpt", False),
    (554, "data", False),
    (599, "", False),
    (-1, "", True),  # smtplib: the connection was closed
]


@pytest.mark.parametrize(("code", "stage", "transient"), REPLIES)
def test_is_transient_reply(code: int, stage: str, transient: bool) -> None:
    assert is_transient_reply(code, stage=stage) is transient


@pytest.mark.parametrize("code", [200, 220, 235, 250, 251, 299])
def test_accepted_replies(code: int) -> None:
    assert is_accepted(code)
    assert not is_transient_reply(code)


@pytest.mark.parametrize("code", [199, 354, 421, 550, -1, 0])
def test_not_accepted_replies(code: int) -> None:
    assert not is_accepted(code)


TOO_MANY = [
    (452, "4.5.3 Too many recipients", True),
    (452, "Too many recipients", True),
    (452, "too many recipients in this transaction", True),
    (452, "4.5.3 Error: too much mail", True),
    (452, "4.3.1 Insufficient system storage", False),
    (452, "", False),
    (451, "4.5.3 Too many recipients", False),
    (552, "5.5.3 Too many recipients", False),
    (550, "too many recipients", False),
]


@pytest.mark.parametrize(("code", "text", "expected"), TOO_MANY)
def test_is_too_many_recipients(code: int, text: str, expected: bool) -> None:
    assert is_too_many_recipients(code, text) is expected


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply.SERVICE_UNAVAILABLE, 421),
        (Reply.INSUFFICIENT_STORAGE, 452),
        (Reply.EXCEEDED_STORAGE, 552),
        (Reply.AUTH_FAILED, 535),
    ],
)
def test_reply_codes_have_names(reply: Reply, code: int) -> None:
    assert reply.value == code


BACKOFF = [
    # attempt, first_s, max_s, delay before jitter (rand() == 1 gives exactly this)
    (1, 10.0, 600.0, 10.0),
    (2, 10.0, 600.0, 20.0),
    (3, 10.0, 600.0, 40.0),
    (4, 10.0, 600.0, 80.0),
    (6, 10.0, 600.0, 320.0),
    (7, 10.0, 600.0, 600.0),
    (50, 10.0, 600.0, 600.0),
    (10_000, 10.0, 600.0, 600.0),
    (0, 10.0, 600.0, 10.0),
    (-3, 10.0, 600.0, 10.0),
    (1, 0.3, 1.0, 0.3),
    (3, 0.3, 1.0, 1.0),
    (1, 900.0, 600.0, 600.0),
]


@pytest.mark.parametrize(("attempt", "first_s", "max_s", "delay"), BACKOFF)
def test_backoff_doubles_and_is_capped(
    attempt: int, first_s: float, max_s: float, delay: float
) -> None:
    assert backoff_s(attempt, first_s, max_s, rand=lambda: 1.0) == pytest.approx(delay)
    assert backoff_s(attempt, first_s, max_s, rand=lambda: 0.0) == pytest.approx(delay / 2)


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.25, 0.5, 0.75, 0.999999])
@pytest.mark.parametrize("attempt", [1, 2, 5, 7, 20])
def test_backoff_jitter_stays_within_half_and_whole(rand: float, attempt: int) -> None:
    whole = min(600.0, 10.0 * 2 ** (attempt - 1))
    wait = backoff_s(attempt, 10.0, 600.0, rand=lambda: rand)
    assert whole / 2 <= wait <= whole
    assert wait == pytest.approx(whole / 2 + rand * whole / 2)


def test_backoff_never_exceeds_the_cap_with_real_randomness() -> None:
    for attempt in range(1, 40):
        assert 0 < backoff_s(attempt, 10.0, 600.0) <= 600.0


FORMATS = [
    (451, b"4.7.1 Greylisted, try again later", "451 4.7.1 Greylisted, try again later"),
    (550, "5.1.1 <a@example.com>: mailbox unknown", "550 5.1.1 <a@example.com>: mailbox unknown"),
    (250, b"2.0.0 Ok\n queued as ABC", "250 2.0.0 Ok queued as ABC"),
    (554, b"line one\r\nline two\r\n", "554 line one line two"),
    (421, b"  spaced   out  ", "421 spaced out"),
    (550, "Gr\u00fc\u00dfe".encode(), "550 Grüße"),
    (550, b"bad \xff byte", "550 bad \ufffd byte"),
    (550, b"", "550"),
    (-1, b"Connection unexpectedly closed", "Connection unexpectedly closed"),
    (0, "no reply", "no reply"),
]


@pytest.mark.parametrize(("code", "text", "expected"), FORMATS)
def test_format_reply(code: int, text: bytes | str, expected: str) -> None:
    formatted = format_reply(code, text)
    assert formatted == expected
    assert "\n" not in formatted and "\r" not in formatted
