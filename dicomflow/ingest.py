"""The ingest function's work on one object: filter, header check, one create-if-absent copy.

``ingest_object`` stages one object generation into its window (or quarantines, drops or
records its failure); ``stage`` makes the copy into the window that will list it, taking
a late claim when needed; ``restage_stragglers`` re-stages copies that landed after their
window was listed.

See docs/architecture.md#ingest-path
"""

from __future__ import annotations

import logging
import traceback
from datetime import datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import alerts, batches, header, log, objects, retry
from dicomflow.clock import iso
from dicomflow.config import BATCHES_PREFIX, Settings
from dicomflow.errors import DicomflowError, PermanentError, TransientError
from dicomflow.events import (
    StorageObject,
    is_too_old,
)
from dicomflow.json_types import JSON
from dicomflow.runtime import Context
from dicomflow.sniff import sniffed_skip_reason
from dicomflow.staging import (
    FileRecord,
    dropped_name,
    failed_name,
    file_key,
    late_home_window,
    late_name,
    late_window_id,
    parse_batch,
    quarantine_name,
    seal_time,
    staged_name,
    window_id,
)

logger = logging.getLogger(__name__)

STAGED = "staged"
# The ``via`` of a record that ``dicomflow retry`` staged under a new key.
REDRIVE = "retry"
QUARANTINED = "quarantined"
DROPPED = "dropped"
FAILED = "failed"
# Reason codes of failure records; ``feeds.failure_kind`` maps them to alert kinds.
PERMISSION_DENIED = "permission-denied"
SOURCE_UNREADABLE = "source-unreadable"
FOREIGN_BUCKET = "foreign-bucket"
# The ``via`` of a file the reconciliation sweep found without a record.
SWEPT = "sweep"


def copy_deadline(settings: Settings) -> float:
    """How long one staging copy may take, retries included: half the seal grace."""
    return max(0.5, settings.seal_grace_seconds / 2)


def ingest_object(
    ctx: Context,
    obj: StorageObject,
    event_id: str,
    event_time: datetime | None,
    via: str | None = None,
) -> JSON:
    """Take one object generation through filter, check and staging (or quarantine).

    ``via`` is ``SWEPT`` for a file the sweep found (see docs/architecture.md#swept-files).
    """
    settings = ctx.settings
    label = alerts.object_label(settings, obj.bucket, obj.name)
    key = file_key(obj.bucket, obj.name, obj.generation)
    # A foreign object is recorded (in _ingest) without being read, unless it is one of
    # the pipeline's own: those are skipped, so ingest's records never loop back to it.
    foreign = obj.bucket != settings.landing_bucket
    pipeline = settings.is_pipeline_object(obj.bucket, obj.name)
    skipped = _skip_reason(ctx, obj) if pipeline or not foreign else None
    if skipped:
        logger.info(
            "skipped", extra=log.fields(eventId=event_id, object=label, key=key, reason=skipped)
        )
        return {"status": "skipped", "reason": skipped}
    try:
        result = _ingest(ctx, obj, key, event_id, event_time, via)
    except PermanentError:
        raise
    except Exception as exc:
        error = redacted(exc)
        logger.warning(
            "ingest failed; the event will be retried",
            extra=log.fields(eventId=event_id, object=label, key=key, **error),
        )
        raise TransientError(f"ingest of {label} (key {key}) failed: {error['error']}") from None
    result["key"] = key
    level = logging.INFO if result["status"] == STAGED else logging.WARNING
    logger.log(
        level,
        result["status"],
        extra=log.fields(
            eventId=event_id,
            object=label,
            key=key,
            window=result.get("window"),
            reason=result.get("reason"),
            repeat=result.get("repeat"),
        ),
    )
    return result


def _skip_reason(ctx: Context, obj: StorageObject) -> str | None:
    """Why ``obj`` is not ingested, sniffing its first bytes where its name decides
    nothing. A sniff refused for good (403 ...) cannot tell: the header read decides,
    and records that failure."""
    try:
        return sniffed_skip_reason(ctx.settings, ctx.storage, obj)
    except gexc.ClientError as exc:
        if not retry.is_permanent(exc):
            raise
        return None


def redacted(exc: BaseException) -> JSON:
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


def record_of(
    ctx: Context, obj: StorageObject, event_id: str, created: datetime, via: str | None = None
) -> FileRecord:
    key = file_key(obj.bucket, obj.name, obj.generation)
    home = window_id(created, ctx.settings.batch_window_seconds)
    return FileRecord(
        key=key,
        bucket=obj.bucket,
        name=obj.name,
        generation=obj.generation,
        size=obj.size,
        home=home,
        window=home,
        event=event_id,
        md5=obj.md5_hash,
        crc32c=obj.crc32c,
        via=via,
    )


def _ingest(
    ctx: Context,
    obj: StorageObject,
    key: str,
    event_id: str,
    event_time: datetime | None,
    via: str | None,
) -> JSON:
    settings = ctx.settings
    now = ctx.clock()
    created = obj.time_created or event_time
    if created is None:
        raise PermanentError("the event has neither timeCreated nor a time")
    record = record_of(ctx, obj, event_id, created, via)
    foreign = obj.bucket != settings.landing_bucket
    if is_too_old(event_time, now, settings.max_event_age_seconds):
        return _drop_late(ctx, record, FOREIGN_BUCKET if foreign else "event-too-old", now)
    if foreign:
        return _drop(ctx, record, record.home, FOREIGN_BUCKET, now)
    source = _source_blob(ctx, obj)
    try:
        uids = header.check(range_reader(source), obj.size)
    except header.Rejected as rejected:
        window = record.home if via != SWEPT else _swept_window(ctx, key, now)
        if window is None:
            return {"status": QUARANTINED, "reason": "recorded-earlier", "repeat": True}
        bad = _with(record, reason=str(rejected), window=window)
        return _copied(ctx, source, quarantine_name(window, key), bad, QUARANTINED, bad.reason)
    except gexc.NotFound:
        if via == SWEPT:
            return _drop_late(ctx, record, "source-missing", now)
        return _drop(ctx, record, record.home, "source-missing", now)
    except gexc.ClientError as exc:
        if not retry.is_permanent(exc):
            raise
        return _fail(ctx, record, exc, "header read")
    good = _with(record, study=uids.study, series=uids.series, sop=uids.sop)
    return stage(ctx, source, good, ctx.clock())


def late_home(record: FileRecord, settings: Settings) -> str:
    """The late window of a file that misses its home window's seal (see
    ``staging.late_home_window``)."""
    return late_home_window(record.home, settings)


def stage(ctx: Context, source: storage.Blob, record: FileRecord, now: datetime) -> JSON:
    """Copy ``source`` into the window that will list it (docs/architecture.md#which-window).

    ``source`` is the landing object (or, for a re-staged file, its earlier staging copy).
    """
    settings = ctx.settings
    landed_by = now + timedelta(seconds=copy_deadline(settings))
    if record.via is None and landed_by < seal_time(record.home, settings):
        return _copied(ctx, source, staged_name(record.home, record.key), record, STAGED)
    # A re-drive (``dicomflow retry``, a new key) always claims: the operator's settings
    # need not be the functions', so it must not rely on computing their late window.
    # So does a swept file: a too-old event of it meets that claim.
    if record.via not in (REDRIVE, SWEPT):
        late = late_home(record, settings)
        if landed_by < seal_time(late, settings):
            with_late = _with(record, window=late, via=record.via or "late")
            return _copied(ctx, source, staged_name(late, record.key), with_late, STAGED)
        # Later still: unless one of the two windows a delivery may have copied into
        # lists the file, a claim picks the window.
        if now < seal_time(late, settings):
            raise TransientError(f"{record.key}: its late window is being sealed; retry shortly")
        if record.key in batches.listed_keys(ctx, record.home, now) or record.key in (
            batches.listed_keys(ctx, late, now)
        ):
            return {"status": STAGED, "window": None, "reason": "listed-earlier", "repeat": True}
    current = late_window_id(now, settings.late_window_seconds)
    window = late_window(ctx, record.key, current, now)
    if window is None:
        return {"status": DROPPED, "reason": "dropped-earlier", "repeat": True}
    if not window:
        return {"status": STAGED, "window": None, "reason": "listed-earlier", "repeat": True}
    claimed = _with(record, window=window, via=record.via or "claimed")
    return _copied(ctx, source, staged_name(window, record.key), claimed, STAGED)


def late_window(ctx: Context, key: str, window: str, now: datetime) -> str | None:
    """Claim ``state/late/<key>`` for ``window``; the window to copy into.

    A claim found naming a window whose seal has passed moves to ``window``
    (compare-and-swap), unless that window's file list holds the key: then the file
    has its record there and ``""`` is returned (nothing to copy). None when the
    claim records a drop: the file was dropped, not staged.

    Raises:
        TransientError: the claimed window's seal is due within the copy's deadline;
            the platform retries once it has passed.
    """
    settings = ctx.settings
    staging_bucket = ctx.storage.bucket(settings.staging_bucket)
    name = late_name(key)
    for _ in range(5):
        if objects.create(staging_bucket, name, {"window": window, "claimedAt": iso(now)}):
            return window
        found = objects.read(staging_bucket, name)
        if found is None:
            continue  # deleted in between: claim afresh
        claim, generation = found
        if claim.get("dropped"):
            return None
        claimed = str(claim["window"])
        due = seal_time(claimed, settings)
        if now + timedelta(seconds=copy_deadline(settings)) < due:
            return claimed  # still open long enough for the copy
        if now < due:
            raise TransientError(f"late claim of {key} names a window being sealed")
        if key in batches.listed_keys(ctx, claimed, now):
            return ""
        moved = {"window": window, "movedAt": iso(now), "from": claimed}
        if objects.swap(staging_bucket, name, moved, generation) is not None:
            return window
    raise TransientError(f"late claim of {key} keeps changing")


def _swept_window(ctx: Context, key: str, now: datetime) -> str | None:
    """Claim ``state/late/<key>`` for the quarantine copy of a swept file: the window to
    copy into (the current one, or the one an interrupted sweep claimed), or None when
    another record of the file holds the claim."""
    window = window_id(now, ctx.settings.batch_window_seconds)
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    name = late_name(key)
    if objects.create(bucket, name, {"window": window, "swept": True, "at": iso(now)}):
        return window
    found = objects.read_json(bucket, name) or {}
    return str(found["window"]) if found.get("swept") else None


def _with(record: FileRecord, **changes: str | None) -> FileRecord:
    return FileRecord(**{**record.line(), "size": record.size, **changes})


def _source_blob(ctx: Context, obj: StorageObject) -> storage.Blob:
    return ctx.storage.bucket(obj.bucket).blob(obj.name, generation=int(obj.generation))


def range_reader(blob: storage.Blob) -> header.RangeReader:
    def read(start: int, end: int) -> bytes:
        data: bytes = blob.download_as_bytes(
            start=start, end=end, checksum=None, retry=retry.storage(), timeout=retry.DEADLINE
        )
        return data

    return read


def copy_object(ctx: Context, source: storage.Blob, target_name: str, record: FileRecord) -> bool:
    """Server-side copy of ``source`` to ``target_name`` with ``record`` as its metadata,
    if no live object has that name; False when one had (someone claimed it first).

    Only ``Blob.rewrite`` sends destination metadata; a rewrite may need several calls
    (another location or storage class), each with the same precondition. The retries
    and each request's timeout are bounded, so a copy never lands long after it began.

    Raises:
        google.api_core.exceptions.NotFound: the source generation is gone.
        TransientError: Cloud Storage kept failing with 429, 5xx or timeouts.
    """
    deadline = copy_deadline(ctx.settings)
    target = ctx.storage.bucket(ctx.settings.staging_bucket).blob(target_name)
    target.metadata = record.metadata()
    target.content_type = "application/dicom"
    policy = retry.storage(deadline)
    token: str | None = None
    try:
        while True:
            token, _, _ = target.rewrite(
                source, token=token, if_generation_match=0, retry=policy, timeout=deadline
            )
            if token is None:
                return True
    except gexc.PreconditionFailed:
        return False


def _copied(
    ctx: Context,
    source: storage.Blob,
    target: str,
    record: FileRecord,
    status: str,
    reason: str | None = None,
) -> JSON:
    try:
        created = copy_object(ctx, source, target, record)
    except gexc.NotFound:
        return _drop(ctx, record, record.home, "source-missing", ctx.clock())
    except gexc.ClientError as exc:
        if not retry.is_permanent(exc):
            raise
        return _fail(ctx, _with(record, window=record.home), exc, "copy")
    return {
        "status": status,
        "window": record.window,
        "object": target,
        "reason": reason,
        "repeat": not created,
    }


def _drop_late(ctx: Context, record: FileRecord, reason: str, now: datetime) -> JSON:
    """Drop a file whose home window may be long reported: its record goes in the current
    window, under a late claim so every delivery picks the same one."""
    window = window_id(now, ctx.settings.batch_window_seconds)
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    name = late_name(record.key)
    if not objects.create(bucket, name, {"window": window, "dropped": True, "at": iso(now)}):
        found = objects.read_json(bucket, name) or {}
        if not found.get("dropped"):  # staged by a delivery before the event grew too old
            return {"status": STAGED, "window": found.get("window"), "repeat": True}
        window = str(found["window"])
    return _drop(ctx, record, window, reason, now)


def _drop(ctx: Context, record: FileRecord, window: str, reason: str, now: datetime) -> JSON:
    """Write the drop record of ``record`` in ``window`` (create-if-absent)."""
    doc = {
        **_with(record, window=window, reason=reason).line(),
        "objectLabel": alerts.object_label(ctx.settings, record.bucket, record.name),
        "droppedAt": iso(now),
    }
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    created = objects.create(bucket, dropped_name(window, record.key), doc)
    return {"status": DROPPED, "reason": reason, "window": window, "repeat": not created}


def _fail(ctx: Context, record: FileRecord, exc: gexc.ClientError, step: str) -> JSON:
    """Write the failure record of ``record`` in its home window (create-if-absent): the
    ``step`` (header read, copy) met a permanent answer. Its object metadata is the file
    record with the reason, so listings (status, the report's feed) need no reads.
    """
    status = retry.status_of(exc)
    code = PERMISSION_DENIED if status in (401, 403) else SOURCE_UNREADABLE
    failed = _with(record, window=record.home, reason=f"{code}: HTTP {status} on the {step}")
    doc = {
        **failed.line(),
        "objectLabel": alerts.object_label(ctx.settings, record.bucket, record.name),
        "httpStatus": status,
        "step": step,
        "failedAt": iso(ctx.clock()),
    }
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    name = failed_name(record.home, record.key)
    created = objects.create(bucket, name, doc, metadata=failed.metadata())
    return {"status": FAILED, "reason": failed.reason, "window": record.home, "repeat": not created}


def restage_stragglers(ctx: Context, batch: str, listed: frozenset[str]) -> list[str]:
    """Re-stage copies under ``batch``'s prefix that its window's file list lacks.

    Each goes through the late path into the current window (``stage``),
    copied from the straggler itself; the late claim keeps it to one record.
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    window, bits = parse_batch(batch)
    moved: list[str] = []
    for blob in objects.blobs(bucket, f"{BATCHES_PREFIX}{window}/{bits}"):
        record = FileRecord.from_blob(blob, window)
        if record is None or record.key in listed or not blob.name.endswith(".dcm"):
            continue
        now = ctx.clock()
        if record.home != window and record.key in batches.listed_keys(ctx, record.home, now):
            continue  # a late double whose home window holds the file
        source = bucket.blob(staged_name(window, record.key), generation=blob.generation)
        restaged = FileRecord(**{**record.line(), "size": record.size, "via": "restaged"})
        try:
            # The late path: a claim naming this window (sealed) or another sealed one
            # that did not list the key moves to the current window; one naming a window
            # still open, or one that listed the key, keeps the file there.
            result = stage(ctx, source, restaged, now)
        except gexc.NotFound:
            continue
        if result.get("repeat"):
            continue
        moved.append(record.key)
        logger.warning("straggler re-staged", extra=log.fields(key=record.key, batch=batch))
    return moved
