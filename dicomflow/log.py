"""JSON-line logging in the shape Cloud Logging reads from a function's stdout.

``configure()`` is called once by the process (main.py, the CLI or localcloud); library
modules only call ``logging.getLogger(__name__)`` and pass correlation fields as
``extra`` (``fields``). The installed handler's ``Scrubber`` replaces DICOM UIDs and
object names in every record with their keyed labels (``use_labels``).

See docs/architecture.md#logs
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO
from urllib.parse import quote, unquote

from dicomflow import keys
from dicomflow.json_types import JSON

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
        entry: JSON = {
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
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


# A DICOM UID (PS3.5 9.1): components of digits joined by dots, under a root arc 0, 1 or 2;
# four components or more, or three with a long last one (2.25.<UUID as a number>), so
# that versions (2.0.1) and addresses (127.0.0.1) stay. Files in the wild also carry
# UIDs under other roots (999.999.2.19941105.112000): any five components or more.
UID_PATTERN = re.compile(
    r"(?<![0-9A-Za-z.])"
    r"(?:[0-2](?:(?:\.[0-9]+){3,}|\.[0-9]+\.[0-9]{6,})|[0-9]+(?:\.[0-9]+){4,})"
    r"(?![0-9A-Za-z]|\.[0-9])"
)
# A gs:// URI runs to a quote, a line end or the next URI: names may hold spaces and
# commas ("Doe, John/1.dcm"), so a URI in clear text takes the rest of its line with it.
_GS_URI = re.compile(r"gs://([a-z0-9][a-z0-9._-]*)/((?:(?!\s+gs://)[^'\"\n\r<>])*)")
_API_OBJECT = re.compile(r"/b/([a-z0-9][a-z0-9._-]*)/o/([^/?#\s'\"]+)")
_API_QUERY = re.compile(r"/b/([a-z0-9][a-z0-9._-]*)/o\?([^#\s'\"]*)")
_QUERY_NAME = re.compile(r"(^|&)(name|prefix|startOffset|endOffset|matchGlob)=([^&]*)")
_LABEL = re.compile(r"^h:[0-9a-f]{8}:[0-9a-f]{32}$")
NAMING_MIN = 4
UNKNOWN_UID = "<uid>"
UNKNOWN_OBJECT = "<object>"

# pydicom quotes the values it finds invalid ("Invalid value for VR UI: '...'"), and
# a value may be a name or a UID of any shape: its records lose every quoted text.
VALUE_QUOTING_LOGGERS = ("pydicom", "py.warnings")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
QUOTED_VALUE = "'<value>'"

_naming: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "dicomflow_log_naming", default=()
)


@dataclass(frozen=True)
class Labels:
    """How the scrubber labels: the deployment key, and which objects keep their names."""

    key: keys.DeploymentKey
    keep: Callable[[str, str], bool]  # (bucket, name) -> True for the pipeline's own objects


@contextlib.contextmanager
def naming(bucket: str, name: str) -> Iterator[None]:
    """Within this block, ``name`` is scrubbed from records wherever it appears."""
    token = _naming.set((*_naming.get(), (bucket, name)))
    try:
        yield
    finally:
        _naming.reset(token)


class Scrubber(logging.Filter):
    """Replaces DICOM UIDs and object names in every record by labels (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: Labels | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: log the template rather than lose the record
            message = str(record.msg)
        if record.name.startswith(VALUE_QUOTING_LOGGERS):
            message = _QUOTED.sub(QUOTED_VALUE, message)
        record.msg, record.args = self.scrub(message), None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = self._scrub_value(fields)
        if record.exc_info:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True

    def _scrub_value(self, value: object) -> object:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_value(v) for v in value]
        return value

    def scrub(self, text: str) -> str:
        """``text`` without UIDs or object names in clear."""
        for bucket, name in _naming.get():
            # A name of a few characters would replace parts of words; URIs and URLs
            # that hold it are still found below.
            if len(name) >= NAMING_MIN and not self._keeps(bucket, name):
                label = self.object_label(bucket, name)
                text = text.replace(f"gs://{bucket}/{name}", label)
                for form in sorted({name, quote(name, safe=""), quote(name)}, key=len)[::-1]:
                    text = text.replace(form, label)
        text = _GS_URI.sub(self._gs_uri, text)
        text = _API_OBJECT.sub(self._api_object, text)
        text = _API_QUERY.sub(self._api_query, text)
        return UID_PATTERN.sub(self._uid, text)

    def object_label(self, bucket: str, name: str) -> str:
        if self.labels is None:
            return UNKNOWN_OBJECT
        return self.labels.key.hash(keys.OBJECT, f"gs://{bucket}/{name}")

    def _keeps(self, bucket: str, name: str) -> bool:
        return self.labels is not None and self.labels.keep(bucket, name)

    def _gs_uri(self, match: re.Match[str]) -> str:
        bucket, name = match.group(1), match.group(2)
        if not name or self._keeps(bucket, name):
            return match.group(0)
        if _LABEL.match(name) or name == UNKNOWN_OBJECT:
            return name  # named by ``naming`` already
        return self.object_label(bucket, name)

    def _api_object(self, match: re.Match[str]) -> str:
        bucket, name = match.group(1), unquote(match.group(2))
        if self._keeps(bucket, name) or _LABEL.match(name) or name == UNKNOWN_OBJECT:
            return match.group(0)
        return f"/b/{bucket}/o/{self.object_label(bucket, name)}"

    def _api_query(self, match: re.Match[str]) -> str:
        bucket = match.group(1)

        def param(found: re.Match[str]) -> str:
            name = unquote(found.group(3).replace("+", " "))
            if not name or self._keeps(bucket, name):
                return found.group(0)
            return f"{found.group(1)}{found.group(2)}={self.object_label(bucket, name)}"

        return f"/b/{bucket}/o?{_QUERY_NAME.sub(param, match.group(2))}"

    def _uid(self, match: re.Match[str]) -> str:
        if self.labels is None:
            return UNKNOWN_UID
        return self.labels.key.hash(keys.UID, match.group(0))


SCRUBBER = Scrubber()


def use_labels(labels: Labels | None) -> None:
    """Label UIDs and object names with this deployment's key from now on (None: placeholders)."""
    SCRUBBER.labels = labels


def configure(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the root logger's records to ``stream`` (stdout) as scrubbed JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SCRUBBER)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old.formatter, JsonFormatter):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Warnings (pydicom's about invalid values quote them) are records like any other.
    logging.captureWarnings(True)
    # dicomweb-client logs every request at INFO, with the study's UID in the message: one
    # line per QIDO of a verification, which drowns the function's own records.
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))


QUIET_LIBRARIES = ("dicomweb_client",)


def fields(**values: object) -> JSON:
    """Build the ``extra`` argument carrying correlation fields."""
    return {"fields": {k: v for k, v in values.items() if v is not None}}
