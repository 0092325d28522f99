"""Re-drive: give conflict, failed and quarantined files a fresh outcome, after a fix.

(Not to be confused with ``dicomflow.retry``, the backoff policy for transient errors.)

``select`` picks the outcomes to re-drive; ``redrive`` stages one file again under its
retry key, behind the marker ``state/retries/<key>.json``. Outcomes are never rewritten.

See docs/architecture.md#re-drive
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import header, ingest, log, objects, retry
from dicomflow.clock import iso
from dicomflow.config import STATE_PREFIX
from dicomflow.errors import DicomflowError
from dicomflow.events import StorageObject, skip_reason
from dicomflow.json_types import JSON
from dicomflow.ops import outcomes
from dicomflow.ops.outcomes import Outcome
from dicomflow.pool import pmap
from dicomflow.runtime import Context
from dicomflow.staging import (
    FileRecord,
    file_key,
    parse_batch,
    quarantine_name,
    staged_name,
)
from dicomflow.verify import CONFLICT, FAILED

logger = logging.getLogger(__name__)

RETRIES_PREFIX = f"{STATE_PREFIX}retries/"
RETRYABLE = (FAILED, outcomes.QUARANTINED, CONFLICT)
DEFAULT_STATUSES = (FAILED, outcomes.QUARANTINED)
VIA = ingest.REDRIVE

# Results of one re-drive.
RESTAGED = "restaged"  # staged under its retry key; a later batch gives it an outcome
RESUMED = "resumed"  # the marker was there already: this run finished or repeated it
ALREADY = "already-retried"  # a batch lists its retry record already: nothing to do
STILL_REJECTED = "still-rejected"  # the header check rejects it again; nothing written
SOURCE_MISSING = "source-missing"  # neither the source generation nor a kept copy exists
FILTERED = "filtered"  # the settings no longer ingest it; nothing written
NOT_RETRYABLE = "not-retryable"  # its outcome is not one a re-drive changes


@dataclass(frozen=True)
class Result:
    """What re-driving one outcome did."""

    key: str
    previous: str
    result: str
    status: str
    retry_key: str | None = None
    window: str | None = None
    reason: str | None = None

    def as_dict(self) -> JSON:
        out = {
            "key": self.key,
            "previous": self.previous,
            "result": self.result,
            "status": self.status,
            "retryKey": self.retry_key,
            "window": self.window,
            "reason": self.reason,
        }
        return {k: v for k, v in out.items() if v is not None}


def retry_name(key: str) -> str:
    return f"{RETRIES_PREFIX}{key}.json"


def retry_key(record: FileRecord) -> str:
    """The key a re-drive of ``record`` stages the file under (docs/architecture.md#re-drive)."""
    return file_key(record.bucket, record.name, f"{record.generation}/retry/{record.key}")


def retried_keys(bucket: storage.Bucket) -> set[str]:
    """The keys whose outcome a re-drive superseded (one listing)."""
    return {
        n[len(RETRIES_PREFIX) : -len(".json")]
        for n in objects.names(bucket, RETRIES_PREFIX)
        if n.endswith(".json")
    }


def markers(bucket: storage.Bucket) -> list[JSON]:
    """Every re-drive marker (one listing, one read each: re-drives are few)."""
    names = sorted(retry_name(k) for k in retried_keys(bucket))
    return [m for m in pmap(lambda n: objects.read_json(bucket, n), names) if m is not None]


def is_pending(outcome: Outcome, retried: Collection[str], found: Mapping[str, Outcome]) -> bool:
    """A re-drive marked ``outcome`` superseded but its retry record is not there yet."""
    return (
        outcome.key in retried
        and outcome.record is not None
        and retry_key(outcome.record) not in found
    )


def select(
    found: Mapping[str, Outcome],
    retried: Collection[str],
    statuses: Iterable[str] = DEFAULT_STATUSES,
    prefix: str | None = None,
    batch: str | None = None,
) -> list[Outcome]:
    """Outcomes to re-drive, in key order. Pure.

    Args:
        found: ``outcomes.read_all``.
        retried: ``retried_keys``: those outcomes are superseded, unless their retry
            record is missing (an interrupted re-drive, picked up whatever ``statuses``).
        statuses: any of ``RETRYABLE``.
        prefix: keep objects whose name starts with it (``gs://BUCKET/`` may lead it).
        batch: keep outcomes of this batch.
    """
    wanted = set(statuses)
    unknown = wanted - set(RETRYABLE)
    if unknown:
        raise ValueError(
            f"cannot re-drive status {sorted(unknown)}; choose from {', '.join(RETRYABLE)}"
        )
    bucket = name_prefix = None
    if prefix:
        if prefix.startswith("gs://"):
            bucket, _, name_prefix = prefix[len("gs://") :].partition("/")
        else:
            name_prefix = prefix
    chosen = []
    for outcome in found.values():
        record = outcome.record
        if record is None:
            continue
        if outcome.key in retried:
            if not is_pending(outcome, retried, found):
                continue
        elif outcome.status not in wanted:
            continue
        if bucket and record.bucket != bucket:
            continue
        if name_prefix and not record.name.startswith(name_prefix):
            continue
        if batch and outcome.batch != batch:
            continue
        chosen.append(outcome)
    return sorted(chosen, key=lambda o: o.key)


def _exists(blob: storage.Blob) -> bool:
    return bool(blob.exists(retry=retry.storage(), timeout=retry.DEADLINE))


def source_of(ctx: Context, outcome: Outcome) -> storage.Blob | None:
    """The landing object's generation if it exists, else the copy the outcome kept."""
    record = outcome.record
    assert record is not None
    landing = ctx.storage.bucket(record.bucket).blob(record.name, generation=int(record.generation))
    if _exists(landing):
        return landing
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    window = outcome.window or record.window
    if outcome.status == outcomes.QUARANTINED:
        kept = quarantine_name(window, record.key)
    else:
        kept = str(outcome.line.get("staged") or staged_name(window, record.key))
    copy = staging.blob(kept)
    return copy if _exists(copy) else None


def _old_window(outcome: Outcome) -> str | None:
    """Where status counts the old outcome: its batch's window, or its quarantine window."""
    if outcome.batch:
        return parse_batch(outcome.batch)[0]
    return outcome.window


def redrive(ctx: Context, outcome: Outcome) -> Result:
    """Re-drive ``outcome`` (see the module docstring). Safe to repeat and to race."""
    settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    record = outcome.record
    if record is None:
        raise ValueError(f"outcome {outcome.key} has no file record")
    key, previous = outcome.key, outcome.status
    marker = objects.read_json(staging, retry_name(key))
    if marker is None and previous not in RETRYABLE:
        return Result(key, previous, NOT_RETRYABLE, previous)
    obj = StorageObject(
        record.bucket, record.name, record.generation, record.size, record.md5, record.crc32c
    )
    if marker is None:
        skipped = skip_reason(settings, obj)
        if skipped:
            return Result(key, previous, FILTERED, previous, reason=skipped)
    source = source_of(ctx, outcome)
    if source is None:
        return Result(key, previous, SOURCE_MISSING, previous)
    label = RESUMED
    if marker is None:
        uids = {"study": record.study, "series": record.series, "sop": record.sop}
        if previous == outcomes.QUARANTINED or not record.sop:
            try:
                found = header.check(ingest.range_reader(source), record.size)
            except header.Rejected as rejected:
                return Result(key, previous, STILL_REJECTED, previous, reason=rejected.code)
            except gexc.NotFound:
                return Result(key, previous, SOURCE_MISSING, previous)
            uids = {"study": found.study, "series": found.series, "sop": found.sop}
        doc = {
            "key": key,
            "retryKey": retry_key(record),
            "previous": previous,
            "reason": outcome.reason,
            "batch": outcome.batch,
            "window": _old_window(outcome),
            "at": iso(ctx.clock()),
            **uids,
        }
        if objects.create(staging, retry_name(key), doc):
            label = RESTAGED
            logger.info(
                "re-drive",
                extra=log.fields(key=key, previous=previous, retryKey=doc["retryKey"]),
            )
        marker = objects.read_json(staging, retry_name(key)) or doc
    return _stage(ctx, outcome, record, marker, source, label)


def _stage(
    ctx: Context,
    outcome: Outcome,
    record: FileRecord,
    marker: JSON,
    source: storage.Blob,
    label: str,
) -> Result:
    """Copy the file under its retry key into the current window (create-if-absent)."""
    new_key = retry_key(record)
    now = ctx.clock()
    fresh = FileRecord(
        key=new_key,
        bucket=record.bucket,
        name=record.name,
        generation=record.generation,
        size=record.size,
        home=record.home,
        window=record.home,
        event=f"retry:{record.key}",
        md5=record.md5,
        crc32c=record.crc32c,
        study=marker.get("study"),
        series=marker.get("series"),
        sop=marker.get("sop"),
        via=VIA,
    )
    try:
        out = ingest.stage(ctx, source, fresh, now)
    except gexc.NotFound:
        return Result(outcome.key, outcome.status, SOURCE_MISSING, outcome.status, new_key)
    if out.get("reason") == "listed-earlier":  # a window's file list holds the retry record
        return Result(outcome.key, outcome.status, ALREADY, "listed", new_key)
    return Result(
        outcome.key,
        outcome.status,
        label,
        str(out["status"]),
        new_key,
        out.get("window"),
        out.get("reason"),
    )


def redrive_all(
    ctx: Context,
    chosen: list[Outcome],
    workers: int = 8,
    on_done: Callable[[Result | None], None] | None = None,
) -> tuple[list[Result], list[str]]:
    """Re-drive ``chosen`` in parallel; returns (results, errors as text without PHI)."""
    results: list[Result] = []
    errors: list[str] = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="redrive") as pool:
        futures = {pool.submit(redrive, ctx, o): o.key for o in chosen}
        for future in as_completed(futures):
            try:
                result: Result | None = future.result()
            except (DicomflowError, ValueError, gexc.GoogleAPIError) as exc:
                result = None
                # Only the type and code: messages of storage errors can hold object names.
                code = getattr(exc, "code", None)
                errors.append(
                    f"key {futures[future]}: {type(exc).__name__}" + (f" {code}" if code else "")
                )
            if result is not None:
                results.append(result)
            if on_done:
                on_done(result)
    results.sort(key=lambda r: r.key)
    return results, errors
