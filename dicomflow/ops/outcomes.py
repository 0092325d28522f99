"""Where every object generation stands, for operators, the demo and the test harnesses.

There is no per-file state object: a file's outcome is read from where the pipeline
put it (``dicomflow.staging`` has the layout):

- ``manifests/<batch>/success.ndjson`` and ``failure.ndjson``: imported, duplicate,
  conflict, failed (with the reason);
- ``quarantine/<window>/<key>.dcm``: quarantined (the reason is in its metadata);
- ``state/dropped/<window>/<key>.json``: dropped (event too old, source gone, foreign
  bucket);
- ``failed/<window>/<key>.json``: failed before staging (the source could not be read or
  copied; the reason is in its metadata). A later record of the same key (a redelivery
  after the fix) takes its place;
- ``batches/<window>/<key>.dcm`` with no outcome yet: ``staged`` (in progress).

``read_all`` lists all of them: one listing per 1,000 objects plus one read per
manifest and per drop record. The totals of verified batches come cheaper from the
summaries (``summaries``); the tick never calls either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.cloud import storage

from dicomflow import objects
from dicomflow.config import (
    BATCHES_PREFIX,
    DROPPED_PREFIX,
    FAILED_PREFIX,
    MANIFESTS_PREFIX,
    QUARANTINE_PREFIX,
)
from dicomflow.json_types import JSON
from dicomflow.pool import pmap
from dicomflow.staging import FileRecord
from dicomflow.verify import FAILED, OUTCOMES

STAGED = "staged"
QUARANTINED = "quarantined"
DROPPED = "dropped"
STATUSES = (*OUTCOMES, QUARANTINED, DROPPED, STAGED)
# Outcomes that will not change again (``staged`` is the only one that does).
FINAL = frozenset({*OUTCOMES, QUARANTINED, DROPPED})


@dataclass
class Outcome:
    """One object generation's outcome."""

    key: str
    status: str
    reason: str | None = None
    batch: str | None = None
    window: str | None = None
    record: FileRecord | None = None
    line: JSON = field(default_factory=dict)

    @classmethod
    def of_manifest(cls, batch: str, line: JSON) -> Outcome:
        """The outcome a manifest line of ``batch`` records."""
        return cls(
            key=line["key"],
            status=line["status"],
            reason=line.get("reason"),
            batch=batch,
            window=line.get("window"),
            record=FileRecord.from_line(line),
            line=line,
        )


def batch_ids(bucket: storage.Bucket) -> list[str]:
    """Every batch with a manifest folder (verified, or being verified), in order."""
    return objects.folders(bucket, MANIFESTS_PREFIX)


def summaries(bucket: storage.Bucket, batches: Iterable[str] | None = None) -> list[JSON]:
    """The summaries of verified batches (one read each)."""
    ids = list(batches) if batches is not None else batch_ids(bucket)
    found = pmap(lambda b: objects.read_json(bucket, f"{MANIFESTS_PREFIX}{b}/summary.json"), ids)
    return [s for s in found if s is not None]


def manifest_lines(bucket: storage.Bucket, batch: str) -> list[JSON]:
    lines: list[JSON] = []
    for part in ("success", "failure"):
        lines += objects.read_ndjson(bucket, f"{MANIFESTS_PREFIX}{batch}/{part}.ndjson") or []
    return lines


def read_all(bucket: storage.Bucket) -> dict[str, Outcome]:
    """Key -> outcome of every object generation the pipeline has a record of."""
    found: dict[str, Outcome] = {}
    ids = batch_ids(bucket)
    for batch, lines in zip(ids, pmap(lambda b: manifest_lines(bucket, b), ids), strict=True):
        for line in lines:
            found[line["key"]] = Outcome.of_manifest(batch, line)
    for blob in objects.blobs(bucket, QUARANTINE_PREFIX):
        window = blob.name[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
        record = FileRecord.from_blob(blob, window)
        if record is not None and record.key not in found:
            found[record.key] = Outcome(
                record.key, QUARANTINED, record.reason, None, window, record, record.line()
            )
    drops = [b.name for b in objects.blobs(bucket, DROPPED_PREFIX) if b.name.endswith(".json")]
    for doc in pmap(lambda name: objects.read_json(bucket, name), drops):
        if doc is not None and doc.get("key") and doc["key"] not in found:
            record = FileRecord.from_line(doc)
            found[record.key] = Outcome(
                record.key, DROPPED, doc.get("reason"), None, record.window, record, doc
            )
    for blob in objects.blobs(bucket, BATCHES_PREFIX):
        if not blob.name.endswith(".dcm"):
            continue
        window = blob.name[len(BATCHES_PREFIX) :].split("/", 1)[0]
        record = FileRecord.from_blob(blob, window)
        if record is not None and record.key not in found:
            found[record.key] = Outcome(record.key, STAGED, None, None, window, record)
    for window, record in failure_records(bucket):
        if record.key not in found:
            found[record.key] = Outcome(
                record.key, FAILED, record.reason, None, window, record, record.line()
            )
    return found


def failure_records(bucket: storage.Bucket) -> list[tuple[str, FileRecord]]:
    """(window, record) of every failure record, from one listing (its metadata)."""
    found = []
    for blob in objects.blobs(bucket, FAILED_PREFIX):
        window = blob.name[len(FAILED_PREFIX) :].split("/", 1)[0]
        record = FileRecord.from_blob(blob, window)
        if record is not None and blob.name.endswith(".json"):
            found.append((window, record))
    return found


def totals(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Files per status, every status present (zero when absent)."""
    counts = dict.fromkeys(STATUSES, 0)
    counts.update(Counter(o.status for o in outcomes))
    return counts
