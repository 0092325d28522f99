"""JSON-line logging in the shape Cloud Logging reads from a function's stdout.

Each record is one line: ``{"severity": ..., "message": ..., <fields>}``.
Correlation fields (event id, batch id, operation) are passed as ``extra``::

    log.info("staged", extra={"fields": {"eventId": eid, "batch": batch_id}})

Library modules only call ``logging.getLogger(__name__)``; ``configure()`` is
called once by the process (main.py, the CLI or localcloud).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object with ``severity`` and ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the root logger's records to ``stream`` (stdout) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old.formatter, JsonFormatter):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # dicomweb-client logs every request at INFO, with the study's UID in the message: one
    # line per QIDO of a verification, which drowns the function's own records.
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))


QUIET_LIBRARIES = ("dicomweb_client",)


def fields(**values: Any) -> dict[str, Any]:
    """Build the ``extra`` argument carrying correlation fields."""
    return {"fields": {k: v for k, v in values.items() if v is not None}}
