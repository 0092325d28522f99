"""The report function: the minute tick that turns operations and files into outcomes and alerts.

One tick (``run_tick``), each step safe to repeat after a crash at any line::

    1. list the dataset's operations, all pages (imports and exports, any origin)
    2. settle exports (dicomflow.export.settle_exports: manifest, export_failed)
    3. retire active batches whose import is done (-> state/finished/<id>.json); an
       operation the service cannot return (404: expired) is retired with that reason,
       and the store decides each file's outcome as for any batch (import_failed for
       files not stored; none when every file is there), so it never blocks a tick
    4. verify each finished batch not leased by another live tick (lease marker
       state/verifying/<id>.json, create-if-absent, CAS takeover once expired, renewed
       while held; dicomflow.lease), VERIFY_BATCHES_AT_ONCE at a time, their use of
       the instance index in batch order, each in this order:
         manifests success/failure.ndjson -> ledger entries -> alerts import_failed
         and conflict -> summary.json -> delete staging copies of settled files
         -> mark the operation settled -> delete state/finished/<id>.json -> release the lease
       This is the long step (a backlog of batches can take minutes), so it runs in
       threads alongside steps 5 to 9, and a tick cut short moves both along.
    5. operations started outside dicomflow: operation_failed, once each
    6. operations running longer than DICOMFLOW_STALLED_SECONDS: stalled, once each
    7. batches sealed but not importing for DICOMFLOW_BACKLOG_SECONDS: backlog, once
       per episode (state/report/backlog.json names the episode)
    8. quarantined files, one alert per closed quarantine window, and a follow-up for
       records that land in it later (state/report/quarantine/<window>.json holds the
       keys alerted; see ``_report_windows``)
    9. dropped files (event too old, source gone), the same way from the drop records
       ingest writes (state/dropped/<window>/<key>.json): one ``dropped`` alert per
       closed window, follow-ups for late records (state/report/dropped/<window>.json)

Alerts go through ``alerts.publish_once``, whose ``alertId`` is a hash of
(kind, subject). Every subject is fixed before the alert is sent (batch id,
operation name, episode, window), and the step's "done" marker is written
only after the send, so a crash repeats the alert with the same id and never
loses it. Subjects::

    import_failed   batch/<id>/import_failed        conflict   batch/<id>/conflict
    operation_failed  <operation name>               stalled    <operation name>/stalled
    backlog         backlog/<first batch of episode> quarantined quarantine/<window>
    quarantined (late records)  quarantine/<window>/late/<sha256 of their sorted keys>[:16]
    dropped         dropped/<window>                 dropped (late)  dropped/<window>/late/<...>

Settled files are ``imported`` and ``duplicate``: their staging copies are
deleted. The copies of ``conflict`` and ``failed`` files stay in
``batches/<id>/`` for inspection and re-drive; the failure manifest names them.

Per-tick cost. Bounded: quarantine and drop windows are listed from a cursor
(``state/report/<quarantine|dropped>-cursor.json``, never later than now minus the late
horizon), so windows done for good are not listed again; verification stops
starting batches after ``TICK_BUDGET_SECONDS``. Still O(history), to bound later:
``operations.list_operations`` reads every page of the dataset's operations
(the emulator lists oldest first; the real API's order is not documented, so
paging is not cut short on a time horizon), and ``operations.settled_ids`` lists
every settled marker; both grow with the operations the service retains. The
export markers are read only when an unknown export operation turns up.

No PHI: alerts and logs carry batch ids, operation names, counts, reasons,
UIDs and object labels (``alerts.object_label``, hashed by default) only.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cloudevents.http import CloudEvent
from google.api_core import exceptions as gexc
from googleapiclient.errors import HttpError

from dicomflow import (
    alerts,
    batches,
    export,
    lease,
    ledger,
    log,
    manifests,
    operations,
    retry,
    verify,
)
from dicomflow.config import DROPPED_PREFIX, QUARANTINE_PREFIX, STATE_PREFIX
from dicomflow.operations import OperationView
from dicomflow.verify import CONFLICT, FAILED, SUCCESS, FileResult

logger = logging.getLogger(__name__)

MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
REPORT_PREFIX = f"{STATE_PREFIX}report/"
BACKLOG_MARKER = f"{REPORT_PREFIX}backlog.json"


@dataclass(frozen=True)
class WindowFeed:
    """Per-window records that ingest writes and this tick alerts, one kind each.

    ``prefix/<window>/<key>.json`` are the records (and, for quarantine, the copies
    ``<key>.dcm`` beside them); the progress record of a window is
    ``state/report/<root>/<window>.json``, a window done for good is marked in
    ``state/report/<root>-done/``, and the window cursor is
    ``state/report/<root>-cursor.json``. Subjects are ``<root>/<window>`` and
    ``<root>/<window>/late/<digest>``.
    """

    kind: str
    root: str
    prefix: str
    time_field: str  # the record's time, for progress records written before follow-ups
    prefix_detail: str  # the detail naming where the records are

    @property
    def markers(self) -> str:
        return f"{REPORT_PREFIX}{self.root}/"

    @property
    def done(self) -> str:
        return f"{REPORT_PREFIX}{self.root}-done/"

    @property
    def cursor(self) -> str:
        return f"{REPORT_PREFIX}{self.root}-cursor.json"


QUARANTINE = WindowFeed(
    "quarantined", "quarantine", QUARANTINE_PREFIX, "quarantinedAt", "quarantinePrefix"
)
DROPPED = WindowFeed("dropped", "dropped", DROPPED_PREFIX, "droppedAt", "recordPrefix")
QUARANTINE_MARKERS = QUARANTINE.markers
# A quarantine copy without its record holds its window back this long after it closes.
ORPHAN_WAIT_SECONDS = 600
MISSING_RECORD = "quarantine-record-missing"
# Stop starting batch verifications after this long; the next tick goes on (timeout 540 s).
TICK_BUDGET_SECONDS = 300.0
# Finished batches being verified: one lease marker each (dicomflow.lease), so that
# overlapping ticks (the minute tick while a slow one runs, platform retries) split the
# batches instead of verifying the same ones. The verifier renews its lease every third
# of VERIFY_LEASE_SECONDS (lease.Renewal), however long the batch takes; a killed tick's
# lease expires that long after its last renewal and the next tick resumes the batch
# (verification is idempotent).
VERIFYING_PREFIX = f"{STATE_PREFIX}verifying/"
VERIFY_LEASE_SECONDS = 60.0
# Finished batches one tick verifies at the same time (each with its own lease). Their
# reads of the ledger and the store overlap; their use of the settled-instance index
# goes in batch order (a turnstile, verify_batch's ``my_turn``): the index decides most
# files without fetching bytes, which is right only when batches settle in the order
# they were imported. Without the turnstile a later batch could claim a SOP UID first,
# and the demo marked two files with that UID and different bytes both imported.
VERIFY_BATCHES_AT_ONCE = 4
# A quarantine window is reported this long after it ends (late copies land in it first).
QUARANTINE_GRACE_SECONDS = 60
# An unknown import this much older than ingest's restart delay cannot be ours unrecorded.
UNRECORDED_IMPORT_MARGIN_SECONDS = 60


# One tick at a time per instance. The deployment runs one request per instance
# (max_instance_request_concurrency = 1), so there a tick never meets another in its
# process; an instance that serves several at once (localcloud's threaded server) lets
# a tick that finds one running return at once instead of piling ticks up: each would
# redo the same listings and slow all of them, and every kill of the process would lose
# them all. Ticks on other instances still split the work through the per-batch leases.
_TICK_RUNNING = threading.Lock()


def crashpoint(step: str) -> None:
    """A named point between steps; tests replace it to crash the tick there."""


def handle_event(ctx: Any, cloud_event: CloudEvent) -> dict[str, Any]:
    """The report function: every event is a tick (Scheduler -> Pub/Sub)."""
    event_id = cloud_event["id"]
    if cloud_event["type"] != MESSAGE_PUBLISHED:
        logger.info(
            "ignored event type",
            extra=log.fields(eventId=event_id, eventType=cloud_event["type"]),
        )
        return {"status": "ignored", "reason": "event-type"}
    if not _TICK_RUNNING.acquire(blocking=False):
        logger.info(
            "tick skipped: a tick is running in this instance", extra=log.fields(eventId=event_id)
        )
        return {"status": "busy"}
    try:
        return run_tick(ctx, event_id)
    finally:
        _TICK_RUNNING.release()


def run_tick(ctx: Any, event_id: str | None = None) -> dict[str, Any]:
    """One report tick; see the module docstring. Returns what it did, for tests and logs."""
    now = ctx.clock()
    started = time.monotonic()
    steps_ms: dict[str, int] = {}  # wall time of each part, for the tick's log line

    def lap(step: str) -> None:
        steps_ms[step] = round((time.monotonic() - started) * 1000) - sum(steps_ms.values())

    listed = operations.list_operations(ctx)
    settled = operations.settled_ids(ctx)
    by_name = {op.name: op for op in listed}
    lap("list")
    crashpoint("listed")

    exports = export.settle_exports(ctx, now)
    lap("exports")
    crashpoint("exports")

    active = _retire_done(ctx, by_name, now)
    lap("retire")
    crashpoint("retired")

    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    finished = {
        b: r
        for b in batches.list_ids(bucket, batches.FINISHED_PREFIX)
        if (r := batches.read_json(bucket, batches.finished_name(b))) is not None
    }
    ours = {r["operation"] for r in [*active.recorded.values(), *finished.values()]}
    ours.discard(None)
    lap("finished")
    verified: list[dict[str, Any]] = []
    leased: list[str] = []
    order = sorted(finished)
    done_with_index = {b: threading.Event() for b in order}
    waits = {b: done_with_index[a].wait for a, b in itertools.pairwise(order)}

    def verify_one(item: tuple[str, dict[str, Any]]) -> None:
        try:
            settle_one(*item)
        finally:
            done_with_index[item[0]].set()  # however it ended: the next batch goes on
            ctx.close_clients()  # the API clients this pool thread made

    def settle_one(batch: str, record: dict[str, Any]) -> None:
        if time.monotonic() - started > TICK_BUDGET_SECONDS:
            return
        held = acquire_verification(ctx, batch)
        if held is None:
            leased.append(batch)  # another live tick verifies it: take the next one
            return
        with held:  # renewed while the batch is verified
            if not batches.exists(bucket, batches.finished_name(batch)):
                held.release()  # settled by another tick since we listed it
                return
            try:
                verified.append(
                    settle_batch(
                        ctx,
                        batch,
                        record,
                        by_name,
                        now,
                        held=held,
                        my_turn=waits.get(batch, lambda: None),
                        index_done=done_with_index[batch].set,
                    )
                )
            except Exception:
                # The tick is alive and gives up this batch: let the next tick take it at
                # once. A kill runs no code; its lease expires VERIFY_LEASE_SECONDS after
                # the last renewal.
                held.release()
                raise

    # Verification waits on the services far more than it computes (and under throttling,
    # on retry back-off), so it runs in a thread that starts before the alert steps and
    # goes on beside them: a tick that lives only seconds still moves both along. An
    # error in a batch raises once the others are done.
    pool = ThreadPoolExecutor(VERIFY_BATCHES_AT_ONCE, thread_name_prefix="settle")
    try:
        work = [pool.submit(verify_one, item) for item in sorted(finished.items())]
        outside = _report_outside(ctx, listed, settled, ours, active.starting, now)
        crashpoint("outside")
        stalled = _report_stalled(ctx, listed, now)
        crashpoint("stalled")
        backlog = _report_backlog(ctx, active.waiting, now)
        crashpoint("backlog")
        quarantined = _report_windows(ctx, QUARANTINE, now)
        crashpoint("quarantine")
        dropped = _report_windows(ctx, DROPPED, now)
        lap("alerts")  # steps 5 to 9, with verification going on beside them
        crashpoint("dropped")
    finally:
        pool.shutdown(wait=True)
    lap("verifyAfterAlerts")
    for future in work:
        future.result()

    result = {
        "status": "tick",
        "operations": len(listed),
        "exports": [e.get("status") for e in exports],
        "retired": active.retired,
        "verified": verified,
        "pending": len(finished) - len(verified),
        "leased": leased,
        "outside": outside,
        "stalled": stalled,
        "backlog": backlog,
        "quarantine": quarantined,
        "dropped": dropped,
    }
    logger.info(
        "report tick",
        extra=log.fields(
            eventId=event_id,
            operations=len(listed),
            retired=len(active.retired),
            verified=len(verified),
            pending=result["pending"],
            leased=len(leased),
            outside=len(outside),
            stalled=len(stalled),
            backlog=backlog,
            quarantineWindows=len(quarantined),
            droppedWindows=len(dropped),
            ms=round((time.monotonic() - started) * 1000),
            stepsMs=steps_ms,
        ),
    )
    return result


# --- 3. active batches ------------------------------------------------------------------------


class _Active:
    """What step 3 learnt about the active batches."""

    def __init__(self) -> None:
        self.retired: list[str] = []
        self.recorded: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, dict[str, Any]] = {}
        self.starting = False


def _retire_done(ctx: Any, by_name: dict[str, OperationView], now: datetime) -> _Active:
    """Move active batches whose import is done to ``state/finished/``, as ingest's tick does.

    The report does it too so that verification does not wait for the ingest tick.
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    out = _Active()
    for batch in batches.list_ids(bucket, batches.ACTIVE_PREFIX):
        record = batches.read_json(bucket, batches.operation_name(batch))
        if record is None:
            queued = batches.read_json(bucket, batches.active_name(batch))
            if queued is not None:
                out.waiting[batch] = queued
            if batches.exists(bucket, batches.intent_name(batch)):
                out.starting = True
            continue
        out.recorded[batch] = record
        op = by_name.get(record["operation"])
        if op is None:
            op, unreadable = _read_operation(ctx, record["operation"], batch)
            if unreadable is not None:
                # Permanent (e.g. 404, expired): as ingest's run_queue does, hand the batch
                # to verification with the reason; the store decides each file's outcome.
                done_record = {**record, "done": True, "error": {"message": unreadable}}
                batches.create_json(
                    bucket,
                    batches.finished_name(batch),
                    {**done_record, "finishedAt": export.iso(now)},
                )
                batches.delete(bucket, batches.active_name(batch))
                out.retired.append(batch)
                continue
        assert op is not None
        if not op.done:
            continue
        done: dict[str, Any] = {**record, "done": True}
        if op.error_code is not None:
            done["error"] = {"code": op.error_code, "message": op.error_message[:300]}
        if op.counter:
            done["counter"] = {k: str(v) for k, v in op.counter.items()}
        batches.create_json(
            bucket, batches.finished_name(batch), {**done, "finishedAt": export.iso(now)}
        )
        batches.delete(bucket, batches.active_name(batch))
        out.retired.append(batch)
    return out


def _read_operation(ctx: Any, name: str, batch: str) -> tuple[OperationView | None, str | None]:
    """``operations.get`` of a batch's operation: (view, None), or (None, why) when the
    service answers a permanent error (404: expired or unknown). Transient errors raise."""
    try:
        return operations.view(export.get_operation(ctx, name)), None
    except HttpError as exc:
        if retry.should_retry(exc):
            raise
        status = retry.status_of(exc)
        logger.error(
            "operation unreadable",
            extra=log.fields(batch=batch, operation=name, status=status),
        )
        return None, f"operation unreadable: HTTP {status}"


# --- 4. one finished batch --------------------------------------------------------------------


def verifying_name(batch: str) -> str:
    """The lease marker of a finished batch being verified."""
    return f"{VERIFYING_PREFIX}{batch}.json"


def acquire_verification(ctx: Any, batch: str) -> lease.Renewal | None:
    """Lease ``batch`` for verification, or None while another tick's lease on it is
    live. Expired leases (a killed tick) are taken over. The caller enters the returned
    ``Renewal`` to keep the lease live while it works."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    held = lease.Lease(bucket.blob(verifying_name(batch)))
    now = ctx.clock()
    doc = {
        "state": "verifying",
        "batch": batch,
        "leasedAt": lease.iso(now),
        "leaseUntil": lease.iso(now + timedelta(seconds=VERIFY_LEASE_SECONDS)),
    }
    generation = lease.try_acquire(held, doc, now)
    if generation is None:
        return None
    return lease.Renewal(held, generation, doc, VERIFY_LEASE_SECONDS, ctx.clock)


def settle_batch(
    ctx: Any,
    batch: str,
    record: dict[str, Any],
    by_name: dict[str, OperationView],
    now: datetime,
    *,
    held: lease.Renewal | None = None,
    my_turn: Callable[[], Any] = lambda: None,
    index_done: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Verify a finished batch, record and alert its outcomes, then clean up. Idempotent.

    ``held``: this tick's verification lease on the batch (``acquire_verification``),
    released once the batch is settled, after its ``state/finished/`` record is deleted.
    """
    settings = ctx.settings
    began = time.monotonic()
    bucket = ctx.storage.bucket(settings.staging_bucket)
    op_name: str | None = record.get("operation")
    summary = manifests.read_summary(bucket, batch)
    if summary is None:
        files = batches.read_file_list(bucket, batch)
        keys = sorted(files.keys) if files is not None else []
        results = verify.verify_batch(ctx, batch, keys, my_turn=my_turn)
        index_done()
        crashpoint("verified")
        op = by_name.get(op_name) if op_name else None
        if op is None and op_name:
            op, _ = _read_operation(ctx, op_name, batch)
        manifests.write_lists(bucket, batch, op_name, results)
        crashpoint("manifests")
        _update_ledger(ctx, batch, op_name, results, now)
        crashpoint("ledger")
        _alert_batch(ctx, batch, op, results, now)
        crashpoint("alerts")
        summary = manifests.write_summary(
            bucket, manifests.build_summary(batch, record, op, results, now)
        )
        crashpoint("summary")
        settled_keys = [r.key for r in results if r.status in SUCCESS]
        logger.log(
            logging.INFO if summary["failure"] == 0 else logging.WARNING,
            "batch verified",
            extra=log.fields(
                batch=batch,
                operation=op_name,
                counts=summary["counts"],
                ms=round((time.monotonic() - began) * 1000),
            ),
        )
    else:
        lines = manifests.read_lines(bucket, manifests.success_name(batch))
        settled_keys = [line["key"] for line in lines]
    verify.pmap(lambda key: batches.delete(bucket, batches.staged_name(batch, key)), settled_keys)
    crashpoint("staging")
    if op_name:
        operations.mark_settled(ctx, op_name, "batch", export.iso(now), batch=batch)
    batches.delete(bucket, batches.finished_name(batch))
    if held is not None:
        # After the finished record: a tick that takes the lease next finds no record and
        # skips the batch. A kill in between leaves a stale lease on a settled batch,
        # which nothing reads again.
        held.release()
    return {"batch": batch, "operation": op_name, "counts": summary["counts"]}


def _update_ledger(
    ctx: Any, batch: str, op_name: str | None, results: list[FileResult], now: datetime
) -> None:
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    manifest = f"gs://{ctx.settings.staging_bucket}/{manifests.summary_name(batch)}"

    def change(result: FileResult) -> Any:
        def apply(entry: ledger.Entry) -> bool:
            if entry.status in (ledger.QUARANTINED, ledger.DROPPED):
                return False
            if entry.batch not in (None, batch):
                return False  # moved to another batch; that batch settles it
            if entry.status == result.status and entry.reason == result.reason:
                return False
            entry.status, entry.reason = result.status, result.reason
            entry.mark(result.status, now)
            entry.detail.update(operation=op_name, verifiedBatch=batch, manifest=manifest)
            if result.stored_checksum and result.stored_checksum != result.checksum:
                entry.detail["storedChecksum"] = result.stored_checksum
            return True

        return apply

    def one(result: FileResult) -> None:
        if result.entry is None:
            return
        entry, generation = result.entry, result.generation
        if generation is not None and change(result)(entry):
            with contextlib.suppress(ledger.Conflict):
                ledger.write(bucket, entry, generation)
                return
        ledger.modify(bucket, result.key, change(result))

    verify.pmap(one, results)


def _label_of(ctx: Any, result: FileResult) -> str:
    if result.entry is None:
        return alerts.object_label(
            ctx.settings, ctx.settings.staging_bucket, batches.staged_name("?", result.key)
        )
    return alerts.object_label(ctx.settings, result.entry.source.bucket, result.entry.source.name)


def _file_alert_details(
    ctx: Any, batch: str, op: OperationView | None, chosen: list[FileResult], manifest: str
) -> dict[str, Any]:
    settings = ctx.settings
    limit = settings.alert_sample_files
    details: dict[str, Any] = {
        "batch": batch,
        "operation": op.name if op else None,
        "files": len(chosen),
        "reasons": dict(sorted(Counter(r.reason or "unknown" for r in chosen).items())),
        "manifest": manifest,
        "sampleFiles": [
            {
                "object": _label_of(ctx, r),
                "ledgerKey": r.key,
                "reason": r.reason,
                "sopInstanceUid": r.entry.uids.sop if r.entry and r.entry.uids else None,
            }
            for r in chosen[:limit]
        ],
    }
    details.update(
        alerts.samples(
            settings,
            [
                (r.entry.source.bucket, r.entry.source.name)
                if r.entry
                else (settings.staging_bucket, batches.staged_name(batch, r.key))
                for r in chosen
            ],
        )
    )
    if op is not None:
        details["operationCounter"] = dict(op.counter)
        if op.error_code is not None:
            details["operationError"] = {
                "code": op.error_code,
                "message": operations.redact(op.error_message, _uri_label(ctx)),
            }
    return details


def _uri_label(ctx: Any) -> Any:
    def label(uri: str) -> str:
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        return alerts.object_label(ctx.settings, bucket, name)

    return label


def _alert_batch(
    ctx: Any, batch: str, op: OperationView | None, results: list[FileResult], now: datetime
) -> None:
    settings = ctx.settings
    failure_manifest = f"gs://{settings.staging_bucket}/{manifests.failure_name(batch)}"
    store = str(settings.dicom_store)
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
            store,
            _file_alert_details(ctx, batch, op, chosen, failure_manifest),
            now,
            max_samples=settings.alert_sample_files,
        )
        alerts.publish_once(ctx, alert)


# --- 5. operations started outside dicomflow --------------------------------------------------


def _export_operations(ctx: Any) -> dict[str, str]:
    """Operation name -> export date, for every export dicomflow started."""
    known: dict[str, str] = {}
    for day in export.list_markers(ctx):
        found = export.read_marker(ctx, day)
        if found is None:
            continue
        doc = found[0]
        for attempt in [doc, *(doc.get("previous") or [])]:
            if attempt.get("operation"):
                known[str(attempt["operation"])] = day.isoformat()
    return known


def _report_outside(
    ctx: Any,
    listed: list[OperationView],
    settled: set[str],
    ours: set[str],
    starting: bool,
    now: datetime,
) -> list[str]:
    """Alert ``operation_failed`` once for each failed import/export not started by dicomflow.

    "Ours" is what this tick read: the settled markers, the active and finished
    batches' operation records and the export markers. An overlapping tick can settle
    one of our batches in between, so the settled marker is read again just before
    an alert.

    Known limit: when the import call is retried after a 5xx that had in fact started
    an operation (``healthcare.start_import`` retries inside ``retry.call``), the first
    operation is recorded nowhere. Neither the emulator's nor the real API's Operation
    carries the request (``OperationMetadata`` has apiMethodName, createTime, endTime,
    logsUrl, counter, cancelRequested; no ``gcsSource``), so it cannot be matched to
    the batch URI; if that stray operation fails it is reported as started outside
    dicomflow. Its files are the batch's, whose per-file verification stands.
    """
    pending = [op for op in listed if op.done and op.op_id not in settled and op.name not in ours]
    if not pending:
        return []
    exports_known: dict[str, str] | None = None
    reported: list[str] = []
    stamp = export.iso(now)
    for op in pending:
        if op.kind == operations.EXPORT:
            if exports_known is None:
                exports_known = _export_operations(ctx)
            if op.name in exports_known:
                marker = export.read_marker(ctx, export.parse_day(exports_known[op.name]))
                state = marker[0].get("state") if marker else None
                if state in export.FINAL_STATES or marker is None:
                    operations.mark_settled(ctx, op.name, "export", stamp)
                continue
        elif (
            starting
            and op.created is not None
            and (now - op.created).total_seconds()
            < ctx.settings.import_restart_seconds + UNRECORDED_IMPORT_MARGIN_SECONDS
        ):
            continue  # maybe ingest's, between the import call and its record
        if op.failed:
            # Another tick may have settled our own batch since this tick read the settled
            # markers and listed state/finished/ (ticks overlap): look again, just before.
            if operations.is_settled(ctx, op.name):
                continue
            _alert_outside(ctx, op, now)
            reported.append(op.name)
            how = "outside-failed"
        else:
            how = "outside-cancelled" if op.error_code is not None else "outside-ok"
        operations.mark_settled(ctx, op.name, how, stamp, kind=op.kind)
    return reported


def _alert_outside(ctx: Any, op: OperationView, now: datetime) -> None:
    store = str(ctx.settings.dicom_store)
    details = {
        "operation": op.name,
        "operationKind": op.kind,
        "dataset": str(ctx.settings.dicom_store.dataset),
        "createTime": export.iso(op.created) if op.created else None,
        "endTime": export.iso(op.ended) if op.ended else None,
        "operationCounter": dict(op.counter),
        "operationError": {
            "code": op.error_code,
            "message": operations.redact(op.error_message, _uri_label(ctx)),
        },
        "startedBy": "outside dicomflow",
    }
    alert = alerts.build_alert("operation_failed", op.name, "ERROR", store, details, now)
    alerts.publish_once(ctx, alert)


# --- 6. stalled operations --------------------------------------------------------------------


def _report_stalled(ctx: Any, listed: Iterable[OperationView], now: datetime) -> list[str]:
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
            "createTime": export.iso(op.created) if op.created else None,
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


# --- 7. backlog -------------------------------------------------------------------------------


def _report_backlog(ctx: Any, waiting: dict[str, dict[str, Any]], now: datetime) -> str | None:
    """One ``backlog`` alert per episode of sealed batches waiting longer than the threshold."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    limit = timedelta(seconds=ctx.settings.backlog_seconds)
    late = sorted(
        batch
        for batch, queued in waiting.items()
        if queued.get("sealedAt") and now - export.parse_time(queued["sealedAt"]) > limit
    )
    if not late:
        if batches.exists(bucket, BACKLOG_MARKER):
            batches.delete(bucket, BACKLOG_MARKER)
        return None
    batches.create_json(bucket, BACKLOG_MARKER, {"episode": late[0], "openedAt": export.iso(now)})
    episode = (batches.read_json(bucket, BACKLOG_MARKER) or {}).get("episode", late[0])
    oldest = export.parse_time(waiting[late[0]]["sealedAt"])
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


# --- 8, 9. quarantined and dropped files, per window -----------------------------------------


def _quarantine_horizon(settings: Any) -> timedelta:
    """How long after its start a window can still receive a quarantine copy or record.

    Ingest fixes a file's window at claim time; a delivery retried by the platform
    writes the copy and the record later, for as long as the event is retried.
    Ingest drops events older than ``max_event_age_seconds``, so that bounds it.
    A drop record's window is fixed by the entry's drop time and is written late
    only by a retry after a crash (seconds to minutes); the same bound serves.
    """
    return timedelta(
        seconds=settings.max_event_age_seconds
        + settings.batch_window_seconds
        + settings.seal_grace_seconds
        + QUARANTINE_GRACE_SECONDS
    )


def _window_closes(settings: Any, start: datetime) -> datetime:
    return start + timedelta(
        seconds=settings.batch_window_seconds
        + settings.seal_grace_seconds
        + QUARANTINE_GRACE_SECONDS
    )


def _report_windows(ctx: Any, feed: WindowFeed, now: datetime) -> list[str]:
    """``feed.kind`` alerts per closed window of ``feed`` (a burst is one alert).

    Described for quarantine (``QUARANTINE``); drop records (``DROPPED``) take the
    same path under their own prefixes and subjects, and have no copies, so never
    orphans. Each window has a progress record ``state/report/quarantine/<window>.json``:
    ``{window, keys, alerts, pending, reportedAt}``, changed only by compare-and-swap.
    ``keys`` are the files already alerted. A tick lists the window, and when
    it holds records not in ``keys`` it first writes them as ``pending`` (with
    the alert's subject), then publishes, then folds ``pending`` into ``keys``.
    A crash after the publish repeats the same subject and the same files.

    - The first alert of a window has the subject ``quarantine/<window>``; records
      that land later (a retried delivery) get ``quarantine/<window>/late/<digest>``,
      the digest being over the sorted keys of that follow-up.
    - A ``.dcm`` without its ``.json`` record (a delivery between the copy and the
      record) holds the window back for ``ORPHAN_WAIT_SECONDS`` after it closes;
      after that the files with records are alerted and the orphan follows when its
      record lands. Past the horizon, an orphan is alerted with the reason
      ``quarantine-record-missing``.
    - A window is done for good (``state/report/quarantine-done/<window>.json``)
      once it is past the horizon with nothing left unalerted; until then every
      tick lists it, so late records are found.
    """
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)

    def windows() -> list[str]:
        it = ctx.storage.list_blobs(
            bucket,
            prefix=feed.prefix,
            delimiter="/",
            start_offset=f"{feed.prefix}{cursor}" if cursor else None,
        )
        for _ in it:
            pass
        return sorted(p[len(feed.prefix) :].strip("/") for p in it.prefixes)

    cursor = str((batches.read_json(bucket, feed.cursor) or {}).get("window") or "")
    found = [w for w in retry.call(windows) if w >= cursor]
    done = {w for w in _list_done(ctx, feed, bucket, cursor) if w >= cursor}
    reported: list[str] = []
    for window in found:
        if window in done:
            continue
        try:
            start = datetime.strptime(window, "%Y%m%dT%H%M%SZ").replace(tzinfo=now.tzinfo)
        except ValueError:
            continue
        if now < _window_closes(settings, start):
            continue
        if _settle_window(ctx, feed, window, start, now):
            reported.append(window)
    _advance_cursor(ctx, feed, bucket, cursor, found, now)
    return reported


def _list_done(ctx: Any, feed: WindowFeed, bucket: Any, cursor: str) -> list[str]:
    offset = f"{feed.done}{cursor}" if cursor else None
    names = retry.call(
        lambda: [
            b.name for b in ctx.storage.list_blobs(bucket, prefix=feed.done, start_offset=offset)
        ]
    )
    return [n[len(feed.done) : -len(".json")] for n in names if n.endswith(".json")]


def _advance_cursor(
    ctx: Any, feed: WindowFeed, bucket: Any, cursor: str, found: list[str], now: datetime
) -> None:
    """Move the window cursor to the oldest window that may still need work.

    That is the oldest window not done, but never past the window of ``now`` minus
    the horizon: a late copy can create a window (its first object) that late, and
    the cursor must not have passed it. Windows before the cursor are never listed
    again. Overlapping ticks may write it out of order; a cursor too far back only
    costs a longer listing.
    """
    done = set(_list_done(ctx, feed, bucket, cursor))
    floor = batches.window_id(now - _quarantine_horizon(ctx.settings), 1)
    waiting = [w for w in found if w not in done]
    target = min([floor, *waiting[:1]])
    if target <= cursor:
        return
    blob = bucket.blob(feed.cursor)
    body = json.dumps({"window": target, "movedAt": export.iso(now)}, sort_keys=True)
    retry.call(lambda: blob.upload_from_string(body, content_type="application/json"))


def _read_doc(bucket: Any, name: str) -> tuple[dict[str, Any], int] | None:
    blob = bucket.blob(name)
    try:
        raw = retry.call(blob.download_as_bytes)
    except gexc.NotFound:
        return None
    doc: dict[str, Any] = json.loads(raw)
    return doc, int(blob.generation or 0)


def _swap_doc(bucket: Any, name: str, doc: dict[str, Any], generation: int) -> bool:
    """Write ``doc`` if ``name`` is still at ``generation`` (0: absent); False if it moved."""
    blob = bucket.blob(name)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    try:
        retry.call(
            lambda: blob.upload_from_string(
                body, content_type="application/json", if_generation_match=generation
            )
        )
    except gexc.PreconditionFailed:
        return False
    return True


def _settle_window(ctx: Any, feed: WindowFeed, window: str, start: datetime, now: datetime) -> bool:
    """Alert what is new in ``window``; True when this call published an alert."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    name = f"{feed.markers}{window}.json"
    prefix = f"{feed.prefix}{window}/"
    past_horizon = now - start > _quarantine_horizon(settings)
    waited = now - _window_closes(settings, start) >= timedelta(seconds=ORPHAN_WAIT_SECONDS)
    sent = False
    for _ in range(10):
        found = _read_doc(bucket, name)
        fresh: dict[str, Any] = {"window": window}
        doc, generation = found if found is not None else (fresh, 0)
        pending = doc.get("pending")
        if pending:
            keys = [str(k) for k in pending["keys"]]
            _alert_window(ctx, feed, window, str(pending["subject"]), keys, now)
            sent = True
            settled = {
                **doc,
                "keys": sorted({*(doc.get("keys") or []), *keys}),
                "alerts": int(doc.get("alerts") or 0) + 1,
                "pending": None,
                "reportedAt": export.iso(now),
            }
            _swap_doc(bucket, name, settled, generation)
            continue  # read again: the swap may have lost to another tick
        names = retry.call(lambda: [b.name for b in ctx.storage.list_blobs(bucket, prefix=prefix)])
        copies = {n[len(prefix) : -len(".dcm")] for n in names if n.endswith(".dcm")}
        records = {n[len(prefix) : -len(".json")] for n in names if n.endswith(".json")}
        if found is None:
            alerted: set[str] = set()
        elif "keys" in doc:
            alerted = set(doc["keys"])
        else:  # a marker written before follow-ups existed: {window, reportedAt}
            alerted = _alerted_before(bucket, feed, prefix, records, doc.get("reportedAt"))
        orphans = copies - records - alerted
        new = records - alerted
        if past_horizon:
            new |= orphans  # their records will never come: alert them as missing
        elif orphans and not waited:
            return sent  # a delivery may be between the copy and the record
        if not new:
            if past_horizon:
                batches.create_json(
                    bucket,
                    f"{feed.done}{window}.json",
                    {"window": window, "doneAt": export.iso(now)},
                )
            return sent
        keys = sorted(new)
        if found is None:
            subject = f"{feed.root}/{window}"
        else:
            digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
            subject = f"{feed.root}/{window}/late/{digest}"
        intent = {
            **doc,
            "keys": sorted(alerted),
            "pending": {"subject": subject, "keys": keys},
        }
        _swap_doc(bucket, name, intent, generation)
    return sent


def _alerted_before(
    bucket: Any, feed: WindowFeed, prefix: str, records: set[str], reported_at: Any
) -> set[str]:
    """The records an old-style marker covered: those written before it."""
    if not reported_at:
        return set(records)
    when = export.parse_time(str(reported_at))
    docs = verify.pmap(lambda k: batches.read_json(bucket, f"{prefix}{k}.json"), sorted(records))
    return {
        k
        for k, d in zip(sorted(records), docs, strict=True)
        if d is None
        or not d.get(feed.time_field)
        or export.parse_time(str(d[feed.time_field])) <= when
    }


def _window_record(ctx: Any, prefix: str, key: str) -> dict[str, Any]:
    """The record of ``key`` in a window, or one rebuilt from the ledger when it never came."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    record = batches.read_json(bucket, f"{prefix}{key}.json")
    if record is not None:
        return record
    record = {"key": key, "reason": MISSING_RECORD}
    found = ledger.read(bucket, key)
    if found is not None:
        src = found[0].source
        record["source"] = {"bucket": src.bucket, "name": src.name}
    return record


def _record_label(settings: Any, record: dict[str, Any]) -> str | None:
    """How an alert names the file of a record: from its source, or the label ingest stored."""
    source = record.get("source")
    if source:
        return alerts.object_label(settings, str(source["bucket"]), str(source["name"]))
    label = record.get("objectLabel")
    return str(label) if label else None


def _alert_window(
    ctx: Any, feed: WindowFeed, window: str, subject: str, keys: list[str], now: datetime
) -> None:
    settings = ctx.settings
    prefix = f"{feed.prefix}{window}/"
    records = verify.pmap(lambda k: _window_record(ctx, prefix, k), keys)
    reasons = Counter(_reason_code(r.get("reason")) for r in records)
    named = [(r, label) for r in records if (label := _record_label(settings, r)) is not None]
    labels = [label for _, label in named]
    details: dict[str, Any] = {
        "window": window,
        "files": len(records),
        "reasons": dict(sorted(reasons.items())),
        feed.prefix_detail: f"gs://{settings.staging_bucket}/{prefix}",
        "followUp": subject != f"{feed.root}/{window}",
        "sampleFiles": [
            {
                "object": label,
                "ledgerKey": r.get("key"),
                "reason": _reason_code(r.get("reason")),
            }
            for r, label in named[: settings.alert_sample_files]
        ],
        alerts.SAMPLES_KEY: labels[: settings.alert_sample_files],
        "sampleTotal": len(labels),
    }
    alert = alerts.build_alert(
        feed.kind,
        subject,
        "WARNING",
        str(settings.dicom_store),
        details,
        now,
        max_samples=settings.alert_sample_files,
    )
    alerts.publish_once(ctx, alert)


def _reason_code(reason: Any) -> str:
    """The stable code of a header-check reason (``code: detail``), never a tag value."""
    return str(reason or "unknown").split(":", 1)[0].strip()[:80] or "unknown"
