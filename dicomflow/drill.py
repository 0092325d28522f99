"""The scheduled restore drill: a backup is only trusted once it has been restored.

``on_export_tick`` (the daily export tick) alerts an overdue drill and starts a due one;
``settle_drills`` (the report tick) checks a finished import, empties the drill store
and records the verdict in ``drills/<date>.json``; ``status_section`` feeds the status view.

See docs/architecture.md#the-restore-drill
"""

from __future__ import annotations

import contextlib
import logging
import random
from datetime import date, datetime, timedelta

from google.cloud import storage

from dicomflow import alerts, backup, export, log, objects, pool, restore, retry, store, verify
from dicomflow.clock import iso, parse_time
from dicomflow.config import DRILLS_PREFIX, STATE_PREFIX
from dicomflow.errors import DicomflowError, PermanentError
from dicomflow.json_types import JSON
from dicomflow.names import DicomStoreName
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OPEN_PREFIX = f"{STATE_PREFIX}drills-open/"
SINCE_NAME = f"{STATE_PREFIX}drills-since.json"
START_LEASE_SECONDS = 600
# A drill takes time of its own: it is overdue a day after its period.
OVERDUE_GRACE_DAYS = 1
VERIFY_BYTES = 20
STUDIES_PAGE = 1000

STARTING, CLEARING, IMPORTING, EMPTYING = "starting", "clearing", "importing", "emptying"
PASSED, FAILED = "passed", "failed"
FINAL = frozenset({PASSED, FAILED})


def record_name(day: date) -> str:
    return f"{DRILLS_PREFIX}{day.isoformat()}.json"


def open_name(day: date) -> str:
    return f"{OPEN_PREFIX}{day.isoformat()}.json"


def _day_of(name: str, prefix: str) -> date | None:
    with contextlib.suppress(ValueError):
        return date.fromisoformat(name[len(prefix) :].removesuffix(".json"))
    return None


def _staging(ctx: Context) -> storage.Bucket:
    return ctx.storage.bucket(ctx.settings.staging_bucket)


def _drill_store(ctx: Context) -> DicomStoreName:
    store: DicomStoreName | None = ctx.settings.drill_store
    if store is None:
        live: DicomStoreName = ctx.settings.dicom_store
        store = DicomStoreName(live.dataset, f"{live.store}-drill")
    return store


def read_record(ctx: Context, day: date) -> tuple[JSON, int] | None:
    return objects.read(_staging(ctx), record_name(day))


def recent_days(ctx: Context, since: date) -> list[date]:
    """Dates of the drill records from ``since`` on (one listing from an offset)."""
    names = objects.names(_staging(ctx), DRILLS_PREFIX, start_offset=record_name(since))
    return sorted(d for n in names if (d := _day_of(n, DRILLS_PREFIX)) is not None)


def all_days(ctx: Context) -> list[date]:
    """Every drill date (lists them all: for status and the overdue alert, not per tick)."""
    names = objects.names(_staging(ctx), DRILLS_PREFIX)
    return sorted(d for n in names if (d := _day_of(n, DRILLS_PREFIX)) is not None)


# --- the export tick: overdue, due, start ----------------------------------------------------


def on_export_tick(ctx: Context, tick: datetime) -> JSON:
    """Alert an overdue drill; start one when due. A summary with ``status``.

    Errors are logged, never raised: a drill must not hold back the day's export.
    """
    days = ctx.settings.restore_drill_days
    if days <= 0:
        return {"status": "off"}
    today = backup.export_day(tick)
    try:
        overdue = check_overdue(ctx, ctx.clock())
        if recent_days(ctx, today - timedelta(days=days - 1)):
            return {"status": "not-due", "overdue": overdue}
        latest = latest_complete_backup(ctx, today)
        if latest is None:
            return {"status": "no-backup", "overdue": overdue}
        return {**start(ctx, today, latest), "overdue": overdue}
    except Exception as exc:  # the day's export has started: report it and go on
        error = _describe(exc)
        logger.error("restore drill not started", extra=log.fields(date=today, error=error))
        return {"status": "error", "error": error}


def latest_complete_backup(ctx: Context, today: date) -> date | None:
    """The latest date up to ``today`` whose export is complete (one listing, then reads
    from the newest)."""
    for day in reversed(export.list_markers(ctx)):
        if day > today:
            continue
        found = export.read_marker(ctx, day)
        if found is not None and export.complete_attempt(found[0]) is not None:
            return day
    return None


def check_overdue(ctx: Context, now: datetime) -> bool:
    """Publish ``restore_drill_overdue`` once per overdue spell; True when overdue.

    Overdue: no drill finished within ``days + OVERDUE_GRACE_DAYS`` days, counted from
    when drills were first turned on (``state/drills-since.json``) for a deployment
    that never finished one.
    """
    days = ctx.settings.restore_drill_days
    period = timedelta(days=days + OVERDUE_GRACE_DAYS)
    bucket = _staging(ctx)
    objects.create(bucket, SINCE_NAME, {"since": iso(now)})
    since = parse_time((objects.read_json(bucket, SINCE_NAME) or {}).get("since")) or now
    if now - since <= period:
        return False
    for day in reversed(recent_days(ctx, (now - period).date())):
        doc = (read_record(ctx, day) or ({}, 0))[0]
        finished = parse_time(doc.get("finishedAt"))
        if doc.get("state") in FINAL and finished is not None and now - finished <= period:
            return False
    last = _last_finished(ctx)
    last_text = iso(last[1]) if last else None
    details = {
        "drillDays": days,
        "lastDrill": last[0].isoformat() if last else None,
        "lastFinishedAt": last_text,
        "overdueDays": round((now - (last[1] if last else since)).total_seconds() / 86400, 1),
        "drillStore": str(_drill_store(ctx)),
    }
    store = str(ctx.settings.dicom_store)
    subject = f"{store}/drills/overdue/after-{last[0].isoformat() if last else 'none'}"
    alert = alerts.build_alert("restore_drill_overdue", subject, "WARNING", store, details, now)
    if alerts.publish_once(ctx, alert):
        logger.warning(
            "restore drill overdue",
            extra=log.fields(lastDrill=details["lastDrill"], alertId=alert.alert_id),
        )
    return True


def _last_finished(ctx: Context) -> tuple[date, datetime] | None:
    for day in reversed(all_days(ctx)):
        doc = (read_record(ctx, day) or ({}, 0))[0]
        finished = parse_time(doc.get("finishedAt"))
        if doc.get("state") in FINAL and finished is not None:
            return day, finished
    return None


def start(ctx: Context, today: date, backup_day: date) -> JSON:
    """Claim the drill of ``today`` (of the backup dated ``backup_day``) and start it."""
    now = ctx.clock()
    bucket = _staging(ctx)
    entry = {"date": today.isoformat(), "openedAt": iso(now)}
    objects.write_text(bucket, open_name(today), objects.dumps(entry), "application/json")
    doc = {
        "schemaVersion": SCHEMA_VERSION,
        "date": today.isoformat(),
        "backupDate": backup_day.isoformat(),
        "drillStore": str(_drill_store(ctx)),
        "state": STARTING,
        "startedAt": iso(now),
        "leaseUntil": iso(now + timedelta(seconds=START_LEASE_SECONDS)),
        "studiesWanted": ctx.settings.restore_drill_studies,
    }
    generation = objects.create(bucket, record_name(today), doc)
    if generation is None:
        return {"status": "exists", "date": today.isoformat()}
    return _start(ctx, today, doc, generation)


def _start(ctx: Context, today: date, doc: JSON, generation: int) -> JSON:
    """Prepare and start the import of a claimed drill; or clear the drill store first."""
    target = DicomStoreName.from_string(doc["drillStore"])
    where = {"date": doc["date"], "backupDate": doc["backupDate"]}
    try:
        store.get_store(ctx, target)
    except PermanentError as exc:
        if not store.is_not_found(exc):
            raise
        return _fail(ctx, today, doc, generation, [f"drill store {target} not found"])
    leftover = store_studies(ctx, target)
    if leftover:
        doc.update(state=CLEARING, deletes=_delete_all(ctx, target, leftover))
        _swap(ctx, today, doc, generation)
        logger.warning("drill store not empty: clearing it first", extra=log.fields(**where))
        return {"status": CLEARING, "date": doc["date"]}
    try:
        source = restore.load_backup(ctx, date.fromisoformat(doc["backupDate"]))
        every = source.studies()
        skipped = restore.erased_studies(ctx, every)
    except restore.RestoreRefused as exc:
        return _fail(ctx, today, doc, generation, [str(exc)])
    eligible = [s for s in every if s not in skipped]
    rng = random.Random(doc["date"])
    studies = restore.sample_studies(eligible, int(doc.get("studiesWanted") or 0), rng)
    if not studies:
        return _fail(ctx, today, doc, generation, ["the backup holds no study to restore"])
    rid = f"drill-{doc['date']}"
    uri = restore.stage_source(ctx, source, studies, rid)
    # A 429 is not waited out inside a function: the lease hands the start to a later tick.
    operation = restore.start_import(ctx, target, uri, f"drill/{doc['date']}", quota_wait=0)
    doc.update(
        state=IMPORTING,
        restoreId=rid,
        backup=source.uri,
        source="copy" if restore.is_copy(ctx, uri) else "folder",
        operation=operation,
        studies=studies,
        studiesInBackup=len(every),
        studiesSkipped=len(skipped),
        instances=sum(1 for o in source.objects if o.study in set(studies)),
        importStartedAt=iso(ctx.clock()),
    )
    _swap(ctx, today, doc, generation)
    logger.info(
        "restore drill started",
        extra=log.fields(
            operation=operation, studies=len(studies), instances=doc["instances"], **where
        ),
    )
    return {"status": IMPORTING, "date": doc["date"], "operation": operation}


def _swap(ctx: Context, day: date, doc: JSON, generation: int) -> int | None:
    return objects.swap(_staging(ctx), record_name(day), doc, generation)


def _describe(exc: BaseException) -> str:
    """An error as logs may show it: dicomflow's own message, else the type and HTTP
    status only (a DICOMweb error's text holds the request's URL, and so UIDs)."""
    if isinstance(exc, DicomflowError):
        return str(exc)
    status = retry.status_of(exc)
    return type(exc).__name__ + (f" (HTTP {status})" if status else "")


# --- the report tick: settle -----------------------------------------------------------------


def settle_drills(ctx: Context, now: datetime) -> list[JSON]:
    """Move every open drill along (one listing when none is open)."""
    results: list[JSON] = []
    bucket = _staging(ctx)
    for name in objects.names(bucket, OPEN_PREFIX):
        day = _day_of(name, OPEN_PREFIX)
        if day is None:
            continue
        try:
            results.append(settle_one(ctx, day, now))
        except Exception as exc:  # the rest of the report tick must run
            error = _describe(exc)
            logger.error("restore drill step failed", extra=log.fields(date=day, error=error))
            results.append({"status": "error", "date": day.isoformat(), "error": error})
    return results


def settle_one(ctx: Context, day: date, now: datetime) -> JSON:
    """One step of the drill dated ``day``; a summary with ``status``."""
    found = read_record(ctx, day)
    if found is None or found[0].get("state") in FINAL:
        objects.delete(_staging(ctx), open_name(day))
        return {"status": "closed", "date": day.isoformat()}
    doc, generation = found
    state = doc.get("state")
    target = DicomStoreName.from_string(doc["drillStore"])
    if state == STARTING:
        lease = parse_time(doc.get("leaseUntil"))
        if lease is not None and now < lease:
            return {"status": STARTING, "date": doc["date"]}
        doc["leaseUntil"] = iso(now + timedelta(seconds=START_LEASE_SECONDS))
        new = _swap(ctx, day, doc, generation)
        return _start(ctx, day, doc, new) if new is not None else {"status": "raced"}
    if state == CLEARING:
        if not _deletes_done(ctx, doc):
            return {"status": CLEARING, "date": doc["date"]}
        doc.update(state=STARTING, deletes=[])
        new = _swap(ctx, day, doc, generation)
        return _start(ctx, day, doc, new) if new is not None else {"status": "raced"}
    if state == IMPORTING:
        op = store.get_operation(ctx, doc["operation"])
        if not op.get("done"):
            return {"status": IMPORTING, "date": doc["date"]}
        return _check(ctx, day, doc, generation, op, target)
    if state == EMPTYING:
        if not _deletes_done(ctx, doc):
            return {"status": EMPTYING, "date": doc["date"]}
        left = store_studies(ctx, target)
        if left:
            doc["deletes"] = _delete_all(ctx, target, left)
            _swap(ctx, day, doc, generation)
            return {"status": EMPTYING, "date": doc["date"]}
        return _finish(ctx, day, doc, generation, [])
    return {"status": str(state), "date": doc["date"]}


def _check(
    ctx: Context,
    day: date,
    doc: JSON,
    generation: int,
    op: JSON,
    target: DicomStoreName,
) -> JSON:
    """Check the restored studies, record the verdict's grounds, start emptying the store."""
    problems = restore.operation_problems(op)
    try:
        source = restore.load_backup(ctx, date.fromisoformat(doc["backupDate"]))
    except restore.RestoreRefused as exc:
        problems.append(str(exc))
        checked = None
    else:
        rng = random.Random(f"{doc['date']}/bytes")
        checked = restore.check(ctx, source, target, list(doc["studies"]), VERIFY_BYTES, rng)
        problems += checked.problems
    doc.update(
        importFinishedAt=iso(ctx.clock()),
        check=checked.as_dict(with_uids=False) if checked else None,
        problems=problems,
        state=EMPTYING,
        deletes=_delete_all(ctx, target, store_studies(ctx, target)),
    )
    if _swap(ctx, day, doc, generation) is None:
        return {"status": "raced", "date": doc["date"]}
    return {"status": EMPTYING, "date": doc["date"], "problems": problems}


def _fail(ctx: Context, day: date, doc: JSON, generation: int | None, problems: list[str]) -> JSON:
    if generation is None:
        return {"status": "raced", "date": doc["date"]}
    doc["problems"] = [*doc.get("problems", []), *problems]
    return _finish(ctx, day, doc, generation, [])


def _finish(ctx: Context, day: date, doc: JSON, generation: int, extra: list[str]) -> JSON:
    """Make the record final (passed unless problems), alert once when failed, tidy up."""
    problems = [*doc.get("problems", []), *extra]
    now = ctx.clock()
    started = parse_time(doc.get("startedAt")) or now
    doc.update(
        state=FAILED if problems else PASSED,
        verdict=FAILED if problems else PASSED,
        problems=problems,
        finishedAt=iso(now),
        seconds=round((now - started).total_seconds(), 1),
        deletes=[],
    )
    if _swap(ctx, day, doc, generation) is None:
        return {"status": "raced", "date": doc["date"]}
    if doc.get("restoreId"):
        restore.clean_up(ctx, str(doc["restoreId"]))
    if problems:
        _alert_failed(ctx, doc, now)
    objects.delete(_staging(ctx), open_name(day))
    logger.log(
        logging.ERROR if problems else logging.INFO,
        "restore drill failed" if problems else "restore drill passed",
        extra=log.fields(
            date=doc["date"],
            backupDate=doc.get("backupDate"),
            seconds=doc["seconds"],
            problems=problems,
        ),
    )
    return {"status": doc["state"], "date": doc["date"], "problems": problems}


def _alert_failed(ctx: Context, doc: JSON, now: datetime) -> None:
    store = str(ctx.settings.dicom_store)
    checked = doc.get("check") or {}
    details = {
        "drillDate": doc["date"],
        "backupDate": doc.get("backupDate"),
        "backup": doc.get("backup")
        or backup.destination_uri(ctx.settings, date.fromisoformat(doc["backupDate"])),
        "drillStore": doc.get("drillStore"),
        "operation": doc.get("operation"),
        "studies": len(doc.get("studies") or []),
        "instances": doc.get("instances"),
        "present": checked.get("present"),
        "bytesChecked": checked.get("bytesChecked"),
        "bytesDifferent": checked.get("bytesDifferent"),
        "problems": doc.get("problems"),
        "record": f"gs://{ctx.settings.staging_bucket}/{DRILLS_PREFIX}{doc['date']}.json",
    }
    subject = f"{store}/drills/{doc['date']}"
    alert = alerts.build_alert("restore_drill_failed", subject, "ERROR", store, details, now)
    alerts.publish_once(ctx, alert)


# --- the drill store -------------------------------------------------------------------------


def store_studies(ctx: Context, store: DicomStoreName) -> list[str]:
    """Study Instance UIDs in ``store`` (QIDO, paged)."""
    target = restore.for_store(ctx, store)
    client = target.dicomweb()
    found: list[str] = []
    offset = 0
    try:
        while True:
            page: list[JSON] = retry.call(
                lambda start=offset: client.search_for_studies(  # type: ignore[misc]
                    fields=[verify.STUDY_TAG], offset=start, limit=STUDIES_PAGE
                ),
            )
            found += [s for item in page if (s := verify._value(item, verify.STUDY_TAG))]
            if len(page) < STUDIES_PAGE:
                return found
            offset += len(page)
    finally:
        target.close_clients()


def _delete_all(ctx: Context, target: DicomStoreName, studies: list[str]) -> list[str]:
    """Start ``studies.delete`` for each study of ``target``; the operations' names."""

    def one(study: str) -> str | None:
        try:
            return str(store.delete_study(ctx, target, study)["name"])
        except PermanentError as exc:
            if store.is_not_found(exc):
                return None  # gone already
            raise
        finally:
            ctx.close_clients()

    return [name for name in pool.pmap(one, studies) if name]


def _deletes_done(ctx: Context, doc: JSON) -> bool:
    for name in doc.get("deletes") or []:
        try:
            if not store.get_operation(ctx, name).get("done"):
                return False
        except PermanentError as exc:
            if not store.is_not_found(exc):
                raise
    return True


# --- status ----------------------------------------------------------------------------------


def status_section(ctx: Context, limit: int = 5) -> JSON:
    """The latest drills for ``dicomflow status``: dates, verdicts, counts, no UIDs."""
    days = ctx.settings.restore_drill_days
    recent = []
    for day in all_days(ctx)[-limit:]:
        doc = (read_record(ctx, day) or ({}, 0))[0]
        checked = doc.get("check") or {}
        recent.append(
            {
                "date": day.isoformat(),
                "backupDate": doc.get("backupDate"),
                "state": doc.get("state"),
                "studies": len(doc.get("studies") or []),
                "instances": doc.get("instances"),
                "present": checked.get("present"),
                "bytesChecked": checked.get("bytesChecked"),
                "seconds": doc.get("seconds"),
                "problems": list(doc.get("problems") or []),
            }
        )
    return {"everyDays": days, "drillStore": str(_drill_store(ctx)), "recent": recent}
