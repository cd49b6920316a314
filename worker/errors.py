"""Errors of the worker package, grouped by what the caller must do.

    WorkerError                          root
    ├── ConfigError                      fix the configuration (the worker exits 2)
    └── DeliveryError                    one attempt to deliver an event failed
        ├── TransientError               retry later (connection trouble, 4xx)
        └── PermanentError               final now (5xx, AUTH rejected, TLS, invalid event)

Every ``DeliveryError`` carries the SMTP reply ``code`` (0 when there was none) and a message
that is safe to show: it never contains a password.
"""

from __future__ import annotations

from collections.abc import Sequence


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """The configuration is not valid; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "invalid configuration: " + "; ".join(self.problems)
            if len(self.problems) != 1
            else f"invalid configuration: {self.problems[0]}"
        )


class DeliveryError(WorkerError):
    """One attempt failed; ``code`` is the SMTP reply code, or 0."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


class TransientError(DeliveryError):
    """The attempt may succeed later: retry with back-off."""


class PermanentError(DeliveryError):
    """The event cannot be delivered: final failure now."""
