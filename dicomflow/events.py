"""The events ingest receives, decoded, and the filter that decides which objects to ingest."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dicomflow.config import Settings
from dicomflow.errors import PermanentError
from dicomflow.ledger import Source

FINALIZED = "google.cloud.storage.object.v1.finalized"
MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"


@dataclass(frozen=True)
class StorageObject:
    """The fields of a StorageObjectData payload that ingest uses."""

    bucket: str
    name: str
    generation: str
    size: int
    md5_hash: str | None = None
    crc32c: str | None = None
    content_type: str | None = None

    @classmethod
    def from_data(cls, data: Any) -> StorageObject:
        """Decode a StorageObjectData dict (numbers travel as strings).

        Raises:
            PermanentError: a required field is missing or malformed (retrying cannot help).
        """
        if not isinstance(data, dict):
            raise PermanentError("event data is not a StorageObjectData object")
        try:
            bucket, name = str(data["bucket"]), str(data["name"])
            generation = str(int(data["generation"]))
            size = int(data.get("size") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentError(f"malformed StorageObjectData: {exc!r}") from None
        if not bucket or not name:
            raise PermanentError("StorageObjectData lacks bucket or name")
        return cls(
            bucket=bucket,
            name=name,
            generation=generation,
            size=size,
            md5_hash=data.get("md5Hash"),
            crc32c=data.get("crc32c"),
            content_type=data.get("contentType"),
        )

    def source(self) -> Source:
        """The ledger's view of the object."""
        return Source(
            bucket=self.bucket,
            name=self.name,
            generation=self.generation,
            size=self.size,
            md5Hash=self.md5_hash,
            crc32c=self.crc32c,
            contentType=self.content_type,
        )


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 event time as an aware datetime, or None when absent or unreadable."""
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def is_too_old(event_time: datetime | None, now: datetime, max_age_seconds: int) -> bool:
    """True when the event is older than ``max_age_seconds`` (unknown times are not too old)."""
    return event_time is not None and (now - event_time).total_seconds() > max_age_seconds


def matches_globs(name: str, globs: tuple[str, ...]) -> bool:
    """Case-insensitive match of the full name or its last part against any glob."""
    lowered = name.lower()
    base = lowered.rsplit("/", 1)[-1]
    return any(
        fnmatch.fnmatchcase(lowered, g.lower()) or fnmatch.fnmatchcase(base, g.lower())
        for g in globs
    )


def skip_reason(settings: Settings, obj: StorageObject) -> str | None:
    """Why ``obj`` is not ingested (a short code), or None when it should be."""
    if settings.is_pipeline_object(obj.bucket, obj.name):
        return "pipeline-object"
    if obj.name.endswith("/"):
        return "folder"
    if settings.include_prefixes and not any(
        obj.name.startswith(p) for p in settings.include_prefixes
    ):
        return "prefix"
    if not matches_globs(obj.name, settings.include_globs):
        return "pattern"
    if obj.size <= 0:
        return "empty"
    return None
