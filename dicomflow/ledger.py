"""The ledger: one JSON entry per ingested object generation, in the staging bucket.

Layout (staging bucket)::

    ledger/<key>.json      one entry per (bucket, name, generation)

``key = ledger_key(bucket, name, generation)`` is the first 40 hex digits of a
SHA-256 over the three values. It is also the file name of the object's
staging copy (``batches/<batch>/<key>.dcm``) and quarantine copy, so no
user-controlled character reaches an import wildcard.

The entry is created with ``if_generation_match=0``: the creation *is* the
claim, so duplicate and concurrent deliveries end with one entry. Every
later change is a compare-and-swap on the entry's generation (``modify``).

Lifecycle (``status``)::

    claimed --> staged --> imported | duplicate | conflict | failed   (the last four: report)
       |  `---> quarantined      (header check failed; never imported)
       `------> dropped          (event too old, or the source generation vanished)

- ``claimed``: the entry exists; ``batch`` is set once a batch is chosen,
  which may happen before the copy finishes.
- ``staged``: the copy ``staged`` is in batch ``batch`` and either the batch
  was not sealed when the copy finished, or the batch's file list holds it.
- ``quarantined``: ``quarantine`` names the copy, ``reason`` says why.
- ``dropped``: ``reason`` says why (``event-too-old``, ``source-missing``).

An entry never holds PHI: source location, size, checksums, DICOM UIDs,
the batch, status, reason and times only (no patient tags).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from dicomflow import retry
from dicomflow.config import LEDGER_PREFIX

SCHEMA = 1

CLAIMED = "claimed"
STAGED = "staged"
QUARANTINED = "quarantined"
DROPPED = "dropped"
IMPORTED = "imported"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
FAILED = "failed"

STATUSES = (CLAIMED, STAGED, QUARANTINED, DROPPED, IMPORTED, DUPLICATE, CONFLICT, FAILED)
# Statuses after which ingest has nothing more to do for the entry.
INGEST_DONE = frozenset({STAGED, QUARANTINED, DROPPED, IMPORTED, DUPLICATE, CONFLICT, FAILED})
# Final outcomes (invariant 1): the object will not change status again.
FINAL = frozenset({QUARANTINED, DROPPED, IMPORTED, DUPLICATE, CONFLICT, FAILED})


def ledger_key(bucket: str, name: str, generation: int | str) -> str:
    """The entry's key: a hash of bucket, object name and generation (40 hex digits)."""
    digest = hashlib.sha256(f"{bucket}\n{name}\n{generation}".encode()).hexdigest()
    return digest[:40]


def entry_path(key: str) -> str:
    """The entry's object name in the staging bucket."""
    return f"{LEDGER_PREFIX}{key}.json"


def iso(moment: datetime) -> str:
    """A UTC timestamp as written in entries: ``2026-11-25T12:53:00.123456Z``."""
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Source:
    """The object an entry is about."""

    bucket: str
    name: str
    generation: str
    size: int
    md5Hash: str | None = None
    crc32c: str | None = None
    contentType: str | None = None

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass
class Uids:
    """The DICOM identifiers read by the header check (no PHI)."""

    study: str
    series: str
    sop: str
    sopClass: str
    transferSyntax: str


@dataclass
class Entry:
    """One ledger entry; ``times`` maps a step (``event``, ``claimed``...) to an ISO time."""

    key: str
    source: Source
    status: str = CLAIMED
    reason: str | None = None
    batch: str | None = None
    staged: str | None = None
    quarantine: str | None = None
    uids: Uids | None = None
    eventId: str | None = None
    restaged: int = 0
    times: dict[str, str] = field(default_factory=dict)
    # Free-form details added by later steps (report: operation, manifest, error code).
    detail: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        data = json.loads(text)
        source = Source(**data.pop("source"))
        uids_data = data.pop("uids", None)
        uids = Uids(**uids_data) if uids_data else None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(source=source, uids=uids, **known)

    def mark(self, step: str, moment: datetime) -> None:
        """Record when ``step`` happened."""
        self.times[step] = iso(moment)


class Conflict(Exception):
    """A compare-and-swap lost: the entry changed since it was read."""


def _blob(bucket: storage.Bucket, key: str, generation: int | None = None) -> storage.Blob:
    return bucket.blob(entry_path(key), generation=generation)


def create(bucket: storage.Bucket, entry: Entry) -> int | None:
    """Create the entry if absent (the claim). Returns its generation, or None if it existed."""
    blob = _blob(bucket, entry.key)
    try:
        retry.call(
            lambda: blob.upload_from_string(
                entry.to_json(), content_type="application/json", if_generation_match=0
            )
        )
    except api_exceptions.PreconditionFailed:
        return None
    return int(blob.generation) if blob.generation is not None else None


def read(bucket: storage.Bucket, key: str) -> tuple[Entry, int] | None:
    """The entry and its generation, or None when there is no entry."""
    blob = _blob(bucket, key)
    try:
        data = retry.call(blob.download_as_bytes)
    except api_exceptions.NotFound:
        return None
    assert blob.generation is not None
    return Entry.from_json(data), int(blob.generation)


def write(bucket: storage.Bucket, entry: Entry, generation: int) -> int:
    """Replace the entry if it is still at ``generation``; return the new generation.

    Raises:
        Conflict: someone else changed the entry first.
    """
    blob = _blob(bucket, entry.key)
    try:
        retry.call(
            lambda: blob.upload_from_string(
                entry.to_json(), content_type="application/json", if_generation_match=generation
            )
        )
    except api_exceptions.PreconditionFailed:
        raise Conflict(entry.key) from None
    assert blob.generation is not None
    return int(blob.generation)


def modify(
    bucket: storage.Bucket, key: str, change: Callable[[Entry], bool], attempts: int = 20
) -> tuple[Entry, int]:
    """Read, ``change`` in place, and write back with CAS, retrying on conflicts.

    ``change`` returns False to leave the entry as it is (nothing is written).

    Raises:
        KeyError: there is no entry for ``key``.
        Conflict: still losing after ``attempts`` tries.
    """
    for _ in range(attempts):
        found = read(bucket, key)
        if found is None:
            raise KeyError(key)
        entry, generation = found
        if not change(entry):
            return entry, generation
        try:
            return entry, write(bucket, entry, generation)
        except Conflict:
            continue
    raise Conflict(key)


def list_entries(bucket: storage.Bucket) -> Iterator[Entry]:
    """Every entry in the ledger (one listing plus one read per entry)."""
    for blob in bucket.client.list_blobs(bucket, prefix=LEDGER_PREFIX):
        if blob.name.endswith(".json"):
            try:
                yield Entry.from_json(blob.download_as_bytes())
            except api_exceptions.NotFound:
                continue


def totals(entries: Iterator[Entry] | list[Entry]) -> dict[str, int]:
    """Entries per status (every status present, zero when absent)."""
    counts = dict.fromkeys(STATUSES, 0)
    for entry in entries:
        counts[entry.status] = counts.get(entry.status, 0) + 1
    return counts
