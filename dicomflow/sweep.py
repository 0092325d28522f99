"""The reconciliation sweep: ingest uploads whose finalize event never came.

``run_due`` (the ingest tick) runs one pass per ``DICOMFLOW_SWEEP_HOURS``: list the
landing bucket, compare with the records of the staging bucket (``recorded_keys``), alert
``missed_event`` once, ingest each missed upload, then run landing retention.

See docs/architecture.md#the-reconciliation-sweep
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from google.cloud import storage

from dicomflow import alerts, ingest, log, objects, retention
from dicomflow.clock import iso, parse_time
from dicomflow.config import (
    BATCHES_PREFIX,
    DAY_SECONDS,
    DROPPED_PREFIX,
    FAILED_PREFIX,
    QUARANTINE_PREFIX,
    STATE_PREFIX,
    Settings,
)
from dicomflow.errors import PermanentError, TransientError
from dicomflow.events import StorageObject, skip_reason
from dicomflow.json_types import JSON
from dicomflow.pool import pmap
from dicomflow.runtime import Context
from dicomflow.sniff import has_dicom_magic, needs_sniff
from dicomflow.staging import LATE_PREFIX, WINDOW_FORMAT, file_key, window_id

logger = logging.getLogger(__name__)

SWEEP_PREFIX = f"{STATE_PREFIX}sweep/"
LEASE_SECONDS = 900
ATTEMPTS = 3
# The period of the pass when the sweep is off but landing retention is on.
RETENTION_ONLY_HOURS = 24

# Record prefixes of the staging bucket whose second part is a window id.
WINDOWED_PREFIXES = (BATCHES_PREFIX, QUARANTINE_PREFIX, DROPPED_PREFIX, FAILED_PREFIX)

# (staging bucket, period) of passes this process saw finished: later ticks of the
# period cost no call.
_FINISHED: set[tuple[str, str]] = set()
_FINISHED_LOCK = threading.Lock()


@dataclass
class SweepResult:
    """What one sweep found and did."""

    period: str
    landing: int = 0  # objects listed
    candidates: int = 0  # in the age bounds and passing the filter
    missed: list[StorageObject] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # ingests that raised (transient): the pass is repeated
    alerted: bool = False

    def summary(self) -> JSON:
        return {
            "period": self.period,
            "landing": self.landing,
            "candidates": self.candidates,
            "missed": len(self.missed),
            "statuses": self.statuses,
            "failed": self.failed,
            "alerted": self.alerted,
        }


def pass_hours(settings: Settings) -> int:
    """The period of the pass in hours; 0 when neither sweep nor retention is on."""
    if settings.sweep_hours:
        return settings.sweep_hours
    return RETENTION_ONLY_HOURS if settings.landing_delete_after_days else 0


def period_id(now: datetime, hours: int) -> str:
    """The period holding ``now``: UTC periods of ``hours``, e.g. ``20261201T000000Z``."""
    return window_id(now, hours * 3600)


def marker_name(period: str) -> str:
    return f"{SWEEP_PREFIX}{period}.json"


def age_bounds(settings: Settings, now: datetime) -> tuple[datetime, datetime]:
    """(oldest, newest) ``timeCreated`` of a pass; see docs/architecture.md#sweep-and-retention."""
    newest = now - timedelta(seconds=settings.max_event_age_seconds + settings.seal_grace_seconds)
    oldest = now - timedelta(seconds=(settings.staging_copy_retention_days - 1) * DAY_SECONDS)
    return oldest, newest


def run_due(ctx: Context, now: datetime) -> JSON | None:
    """Run the period's pass unless it ran (or runs) already; its summary, or None.

    Raises:
        TransientError: Cloud Storage kept failing; the next tick tries again.
    """
    hours = pass_hours(ctx.settings)
    if not hours:
        return None
    period = period_id(now, hours)
    seen = (ctx.settings.staging_bucket, period)
    with _FINISHED_LOCK:
        if seen in _FINISHED:
            return None
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    claimed = _claim(bucket, period, now)
    if claimed is None:
        return None
    generation, attempt = claimed
    result: JSON = {"period": period, "attempt": attempt}
    complete = True
    if ctx.settings.sweep_hours:
        swept = sweep(ctx, now, period)
        result["sweep"] = swept.summary()
        complete = not swept.failed
    if ctx.settings.landing_delete_after_days:
        result["retention"] = retention.run(ctx, now)
    if complete:
        done = {**result, "state": "done", "at": iso(now)}
        objects.swap(bucket, marker_name(period), done, generation)
        with _FINISHED_LOCK:
            _FINISHED.add(seen)
    return result


def _claim(bucket: storage.Bucket, period: str, now: datetime) -> tuple[int, int] | None:
    """(generation, attempt) when this call owns the period's pass, else None."""
    name = marker_name(period)
    lease = {"state": "running", "leaseUntil": iso(now + timedelta(seconds=LEASE_SECONDS))}
    created = objects.create(bucket, name, {**lease, "attempt": 1})
    if created is not None:
        return created, 1
    found = objects.read(bucket, name)
    if found is None:
        return None  # deleted in between; the next tick claims afresh
    doc, generation = found
    attempt = int(doc.get("attempt") or 1)
    until = parse_time(doc.get("leaseUntil"))
    if doc.get("state") == "done" or attempt >= ATTEMPTS:
        with _FINISHED_LOCK:
            _FINISHED.add((bucket.name, period))
        return None
    if until is not None and until > now:
        return None  # running elsewhere
    taken = objects.swap(bucket, name, {**lease, "attempt": attempt + 1}, generation)
    return (taken, attempt + 1) if taken is not None else None


def landing_objects(ctx: Context) -> list[storage.Blob]:
    """The landing bucket's objects (under the include prefixes, when set)."""
    bucket = ctx.storage.bucket(ctx.settings.landing_bucket)
    prefixes = ctx.settings.include_prefixes or ("",)
    found: list[storage.Blob] = []
    for prefix in prefixes:
        found += objects.blobs(bucket, prefix)
    return found


def recorded_keys(ctx: Context, since: datetime) -> set[str]:
    """Keys with a record in a window starting at ``since`` or later, or a late claim.

    A record of a file created at T is in a window starting no earlier than T less the
    longer of the two window lengths (``dicomflow.staging``).
    """
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    reach = max(settings.batch_window_seconds, settings.late_window_seconds)
    first = (since - timedelta(seconds=reach)).strftime(WINDOW_FORMAT)[:-1]
    listings = [(p, f"{p}{first}") for p in WINDOWED_PREFIXES] + [(LATE_PREFIX, None)]
    found = pmap(lambda item: objects.names(bucket, item[0], item[1]), listings)
    return {_key_of(name) for names in found for name in names}


def _key_of(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def sweep(ctx: Context, now: datetime, period: str) -> SweepResult:
    """List, compare, alert once, ingest the missed uploads (see docs/architecture.md)."""
    settings = ctx.settings
    oldest, newest = age_bounds(settings, now)
    result = SweepResult(period)
    listed = landing_objects(ctx)
    result.landing = len(listed)
    candidates = [
        o
        for o in map(StorageObject.from_blob, listed)
        if o.time_created is not None
        and oldest < o.time_created <= newest
        and (skip_reason(settings, o) is None or needs_sniff(settings, o))
    ]
    result.candidates = len(candidates)
    if not candidates:
        _log(result)
        return result
    known = recorded_keys(ctx, oldest)
    unrecorded = [o for o in candidates if file_key(o.bucket, o.name, o.generation) not in known]
    result.missed = [o for o in unrecorded if _passes(ctx, o)]
    if result.missed:
        result.alerted = _alert(ctx, period, len(result.missed), now)
        for status in pmap(lambda o: _ingest(ctx, o, period), result.missed):
            result.statuses[status] = result.statuses.get(status, 0) + 1
        result.failed = result.statuses.get("error", 0)
    _log(result)
    return result


def _passes(ctx: Context, obj: StorageObject) -> bool:
    """Ingest's filter: a matching name, or a sniffed one whose bytes say DICOM."""
    return skip_reason(ctx.settings, obj) is None or has_dicom_magic(ctx.storage, obj)


def _ingest(ctx: Context, obj: StorageObject, period: str) -> str:
    try:
        outcome = ingest.ingest_object(ctx, obj, f"sweep-{period}", None, via=ingest.SWEPT)
    except TransientError:
        return "error"  # logged by ingest, without the name; the pass is repeated
    except PermanentError as exc:
        # A repeat cannot help; the pass goes on with the other files.
        logger.error("sweep: ingest refused a file: %s", exc, extra=log.fields())
        return "permanent-error"
    return str(outcome["status"])


def _alert(ctx: Context, period: str, count: int, now: datetime) -> bool:
    settings = ctx.settings
    alert = alerts.build_alert(
        "missed_event",
        f"sweep/{period}",
        "WARNING",
        str(settings.dicom_store),
        {
            "count": count,
            "landingBucket": settings.landing_bucket,
            "period": period,
            "olderThanSeconds": settings.max_event_age_seconds + settings.seal_grace_seconds,
        },
        now,
    )
    return alerts.publish_once(ctx, alert)


def _log(result: SweepResult) -> None:
    """One line with the counts; never a name."""
    level = logging.WARNING if result.missed else logging.INFO
    logger.log(level, "sweep", extra=log.fields(**result.summary()))
