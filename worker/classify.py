"""Pure rules: which SMTP replies are worth retrying, and how long to wait (contract §5)."""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import IntEnum


class Reply(IntEnum):
    """SMTP reply codes MailSender treats by name."""

    SERVICE_READY = 220
    AUTH_OK = 235
    OK = 250
    WILL_FORWARD = 251
    START_INPUT = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    TEMP_AUTH_FAILURE = 454
    EXCEEDED_STORAGE = 552
    AUTH_FAILED = 535


def is_accepted(code: int) -> bool:
    """A positive completion reply (2xx)."""
    return 200 <= code < 300


def is_transient_reply(code: int, *, stage: str = "") -> bool:
    """True when a reply at ``stage`` should be retried later.

    4xx is transient, 5xx is permanent. Exception: 552 to RCPT, which RFC 5321 §4.5.3.1.10
    asks clients to treat as temporary. Codes outside 2xx-5xx (smtplib's -1 for a closed
    connection) are treated as transient.
    """
    if 400 <= code < 500:
        return True
    if code == Reply.EXCEEDED_STORAGE and stage == "rcpt":
        return True
    return not 200 <= code < 600


def is_too_many_recipients(code: int, text: str) -> bool:
    """452 (or 4.5.3) to RCPT: the rest can go in another transaction right away."""
    return code == Reply.INSUFFICIENT_STORAGE and (
        "4.5.3" in text or "too many recipients" in text.lower()
    )


def backoff_s(
    attempt: int,
    first_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``first_s`` doubling per attempt, capped at ``max_s``, with equal jitter: the result lies
    in [half, whole] of the doubled value, so a fleet does not retry in lock-step.
    """
    exponent = min(max(attempt - 1, 0), 32)
    delay = min(max_s, first_s * (2**exponent))
    return float(delay / 2 + rand() * delay / 2)


def format_reply(code: int, text: bytes | str) -> str:
    """``"451 4.7.1 Greylisted"`` from smtplib's (code, bytes) pair, on one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return f"{code} {text}".strip() if code > 0 else text
