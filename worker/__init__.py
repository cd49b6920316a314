"""MailSender's worker: the Celery app that builds and sends mail events over SMTP.

``celery -A worker worker`` works: ``worker.app`` is built on first access from the YAML file
named by ``MAILSENDER_CONFIG`` (default ``./mailsender.yaml``). A configuration error prints
one sentence and exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "create_app"]


def create_app(config: Any) -> Any:
    """Build the worker's Celery app for a ``worker.config.Config``."""
    from worker.app import create_app as _create

    return _create(config)


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(name)
    from worker.config import load_config
    from worker.errors import ConfigError

    try:
        config = load_config()
    except ConfigError as exc:
        print(f"mailsender: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    application = create_app(config)
    globals()["app"] = application
    return application
