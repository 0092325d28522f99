"""Windows become batches: seal, split, import at most K at once.

The ingest tick calls ``seal_due`` (seal marker, listing, file list, open batches) and
``run_imports`` (slots, note, intent, import call, operation record); ``poll`` updates an
import's record once the operation is done, whoever polls it first.

See docs/architecture.md#batches-and-windows
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from google.cloud import storage
from googleapiclient.errors import HttpError

from dicomflow import log, objects, store
from dicomflow.clock import iso, parse_time
from dicomflow.config import BATCHES_PREFIX, STATE_PREFIX, Settings
from dicomflow.errors import PermanentError, TransientError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context
from dicomflow.staging import (
    BITS,
    OPEN_PREFIX,
    SEALED_PREFIX,
    SLOTS_PREFIX,
    FileRecord,
    batch_id,
    files_name,
    import_uri,
    intent_name,
    late_home_window,
    late_name,
    open_name,
    operation_name,
    parse_batch,
    parse_window,
    seal_time,
    sealed_done_name,
    sealed_name,
    slot_name,
    window_id,
)

logger = logging.getLogger(__name__)

SEAL_CURSOR = f"{STATE_PREFIX}cursors/seal.json"
# Beyond the longest window and its grace, for a copy that outlived its window's seal.
LOOKBACK_SECONDS = 300
# Cursors move in steps this long (one write each), not at every tick.
CURSOR_STEP_SECONDS = 300
# An import an interrupted start may have begun: created this soon after its intent.
ADOPT_SECONDS = 120


def open_batches(bucket: storage.Bucket) -> list[str]:
    """The sealed batches not verified yet, in time order (one listing)."""
    names = objects.names(bucket, OPEN_PREFIX)
    return sorted(n[len(OPEN_PREFIX) : -len(".json")] for n in names if n.endswith(".json"))


def lookback_seconds(settings: Settings) -> int:
    """Windows this recent are always listed, sealed or not: the longest window, its grace,
    and time for a copy that outlived its window's seal (bounded by ingest.copy_deadline)."""
    longest = max(settings.batch_window_seconds, settings.late_window_seconds)
    return longest + settings.seal_grace_seconds + LOOKBACK_SECONDS


# ---- seal -------------------------------------------------------------------------------------


def seal_due(ctx: Context, now: datetime) -> list[str]:
    """Seal every due window that is not sealed; the batches they made."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    # A time without the window kind (Z or L), so that both kinds of a start sort after it.
    floor = window_id(now - timedelta(seconds=lookback_seconds(settings)), CURSOR_STEP_SECONDS)[:-1]
    stored = (objects.read_json(bucket, SEAL_CURSOR) or {}).get("window")
    cursor = str(stored or floor)
    # From the earlier of the two: a window whose first copy landed since the last tick
    # starts after that tick's floor, however long ago that tick ran. The first tick of a
    # deployment has no earlier tick: it looks at every window, however old.
    start = min(cursor, floor) if stored is not None else ""
    made: list[str] = []
    waiting: list[str] = []
    for window in unsealed(bucket, start):
        if now < seal_time(window, settings):
            waiting.append(window)
            continue
        made.extend(seal(ctx, window, now))
    target = min([floor, *waiting[:1]])
    if stored is None or target > cursor:
        objects.write_text(
            bucket, SEAL_CURSOR, objects.dumps({"window": target}), "application/json"
        )
    return made


def unsealed(bucket: storage.Bucket, start: str) -> list[str]:
    """The windows under ``batches/`` from ``start`` (a cursor time; "" for all) whose seal
    has not finished, in order (two listings)."""
    sealed = {
        n[len(SEALED_PREFIX) : -len(".done")]
        for n in objects.names(bucket, SEALED_PREFIX, f"{SEALED_PREFIX}{start}")
        if n.endswith(".done")
    }
    return [
        w
        for w in objects.folders(bucket, BATCHES_PREFIX, f"{BATCHES_PREFIX}{start}")
        if w >= start and _is_window(w) and w not in sealed
    ]


def _is_window(text: str) -> bool:
    try:
        parse_window(text)
    except ValueError:
        return False
    return True


def seal(ctx: Context, window: str, now: datetime) -> list[str]:
    """Seal ``window`` once and finish every step after it; its batch ids."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    if objects.create(bucket, sealed_name(window), {"window": window, "sealedAt": iso(now)}):
        logger.info("sealed", extra=log.fields(window=window))
    records = read_files(bucket, window)
    if records is None:
        records = _listed(ctx, window, now)
        objects.create_text(
            bucket,
            files_name(window),
            objects.ndjson(r.line() for r in records),
            "application/x-ndjson",
        )
        records = read_files(bucket, window) or []
    sealed_at = (objects.read_json(bucket, sealed_name(window)) or {}).get("sealedAt", iso(now))
    made = []
    for bits, part in split(records, ctx.settings.batch_max_files, ctx.settings.batch_max_bytes):
        batch = batch_id(window, bits)
        doc = {
            "batch": batch,
            "window": window,
            "bits": bits,
            "count": len(part),
            "bytes": sum(r.size for r in part),
            "sealedAt": sealed_at,
            "uri": import_uri(ctx.settings.staging_bucket, batch),
        }
        if objects.create(bucket, open_name(batch), doc):
            logger.info("batch queued", extra=log.fields(batch=batch, files=len(part)))
        made.append(batch)
    objects.create(bucket, sealed_done_name(window), {"window": window, "batches": made})
    return made


def read_files(bucket: storage.Bucket, window: str) -> list[FileRecord] | None:
    """The window's file list (None while it has none)."""
    lines = objects.read_ndjson(bucket, files_name(window))
    return None if lines is None else [FileRecord.from_line(line) for line in lines]


def batch_records(bucket: storage.Bucket, batch: str) -> list[FileRecord]:
    """The file records of ``batch`` (its window's list, its bits' part)."""
    window, bits = parse_batch(batch)
    return [r for r in read_files(bucket, window) or [] if r.key.startswith(bits)]


# File lists never change once written: a process keeps the keys of the last few it read.
_LISTED: dict[tuple[str, str], frozenset[str]] = {}
_LISTED_LOCK = threading.Lock()
_LISTED_KEEP = 64


def listed_keys(ctx: Context, window: str, now: datetime) -> frozenset[str]:
    """The keys ``window``'s file list holds, sealing the window first if it is not."""
    cached = (ctx.settings.staging_bucket, window)
    with _LISTED_LOCK:
        if cached in _LISTED:
            return _LISTED[cached]
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    records = read_files(bucket, window)
    if records is None:
        seal(ctx, window, now)
        records = read_files(bucket, window) or []
    keys = frozenset(r.key for r in records)
    with _LISTED_LOCK:
        if len(_LISTED) >= _LISTED_KEEP:
            _LISTED.pop(next(iter(_LISTED)))
        _LISTED[cached] = keys
    return keys


def _listed(ctx: Context, window: str, now: datetime) -> list[FileRecord]:
    """The records of ``window``'s staging copies, late doubles dropped."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    prefix = f"{BATCHES_PREFIX}{window}/"
    kept: list[FileRecord] = []
    homes: dict[str, frozenset[str]] = {}
    for blob in objects.blobs(bucket, prefix):
        if not blob.name.endswith(".dcm"):
            continue
        record = FileRecord.from_blob(blob, window)
        if record is None or f"{prefix}{record.key}.dcm" != blob.name:
            logger.error("staging copy without a record", extra=log.fields(window=window))
            continue
        if record.home != window:
            if record.home not in homes:
                homes[record.home] = listed_keys(ctx, record.home, now)
            if window == late_home_window(record.home, ctx.settings):
                claim = {"window": window}  # where every late delivery copies; no claim
            else:
                claim = objects.read_json(bucket, late_name(record.key)) or {}
            if record.key in homes[record.home] or claim.get("window") != window:
                objects.delete(bucket, blob.name, int(blob.generation or 0))
                logger.info("late double dropped", extra=log.fields(key=record.key, window=window))
                continue
        kept.append(record)
    return sorted(kept, key=lambda r: r.key)


def split(
    records: list[FileRecord], max_files: int, max_bytes: int
) -> list[tuple[str, list[FileRecord]]]:
    """The parts of a window by leading key bits: the shallowest depth at which every
    part fits both caps (``[("", records)]`` when the window fits whole). Pure."""
    if not records:
        return []
    for depth in range(BITS + 1):
        parts: dict[str, list[FileRecord]] = defaultdict(list)
        for record in records:
            parts[record.key[:depth]].append(record)
        fits = all(
            len(p) <= max_files and sum(r.size for r in p) <= max_bytes for p in parts.values()
        )
        if fits or depth == BITS:
            return sorted(parts.items())
    raise AssertionError("unreachable")


# ---- import ----------------------------------------------------------------------------------


@dataclass
class Queue:
    """What one pass over the import queue did."""

    running: int = 0
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    queued: int = 0
    throttled: bool = False

    def summary(self) -> JSON:
        return {
            "started": self.started,
            "finished": self.finished,
            "running": self.running,
            "queued": self.queued,
            "throttled": self.throttled,
        }

    def counts(self) -> JSON:
        return {
            "started": len(self.started),
            "finished": len(self.finished),
            "running": self.running,
            "queued": self.queued,
            "throttled": self.throttled,
        }


def poll(ctx: Context, batch: str, record: JSON) -> JSON:
    """The batch's operation record, updated to ``done`` once the operation is.

    An operation the service cannot return (404: expired) counts as done with that
    error; the store decides each file's outcome as for any batch.
    """
    if record.get("done"):
        return record
    try:
        operation = store.get_operation(ctx, record["operation"])
    except PermanentError as exc:
        operation = {"done": True, "error": {"code": 5, "message": str(exc)[:300]}}
    if not operation.get("done"):
        return record
    done = {**record, "done": True, "finishedAt": iso(ctx.clock())}
    if "error" in operation:
        done["error"] = {
            "code": operation["error"].get("code"),
            "message": str(operation["error"].get("message", ""))[:300],
        }
    counter = (operation.get("metadata") or {}).get("counter")
    if counter:
        done["counter"] = {k: str(v) for k, v in counter.items()}
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    found = objects.read(bucket, operation_name(batch))
    if found is not None and not found[0].get("done"):
        objects.swap(bucket, operation_name(batch), done, found[1])
    release_slot(ctx, batch)
    logger.info("import finished", extra=log.fields(batch=batch, operation=record["operation"]))
    return done


def _slots(bucket: storage.Bucket) -> dict[int, tuple[str, int]]:
    """Held slots: number -> (batch, generation)."""
    held: dict[int, tuple[str, int]] = {}
    for name in objects.names(bucket, SLOTS_PREFIX):
        found = objects.read(bucket, name)
        if found is not None:
            number = int(name[len(SLOTS_PREFIX) : -len(".json")])
            held[number] = (str(found[0].get("batch")), found[1])
    return held


def release_slot(ctx: Context, batch: str) -> None:
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    for number, (holder, generation) in _slots(bucket).items():
        if holder == batch:
            objects.delete(bucket, slot_name(number), generation)


def _acquire_slot(
    bucket: storage.Bucket, batch: str, held: dict[int, tuple[str, int]], k: int
) -> bool:
    if any(holder == batch for holder, _ in held.values()):
        return True  # a restart keeps the slot of the attempt it repeats
    for number in range(k):
        if number not in held and objects.create(bucket, slot_name(number), {"batch": batch}):
            held[number] = (batch, 0)
            return True
    return False


def run_imports(ctx: Context, now: datetime) -> Queue:
    """Poll running imports, start queued batches while a slot is free."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    report = Queue()
    waiting: list[tuple[str, tuple[JSON, int] | None]] = []
    live: set[str] = set()
    for batch in open_batches(bucket):
        record = objects.read_json(bucket, operation_name(batch))
        if record is not None:
            if record.get("done"):
                continue
            try:
                record = poll(ctx, batch, record)
            except TransientError as exc:
                logger.warning(
                    "operation poll failed", extra=log.fields(batch=batch, error=str(exc))
                )
            if record.get("done"):
                report.finished.append(batch)
            else:
                report.running += 1
                live.add(batch)
            continue
        intent = objects.read(bucket, intent_name(batch))
        if intent is not None:
            requested = parse_time(intent[0].get("requestedAt")) or now
            if now - requested < timedelta(seconds=settings.import_restart_seconds):
                report.running += 1  # being started right now, or crashed very recently
                live.add(batch)
                continue
        waiting.append((batch, intent))
    held = _slots(bucket)
    for number, (holder, generation) in list(held.items()):
        if holder not in live and holder not in {b for b, _ in waiting}:
            objects.delete(bucket, slot_name(number), generation)  # its import is over
            del held[number]
    report.queued = len(waiting)
    for batch, intent in waiting:
        if not _acquire_slot(bucket, batch, held, settings.max_running_imports):
            break
        outcome = start(ctx, batch, intent, now)
        if outcome == "throttled":
            release_slot(ctx, batch)
            report.throttled = True
            break
        if outcome == "started":
            report.started.append(batch)
            report.queued -= 1
        report.running += outcome in ("started", "elsewhere")
    return report


def start(ctx: Context, batch: str, intent: tuple[JSON, int] | None, now: datetime) -> str:
    """Import ``batch`` once: ``started``, ``elsewhere`` (another tick has it),
    ``throttled`` (429), ``failed`` (refused for good: recorded as done) or ``retry``."""
    from dicomflow import operations, verify

    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    uri = import_uri(settings.staging_bucket, batch)
    # The note first, once (one QIDO per study): before the intent, so that a start cut
    # short between the intent and the call has only the call in between.
    if objects.read_json(bucket, verify.note_name(batch)) is None:
        others = [b for b in open_batches(bucket) if b != batch]
        note = verify.take_note(ctx, batch_records(bucket, batch), others)
        objects.create(bucket, verify.note_name(batch), note)
    body = {"batch": batch, "uri": uri, "requestedAt": iso(ctx.clock())}
    if intent is None:
        if not objects.create(bucket, intent_name(batch), body):
            return "elsewhere"
    else:
        logger.warning("restarting interrupted import", extra=log.fields(batch=batch))
        if objects.swap(bucket, intent_name(batch), body, intent[1]) is None:
            return "elsewhere"
        adopt_interrupted(ctx, batch, intent[0])
    try:
        operation = store.start_import(ctx, uri)
    except store.QuotaExceeded:
        objects.delete(bucket, intent_name(batch))
        logger.info("import throttled (429)", extra=log.fields(batch=batch))
        return "throttled"
    except TransientError as exc:
        if isinstance(exc.__cause__, HttpError):
            objects.delete(bucket, intent_name(batch))  # the service answered: nothing started
        logger.warning("import call failed", extra=log.fields(batch=batch, error=str(exc)))
        return "retry"
    except PermanentError as exc:
        logger.error("import refused", extra=log.fields(batch=batch, error=str(exc)))
        error = {"code": 3, "message": str(exc)[:300]}
        objects.create(
            bucket,
            operation_name(batch),
            {**body, "operation": None, "done": True, "error": error, "finishedAt": iso(now)},
        )
        return "failed"
    # Ours first: a start cut short after it leaves an operation the report knows.
    operations.record_ours(ctx, operation["name"], operations.IMPORT, batch)
    record = {**body, "operation": operation["name"], "startedAt": iso(now)}
    objects.create(bucket, operation_name(batch), record)
    logger.info("import started", extra=log.fields(batch=batch, operation=operation["name"]))
    return "started"


def adopt_interrupted(ctx: Context, batch: str, intent: JSON) -> list[str]:
    """Record as ours the imports an interrupted attempt may have started.

    A start killed between the import call and its record leaves an operation nobody
    knows: the Operation does not carry its request, so it cannot be matched to the
    batch. Every unrecorded import created within ``ADOPT_SECONDS`` of the attempt's
    intent is taken as the attempt's, so that its failures are not reported as an
    import started outside dicomflow. Its files are the batch's, imported again now
    and verified once. The cost: an import started outside dicomflow in that same
    interval is not reported either. One ``operations.list``, on this path only.
    """
    from dicomflow import operations

    requested = parse_time(intent.get("requestedAt"))
    if requested is None:
        return []
    adopted = []
    for op in operations.list_operations(ctx):
        if op.kind != operations.IMPORT or op.created is None:
            continue
        if (
            not requested - timedelta(seconds=5)
            <= op.created
            <= requested + timedelta(seconds=ADOPT_SECONDS)
        ):
            continue
        if not operations.is_ours(ctx, op.name):
            operations.record_ours(ctx, op.name, operations.IMPORT, f"{batch}/interrupted")
            adopted.append(op.name)
    if adopted:
        logger.warning(
            "interrupted import adopted", extra=log.fields(batch=batch, count=len(adopted))
        )
    return adopted
