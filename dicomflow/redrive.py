"""Re-drive: send failed or quarantined files through ingest again, after a fix.

(Not to be confused with ``dicomflow.retry``, the backoff policy for transient errors.)

The ledger is keyed by (bucket, name, generation), so a re-drive of the same
generation keeps its entry: it never creates a second one. For one entry::

    read entry (status failed | quarantined | conflict)
      -> filter and header check of the source generation, as ingest does
           rejected again / source gone / filtered out -> leave the entry as it is
      -> choose an open batch (reserving its tickets, as ingest does)
      -> CAS the entry: status claimed, the new batch, the new UIDs; the old
         outcome is appended to detail.retries  (only if the status is unchanged)
      -> ingest.ingest_object: the normal path resumes a claimed entry
         (copy into the batch, post-copy seal check, status staged)
      -> remove the old staging or quarantine copy, which no longer describes the file

The batch is then sealed, imported and verified by the functions like any
other, and the report gives the file a fresh outcome.

Why it is safe:

- Concurrent re-drives of one entry: the CAS lets one of them reset it; the
  others see ``claimed`` and only resume, which ingest makes idempotent.
- A crash after the CAS leaves a ``claimed`` entry with ``detail.retries``;
  the next re-drive resumes it (``resumed``), so the file is never stranded.
- A file that is already imported or duplicate is never selected, so it is
  never imported twice by a re-drive.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc

from dicomflow import batches, header, ingest, ledger, log, retry
from dicomflow.errors import DicomflowError
from dicomflow.events import StorageObject, skip_reason
from dicomflow.ledger import Entry

logger = logging.getLogger(__name__)

RETRYABLE = (ledger.FAILED, ledger.QUARANTINED, ledger.CONFLICT)
DEFAULT_STATUSES = (ledger.FAILED, ledger.QUARANTINED)
# Ledger times of steps after the claim: moved into the retry record on a reset.
_LATER_STEPS = (
    "staged",
    "restaged",
    "quarantined",
    "dropped",
    ledger.IMPORTED,
    ledger.DUPLICATE,
    ledger.CONFLICT,
    ledger.FAILED,
)

# Results of one re-drive.
RESTAGED = "restaged"  # reset and staged into a new batch
RESUMED = "resumed"  # an interrupted re-drive finished
STILL_REJECTED = "still-rejected"  # the header check rejects it again; entry unchanged
SOURCE_MISSING = "source-missing"  # the object generation is gone; entry unchanged
FILTERED = "filtered"  # the settings no longer ingest it; entry unchanged
CHANGED = "changed"  # someone else changed the entry meanwhile; nothing done


@dataclass(frozen=True)
class Result:
    """What re-driving one entry did."""

    key: str
    previous: str
    result: str
    status: str
    batch: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def is_retry_pending(entry: Entry) -> bool:
    """A re-drive reset this entry and did not see it staged (a crash, or still running)."""
    return entry.status == ledger.CLAIMED and bool(entry.detail.get("retries"))


def select(
    entries: Iterable[Entry],
    statuses: Iterable[str] = DEFAULT_STATUSES,
    prefix: str | None = None,
    batch: str | None = None,
) -> list[Entry]:
    """Entries to re-drive: in ``statuses`` (or interrupted re-drives), filtered. Pure.

    Args:
        entries: ledger entries.
        statuses: any of ``RETRYABLE``.
        prefix: keep objects whose name starts with it (``gs://BUCKET/`` may lead it).
        batch: keep entries of this batch.
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
    for entry in entries:
        if entry.status not in wanted and not is_retry_pending(entry):
            continue
        if bucket and entry.source.bucket != bucket:
            continue
        if name_prefix and not entry.source.name.startswith(name_prefix):
            continue
        if batch and entry.batch != batch:
            continue
        chosen.append(entry)
    return sorted(chosen, key=lambda e: e.key)


def _object(entry: Entry) -> StorageObject:
    src = entry.source
    return StorageObject(
        bucket=src.bucket,
        name=src.name,
        generation=src.generation,
        size=src.size,
        md5_hash=src.md5Hash,
        crc32c=src.crc32c,
        content_type=src.contentType,
    )


def _reader(ctx: Any, entry: Entry) -> header.RangeReader:
    blob = ctx.storage.bucket(entry.source.bucket).blob(
        entry.source.name, generation=int(entry.source.generation)
    )

    def read(start: int, end: int) -> bytes:
        data: bytes = retry.call(
            lambda: blob.download_as_bytes(start=start, end=end, checksum=None)
        )
        return data

    return read


def redrive(ctx: Any, key: str) -> Result:
    """Re-drive the entry ``key`` (see the module docstring). Safe to repeat and to race."""
    settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    found = ledger.read(staging, key)
    if found is None:
        raise KeyError(key)
    entry = found[0]
    previous = entry.status
    obj = _object(entry)
    if is_retry_pending(entry):
        return _resume(ctx, entry, previous, RESUMED)
    if entry.status not in RETRYABLE:
        return Result(key, previous, CHANGED, entry.status, entry.batch)
    skipped = skip_reason(settings, obj)
    if skipped:
        return Result(key, previous, FILTERED, entry.status, entry.batch, skipped)
    try:
        uids = header.check(_reader(ctx, entry), obj.size)
    except header.Rejected as rejected:
        return Result(key, previous, STILL_REJECTED, entry.status, None, rejected.code)
    except gexc.NotFound:
        return Result(key, previous, SOURCE_MISSING, entry.status, entry.batch)

    now = ctx.clock()
    weight = batches.ticket_weight(obj.size, settings.batch_max_files, settings.batch_max_bytes)
    new_batch = batches.choose(ctx, now, weight)
    old_batch = entry.batch

    applied = False

    def reset(e: Entry) -> bool:
        nonlocal applied
        applied = e.status == previous
        if not applied:
            return False
        record: dict[str, Any] = {
            "status": e.status,
            "reason": e.reason,
            "batch": e.batch,
            "at": ledger.iso(now),
            "times": {s: e.times.pop(s) for s in _LATER_STEPS if s in e.times},
        }
        if e.quarantine:
            record["quarantine"] = e.quarantine
        earlier = {k: v for k, v in e.detail.items() if k != "retries"}
        if earlier:
            record["detail"] = earlier
        e.detail = {"retries": [*e.detail.get("retries", []), record]}
        e.status, e.reason = ledger.CLAIMED, None
        e.batch, e.staged, e.quarantine, e.uids = new_batch, None, None, uids
        e.mark("retried", now)
        return True

    entry, _ = ledger.modify(staging, key, reset)
    if not applied:
        if is_retry_pending(entry):  # another re-drive won the race: help it finish
            return _resume(ctx, entry, previous, RESUMED)
        return Result(key, previous, CHANGED, entry.status, entry.batch)
    logger.info(
        "re-drive",
        extra=log.fields(key=key, previous=previous, batch=new_batch, oldBatch=old_batch),
    )
    return _resume(ctx, entry, previous, RESTAGED)


def _resume(ctx: Any, entry: Entry, previous: str, label: str) -> Result:
    """Let ingest finish a claimed entry (copy, post-copy seal check, staged), then clean up."""
    out = ingest.ingest_object(ctx, _object(entry), f"redrive:{entry.key}", None)
    status = str(out["status"])
    if status == "skipped":  # the filter changed between our check and now
        return Result(entry.key, previous, FILTERED, entry.status, entry.batch, out.get("reason"))
    if status == ledger.STAGED:
        _remove_old_copies(ctx, entry)
    return Result(entry.key, previous, label, status, out.get("batch"), out.get("reason"))


def _remove_old_copies(ctx: Any, entry: Entry) -> None:
    """The copies the last outcome left: staging copy (failed, conflict) or quarantine files.

    They no longer describe the file; the failure manifest and the retry record still do.
    """
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    last = (entry.detail.get("retries") or [{}])[-1]
    names = []
    old_batch = last.get("batch")
    if old_batch and old_batch != entry.batch:
        names.append(batches.staged_name(old_batch, entry.key))
    if last.get("quarantine"):
        names += [last["quarantine"], ingest.quarantine_record_name(last["quarantine"])]
    for name in names:
        with contextlib.suppress(gexc.NotFound):
            batches.delete(staging, name)


def redrive_all(
    ctx: Any,
    entries: list[Entry],
    workers: int = 8,
    on_done: Callable[[Result | None], None] | None = None,
) -> tuple[list[Result], list[str]]:
    """Re-drive ``entries`` in parallel; returns (results, errors as text without PHI)."""
    results: list[Result] = []
    errors: list[str] = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="redrive") as pool:
        futures = {pool.submit(redrive, ctx, e.key): e.key for e in entries}
        for future in as_completed(futures):
            try:
                result: Result | None = future.result()
            except (DicomflowError, ledger.Conflict, KeyError, gexc.GoogleAPIError) as exc:
                result = None
                # Only the type and code: messages of storage errors can hold object names.
                code = getattr(exc, "code", None)
                errors.append(
                    f"ledger {futures[future]}: {type(exc).__name__}" + (f" {code}" if code else "")
                )
            if result is not None:
                results.append(result)
            if on_done:
                on_done(result)
    results.sort(key=lambda r: r.key)
    return results, errors
