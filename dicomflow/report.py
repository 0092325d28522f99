"""The report function: the minute tick that turns operations and files into outcomes and alerts.

``run_tick`` verifies finished imports (``check_batch``, ``settle_batch``), alerts failed
and stalled operations, settles exports and drills, alerts quarantined, dropped and failed
files, a backlog and stale state. Every step is safe to repeat and to run twice at once.

See docs/architecture.md#report-tick
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from dicomflow import (
    alerts,
    batches,
    drill,
    export,
    feeds,
    ingest,
    log,
    manifests,
    objects,
    operations,
    retry,
    stale,
    verify,
)
from dicomflow.clock import iso, parse_time
from dicomflow.config import STATE_PREFIX
from dicomflow.errors import TransientError
from dicomflow.json_types import JSON
from dicomflow.operations import OperationView
from dicomflow.runtime import Context
from dicomflow.staging import (
    FileRecord,
    failure_name,
    open_name,
    operation_name,
    parse_batch,
    stuck_name,
)
from dicomflow.verify import CONFLICT, FAILED, FileResult

logger = logging.getLogger(__name__)

BACKLOG_MARKER = f"{STATE_PREFIX}report/backlog.json"
# Stop starting batch verifications after this long; the next tick goes on (timeout 540 s).
TICK_BUDGET_SECONDS = 300.0
# Finished batches one tick verifies at the same time.
VERIFY_BATCHES_AT_ONCE = 4
# Failed operations are looked at while they ended this recently; a tick runs every minute.
OUTSIDE_HORIZON_SECONDS = 86_400
# dicomflow records an operation it started right after the call, or adopts it when it
# repairs an interrupted start (batches.adopt_interrupted); one this much older than the
# repair delay without a record is not ours.
RECORD_MARGIN_SECONDS = 60


def crashpoint(step: str) -> None:
    """A named point between steps; tests replace it to crash the tick there."""


def run_tick(ctx: Context, event_id: str | None = None) -> JSON:
    """One report tick; see the module docstring. Returns what it did, for tests and logs."""
    now = ctx.clock()
    started = time.monotonic()
    steps_ms: dict[str, int] = {}

    def lap(step: str) -> None:
        steps_ms[step] = round((time.monotonic() - started) * 1000) - sum(steps_ms.values())

    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    pending = batches.open_batches(bucket)
    lap("open")
    verified: list[JSON] = []
    waiting: dict[str, JSON] = {}

    def settle_one(batch: str) -> None:
        try:
            if time.monotonic() - started > TICK_BUDGET_SECONDS:
                return
            try:
                outcome = check_batch(ctx, batch, now)
            except Exception as exc:
                if not stuck_batch(ctx, batch, exc, now):
                    raise
                return
            if outcome is None:
                return
            if "counts" in outcome:
                verified.append(outcome)
            else:
                waiting[batch] = outcome
        finally:
            ctx.close_clients()  # the API clients this pool thread made

    # Verification waits on the services far more than it computes, so it runs in
    # threads that start before the alert steps and go on beside them: a tick that
    # lives only seconds still moves both along. An error raises once all are done.
    pool = ThreadPoolExecutor(VERIFY_BATCHES_AT_ONCE, thread_name_prefix="settle")
    try:
        work = [pool.submit(settle_one, batch) for batch in pending]
        listed = operations.list_operations(ctx)
        crashpoint("listed")
        stalled = _report_stalled(ctx, listed, now)
        outside = _report_outside(ctx, listed, now)
        crashpoint("outside")
        exports = export.settle_exports(ctx, now)
        crashpoint("exports")
        drills = drill.settle_drills(ctx, now)
        lap("operations")
        # Beside the verifications, not after them: a long one must not hold these back.
        quarantined = feeds.report(ctx, feeds.QUARANTINE, now)
        crashpoint("quarantine")
        dropped = feeds.report(ctx, feeds.DROPPED, now)
        failed = feeds.report(ctx, feeds.FAILED, now)
        lap("feeds")
    finally:
        pool.shutdown(wait=True)
    lap("verify")
    for future in work:
        future.result()
    backlog = _report_backlog(ctx, waiting, now)
    crashpoint("backlog")
    stale_states = stale.report(ctx, now, pending)

    result = {
        "status": "tick",
        "operations": len(listed),
        "exports": [e.get("status") for e in exports],
        "drills": [d.get("status") for d in drills],
        "verified": verified,
        "pending": len(pending) - len(verified),
        "outside": outside,
        "stalled": stalled,
        "backlog": backlog,
        "quarantine": quarantined,
        "dropped": dropped,
        "failed": failed,
        "stale": stale_states,
    }
    logger.info(
        "report tick",
        extra=log.fields(
            eventId=event_id,
            operations=len(listed),
            verified=len(verified),
            pending=result["pending"],
            outside=len(outside),
            stalled=len(stalled),
            backlog=backlog,
            quarantineWindows=len(quarantined),
            droppedWindows=len(dropped),
            failedWindows=len(failed),
            stale=len(stale_states),
            ms=round((time.monotonic() - started) * 1000),
            stepsMs=steps_ms,
        ),
    )
    return result


# --- 1. open batches --------------------------------------------------------------------------


def check_batch(ctx: Context, batch: str, now: datetime) -> JSON | None:
    """Verify ``batch`` if its import is done. Returns what was verified, or the batch's
    queue record while it waits to import (for the backlog), or None while it runs."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    record = objects.read_json(bucket, operation_name(batch))
    if record is None:
        return objects.read_json(bucket, open_name(batch)) or {}
    try:
        record = batches.poll(ctx, batch, record)
    except TransientError as exc:
        logger.warning("operation poll failed", extra=log.fields(batch=batch, error=str(exc)))
        return None
    if not record.get("done"):
        return None
    return settle_batch(ctx, batch, record, now)


def settle_batch(ctx: Context, batch: str, record: JSON, now: datetime) -> JSON:
    """Verify a finished batch, record and alert its outcomes, then close it. Idempotent."""
    began = time.monotonic()
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    op_name: str | None = record.get("operation")
    summary = manifests.read_summary(bucket, batch)
    if summary is None:
        queued = objects.read_json(bucket, open_name(batch)) or {"batch": batch}
        window, bits = parse_batch(batch)
        in_window = batches.read_files(bucket, window) or []
        records = [r for r in in_window if r.key.startswith(bits)]
        listed = frozenset(r.key for r in in_window)
        restaged = ingest.restage_stragglers(ctx, batch, listed)
        crashpoint("restaged")
        note = objects.read_json(bucket, verify.note_name(batch))
        earlier = verify.earlier_copies(
            lambda other: batches.batch_records(bucket, other),
            lambda other: objects.read_json(bucket, verify.note_name(other)),
            batch,
            note,
        )
        results = verify.verify_batch(ctx, records, record, note, earlier)
        crashpoint("verified")
        manifests.write_lists(bucket, batch, op_name, results)
        crashpoint("manifests")
        _alert_batch(ctx, batch, record, results, now)
        crashpoint("alerts")
        summary = manifests.write_summary(
            bucket, manifests.build_summary(batch, queued, record, results, len(restaged), now)
        )
        crashpoint("summary")
        logger.log(
            logging.INFO if summary["failure"] == 0 else logging.WARNING,
            "batch verified",
            extra=log.fields(
                batch=batch,
                operation=op_name,
                counts=summary["counts"],
                fetched=summary["fetchedForChecksum"],
                ms=round((time.monotonic() - began) * 1000),
            ),
        )
    objects.delete(bucket, open_name(batch))
    objects.delete(bucket, stuck_name(batch))
    batches.release_slot(ctx, batch)
    return {"batch": batch, "operation": op_name, "counts": summary["counts"]}


def _service_status(exc: BaseException) -> int | None:
    """The HTTP status of a service's answer behind ``exc`` (DICOMweb, the APIs)."""
    for err in (exc, exc.__cause__):
        if err is not None and (status := retry.status_of(err)) is not None:
            return status
    return None


def stuck_batch(ctx: Context, batch: str, exc: BaseException, now: datetime) -> bool:
    """Note that checking ``batch`` failed with ``exc``; alert ``verification_stuck`` once
    when it first failed ``verify_stuck_minutes`` ago. True when the caller need not
    raise ``exc``: a permanent answer (4xx), which a platform retry of the tick cannot
    help (the next tick tries again). Transient errors are noted and raised; errors
    that are no service's answer (a bug, a crash) are raised without a note.
    """
    status = _service_status(exc)
    if status is None and not isinstance(exc, TransientError):
        return False
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    what = {"errorType": type(exc).__name__, "httpStatus": status}
    since = now
    if not objects.create(bucket, stuck_name(batch), {"batch": batch, "since": iso(now), **what}):
        found = objects.read_json(bucket, stuck_name(batch)) or {}
        since = parse_time(found.get("since")) or now
    minutes = (now - since).total_seconds() / 60
    permanent = status is not None and retry.is_permanent_status(status)
    # A permanent error is not raised, so its traceback is logged here (the platform logs
    # a raised one); the log filter puts labels in place of the URL's UIDs.
    logger.warning(
        "batch check failed",
        exc_info=exc if permanent else None,
        extra=log.fields(batch=batch, stuckMinutes=int(minutes), **what),
    )
    if minutes >= ctx.settings.verify_stuck_minutes:
        details = {
            "batch": batch,
            "operation": (objects.read_json(bucket, operation_name(batch)) or {}).get("operation"),
            "since": iso(since),
            "stuckMinutes": int(minutes),
            "thresholdMinutes": ctx.settings.verify_stuck_minutes,
            **what,
        }
        alert = alerts.build_alert(
            "verification_stuck",
            f"batch/{batch}/verification_stuck",
            "ERROR",
            str(ctx.settings.dicom_store),
            details,
            now,
        )
        alerts.publish_once(ctx, alert)
    return permanent


def _file_alert_details(
    ctx: Context, batch: str, record: JSON, chosen: list[FileResult], manifest: str
) -> JSON:
    settings = ctx.settings
    limit = settings.alert_sample_files

    def label(rec: FileRecord) -> str:
        return alerts.object_label(settings, rec.bucket, rec.name)

    details: JSON = {
        "batch": batch,
        "operation": record.get("operation"),
        "files": len(chosen),
        "reasons": dict(sorted(Counter(r.reason or "unknown" for r in chosen).items())),
        "manifest": manifest,
        "sampleFiles": [
            {
                "object": label(r.record),
                "key": r.key,
                "reason": r.reason,
                "sopInstanceUid": alerts.uid_label(settings, r.record.sop),
            }
            for r in chosen[:limit]
        ],
    }
    details.update(alerts.samples(settings, [(r.record.bucket, r.record.name) for r in chosen]))
    if record.get("counter"):
        details["operationCounter"] = {k: int(v) for k, v in record["counter"].items()}
    if record.get("error"):
        details["operationError"] = {
            "code": record["error"].get("code"),
            "message": _redact(ctx, str(record["error"].get("message", ""))),
        }
    return details


def _redact(ctx: Context, text: str) -> str:
    """An operation's error message with objects and UIDs as the alert settings name them."""

    def label(uri: str) -> str:
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        return alerts.object_label(ctx.settings, bucket, name)

    text = operations.redact(text, label)
    return log.UID_PATTERN.sub(lambda m: str(alerts.uid_label(ctx.settings, m.group(0))), text)


def _alert_batch(
    ctx: Context, batch: str, record: JSON, results: list[FileResult], now: datetime
) -> None:
    settings = ctx.settings
    manifest = f"gs://{settings.staging_bucket}/{failure_name(batch)}"
    for kind, status, severity in (
        ("import_failed", FAILED, "ERROR"),
        ("conflict", CONFLICT, "WARNING"),
    ):
        chosen = [r for r in results if r.status == status]
        if not chosen:
            continue
        alert = alerts.build_alert(
            kind,
            f"batch/{batch}/{kind}",
            severity,
            str(settings.dicom_store),
            _file_alert_details(ctx, batch, record, chosen, manifest),
            now,
            max_samples=settings.alert_sample_files,
        )
        alerts.publish_once(ctx, alert)


# --- 2. operations ---------------------------------------------------------------------------


def _report_outside(ctx: Context, listed: list[OperationView], now: datetime) -> list[str]:
    """Alert ``operation_failed`` once for each failed import or export that dicomflow did
    not start, among those that ended within ``OUTSIDE_HORIZON_SECONDS``.

    An import call retried after a 5xx that had in fact started an operation, or a
    start killed between the call and its record, leaves that operation unrecorded
    (an Operation does not carry its request, so it cannot be matched to the batch).
    The repair of an interrupted start adopts it (``batches.adopt_interrupted``); the
    retry after a 5xx does not, and such an operation, if it fails, is reported as
    started outside dicomflow. Its files are the batch's, whose verification stands.
    """
    # An interrupted start is repaired (and its import adopted) import_restart_seconds after it.
    recorded_by = now - timedelta(
        seconds=ctx.settings.import_restart_seconds + RECORD_MARGIN_SECONDS
    )
    oldest = now - timedelta(seconds=OUTSIDE_HORIZON_SECONDS)
    reported: list[str] = []
    for op in listed:
        if not op.failed or op.ended is None or op.ended < oldest:
            continue
        if op.created is None or op.created > recorded_by:
            continue  # maybe ours, between the call that started it and its record
        if operations.is_ours(ctx, op.name):
            continue
        _alert_outside(ctx, op, now)
        reported.append(op.name)
    return reported


def _alert_outside(ctx: Context, op: OperationView, now: datetime) -> None:
    details = {
        "operation": op.name,
        "operationKind": op.kind,
        "dataset": str(ctx.settings.dicom_store.dataset),
        "createTime": iso(op.created) if op.created else None,
        "endTime": iso(op.ended) if op.ended else None,
        "operationCounter": dict(op.counter),
        "operationError": {
            "code": op.error_code,
            "message": _redact(ctx, op.error_message),
        },
        "startedBy": "outside dicomflow",
    }
    alert = alerts.build_alert(
        "operation_failed", op.name, "ERROR", str(ctx.settings.dicom_store), details, now
    )
    alerts.publish_once(ctx, alert)


def _report_stalled(ctx: Context, listed: Iterable[OperationView], now: datetime) -> list[str]:
    """Alert ``stalled`` once for each operation running longer than the threshold."""
    limit = ctx.settings.stalled_seconds
    found: list[str] = []
    for op in listed:
        running = op.running_seconds(now)
        if running is None or running <= limit:
            continue
        details = {
            "operation": op.name,
            "operationKind": op.kind,
            "createTime": iso(op.created) if op.created else None,
            "runningSeconds": int(running),
            "thresholdSeconds": limit,
            "operationCounter": dict(op.counter),
        }
        alert = alerts.build_alert(
            "stalled", f"{op.name}/stalled", "WARNING", str(ctx.settings.dicom_store), details, now
        )
        alerts.publish_once(ctx, alert)
        found.append(op.name)
    return found


# --- 4. backlog -------------------------------------------------------------------------------


def _report_backlog(ctx: Context, waiting: dict[str, JSON], now: datetime) -> str | None:
    """One ``backlog`` alert per episode of sealed batches waiting longer than the threshold."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    limit = timedelta(seconds=ctx.settings.backlog_seconds)

    def sealed_at(batch: str) -> datetime | None:
        return parse_time(waiting[batch].get("sealedAt"))

    late = sorted(b for b in waiting if (at := sealed_at(b)) is not None and now - at > limit)
    if not late:
        if objects.exists(bucket, BACKLOG_MARKER):
            objects.delete(bucket, BACKLOG_MARKER)
        return None
    objects.create(bucket, BACKLOG_MARKER, {"episode": late[0], "openedAt": iso(now)})
    episode = (objects.read_json(bucket, BACKLOG_MARKER) or {}).get("episode", late[0])
    oldest = sealed_at(late[0])
    assert oldest is not None
    details = {
        "episode": episode,
        "batches": len(late),
        "files": sum(int(waiting[b].get("count") or 0) for b in late),
        "oldestBatch": late[0],
        "oldestWaitingSeconds": int((now - oldest).total_seconds()),
        "thresholdSeconds": ctx.settings.backlog_seconds,
        "maxRunningImports": ctx.settings.max_running_imports,
    }
    alert = alerts.build_alert(
        "backlog", f"backlog/{episode}", "WARNING", str(ctx.settings.dicom_store), details, now
    )
    alerts.publish_once(ctx, alert)
    return str(episode)
