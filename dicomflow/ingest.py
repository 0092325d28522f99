"""The ingest function: finalize events stage files into batches; the minute tick imports them.

Finalize (one object generation), each step safe to repeat after a crash::

    filter -> read ledger entry -> (none) header check -> choose batch, reserve tickets
           -> claim: create ledger/<key>.json {status: claimed, batch | quarantine}
           -> copy into batches/<batch>/<key>.dcm -> post-copy seal check -> status staged
    header check failed -> claim with the quarantine path -> copy to quarantine/<window>/<key>.dcm
           -> reason record quarantine/<window>/<key>.json -> status quarantined
    event too old, or source gone -> status dropped -> drop record
           state/dropped/<window>/<key>.json

Drop records. A dropped file has no copy anywhere, so the report function finds it
through a small record per file, grouped in ``batch_window_seconds`` windows of
the entry's ``dropped`` time: ``{schema, key, window, reason, objectLabel, ledger,
droppedAt}`` (``objectLabel`` is ``alerts.object_label``, hashed by default; no
object name, no PHI). It is written create-if-absent after the entry became
``dropped``, and again by every delivery that finds a ``dropped`` entry and by the
tick when it clears the claim marker of one, so a crash between the two writes is
repaired by the platform's retry (its window is fixed by the entry, so a repeat
never writes a second record).

A delivery that finds an entry resumes at the step the entry shows. Tick:
seal due batches (and finish half-done seals), run the import queue, then
resume stuck claims. The object layouts are described in ``dicomflow.ledger``
and ``dicomflow.batches``.

Stuck claims. Platform retries run out (Eventarc stops after 24 h) and a
delivery can die anywhere between the claim and the entry's next status, so
nothing but the tick may ever come back to a ``claimed`` entry. Without listing
the ledger, the tick finds them through small markers (staging bucket)::

    state/claims/<window>/<key>   {bucket, name, generation, size, ..., eventId}

- A delivery creates the marker (create-if-absent) after the filter and before
  the header check and the claim; ``<window>`` is the claim time in UTC windows
  of ``CLAIM_WINDOW_SECONDS``. A delivery that resumes a ``claimed`` entry
  (e.g. a re-drive) makes sure the marker exists. The delivery that takes the
  entry out of ``claimed`` deletes it (best effort: deletes are free, and a
  marker left behind is removed by the tick).
- The tick lists only the window prefixes (one delimited listing, normally the
  current window or two) and looks inside the windows that ended more than
  ``STUCK_CLAIM_SECONDS`` ago: twice the 540 s maximum timeout of an
  event-driven function, so no live delivery can still be working on them.
  Per marker: the entry left ``claimed`` -> delete the marker; still
  ``claimed`` and untouched (latest of its times) for ``STUCK_CLAIM_SECONDS``
  -> resume it by the path a redelivery takes (``_ingest_object``; the filter
  is not applied again, the object passed it already); no entry (a delivery died
  before its claim, or its header read never succeeded) -> claim the marker's
  object afresh. At most ``MAX_RESUMES_PER_TICK`` per tick; an entry that fails
  again keeps its marker and is tried on a later tick.
- Resuming while a delivery is still at work is safe (every step is, see
  above); the age threshold only avoids doing the work twice.

Cost: one small create and one delete per file, one listing per tick.
"""

from __future__ import annotations

import functools
import logging
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudevents.http import CloudEvent
from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from dicomflow import alerts, batches, header, ledger, log, retry
from dicomflow.config import DROPPED_PREFIX, QUARANTINE_PREFIX, STATE_PREFIX
from dicomflow.errors import DicomflowError, PermanentError, TransientError
from dicomflow.events import (
    FINALIZED,
    MESSAGE_PUBLISHED,
    StorageObject,
    is_too_old,
    parse_time,
    skip_reason,
)
from dicomflow.ledger import Entry
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

# Re-staging more often than this for one file means something is badly wrong; let the
# platform retry later rather than loop.
_MAX_RESTAGES = 8

CLAIMS_PREFIX = f"{STATE_PREFIX}claims/"
# Claim markers are grouped in UTC windows of this length (see the module docstring).
CLAIM_WINDOW_SECONDS = 300
# A claim untouched this long has no live delivery: 2 x the event-driven function maximum.
STUCK_CLAIM_SECONDS = 2 * 540
MAX_RESUMES_PER_TICK = 50


def handle_event(ctx: Context, cloud_event: CloudEvent) -> dict[str, Any]:
    """Route a finalize event or a tick; see the module docstring."""
    kind = cloud_event["type"]
    event_id = cloud_event["id"]
    if kind == FINALIZED:
        obj = StorageObject.from_data(cloud_event.data)
        return ingest_object(ctx, obj, event_id, parse_time(cloud_event.get("time")))
    if kind == MESSAGE_PUBLISHED:
        return tick(ctx, event_id)
    logger.info("ignored event type", extra=log.fields(eventId=event_id, eventType=kind))
    return {"status": "ignored", "reason": "event-type"}


def tick(ctx: Context, event_id: str | None = None) -> dict[str, Any]:
    """Seal due batches, finish half-done seals, poll imports and start queued ones."""
    now = ctx.clock()
    sealed = batches.seal_due(ctx, now)
    queue = batches.run_queue(ctx, now)
    resumed = resume_stuck_claims(ctx, now)
    result = {
        "status": "tick",
        "sealed": sealed,
        "started": queue.started,
        "finished": queue.finished,
        "running": queue.running,
        "queued": queue.queued,
        "throttled": queue.throttled,
        "resumed": resumed,
    }
    logger.info(
        "tick",
        extra=log.fields(
            eventId=event_id,
            sealed=len(sealed),
            started=len(queue.started),
            finished=len(queue.finished),
            running=queue.running,
            queued=queue.queued,
            throttled=queue.throttled,
            resumed=len(resumed),
        ),
    )
    return result


def ingest_object(
    ctx: Context, obj: StorageObject, event_id: str, event_time: datetime | None
) -> dict[str, Any]:
    """Take one object generation through filter, check, claim and staging (or quarantine).

    Object names can carry patient names, so logs and the errors raised from here name
    the object by ``alerts.object_label`` (a hash by default) and its ledger key, never
    by its ``gs://`` URI. Errors other than ``PermanentError`` (whose messages are ours)
    are raised again as a ``TransientError`` without the original message or chain:
    storage errors quote request URLs, and the platform logs what a function raises.
    """
    settings = ctx.settings
    label = alerts.object_label(settings, obj.bucket, obj.name)
    key = ledger.ledger_key(obj.bucket, obj.name, obj.generation)
    skipped = skip_reason(settings, obj)
    if skipped:
        logger.info(
            "skipped", extra=log.fields(eventId=event_id, object=label, key=key, reason=skipped)
        )
        return {"status": "skipped", "reason": skipped}
    return _run(ctx, obj, key, label, event_id, event_time)


def _run(
    ctx: Context,
    obj: StorageObject,
    key: str,
    label: str,
    event_id: str,
    event_time: datetime | None,
) -> dict[str, Any]:
    """``_ingest_object`` with errors logged and raised without PHI (see ``ingest_object``)."""
    try:
        return _ingest_object(ctx, obj, key, label, event_id, event_time)
    except PermanentError:
        raise
    except Exception as exc:
        error = _redacted(exc)
        logger.warning(
            "ingest failed; the event will be retried",
            extra=log.fields(eventId=event_id, object=label, key=key, **error),
        )
        raise TransientError(f"ingest of {label} (key {key}) failed: {error['error']}") from None


def _redacted(exc: BaseException) -> dict[str, Any]:
    """What can be logged of ``exc`` without PHI: its type, HTTP status and where it arose.

    The messages of our own errors are kept (they never hold object names); other
    messages (storage errors quote request URLs, pydicom quotes values) are not.
    """
    status = retry.status_of(exc)
    if status is None and isinstance(exc.__cause__, Exception):
        status = retry.status_of(exc.__cause__)
    text = str(exc) if isinstance(exc, DicomflowError) else type(exc).__name__
    if status is not None and not isinstance(exc, DicomflowError):
        text = f"{text} (HTTP {status})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else None
    return {"error": text, "errorType": type(exc).__name__, "httpStatus": status, "where": where}


def _ingest_object(
    ctx: Context,
    obj: StorageObject,
    key: str,
    label: str,
    event_id: str,
    event_time: datetime | None,
) -> dict[str, Any]:
    settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    found = ledger.read(staging, key)
    claimed = found is None
    if found is None:
        found, claimed = _claim(ctx, obj, key, event_id, event_time)
    elif found[0].status == ledger.CLAIMED:
        _ensure_marker(ctx, found[0])  # e.g. a re-drive put the entry back to claimed
    entry, generation = found
    marker = _entry_marker(entry) if entry.status == ledger.CLAIMED else None
    result = _resume(ctx, entry, generation if claimed else None)
    result["key"] = key
    if marker is not None and result["status"] in ledger.INGEST_DONE:
        _forget_marker(ctx, key, marker)
    level = (
        logging.WARNING
        if result["status"] in (ledger.QUARANTINED, ledger.DROPPED)
        else (logging.INFO)
    )
    logger.log(
        level,
        result["status"],
        extra=log.fields(
            eventId=event_id,
            object=label,
            key=key,
            batch=result.get("batch"),
            reason=result.get("reason"),
        ),
    )
    return result


def _claim(
    ctx: Context, obj: StorageObject, key: str, event_id: str, event_time: datetime | None
) -> tuple[tuple[Entry, int], bool]:
    """Decide the object's path (drop, quarantine or a batch) and create the entry.

    Returns the entry, its generation, and whether this call created it. When
    another delivery created the entry first, that entry wins and is returned.
    """
    settings = ctx.settings
    now = ctx.clock()
    entry = Entry(key=key, source=obj.source(), eventId=event_id)
    if event_time is not None:
        entry.mark("event", event_time)
    if is_too_old(event_time, now, settings.max_event_age_seconds):
        entry.status, entry.reason = ledger.DROPPED, "event-too-old"
        entry.mark("dropped", now)
    else:
        staging = ctx.storage.bucket(settings.staging_bucket)
        batches.create_json(staging, claim_marker_name(now, key), _marker_body(obj, event_id))
        try:
            entry.uids = header.check(_range_reader(ctx, obj), obj.size)
        except header.Rejected as rejected:
            entry.reason = str(rejected)
            window = batches.window_id(now, settings.batch_window_seconds)
            entry.quarantine = f"{QUARANTINE_PREFIX}{window}/{key}.dcm"
        except api_exceptions.NotFound:
            entry.status, entry.reason = ledger.DROPPED, "source-missing"
            entry.mark("dropped", now)
        else:
            weight = batches.ticket_weight(
                obj.size, settings.batch_max_files, settings.batch_max_bytes
            )
            entry.batch = batches.choose(ctx, now, weight)
    entry.mark("claimed", now)
    staging = ctx.storage.bucket(settings.staging_bucket)
    generation = ledger.create(staging, entry)
    if generation is None:
        found = ledger.read(staging, key)
        if found is None:  # created and deleted in between: only an operator does that
            raise TransientError(f"ledger entry {key} vanished during the claim")
        return found, False
    return (entry, generation), True


def _resume(ctx: Context, entry: Entry, generation: int | None) -> dict[str, Any]:
    """Finish whatever step ``entry`` stopped at.

    ``generation`` is given when this delivery has just created the entry: its batch
    was found open a moment ago and the entry can be updated without a read.
    """
    if entry.status in ledger.INGEST_DONE:
        if entry.status == ledger.DROPPED:
            record_drop(ctx, entry)
        return {
            "status": entry.status,
            "reason": entry.reason,
            "batch": entry.batch,
            "repeat": True,
        }
    if entry.quarantine:
        return _quarantine(ctx, entry)
    if entry.batch:
        return _stage(ctx, entry, generation)
    # A claim without a decision is not written by this version; treat it as a fresh start.
    raise PermanentError(f"ledger entry {entry.key} has no batch and no quarantine path")


# ---- stuck claims --------------------------------------------------------------------------


def claim_marker_name(claimed_at: datetime, key: str) -> str:
    """The marker of a claim made at ``claimed_at`` (see the module docstring)."""
    return f"{CLAIMS_PREFIX}{batches.window_id(claimed_at, CLAIM_WINDOW_SECONDS)}/{key}"


def _marker_body(obj: StorageObject, event_id: str) -> dict[str, Any]:
    return {
        "bucket": obj.bucket,
        "name": obj.name,
        "generation": obj.generation,
        "size": str(obj.size),
        "md5Hash": obj.md5_hash,
        "crc32c": obj.crc32c,
        "contentType": obj.content_type,
        "eventId": event_id,
    }


def _entry_marker(entry: Entry) -> str | None:
    claimed = parse_time(entry.times.get("claimed"))
    return claim_marker_name(claimed, entry.key) if claimed is not None else None


def _ensure_marker(ctx: Context, entry: Entry) -> None:
    name = _entry_marker(entry)
    if name is not None:
        staging = ctx.storage.bucket(ctx.settings.staging_bucket)
        batches.create_json(staging, name, _marker_body(_object_of(entry), entry.eventId or ""))


def _forget_marker(ctx: Context, key: str, marker: str) -> None:
    """Delete a claim marker; a failure only leaves it to the tick."""
    try:
        batches.delete(ctx.storage.bucket(ctx.settings.staging_bucket), marker)
    except (TransientError, api_exceptions.GoogleAPIError) as exc:
        logger.info("claim marker left for the tick", extra=log.fields(key=key, **_redacted(exc)))


def _object_of(entry: Entry) -> StorageObject:
    source = entry.source
    return StorageObject(
        bucket=source.bucket,
        name=source.name,
        generation=source.generation,
        size=source.size,
        md5_hash=source.md5Hash,
        crc32c=source.crc32c,
        content_type=source.contentType,
    )


def _last_touched(entry: Entry) -> datetime | None:
    times = [t for t in (parse_time(v) for v in entry.times.values()) if t is not None]
    return max(times) if times else None


def resume_stuck_claims(ctx: Context, now: datetime) -> list[dict[str, Any]]:
    """Finish claims that no delivery will come back to (see the module docstring)."""
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)

    def windows() -> list[str]:
        it = ctx.storage.list_blobs(staging, prefix=CLAIMS_PREFIX, delimiter="/")
        for _ in it:
            pass
        return sorted(p[len(CLAIMS_PREFIX) :].strip("/") for p in it.prefixes)

    cutoff = now - timedelta(seconds=CLAIM_WINDOW_SECONDS + STUCK_CLAIM_SECONDS)
    resumed: list[dict[str, Any]] = []

    def markers(prefix: str) -> list[str]:
        return [b.name for b in ctx.storage.list_blobs(staging, prefix=prefix)]

    for window in retry.call(windows):
        try:
            start = datetime.strptime(window, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue
        if start > cutoff:
            break  # this window and the later ones may still have live deliveries
        prefix = f"{CLAIMS_PREFIX}{window}/"
        for marker in retry.call(functools.partial(markers, prefix)):
            if len(resumed) >= MAX_RESUMES_PER_TICK:
                return resumed
            key = marker[len(prefix) :]
            try:
                outcome = _revisit(ctx, marker, key, now)
            except Exception as exc:  # one bad entry must not stop the tick
                logger.warning(
                    "stuck claim not resumed; next tick retries",
                    extra=log.fields(key=key, **_redacted(exc)),
                )
                continue
            if outcome is not None:
                resumed.append(outcome)
    return resumed


def _revisit(ctx: Context, marker: str, key: str, now: datetime) -> dict[str, Any] | None:
    """Resume the claim behind ``marker`` if it is stuck; None when there was nothing to do."""
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    found = ledger.read(staging, key)
    if found is None:
        data = batches.read_json(staging, marker)
        if data is None:
            return None
        obj = StorageObject.from_data(data)
        event_id = str(data.get("eventId") or f"resume:{key}")
        if ledger.ledger_key(obj.bucket, obj.name, obj.generation) != key:
            batches.delete(staging, marker)  # not a marker this code wrote
            return None
    else:
        entry = found[0]
        if entry.status != ledger.CLAIMED:
            if entry.status == ledger.DROPPED:
                record_drop(ctx, entry)  # a delivery may have died before writing it
            batches.delete(staging, marker)
            return None
        touched = _last_touched(entry)
        if touched is not None and now - touched < timedelta(seconds=STUCK_CLAIM_SECONDS):
            return None
        obj, event_id = _object_of(entry), f"resume:{key}"
    label = alerts.object_label(ctx.settings, obj.bucket, obj.name)
    result = _run(ctx, obj, key, label, event_id, None)
    if result["status"] in ledger.INGEST_DONE:
        batches.delete(staging, marker)
    logger.warning(
        "resumed a stuck claim",
        extra=log.fields(key=key, object=label, status=result["status"], fresh=found is None),
    )
    return {"key": key, "status": result["status"], "batch": result.get("batch")}


# ---- staging -------------------------------------------------------------------------------


def _source_blob(ctx: Context, entry: Entry) -> storage.Blob:
    bucket = ctx.storage.bucket(entry.source.bucket)
    return bucket.blob(entry.source.name, generation=int(entry.source.generation))


def _range_reader(ctx: Context, obj: StorageObject) -> header.RangeReader:
    blob = ctx.storage.bucket(obj.bucket).blob(obj.name, generation=int(obj.generation))

    def read(start: int, end: int) -> bytes:
        data: bytes = retry.call(
            lambda: blob.download_as_bytes(start=start, end=end, checksum=None)
        )
        return data

    return read


def copy_object(ctx: Context, source: storage.Blob, target_name: str) -> None:
    """Server-side copy of ``source`` (generation pinned) into the staging bucket."""
    target = ctx.storage.bucket(ctx.settings.staging_bucket).blob(target_name)

    def rewrite() -> None:
        token, _, _ = target.rewrite(source)
        while token is not None:
            token, _, _ = target.rewrite(source, token=token)

    retry.call(rewrite)


def _stage(ctx: Context, entry: Entry, generation: int | None = None) -> dict[str, Any]:
    settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    key = entry.key
    batch = entry.batch
    assert batch is not None
    fresh = generation is not None  # the batch was chosen (and found open) just now
    for _ in range(_MAX_RESTAGES):
        name = batches.staged_name(batch, key)
        # A replay must not copy into a sealed batch: that would bring back a staging
        # copy that report may already have deleted.
        if fresh or not batches.exists(staging, batches.seal_name(batch)):
            try:
                copy_object(ctx, _source_blob(ctx, entry), name)
            except api_exceptions.NotFound:
                if not batches.exists(staging, name):
                    return _drop(ctx, entry, "source-missing")
            # Post-copy check: no seal now means the sealer's listing will include the copy.
            if not batches.exists(staging, batches.seal_name(batch)):
                return _mark_staged(ctx, key, batch, entry if fresh else None, generation)
        fresh = False
        files = batches.wait_file_list(staging, batch)
        if key in files.keys:
            return _mark_staged(ctx, key, batch)
        # Landed after the seal: re-stage into an open batch so the file is not lost.
        weight = batches.ticket_weight(
            entry.source.size, settings.batch_max_files, settings.batch_max_bytes
        )
        new_batch = batches.choose(ctx, ctx.clock(), weight)
        late = batch

        def move(e: Entry, late: str = late, new_batch: str = new_batch) -> bool:
            if e.status != ledger.CLAIMED or e.batch != late:
                return False
            e.batch = new_batch
            e.restaged += 1
            e.mark("restaged", ctx.clock())
            return True

        entry, _ = ledger.modify(staging, key, move)
        batches.delete(staging, batches.staged_name(late, key))
        logger.info("re-staged late file", extra=log.fields(key=key, batch=entry.batch, late=late))
        if entry.status != ledger.CLAIMED:
            return _resume(ctx, entry, 0)
        assert entry.batch is not None
        batch = entry.batch
    raise TransientError(f"file {key} re-staged {_MAX_RESTAGES} times; retry later")


def _mark_staged(
    ctx: Context,
    key: str,
    batch: str,
    known: Entry | None = None,
    generation: int | None = None,
) -> dict[str, Any]:
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)

    def staged(e: Entry) -> bool:
        if e.status != ledger.CLAIMED or e.batch != batch:
            return False
        e.status = ledger.STAGED
        e.staged = batches.staged_name(batch, key)
        e.mark("staged", ctx.clock())
        return True

    if known is not None and generation is not None and staged(known):
        try:  # the common case: nobody touched the entry since this delivery created it
            ledger.write(staging, known, generation)
            return {"status": known.status, "batch": known.batch}
        except ledger.Conflict:
            pass
    entry, _ = ledger.modify(staging, key, staged)
    if entry.status == ledger.CLAIMED and entry.batch != batch:
        # Another delivery moved the file meanwhile; follow it.
        return _stage(ctx, entry)
    return {"status": entry.status, "batch": entry.batch}


def _drop(ctx: Context, entry: Entry, reason: str) -> dict[str, Any]:
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)

    def drop(e: Entry) -> bool:
        if e.status != ledger.CLAIMED:
            return False
        e.status, e.reason = ledger.DROPPED, reason
        e.mark("dropped", ctx.clock())
        return True

    entry, _ = ledger.modify(staging, entry.key, drop)
    if entry.status == ledger.DROPPED:
        record_drop(ctx, entry)
    return {"status": entry.status, "reason": entry.reason}


def dropped_record_name(window: str, key: str) -> str:
    """The drop record of ``key`` in ``window`` (see the module docstring)."""
    return f"{DROPPED_PREFIX}{window}/{key}.json"


def record_drop(ctx: Context, entry: Entry) -> None:
    """Write the drop record of a ``dropped`` entry; a repeat is a no-op (create-if-absent)."""
    settings = ctx.settings
    dropped = parse_time(entry.times.get("dropped")) or parse_time(entry.times.get("claimed"))
    when = dropped or ctx.clock()
    window = batches.window_id(when, settings.batch_window_seconds)
    batches.create_json(
        ctx.storage.bucket(settings.staging_bucket),
        dropped_record_name(window, entry.key),
        {
            "schema": 1,
            "key": entry.key,
            "window": window,
            "reason": entry.reason,
            "objectLabel": alerts.object_label(settings, entry.source.bucket, entry.source.name),
            "ledger": ledger.entry_path(entry.key),
            "droppedAt": ledger.iso(when),
        },
    )


# ---- quarantine ----------------------------------------------------------------------------


def quarantine_record_name(quarantine_object: str) -> str:
    """The reason record beside a quarantine copy."""
    return quarantine_object.removesuffix(".dcm") + ".json"


def _quarantine(ctx: Context, entry: Entry) -> dict[str, Any]:
    """Copy the file beside its reason into quarantine, then mark the entry quarantined."""
    staging = ctx.storage.bucket(ctx.settings.staging_bucket)
    assert entry.quarantine is not None
    try:
        copy_object(ctx, _source_blob(ctx, entry), entry.quarantine)
    except api_exceptions.NotFound:
        if not batches.exists(staging, entry.quarantine):
            return _drop(ctx, entry, "source-missing")
    now = ctx.clock()
    window = entry.quarantine[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
    batches.create_json(
        staging,
        quarantine_record_name(entry.quarantine),
        {
            "schema": 1,
            "key": entry.key,
            "window": window,
            "reason": entry.reason,
            "object": entry.quarantine,
            "ledger": ledger.entry_path(entry.key),
            "source": {
                "bucket": entry.source.bucket,
                "name": entry.source.name,
                "generation": entry.source.generation,
                "size": entry.source.size,
                "md5Hash": entry.source.md5Hash,
                "crc32c": entry.source.crc32c,
            },
            "quarantinedAt": ledger.iso(now),
        },
    )

    def done(e: Entry) -> bool:
        if e.status != ledger.CLAIMED:
            return False
        e.status = ledger.QUARANTINED
        e.mark("quarantined", now)
        return True

    entry, _ = ledger.modify(staging, entry.key, done)
    return {"status": entry.status, "reason": entry.reason}
