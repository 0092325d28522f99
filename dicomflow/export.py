"""Scheduled backups of the DICOM store to a dated folder: the export function and its marker.

``start_export`` (the export tick) claims ``state/exports/<date>.json``, plans and starts
the export; ``resume_starts`` takes over dead starts; ``settle_exports`` (the report
tick) checks a finished export, writes its manifest and alerts ``export_failed``;
``run_command`` serves ``dicomflow export``.

See docs/architecture.md#export-and-backups
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import storage
from googleapiclient.errors import HttpError

from dicomflow import alerts, export_plan, log, objects, operations, retry, store
from dicomflow.backup import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    attempt_folder,
    build_manifest,
    check_mode,
    destination_uri,
    export_request,
    found_counts,
    parse_day,
    series_counts,
)
from dicomflow.clock import iso, parse_time
from dicomflow.config import STATE_PREFIX, Settings, parse_mime_type
from dicomflow.errors import PermanentError, TransientError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

EXPORTS_PREFIX = f"{STATE_PREFIX}exports/"
OPEN_PREFIX = f"{STATE_PREFIX}exports-open/"
# Longer than a function's timeout (540 s), so a live start is never taken over.
START_LEASE_SECONDS = 600
# A start still "starting" this long after its first claim raises one ``stalled`` alert.
STALLED_START_SECONDS = 2 * START_LEASE_SECONDS
# How long the export call itself is retried on 429/5xx before the start counts as failed.
START_RETRY_SECONDS = 60.0

STARTING, RUNNING, EMPTY, COMPLETE, FAILED = "starting", "running", "empty", "complete", "failed"
FINAL_STATES = frozenset({EMPTY, COMPLETE, FAILED})
# Kept of each earlier attempt: where it wrote, and what the next incremental export needs.
_PLANNED = ("destination", "tickTime", "scan")


def marker_name(day: date) -> str:
    """The date's marker in the staging bucket (ISO date, whatever the folder layout)."""
    return f"{EXPORTS_PREFIX}{day.isoformat()}.json"


def open_entry_name(day: date) -> str:
    """The date's entry among the exports not final yet."""
    return f"{OPEN_PREFIX}{day.isoformat()}.json"


def _day_of(name: str, prefix: str) -> date | None:
    stem = name[len(prefix) :].removesuffix(".json")
    if "." in stem or not name.endswith(".json"):
        return None
    try:
        return date.fromisoformat(stem)
    except ValueError:
        return None


def is_final(doc: JSON) -> bool:
    """True when the marker's export is over (complete, empty, or failed and finished)."""
    state = doc.get("state")
    return state in (EMPTY, COMPLETE) or (state == FAILED and "finishedAt" in doc)


# --- state in Cloud Storage -------------------------------------------------------------------


def _staging(ctx: Context) -> storage.Bucket:
    return ctx.storage.bucket(ctx.settings.staging_bucket)


def read_marker(ctx: Context, day: date) -> tuple[JSON, int] | None:
    """The date's marker and its generation, or None."""
    return objects.read(_staging(ctx), marker_name(day))


def _dates(ctx: Context, prefix: str) -> list[date]:
    days = (_day_of(n, prefix) for n in objects.names(_staging(ctx), prefix))
    return sorted(d for d in days if d is not None)


def list_markers(ctx: Context) -> list[date]:
    """Every date that has an export marker (lists them all: not for ticks)."""
    return _dates(ctx, EXPORTS_PREFIX)


def open_days(ctx: Context) -> list[date]:
    """The dates whose export is not final, or was final a moment ago (one listing)."""
    return _dates(ctx, OPEN_PREFIX)


def _update(ctx: Context, day: date, doc: JSON, generation: int) -> int | None:
    """Compare-and-swap the marker; None when someone else changed it first."""
    return objects.swap(_staging(ctx), marker_name(day), doc, generation)


def _open(ctx: Context, day: date, attempt: int, now: datetime) -> None:
    """Write the date's open entry (overwriting, so a racing delete of an older one fails)."""
    entry = {"date": day.isoformat(), "attempt": attempt, "openedAt": iso(now)}
    objects.write_text(
        _staging(ctx), open_entry_name(day), objects.dumps(entry), "application/json"
    )


def _close(ctx: Context, day: date, attempt: int, now: datetime | None = None) -> None:
    """Delete the open entry if it names ``attempt`` or earlier (or, given ``now``, if a
    starter that never claimed left it)."""
    found = objects.read(_staging(ctx), open_entry_name(day))
    if found is None:
        return
    entry, generation = found
    opened = parse_time(entry.get("openedAt"))
    lease = timedelta(seconds=START_LEASE_SECONDS)
    stale = now is not None and (opened is None or now - opened > lease)
    if int(entry.get("attempt") or 0) <= attempt or stale:
        objects.delete(_staging(ctx), open_entry_name(day), generation)


# --- the Healthcare API -----------------------------------------------------------------------


def _start_operation(ctx: Context, body: JSON) -> str:
    stores = ctx.healthcare().projects().locations().datasets().dicomStores()
    request = stores.export(name=str(ctx.settings.dicom_store), body=body)
    operation = retry.call(lambda: request.execute(num_retries=0), deadline=START_RETRY_SECONDS)
    return str(operation["name"])


def _poll(ctx: Context, name: str) -> JSON | None:
    """The operation, or None when the service no longer has it (404)."""
    try:
        return store.get_operation(ctx, name)
    except PermanentError as exc:
        if isinstance(exc.__cause__, HttpError) and retry.status_of(exc.__cause__) == 404:
            return None
        raise


# --- start ------------------------------------------------------------------------------------


def claimed_by(doc: JSON, event_id: str, now: datetime) -> bool:
    """Whether ``doc`` is a start claimed by ``event_id`` whose lease still runs."""
    return (
        doc.get("state") == STARTING
        and doc.get("eventId") == event_id
        and not _lease_over(doc, now)
    )


def resume_starts(
    ctx: Context, now: datetime, skip: date | None = None, event_id: str | None = None
) -> list[JSON]:
    """Take over every open date (but ``skip``) whose start died and whose lease ran out.

    One listing of the open entries. Errors are logged, not raised: an old date's
    trouble must not hold back the tick's own export (report alerts a stuck start).
    """
    results: list[JSON] = []
    for day in open_days(ctx):
        if day == skip:
            continue
        found = read_marker(ctx, day)
        if found is None or not _lease_over(found[0], now):
            continue
        doc = found[0]
        try:
            results.append(
                start_export(
                    ctx,
                    day,
                    mode=doc["mode"],
                    mime_type=doc["mimeType"],
                    tick=parse_time(doc.get("tickTime")) or now,
                    event_id=event_id,
                )
            )
        except (TransientError, PermanentError, gexc.GoogleAPIError) as exc:
            logger.error(
                "export takeover failed",
                extra=log.fields(date=day.isoformat(), error=type(exc).__name__, eventId=event_id),
            )
            results.append({"status": "error", "date": day.isoformat()})
    return results


def _new_marker(
    settings: Settings, day: date, mode: str, mime_type: str, tick: datetime, now: datetime
) -> JSON:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "date": day.isoformat(),
        "attempt": 1,
        "state": STARTING,
        "store": str(settings.dicom_store),
        "mode": mode,
        "mimeType": mime_type,
        "destination": destination_uri(settings, day),
        "folder": attempt_folder(settings, day),
        "tickTime": iso(tick),
        "claimedAt": iso(now),
        "firstClaimedAt": iso(now),
        "leaseUntil": iso(now + timedelta(seconds=START_LEASE_SECONDS)),
        "operation": None,
        "previous": [],
    }


def _summary(doc: JSON, status: str) -> JSON:
    keys = ("date", "attempt", "state", "operation", "destination", "expected", "manifest")
    return {"status": status, **{k: doc.get(k) for k in keys}}


def _lease_over(doc: JSON, now: datetime) -> bool:
    until = parse_time(doc.get("leaseUntil"))
    return doc.get("state") == STARTING and (until is None or until <= now)


def start_export(
    ctx: Context,
    day: date,
    *,
    mode: str,
    mime_type: str,
    tick: datetime,
    force: bool = False,
    event_id: str | None = None,
) -> JSON:
    """Start the export of ``day`` once; report the existing one on a repeat.

    Returns a summary whose ``status`` is ``started``, ``exists``, ``empty`` or ``failed``.

    Raises:
        PermanentError: a bad mode or mimeType, or ``force`` while an attempt is running.
        TransientError: Cloud Storage or QIDO stayed unavailable; a retry may help.
    """
    try:
        check_mode(mode)
        parse_mime_type(mime_type)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    now = ctx.clock()
    while True:
        claim = _new_marker(ctx.settings, day, mode, mime_type, tick, now)
        found = read_marker(ctx, day)
        current = 0
        if found is not None:
            doc, current = found
            if force and doc.get("state") in FINAL_STATES:
                claim["attempt"] = int(doc.get("attempt") or 1) + 1
                keep = ("attempt", "state", "operation", "manifest", "mode", "folder", *_PLANNED)
                claim["previous"] = [*doc.get("previous", []), {k: doc.get(k) for k in keep}]
            elif force:
                raise PermanentError(
                    f"the export of {day} is {doc.get('state')} (attempt {doc.get('attempt')}); "
                    "wait for it to finish before forcing a rerun"
                )
            elif _lease_over(doc, now):
                # The claimer crashed before starting the export: take over its attempt.
                claim["attempt"] = doc.get("attempt", 1)
                claim["previous"] = doc.get("previous", [])
                claim["tickTime"] = doc.get("tickTime", claim["tickTime"])
                claim["firstClaimedAt"] = doc.get("firstClaimedAt")
                claim["takeovers"] = int(doc.get("takeovers") or 0) + 1
            else:
                logger.info(
                    "export exists for date",
                    extra=log.fields(
                        date=day.isoformat(),
                        state=doc.get("state"),
                        operation=doc.get("operation"),
                        eventId=event_id,
                    ),
                )
                return _summary(doc, "exists")
        claim["folder"] = attempt_folder(ctx.settings, day, int(claim["attempt"]))
        claim["destination"] = destination_uri(ctx.settings, day, int(claim["attempt"]))
        claim["eventId"] = event_id
        _open(ctx, day, int(claim["attempt"]), now)
        generation = _update(ctx, day, claim, current)
        if generation is not None:
            _open(ctx, day, int(claim["attempt"]), now)
            return _run_claimed(ctx, day, claim, generation, event_id)


def complete_attempt(doc: JSON) -> JSON | None:
    """The marker as of its latest complete attempt: itself when complete, else its latest
    complete earlier attempt (a forced rerun that failed keeps the first run's backup)."""
    if doc.get("state") == COMPLETE:
        return dict(doc)
    for earlier in reversed(doc.get("previous") or []):
        if earlier.get("state") == COMPLETE:
            return {**doc, **earlier}
    return None


def _last_complete(ctx: Context, before: date) -> JSON | None:
    """The marker of the latest complete export dated before ``before``, newest date first
    (one listing of the markers, at export start only)."""
    for day in reversed(list_markers(ctx)):
        if day >= before:
            continue
        found = read_marker(ctx, day)
        complete = complete_attempt(found[0]) if found is not None else None
        if complete is not None:
            return complete
    return None


def _run_claimed(ctx: Context, day: date, doc: JSON, generation: int, event_id: str | None) -> JSON:
    """Count, start the operation and record it. ``doc`` is our claimed marker."""
    where = {"date": day.isoformat(), "eventId": event_id}
    try:
        previous = _last_complete(ctx, day) if doc["mode"] != "full" else None
        planned = export_plan.plan(ctx, day, doc, previous)
    except BaseException:
        # Counting failed (QIDO or Storage down): end our lease now so that the
        # platform's retry of this event takes the date over at once.
        doc["leaseUntil"] = doc["claimedAt"]
        with contextlib.suppress(gexc.GoogleAPIError, TransientError):
            _update(ctx, day, doc, generation)
        raise
    if planned.empty:
        doc.update(state=EMPTY)
        doc["note"] = "no instances settled since the last complete export; nothing exported"
        if _update(ctx, day, doc, generation) is not None:
            _close(ctx, day, int(doc["attempt"]))
        logger.info("incremental export: nothing settled", extra=log.fields(**where))
        return _summary(doc, EMPTY)
    body = export_request(doc["destination"], doc["mimeType"], planned.paths_uri)
    try:
        operation = _start_operation(ctx, body)
    except (HttpError, TransientError) as exc:
        cause = exc.__cause__ if isinstance(exc, TransientError) else exc
        status = retry.status_of(cause) if cause is not None else None
        doc.update(state=FAILED, error=f"export call failed: HTTP {status or '?'}")
        logger.error("export call failed", extra=log.fields(status=status, **where))
        if (new_gen := _update(ctx, day, doc, generation)) is not None:
            _finish(ctx, day, doc, new_gen, None)
        return _summary(doc, FAILED)
    try:
        operations.record_ours(ctx, operation, operations.EXPORT, day.isoformat())
    except TransientError as exc:
        logger.warning("export not recorded as ours", extra=log.fields(error=str(exc), **where))
    doc.update(state=RUNNING, operation=operation, startedAt=iso(ctx.clock()))
    if _update(ctx, day, doc, generation) is None:
        logger.warning(
            "export marker changed while starting; another attempt took over",
            extra=log.fields(operation=operation, **where),
        )
    plan = {"mode": doc["mode"], "mimeType": doc["mimeType"], "expected": doc["expected"]}
    logger.info("export started", extra=log.fields(operation=operation, **plan, **where))
    return _summary(doc, "started")


# --- settle (called by report's tick) ---------------------------------------------------------


def settle_exports(ctx: Context, now: datetime, days: Iterable[date] | None = None) -> list[JSON]:
    """Move every export that is not final along; one summary per marker looked at.

    Looks at the open entries only (or ``days``). Finishes exports whose operation is
    done (manifest, ``export_failed`` unless complete), alerts starts stuck too long,
    and deletes the entries of final exports. Never starts an export: the report
    function may not, so a start whose claimer crashed waits for the export function.
    """
    results: list[JSON] = []
    listed = days is None
    for day in open_days(ctx) if days is None else list(days):
        found = read_marker(ctx, day)
        if found is None or is_final(found[0]):
            if listed:
                _close(ctx, day, int(found[0].get("attempt") or 0) if found else 0, now)
            continue
        doc, generation = found
        state = doc.get("state")
        if state == STARTING:
            _alert_stuck_start(ctx, doc, now)
            results.append(_summary(doc, STARTING))
        elif state == RUNNING:
            operation = _poll(ctx, doc["operation"])
            if operation is None:
                # Gone (kept about 30 days, or deleted with its dataset): it cannot be
                # checked, so the backup cannot be called complete.
                doc["error"] = f"operation {doc['operation']} not found"
                results.append(_finish(ctx, day, doc, generation, None))
            elif not operation.get("done"):
                results.append(_summary(doc, "running"))
            else:
                results.append(_finish(ctx, day, doc, generation, operation))
        elif state == FAILED:
            results.append(_finish(ctx, day, doc, generation, None))
    return results


def stuck_start_seconds(doc: JSON, now: datetime) -> float:
    """How long a ``starting`` marker has been starting: since its attempt's first claim."""
    first = parse_time(doc.get("firstClaimedAt"))
    return (now - first).total_seconds() if first else 0.0


def _alert_stuck_start(ctx: Context, doc: JSON, now: datetime) -> bool:
    """One ``stalled`` alert per date and attempt once a start is stuck too long."""
    stuck = stuck_start_seconds(doc, now)
    if stuck <= STALLED_START_SECONDS:
        return False
    store = str(doc.get("store") or ctx.settings.dicom_store)
    details = {k: doc.get(k) for k in ("date", "attempt", "mode", "mimeType", "destination")}
    details.update(
        state=STARTING,
        tickTime=doc.get("tickTime"),
        firstClaimedAt=doc.get("firstClaimedAt"),
        takeovers=int(doc.get("takeovers") or 0),
        stuckSeconds=int(stuck),
        thresholdSeconds=STALLED_START_SECONDS,
        marker=f"gs://{ctx.settings.staging_bucket}/{marker_name(parse_day(doc['date']))}",
    )
    subject = f"{store}/exports/{doc['date']}/attempt-{doc['attempt']}/starting"
    alert = alerts.build_alert("stalled", subject, "ERROR", store, details, now)
    published = alerts.publish_once(ctx, alert)
    if published:
        logger.error(
            "export stuck starting",
            extra=log.fields(
                date=doc["date"],
                attempt=doc["attempt"],
                stuckSeconds=int(stuck),
                alertId=alert.alert_id,
            ),
        )
    return published


def _finish(
    ctx: Context,
    day: date,
    doc: JSON,
    generation: int,
    operation: JSON | None,
) -> JSON:
    """Write the manifest, alert unless complete, make the marker final. Idempotent."""
    settings: Settings = ctx.settings
    folder = doc["folder"]
    backups = ctx.storage.bucket(settings.backup_bucket)
    try:
        names = objects.names(backups, folder)
    except gexc.NotFound:
        names = []
    counted = found_counts(names, folder)
    manifest = build_manifest(doc, operation, counted, ctx.clock(), series_counts(names, folder))
    manifest_uri: str | None = f"gs://{settings.backup_bucket}/{folder}{MANIFEST_NAME}"
    try:
        manifest = _put_manifest(backups, folder + MANIFEST_NAME, manifest)
    except gexc.NotFound:
        # The backup bucket is gone: nothing to write into; the marker and the alert say so.
        manifest["complete"] = False
        manifest["problems"].append(f"backup bucket {settings.backup_bucket} not found")
        manifest_uri = None
    if not manifest["complete"]:
        details = {k: doc.get(k) for k in ("date", "attempt", "mode", "mimeType", "destination")}
        details.update(
            operation=doc.get("operation"),
            problems=manifest["problems"],
            expected=manifest["expected"],
            found=manifest["found"],
            manifest=manifest_uri,
        )
        subject = f"{doc['store']}/exports/{doc['date']}/attempt-{doc['attempt']}"
        store = doc["store"]
        alert = alerts.build_alert("export_failed", subject, "ERROR", store, details, ctx.clock())
        alerts.publish_once(ctx, alert)
    doc.update(
        state=COMPLETE if manifest["complete"] else FAILED,
        manifest=manifest_uri,
        found=manifest["found"],
        problems=manifest["problems"],
        finishedAt=manifest["writtenAt"],
    )
    if _update(ctx, day, doc, generation) is None:
        found = read_marker(ctx, day)
        if found is not None:
            return _summary(found[0], str(found[0].get("state")))
    _close(ctx, day, int(doc["attempt"]))
    logger.log(
        logging.INFO if manifest["complete"] else logging.ERROR,
        "export complete" if manifest["complete"] else "export failed",
        extra=log.fields(
            date=doc["date"],
            operation=doc.get("operation"),
            found=manifest["found"],
            expected=manifest["expected"],
            problems=manifest["problems"],
        ),
    )
    return _summary(doc, str(doc["state"]))


def _put_manifest(bucket: storage.Bucket, name: str, manifest: JSON) -> JSON:
    """Create the attempt's manifest once (the bucket may refuse any overwrite: retention);
    a repeat keeps what the first writer wrote."""
    if objects.create(bucket, name, manifest) is not None:
        return manifest
    found = objects.read(bucket, name)
    return found[0] if found is not None else manifest


# --- by hand (``python -m dicomflow export``) ---------------------------------------------------


def run_command(
    ctx: Context,
    *,
    day: date | None,
    mode: str,
    mime_type: str,
    force: bool = False,
    wait: bool = False,
    timeout: float | None = None,
    poll_seconds: float = 2.0,
    on_progress: Callable[[JSON], None] | None = None,
) -> JSON:
    """The same path as the schedule, run by hand; with ``wait``, settle it when done.

    The date defaults to today (UTC). A manual run's "tick" is now, which is
    also where an incremental export's window ends.

    ``on_progress`` gets ``{"state", "operation", "counter", "expected"}`` at each poll.
    """
    now = ctx.clock()
    day = day or now.astimezone(UTC).date()
    result = start_export(ctx, day, mode=mode, mime_type=mime_type, tick=now, force=force)
    if not wait:
        return result
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = read_marker(ctx, day)
        if found is None:
            return result
        doc = found[0]
        state = doc.get("state")
        if is_final(doc):
            return {**_summary(doc, str(state)), "problems": doc.get("problems", [])}
        if state == RUNNING:
            operation = _poll(ctx, doc["operation"]) or {"done": True}
            if on_progress is not None:
                counter = (operation.get("metadata") or {}).get("counter") or {}
                on_progress(
                    {
                        "state": state,
                        "operation": doc["operation"],
                        "counter": {k: int(v) for k, v in counter.items()},
                        "expected": doc.get("expected") or {},
                    }
                )
            if operation.get("done"):
                settle_exports(ctx, ctx.clock(), days=[day])
                continue
        elif state == STARTING:
            # A dead start is taken over here as by the export function (lease over).
            tick = parse_time(doc.get("tickTime")) or now
            start_export(ctx, day, mode=doc["mode"], mime_type=doc["mimeType"], tick=tick)
        elif state == FAILED:
            settle_exports(ctx, ctx.clock(), days=[day])
        if deadline is not None and time.monotonic() > deadline:
            return {**_summary(doc, "timeout"), "problems": ["still running at the timeout"]}
        time.sleep(poll_seconds)
