"""Time as the pipeline writes and reads it: UTC, RFC 3339, ``Z`` suffix."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """A time as written in records: ``2026-11-25T12:53:00.123456Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_seconds(moment: datetime) -> str:
    """A time as shown to people: ``2026-11-25T12:53:00Z`` (whole seconds)."""
    return iso(moment.replace(microsecond=0))


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 time as an aware datetime, or None when absent, naive or unreadable."""
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
