"""The events ingest receives, decoded, and the filter that decides which objects to ingest.

Binary-mode CloudEvents carry their attributes in ``ce-`` HTTP headers,
percent-encoded (CloudEvents HTTP binding, section 3.1.3.2), and neither
functions-framework nor the cloudevents SDK decodes them: ``decode_attributes``
does, once per event, before anything reads ``subject``, ``id`` or ``time``.
"""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from dataclasses import dataclass
from datetime import datetime

from cloudevents.http import CloudEvent
from google.cloud import storage

from dicomflow.clock import parse_time
from dicomflow.config import Settings
from dicomflow.errors import PermanentError

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
    time_created: datetime | None = None

    @classmethod
    def from_blob(cls, blob: storage.Blob) -> StorageObject:
        """The payload fields of a listed ``storage.Blob`` (what its event would carry)."""
        return cls(
            bucket=blob.bucket.name,
            name=blob.name,
            generation=str(blob.generation),
            size=int(blob.size or 0),
            md5_hash=blob.md5_hash,
            crc32c=blob.crc32c,
            content_type=blob.content_type,
            time_created=blob.time_created,
        )

    @classmethod
    def from_data(cls, data: object) -> StorageObject:
        """Decode a StorageObjectData dict (numbers travel as strings).

        Raises:
            PermanentError: a required field is missing or malformed (retrying cannot help).
                The message names the field, never its value: object names can carry PHI.
        """
        if not isinstance(data, dict):
            raise PermanentError("event data is not a StorageObjectData object")
        bucket, name = data.get("bucket"), data.get("name")
        if not isinstance(bucket, str) or not isinstance(name, str) or not bucket or not name:
            raise PermanentError("StorageObjectData lacks bucket or name")
        generation = _count(data.get("generation"), "generation", minimum=1)
        size = _count(data.get("size") or 0, "size")
        optional = {key: data.get(key) for key in ("md5Hash", "crc32c", "contentType")}
        for key, value in {"bucket": bucket, "name": name, **optional}.items():
            if value is not None and not (isinstance(value, str) and _is_utf8(value)):
                raise PermanentError(f"malformed StorageObjectData: {key} is not a UTF-8 string")
        return cls(
            bucket=bucket,
            name=name,
            generation=str(generation),
            size=size,
            md5_hash=optional["md5Hash"],
            crc32c=optional["crc32c"],
            content_type=optional["contentType"],
            time_created=parse_time(data.get("timeCreated")),
        )


def decode_header_value(value: str) -> str:
    """One round of percent-decoding of a ``ce-`` header value, read as UTF-8.

    A value that does not decode to UTF-8 is returned as it came: it was not
    encoded by the binding's rule, and the raw text is still the best reading of it.
    """
    if "%" not in value:
        return value
    try:
        return urllib.parse.unquote(value, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return value


def decode_attributes(event: CloudEvent) -> CloudEvent:
    """A copy of ``event`` whose string attributes are percent-decoded (data unchanged)."""
    attributes = {
        name: decode_header_value(value) if isinstance(value, str) else value
        for name, value in event.get_attributes().items()
    }
    return CloudEvent(attributes, event.data)


_DIGITS = re.compile(r"[0-9]{1,20}")


def _count(value: object, key: str, minimum: int = 0) -> int:
    """An integer field, sent as a string of digits (or as a JSON integer)."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and minimum <= value < 10**20:
        return value
    raise PermanentError(f"malformed StorageObjectData: {key} is not an integer >= {minimum}")


def _is_utf8(text: str) -> bool:
    """False for text JSON can carry but UTF-8 cannot (lone surrogates, as in ``"\\ud800"``)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


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
