"""Batches: staging copies grouped by time window, sealed once, imported with a cap.

Object layout (all in the staging bucket; ``<id>`` is a batch id, ``<key>``
a ledger key, see ``dicomflow.ledger``)::

    batches/<id>/<key>.dcm          staging copy of one file (the import wildcard matches these)
    batches/<id>/_tickets/<n>       empty; one per reserved slot n in [0, max_files)
    batches/<id>/_seal.json         seal marker, create-if-absent: {batch, sealedAt, reason}
    batches/<id>/_files.json        file list, create-if-absent, written after the seal:
                                    {batch, sealedAt, count, bytes, files: [{key, object, size}]}
    batches/<id>/_import.json       import intent, create-if-absent just before the import call:
                                    {batch, uri, requestedAt}
    batches/<id>/_operation.json    operation record, create-if-absent after the call:
                                    {batch, uri, operation, startedAt}
    state/open/<id>.json            the batch may hold files and is not sealed yet
    state/active/<id>.json          sealed with files, queued or importing:
                                    {batch, sealedAt, count, bytes}
    state/finished/<id>.json        the import operation is done (for report to verify):
                                    {batch, uri, operation, startedAt, finishedAt, done,
                                     error?, counter?}

Batch ids are ``<window start>-<n>``, e.g. ``20261125T125300Z-000``: the UTC
window (``batch_window_seconds`` long) in which a file was staged, and a
sub-batch number that grows when a batch fills up. Ids sort in time order,
so ``state/active/`` listed in name order is the import queue.

Closing. A batch closes on its age (the tick seals it ``seal_grace_seconds``
after its window ends) or its size. Size is kept without a counter object:
each file reserves ``weight`` tickets (1 per file, more for files larger than
``max_bytes / max_files``) by creating random ``_tickets/<n>`` objects with
create-if-absent. A batch therefore never holds more than ``max_files``
files (nor, roughly, more than ``max_bytes``); when reservations keep
colliding (the batch is about 85-90% full), the file seals that batch and
moves on to sub-batch ``n + 1``. Every object on the hot path is written
about once.

Sealing (``seal``, idempotent, resumable at any step): create ``_seal.json``,
*then* list the batch and write ``_files.json``, then queue it in
``state/active/`` and remove ``state/open/``. A copy that finishes after the
seal sees the seal in its post-copy check; when its key is not in the file
list it is re-staged into an open batch (never lost).

Import (``run_queue``, the tick): poll the operations of active batches,
move finished ones to ``state/finished/``, and start queued batches in id
order while fewer than K are running. A 429 leaves the batch queued for the
next tick. A crash between the import call and the operation record is
repaired after ``import_restart_seconds`` (a setting, 300 s) by importing the batch again; that
can only produce identical duplicates, which the store ignores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from googleapiclient.errors import HttpError

from dicomflow import healthcare, log, retry
from dicomflow.config import BATCHES_PREFIX, STATE_PREFIX, Settings
from dicomflow.errors import PermanentError, TransientError
from dicomflow.ledger import iso
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

OPEN_PREFIX = f"{STATE_PREFIX}open/"
ACTIVE_PREFIX = f"{STATE_PREFIX}active/"
FINISHED_PREFIX = f"{STATE_PREFIX}finished/"

# Reservation misses before a batch counts as full (see module docstring).
_MIN_MISSES = 12
# A single file never reserves more than this many tickets.
MAX_WEIGHT = 256

_ID = re.compile(r"^(\d{8}T\d{6}Z)-(\d{3,})$")
_STAGED = re.compile(r"^[0-9a-f]{40}\.dcm$")


# ---- names and pure decisions ---------------------------------------------------------------


def window_start(now: datetime, window_seconds: int) -> datetime:
    """The start of the UTC window of ``window_seconds`` that holds ``now``."""
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % window_seconds, UTC)


def window_id(now: datetime, window_seconds: int) -> str:
    """``now``'s window as text, e.g. ``20261125T125300Z``."""
    return window_start(now, window_seconds).strftime("%Y%m%dT%H%M%SZ")


def batch_id(window: str, sub: int) -> str:
    """The id of sub-batch ``sub`` of ``window``."""
    return f"{window}-{sub:03d}"


def parse_batch_id(batch: str) -> tuple[datetime, int]:
    """(window start, sub-batch number) of a batch id.

    Raises:
        ValueError: not a batch id.
    """
    match = _ID.match(batch)
    if not match:
        raise ValueError(f"invalid batch id {batch!r}: expected YYYYMMDDTHHMMSSZ-NNN")
    start = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return start, int(match.group(2))


def is_due(batch: str, now: datetime, window_seconds: int, grace_seconds: int) -> bool:
    """True once ``batch``'s window has ended and the grace has passed."""
    start, _ = parse_batch_id(batch)
    return now >= start + timedelta(seconds=window_seconds + grace_seconds)


def ticket_weight(size: int, max_files: int, max_bytes: int) -> int:
    """Tickets a file of ``size`` bytes reserves: one per ``max_bytes / max_files`` bytes."""
    unit = max(1, max_bytes // max_files)
    return max(1, min(MAX_WEIGHT, max_files, -(-size // unit)))


def staged_name(batch: str, key: str) -> str:
    return f"{BATCHES_PREFIX}{batch}/{key}.dcm"


def seal_name(batch: str) -> str:
    return f"{BATCHES_PREFIX}{batch}/_seal.json"


def files_name(batch: str) -> str:
    return f"{BATCHES_PREFIX}{batch}/_files.json"


def intent_name(batch: str) -> str:
    return f"{BATCHES_PREFIX}{batch}/_import.json"


def operation_name(batch: str) -> str:
    return f"{BATCHES_PREFIX}{batch}/_operation.json"


def ticket_name(batch: str, slot: int) -> str:
    return f"{BATCHES_PREFIX}{batch}/_tickets/{slot:06d}"


def open_name(batch: str) -> str:
    return f"{OPEN_PREFIX}{batch}.json"


def active_name(batch: str) -> str:
    return f"{ACTIVE_PREFIX}{batch}.json"


def finished_name(batch: str) -> str:
    return f"{FINISHED_PREFIX}{batch}.json"


def import_uri(staging_bucket: str, batch: str) -> str:
    """The import source: every staged ``.dcm`` of the batch."""
    return f"gs://{staging_bucket}/{BATCHES_PREFIX}{batch}/**.dcm"


# ---- small storage primitives ---------------------------------------------------------------


def create_json(bucket: storage.Bucket, name: str, data: dict[str, Any]) -> bool:
    """Create ``name`` holding ``data`` if absent; True when this call created it."""
    blob = bucket.blob(name)
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    try:
        retry.call(
            lambda: blob.upload_from_string(
                body, content_type="application/json", if_generation_match=0
            )
        )
    except api_exceptions.PreconditionFailed:
        return False
    return True


def read_json(bucket: storage.Bucket, name: str) -> dict[str, Any] | None:
    """The JSON object ``name``, or None when absent."""
    try:
        data = retry.call(bucket.blob(name).download_as_bytes)
    except api_exceptions.NotFound:
        return None
    result: dict[str, Any] = json.loads(data)
    return result


def exists(bucket: storage.Bucket, name: str) -> bool:
    return bool(retry.call(bucket.blob(name).exists))


def delete(bucket: storage.Bucket, name: str) -> None:
    """Delete ``name``; absent is fine."""
    with contextlib.suppress(api_exceptions.NotFound):
        retry.call(bucket.blob(name).delete)


def list_ids(bucket: storage.Bucket, prefix: str) -> list[str]:
    """Batch ids of the ``<prefix><id>.json`` records, in order."""
    names = retry.call(lambda: [b.name for b in bucket.client.list_blobs(bucket, prefix=prefix)])
    return sorted(n[len(prefix) : -len(".json")] for n in names if n.endswith(".json"))


# ---- choosing a batch (finalize path) -------------------------------------------------------

# Per-process hint: the lowest sub-batch of a window (per staging bucket) not known to be
# sealed. Only a hint: correctness never depends on it, it saves reads of sealed sub-batches.
_hints: dict[str, int] = {}
_hints_lock = threading.Lock()


def _hint(key: str) -> int:
    with _hints_lock:
        return _hints.get(key, 0)


def _advance_hint(key: str, sub: int) -> None:
    with _hints_lock:
        if _hints.get(key, 0) < sub:
            _hints[key] = sub
        if len(_hints) > 64:
            for old in sorted(_hints)[:-16]:
                del _hints[old]


def reserve(bucket: storage.Bucket, batch: str, weight: int, capacity: int) -> bool:
    """Reserve ``weight`` tickets in ``batch``; False when the batch is (nearly) full."""
    hits = misses = 0
    rng = random.Random()
    while hits < weight:
        if misses >= max(_MIN_MISSES, 4 * hits) or hits + misses > 8 * weight + _MIN_MISSES:
            return False
        if create_json(bucket, ticket_name(batch, rng.randrange(capacity)), {}):
            hits += 1
        else:
            misses += 1
    return True


# Batches this process has seen an open marker for. Safe to trust: the marker is only
# deleted after the seal is created, and a sealed batch gets no new files.
_known_open: set[str] = set()


def ensure_open(bucket: storage.Bucket, batch: str, now: datetime) -> None:
    """Make sure the tick will find ``batch``: ``state/open/<id>.json`` exists."""
    marker = f"{bucket.name}/{batch}"
    with _hints_lock:
        if marker in _known_open:
            return
    if not exists(bucket, open_name(batch)):
        create_json(bucket, open_name(batch), {"batch": batch, "openedAt": iso(now)})
    with _hints_lock:
        if len(_known_open) > 4096:
            _known_open.clear()
        _known_open.add(marker)


def choose(ctx: Context, now: datetime, weight: int) -> str:
    """An open batch of ``now``'s window with ``weight`` tickets reserved for the caller.

    Full batches found on the way are sealed (closing on size).
    """
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    window = window_id(now, settings.batch_window_seconds)
    hint_key = f"{bucket.name}/{window}"
    sub = _hint(hint_key)
    while True:
        batch = batch_id(window, sub)
        if not exists(bucket, seal_name(batch)):
            ensure_open(bucket, batch, now)
            if reserve(bucket, batch, weight, settings.batch_max_files):
                return batch
            seal(ctx, batch, now, reason="size")
        sub += 1
        _advance_hint(hint_key, sub)


# ---- sealing ----------------------------------------------------------------------------------


@dataclass
class FileList:
    """The contents of ``_files.json``."""

    batch: str
    keys: frozenset[str]
    count: int
    bytes: int
    data: dict[str, Any] = field(repr=False)


def _file_list(data: dict[str, Any]) -> FileList:
    return FileList(
        batch=data["batch"],
        keys=frozenset(f["key"] for f in data["files"]),
        count=int(data["count"]),
        bytes=int(data["bytes"]),
        data=data,
    )


def read_file_list(bucket: storage.Bucket, batch: str) -> FileList | None:
    """The batch's file list, or None while there is none."""
    data = read_json(bucket, files_name(batch))
    return _file_list(data) if data is not None else None


def wait_file_list(bucket: storage.Bucket, batch: str, timeout: float = 15.0) -> FileList:
    """The file list of a sealed batch, waiting for the sealer to write it.

    Raises:
        TransientError: still absent after ``timeout`` (the tick will finish the seal).
    """
    stop = time.monotonic() + timeout
    delay = 0.05
    while True:
        found = read_file_list(bucket, batch)
        if found is not None:
            return found
        if time.monotonic() > stop:
            raise TransientError(f"batch {batch} is sealed but has no file list yet")
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def seal(ctx: Context, batch: str, now: datetime, reason: str) -> FileList:
    """Seal ``batch`` (once) and finish every step after it; safe to repeat at any point."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    if create_json(
        bucket, seal_name(batch), {"batch": batch, "sealedAt": iso(now), "reason": reason}
    ):
        logger.info("sealed", extra=log.fields(batch=batch, reason=reason))
    seal_data = read_json(bucket, seal_name(batch)) or {}
    sealed_at = seal_data.get("sealedAt", iso(now))
    files = read_file_list(bucket, batch)
    if files is None:
        prefix = f"{BATCHES_PREFIX}{batch}/"
        blobs = retry.call(lambda: list(bucket.client.list_blobs(bucket, prefix=prefix)))
        listed = [
            {"key": b.name[len(prefix) : -4], "object": b.name, "size": int(b.size or 0)}
            for b in blobs
            if _STAGED.match(b.name[len(prefix) :])
        ]
        data = {
            "batch": batch,
            "sealedAt": sealed_at,
            "count": len(listed),
            "bytes": sum(f["size"] for f in listed),
            "files": listed,
        }
        create_json(bucket, files_name(batch), data)
        files = read_file_list(bucket, batch)
        assert files is not None
    if files.count:
        create_json(
            bucket,
            active_name(batch),
            {"batch": batch, "sealedAt": sealed_at, "count": files.count, "bytes": files.bytes},
        )
    delete(bucket, open_name(batch))
    return files


def seal_due(ctx: Context, now: datetime) -> list[str]:
    """Seal every open batch whose window plus grace has passed; finish interrupted seals."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    sealed = []
    for batch in list_ids(bucket, OPEN_PREFIX):
        try:
            parse_batch_id(batch)
        except ValueError:
            delete(bucket, open_name(batch))
            continue
        half_done = exists(bucket, seal_name(batch))
        if half_done or is_due(
            batch, now, settings.batch_window_seconds, settings.seal_grace_seconds
        ):
            seal(ctx, batch, now, reason="size" if half_done else "age")
            sealed.append(batch)
    return sealed


# ---- import queue (tick) -------------------------------------------------------------------


@dataclass
class QueueReport:
    """What one pass over the import queue did."""

    running: int = 0
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    queued: int = 0
    throttled: bool = False


def _finish(bucket: storage.Bucket, batch: str, record: dict[str, Any], now: datetime) -> None:
    create_json(bucket, finished_name(batch), {**record, "finishedAt": iso(now)})
    delete(bucket, active_name(batch))


def run_queue(ctx: Context, now: datetime) -> QueueReport:
    """Poll running imports, retire finished ones, start queued batches while fewer than K run."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    report = QueueReport()
    waiting: list[tuple[str, dict[str, Any] | None]] = []
    for batch in list_ids(bucket, ACTIVE_PREFIX):
        record = read_json(bucket, operation_name(batch))
        if record is not None:
            try:
                operation = healthcare.get_operation(ctx, record["operation"])
            except TransientError as exc:
                logger.warning(
                    "operation poll failed", extra=log.fields(batch=batch, error=str(exc))
                )
                report.running += 1
                continue
            except PermanentError as exc:
                # The operation cannot be read (e.g. expired): hand the batch to report.
                logger.error("operation unreadable", extra=log.fields(batch=batch, error=str(exc)))
                operation = {"done": True, "error": {"message": str(exc)}}
            if operation.get("done"):
                done = {**record, "done": True}
                if "error" in operation:
                    done["error"] = operation["error"]
                counter = (operation.get("metadata") or {}).get("counter")
                if counter:
                    done["counter"] = counter
                _finish(bucket, batch, done, now)
                report.finished.append(batch)
                logger.info(
                    "import finished",
                    extra=log.fields(batch=batch, operation=record["operation"]),
                )
            else:
                report.running += 1
            continue
        intent = read_json(bucket, intent_name(batch))
        if intent is not None:
            requested = datetime.fromisoformat(intent["requestedAt"].replace("Z", "+00:00"))
            if now - requested < timedelta(seconds=settings.import_restart_seconds):
                report.running += 1  # being started right now, or crashed very recently
                continue
        waiting.append((batch, intent))
    report.queued = len(waiting)
    for batch, intent in waiting:
        if report.running >= settings.max_running_imports:
            break
        uri = import_uri(settings.staging_bucket, batch)
        body = {"batch": batch, "uri": uri, "requestedAt": iso(now)}
        if intent is None:
            if not create_json(bucket, intent_name(batch), body):
                report.running += 1  # another tick is starting it
                continue
        else:
            logger.warning("restarting interrupted import", extra=log.fields(batch=batch))
            delete(bucket, intent_name(batch))
            if not create_json(bucket, intent_name(batch), body):
                report.running += 1
                continue
        try:
            operation = healthcare.start_import(ctx, uri)
        except healthcare.QuotaExceeded:
            # The service's own cap: nothing started. Leave the batch queued for the next tick.
            delete(bucket, intent_name(batch))
            report.throttled = True
            logger.info("import throttled (429)", extra=log.fields(batch=batch))
            break
        except TransientError as exc:
            if isinstance(exc.__cause__, HttpError):
                # The service answered 5xx: the call failed and nothing started.
                delete(bucket, intent_name(batch))
            # Otherwise (timeout) it is unknown whether it started; the intent stays and
            # is repaired after settings.import_restart_seconds.
            logger.warning("import call failed", extra=log.fields(batch=batch, error=str(exc)))
            break
        except PermanentError as exc:
            logger.error("import refused", extra=log.fields(batch=batch, error=str(exc)))
            _finish(
                bucket,
                batch,
                {**body, "operation": None, "done": True, "error": {"message": str(exc)}},
                now,
            )
            continue
        record = {**body, "operation": operation["name"], "startedAt": iso(now)}
        create_json(bucket, operation_name(batch), record)
        report.running += 1
        report.started.append(batch)
        report.queued -= 1
        logger.info(
            "import started", extra=log.fields(batch=batch, operation=operation["name"], uri=uri)
        )
    return report


def settings_summary(settings: Settings) -> dict[str, int]:
    """The batch settings in force (for logs and the CLI)."""
    return {
        "windowSeconds": settings.batch_window_seconds,
        "maxFiles": settings.batch_max_files,
        "maxBytes": settings.batch_max_bytes,
        "maxRunningImports": settings.max_running_imports,
    }
