"""Log lines for people (Celery's format) or for log shippers (one JSON object per line).

Every line about an event carries ``event_id`` and ``instance``; lines about an attempt also
``attempt`` and ``smtp_code`` (0 when there was no reply), lines about an outcome ``outcome``
(``Done`` or ``Failed``). Bodies and secrets are never logged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from celery import signals

FIELDS = ("event_id", "instance", "attempt", "smtp_code", "outcome")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the event fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def use_json_logs() -> None:
    """Make Celery's worker loggers write JSON lines (call before the worker starts)."""

    def to_json(logger: logging.Logger | None = None, **_: Any) -> None:
        for target in (logger, logging.getLogger()):
            if target is None:
                continue
            for handler in target.handlers:
                handler.setFormatter(JsonFormatter())

    signals.after_setup_logger.connect(to_json, weak=False)
    signals.after_setup_task_logger.connect(to_json, weak=False)
