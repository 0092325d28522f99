"""What each of the three functions does with an event: one handler each, called by main.py.

- ``ingest``: a Storage finalize event takes one object through ``ingest.ingest_object``;
  the minute tick seals due windows, polls and starts imports (``batches``) and runs the
  daily pass (``sweep``).
- ``report``: the minute tick (``report.run_tick``).
- ``export``: the daily tick starts the day's export (``export.start_export``), takes over
  dead starts of other days, then starts a restore drill when one is due (``drill``).

A tick that meets a tick of the same function running in this instance returns at once
(``busy``) instead of repeating its work beside it: the deployment serves one request per
instance, localcloud's threaded server several.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloudevents.http import CloudEvent

from dicomflow import batches, drill, log, sweep
from dicomflow import export as exports
from dicomflow import ingest as files
from dicomflow import report as reports
from dicomflow.backup import export_day, tick_time
from dicomflow.clock import parse_time
from dicomflow.errors import TransientError
from dicomflow.events import FINALIZED, MESSAGE_PUBLISHED, StorageObject
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

_INGEST_TICK = threading.Lock()
_REPORT_TICK = threading.Lock()


def _one_at_a_time(lock: threading.Lock, busy: JSON, run: Callable[[], JSON]) -> JSON:
    if not lock.acquire(blocking=False):
        logger.info("tick skipped: a tick is running in this instance", extra=log.fields())
        return busy
    try:
        return run()
    finally:
        lock.release()


def _ignored(event: CloudEvent) -> JSON:
    logger.info(
        "ignored event type", extra=log.fields(eventId=event["id"], eventType=event["type"])
    )
    return {"status": "ignored", "reason": "event-type"}


def ingest(ctx: Context, event: CloudEvent) -> JSON:
    """A finalize event (one object) or the minute tick."""
    if event["type"] == FINALIZED:
        obj = StorageObject.from_data(event.data)
        with log.naming(obj.bucket, obj.name):
            return files.ingest_object(ctx, obj, event["id"], parse_time(event.get("time")))
    if event["type"] == MESSAGE_PUBLISHED:
        return ingest_tick(ctx, event["id"])
    return _ignored(event)


def ingest_tick(ctx: Context, event_id: str | None = None) -> JSON:
    """Seal due windows, poll running imports and start queued ones, run the daily pass."""
    busy = {"status": "busy", "sealed": [], **batches.Queue().summary()}
    return _one_at_a_time(_INGEST_TICK, busy, lambda: run_ingest_tick(ctx, event_id))


def run_ingest_tick(ctx: Context, event_id: str | None = None) -> JSON:
    """One ingest tick, without the per-instance lock (two instances tick at once like this)."""
    now = ctx.clock()
    sealed = batches.seal_due(ctx, now)
    queue = batches.run_imports(ctx, now)
    result: JSON = {"status": "tick", "sealed": sealed, **queue.summary()}
    # The daily pass (the reconciliation sweep, landing retention) rides on this tick.
    swept = sweep.run_due(ctx, now)
    if swept is not None:
        result["daily"] = swept
    logger.info("tick", extra=log.fields(eventId=event_id, sealed=len(sealed), **queue.counts()))
    return result


def report(ctx: Context, event: CloudEvent) -> JSON:
    """The report function: every event is a tick (Scheduler -> Pub/Sub)."""
    if event["type"] != MESSAGE_PUBLISHED:
        return _ignored(event)
    return _one_at_a_time(
        _REPORT_TICK, {"status": "busy"}, lambda: reports.run_tick(ctx, event["id"])
    )


def export(ctx: Context, event: CloudEvent) -> JSON:
    """The export function: start the tick's export unless its date already has one, take
    over other dates' dead starts, then start a restore drill when one is due.

    Raises:
        TransientError: this event's own earlier delivery claimed the date and its lease
            still runs (it died, or still runs): the platform's retry takes it over later.
    """
    scheduled = tick_time(event)
    day = export_day(scheduled)
    result = exports.start_export(
        ctx,
        day,
        mode=ctx.settings.export_mode,
        mime_type=ctx.settings.export_mime_type,
        tick=scheduled,
        event_id=event["id"],
    )
    result["resumed"] = exports.resume_starts(ctx, ctx.clock(), skip=day, event_id=event["id"])
    result["drill"] = drill.on_export_tick(ctx, scheduled)
    if result["status"] == "exists" and result["state"] == exports.STARTING:
        found = exports.read_marker(ctx, day)
        if found is not None and exports.claimed_by(found[0], event["id"], ctx.clock()):
            raise TransientError(
                f"the start of the export of {day} by this event is still leased; "
                "a retry takes it over once the lease runs out"
            )
    return result
