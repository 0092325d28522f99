"""Scheduled backups of the DICOM store to a dated folder (issue 6, DESIGN invariant 6).

Flow::

    export(tick) --> handle_event --> start_export
        claim  state/exports/<YYYY-MM-DD>.json  (create-if-absent: one export per date)
        count what the store should export (QIDO; incremental: the batch manifests)
        dicomStores.export(gs://BACKUP/PREFIX/<date>/, mimeType[, filterConfig])
        marker <- operation name (state "running")
    report(tick) --> settle_exports
        operation done? list the dated folder, compare with the expected counts,
        write <folder>/_MANIFEST.json, alert export_failed unless complete,
        marker <- "complete" | "failed"

The date. A tick is Cloud Scheduler -> Pub/Sub -> Eventarc, a ``messagePublished``
CloudEvent. Its date is taken from the message's ``scheduledTime`` attribute
when present (localcloud sets it; a Scheduler job may be configured to), else
from the message's ``publishTime``, else the CloudEvent ``time``. All three are
fixed when the message is published, and a redelivery carries the same
message, so a retry lands on the tick's date even after midnight. The wall
clock is never used for the date of a tick.

The marker (``state/exports/<date>.json`` in the staging bucket, keyed by the
ISO date whatever the folder layout) is created with ``if_generation_match=0``:
of two ticks for one date, concurrent or not, one creates it and starts the
export, the other reports it. Each later change is a compare-and-swap. States::

    starting --> running --> complete | failed
        |   `--> empty        (incremental, nothing settled since the last export)
        `------> failed       (the export call failed after retries)

A crash between the claim and the export call leaves ``starting``; once its
lease (``START_LEASE_SECONDS``) ran out, the next tick or ``settle_exports``
takes it over. A takeover keeps the attempt and its ``firstClaimedAt``. When a
marker is still ``starting`` more than ``STALLED_START_SECONDS`` (two leases)
after that first claim, ``settle_exports`` publishes one ``stalled`` alert
(severity ERROR, subject ``<store>/exports/<date>/attempt-<n>/starting``) before
it tries the takeover again, so a start that dies at the function timeout on
every try is still reported, once per date (per attempt for forced reruns).
It is ``stalled``, not ``export_failed``: nothing is final yet, the takeovers
go on, and a final failure still raises its own ``export_failed``.

A crash between the export call and recording the operation can start a
second export of the same date; it writes the same objects.
``force`` starts a new attempt for a date whose marker is final.

Expected counts. Full mode counts the store's instances by QIDO at start;
incremental mode collects the instances of the batches verified since the last
complete export (below), and writes their ``/studies/S/series/R/instances/I``
paths to a ``filterConfig`` file.
For ``application/dicom`` one object per instance is expected. For images
(``image/png``, ``image/jpeg``, ``application/octet-stream``) only instances
with pixel data (``Rows`` present) count, with one object per frame for
multi-frame instances and one object otherwise. A backup is complete only
when the operation succeeded, reported no failures, and the objects and
distinct instances found under the folder match the expected counts (in full
mode at least the expected counts, since ingest may add instances while
the export runs). Anything else writes ``complete: false`` and raises one
``export_failed`` alert per date and attempt.

Incremental selection. Report verifies a batch and writes
``manifests/<batch>/success.ndjson`` (its imported and duplicate files, with
UIDs), then ``summary.json`` last, with ``times.verifiedAt`` = the start of that
report tick. Its presence means the batch is verified. The ledger is never read
here: one listing of ``manifests/``, one GET per summary listed and one per
success list chosen, however many files there are. With P the previous complete
export (latest date first; tick T_P) and this export's tick T, a batch B
(verified at v) is chosen when::

    T_P - MARGIN < v <= T   and   B not in P.scan.recent      (no P: v <= T)

- ``v <= T``: a batch verified after the tick belongs to the next export, even
  when it is already visible now (a tick delivered or taken over late).
- ``MARGIN`` (``MANIFEST_MARGIN``, 20 min) is longer than a report tick can run.
  A summary stamped v <= T_P can be written after P listed ``manifests/`` (the
  report tick began before T_P and wrote it later), so P missed it. It is
  written by v + 540 s, so v > T_P - MARGIN and this export takes it.
- ``scan.recent`` lists the batches P chose with v > T_P - MARGIN, so those
  are not exported twice. Batches P did not take are not in it. A full P
  records none: what was verified before it ran was in the store, so in P,
  and the margin's batches are exported again (harmless).
- Where to list from. Batch ids sort by time, but a batch can be verified long
  after its window (a backlog), so the id bound is not a fixed lookback. Each
  export records ``scan.nextFrom``: the lowest of (a) the batches not verified
  yet (``state/open``, ``state/active``, ``state/finished``, listed *before*
  ``manifests/``; a batch stays in one of them until its summary exists),
  (b) the batches it saw with v > T - MARGIN, and (c) the window of
  now - MARGIN (a batch named by a clock reading but not yet marked open). Any
  batch the next export may need has an id at or above it, and the next export
  lists from there (``start_offset``). A P without ``scan`` (written before
  this rule) or no P at all: ``manifests/`` is listed from its start, once.
- Exporting an instance twice is harmless (same objects); missing one is not,
  so every bound errs toward taking a batch again.

Retention is the lifecycle rule on the backups bucket in ``infra/storage.tf``
(``backup_retention_days``, matching ``PREFIX/``); this module never deletes a
backup. The schedule (``export_schedule``, default 02:00) should stay clear of
midnight UTC, since the folder is named after the tick's UTC date.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import requests
from cloudevents.http import CloudEvent
from google.api_core import exceptions as gexc
from google.cloud import storage
from googleapiclient.errors import HttpError

from dicomflow import alerts, batches, log, retry
from dicomflow.config import (
    EXPORT_MODES,
    MANIFESTS_PREFIX,
    STATE_PREFIX,
    Settings,
    parse_mime_type,
)
from dicomflow.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EXPORTS_PREFIX = f"{STATE_PREFIX}exports/"
MANIFEST_NAME = "_MANIFEST.json"
# Longer than a function's timeout (540 s), so a live start is never taken over.
START_LEASE_SECONDS = 600
# A start still "starting" this long after its first claim raises one ``stalled`` alert.
STALLED_START_SECONDS = 2 * START_LEASE_SECONDS
# Longer than a report tick can run (the function timeout, 540 s) plus clock skew: a batch
# verified (``verifiedAt``, the report tick's start) gets its summary within this time.
MANIFEST_MARGIN = timedelta(seconds=2 * START_LEASE_SECONDS)
# Summaries and success lists read at once while an incremental export counts.
READ_THREADS = 16
SUMMARY_FILE = "summary.json"
SUCCESS_FILE = "success.ndjson"
# How long the export call itself is retried on 429/5xx before the start counts as failed.
START_RETRY_SECONDS = 60.0
QIDO_PAGE = 1000

STARTING = "starting"
RUNNING = "running"
EMPTY = "empty"
COMPLETE = "complete"
FAILED = "failed"
FINAL_STATES = frozenset({EMPTY, COMPLETE, FAILED})

# Statuses of files whose instance is in the store (report's success.ndjson lines).
SETTLED_STATUSES = ("imported", "duplicate")
_EXTENSIONS = (".dcm", ".png", ".jpg", ".jpeg")


# --- pure parts -------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """``2026-11-25T02:00:00Z`` (UTC)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp (``Z`` or offset, any fraction) as an aware UTC datetime.

    Raises:
        ValueError: not a timestamp, or one without a zone.
    """
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    # Python before 3.11 accepts only 3 or 6 fractional digits; Pub/Sub sends up to 9.
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        zone = rest[len(digits) :]
        value = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return moment.astimezone(UTC)


def tick_time(event: CloudEvent | Mapping[str, Any]) -> datetime:
    """The scheduled time of a tick: ``scheduledTime`` attribute, else ``publishTime``.

    Falls back to the CloudEvent's ``time`` attribute (Eventarc sets it to the
    publish time). Never the wall clock.

    Raises:
        PermanentError: the event carries none of them (retrying will not add one).
    """
    data = event.data if isinstance(event, CloudEvent) else event.get("data")
    message = data.get("message", {}) if isinstance(data, dict) else {}
    attributes = message.get("attributes") or {}
    candidates = [attributes.get("scheduledTime"), message.get("publishTime")]
    with contextlib.suppress(KeyError):
        candidates.append(event["time"])
    for raw in candidates:
        if raw:
            try:
                return parse_time(str(raw))
            except ValueError:
                continue
    raise PermanentError("export tick has no scheduledTime, publishTime or time")


def export_day(scheduled: datetime) -> date:
    """The backup date of a tick: its scheduled time's UTC calendar date."""
    if scheduled.tzinfo is None:
        raise ValueError("the scheduled time must be timezone-aware")
    return scheduled.astimezone(UTC).date()


def parse_day(text: str) -> date:
    """``YYYY-MM-DD`` as a date (the CLI's ``--date``)."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"invalid date {text!r}: use YYYY-MM-DD") from None


def dated_folder(settings: Settings, day: date) -> str:
    """The backup folder's object prefix, with a trailing slash: ``backups/2026-11-25/``."""
    return f"{settings.backup_prefix}/{day.strftime(settings.export_date_layout)}/"


def destination_uri(settings: Settings, day: date) -> str:
    """``gs://BACKUP_BUCKET/PREFIX/<date>/``: the export's ``uriPrefix``."""
    return f"gs://{settings.backup_bucket}/{dated_folder(settings, day)}"


def marker_name(day: date) -> str:
    """The date's marker in the staging bucket (ISO date, whatever the folder layout)."""
    return f"{EXPORTS_PREFIX}{day.isoformat()}.json"


def paths_file_name(day: date, attempt: int) -> str:
    """The ``filterConfig.resourcePathsGcsUri`` file of an incremental export."""
    return f"{EXPORTS_PREFIX}{day.isoformat()}.{attempt}.paths.txt"


def check_mode(mode: str) -> str:
    """``mode`` when valid. Raises ValueError naming the valid modes."""
    if mode not in EXPORT_MODES:
        raise ValueError(f"unsupported export mode {mode!r}; valid: {', '.join(EXPORT_MODES)}")
    return mode


def is_image_mime(mime_type: str) -> bool:
    """True when the export writes pixel data (png, jpeg, octet-stream), not DICOM files."""
    return parse_mime_type(mime_type)[0] != "application/dicom"


def is_per_frame_mime(mime_type: str) -> bool:
    """True for rendered images: one object per frame of a multi-frame instance."""
    return parse_mime_type(mime_type)[0] in ("image/png", "image/jpeg")


def export_request(destination: str, mime_type: str, paths_uri: str | None) -> dict[str, Any]:
    """The body of ``dicomStores.export``."""
    body: dict[str, Any] = {
        "gcsDestination": {"uriPrefix": destination.rstrip("/"), "mimeType": mime_type}
    }
    if paths_uri:
        body["filterConfig"] = {"resourcePathsGcsUri": paths_uri}
    return body


def resource_path(study: str, series: str, sop: str) -> str:
    """A ``filterConfig`` line for one instance."""
    return f"/studies/{study}/series/{series}/instances/{sop}"


@dataclass(frozen=True)
class Counts:
    """Instances and objects: what the export should write, or what was found.

    ``skipped``: instances the format cannot hold (no pixel data in an image export);
    the service counts them as failures.
    """

    instances: int
    objects: int
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        out = {"instances": self.instances, "objects": self.objects}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _tag_value(instance: Mapping[str, Any], tag: str) -> Any:
    values = (instance.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def expected_counts(qido_instances: Iterable[Mapping[str, Any]], mime_type: str) -> Counts:
    """What an export of these instances (QIDO JSON) should write under ``mime_type``."""
    items = list(qido_instances)
    if not is_image_mime(mime_type):
        return Counts(len(items), len(items))
    # A server that honours includefield=Rows omits it only for instances without pixels.
    rows_reported = any("00280010" in item for item in items)
    per_frame = is_per_frame_mime(mime_type)
    instances = objects = skipped = 0
    for item in items:
        if rows_reported and _tag_value(item, "00280010") is None:
            skipped += 1
            continue
        try:
            frames = int(_tag_value(item, "00280008") or 1)
        except (TypeError, ValueError):
            frames = 1
        instances += 1
        objects += frames if per_frame and frames > 1 else 1
    return Counts(instances, objects, skipped)


def instance_key(relative_name: str) -> str | None:
    """``study/series/instance`` of an exported object's name below the folder."""
    parts = relative_name.split("/")
    if len(parts) < 3 or not all(parts[:3]):
        return None
    leaf = parts[2]
    for ext in _EXTENSIONS:
        if len(parts) == 3 and leaf.lower().endswith(ext):
            leaf = leaf[: -len(ext)]
            break
    return "/".join([parts[0], parts[1], leaf])


def found_counts(names: Iterable[str], folder: str) -> Counts:
    """Count exported objects (not the manifest) and distinct instances under ``folder``."""
    objects = 0
    keys: set[str] = set()
    for name in names:
        if not name.startswith(folder):
            continue
        relative = name[len(folder) :]
        if relative == MANIFEST_NAME or relative.endswith("/"):
            continue
        objects += 1
        key = instance_key(relative)
        if key:
            keys.add(key)
    return Counts(len(keys), objects)


def _counter(operation: Mapping[str, Any], name: str) -> int | None:
    raw = ((operation.get("metadata") or {}).get("counter") or {}).get(name)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def build_manifest(
    marker: Mapping[str, Any],
    operation: Mapping[str, Any] | None,
    found: Counts,
    now: datetime,
) -> dict[str, Any]:
    """The ``_MANIFEST.json`` of a finished export attempt. Pure.

    ``complete`` is True only when the operation finished without error or
    failures and what was found matches what the store should have exported.
    """
    expected = marker.get("expected") or {}
    problems: list[str] = []
    op: dict[str, Any] | None = None
    if marker.get("error"):
        problems.append(f"export did not start: {marker['error']}")
    if operation is None:
        if not marker.get("error"):
            problems.append("no export operation")
    else:
        meta = operation.get("metadata") or {}
        error = operation.get("error")
        op = {
            "name": operation.get("name"),
            "done": bool(operation.get("done")),
            "createTime": meta.get("createTime"),
            "endTime": meta.get("endTime"),
            "counter": {
                k: _counter(operation, k)
                for k in ("success", "failure", "pending")
                if _counter(operation, k) is not None
            },
            "error": {"code": error.get("code"), "message": str(error.get("message", ""))[:500]}
            if isinstance(error, dict)
            else None,
        }
        if not operation.get("done"):
            problems.append("operation not done")
        if error:
            problems.append(f"operation failed: code {error.get('code')}")
        failures = _counter(operation, "failure") or 0
        if failures > int(expected.get("skipped") or 0):
            problems.append(f"operation counted {failures} failures")
    want_instances = expected.get("instances")
    want_objects = expected.get("objects")
    # A full export also writes instances stored after it was counted: at least, not exactly.
    exact = marker.get("mode") != "full"
    for what, want, got in (
        ("instances", want_instances, found.instances),
        ("objects", want_objects, found.objects),
    ):
        if want is None:
            problems.append(f"expected {what} unknown")
        elif got < want or (exact and got != want):
            problems.append(f"expected {want} {what}, found {got}")
    return {
        "schemaVersion": SCHEMA_VERSION,
        "state": "finished",
        "complete": not problems,
        "problems": problems,
        "date": marker.get("date"),
        "attempt": marker.get("attempt"),
        "dicomStore": marker.get("store"),
        "mode": marker.get("mode"),
        "mimeType": marker.get("mimeType"),
        "destination": marker.get("destination"),
        "tickTime": marker.get("tickTime"),
        "since": marker.get("since"),
        "resourcePathsGcsUri": marker.get("resourcePathsGcsUri"),
        "operation": op,
        "expected": dict(expected),
        "found": found.as_dict(),
        "writtenAt": iso(now),
    }


@dataclass(frozen=True)
class VerifiedBatch:
    """A batch whose ``manifests/<batch>/summary.json`` exists (it is verified).

    ``verified``: the summary's ``times.verifiedAt``; ``success``: its count of
    imported and duplicate files (None when the summary has no count).
    """

    batch: str
    verified: datetime
    success: int | None = None


def select_batches(
    verified: Iterable[VerifiedBatch],
    since: datetime | None,
    until: datetime,
    exported: Collection[str] = (),
    margin: timedelta = MANIFEST_MARGIN,
) -> list[VerifiedBatch]:
    """The verified batches an incremental export ending at ``until`` must hold, by id.

    A batch is chosen when it was verified at or before ``until`` and after
    ``since - margin`` (``since``: the previous complete export's tick; None: no
    previous export, every batch up to ``until``), unless that export already held
    it (``exported``: its ``scan.recent``). See the module docstring for why.
    """
    low = None if since is None else since - margin
    return sorted(
        (
            b
            for b in verified
            if b.verified <= until and (low is None or b.verified > low) and b.batch not in exported
        ),
        key=lambda b: b.batch,
    )


def recent_batches(
    chosen: Iterable[VerifiedBatch], until: datetime, margin: timedelta = MANIFEST_MARGIN
) -> list[str]:
    """Chosen batches verified within ``margin`` of ``until``: the next export skips them."""
    return sorted(b.batch for b in chosen if b.verified > until - margin)


def scan_floor(
    verified: Iterable[VerifiedBatch],
    pending: Iterable[str],
    now: datetime,
    until: datetime,
    window_seconds: int,
    margin: timedelta = MANIFEST_MARGIN,
) -> str:
    """Where the next export may start listing ``manifests/`` (``scan.nextFrom``).

    The lowest of: the batches not verified yet (``pending``, listed before the
    manifests), the batches verified within ``margin`` of ``until`` or after it
    (the next export looks at those again), and the window of ``now - margin``
    (a batch named by a clock reading but not yet listed as open). Every batch that
    the next export may have to include has an id at or above it.
    """
    floor = batches.window_id(now - margin, window_seconds)
    late = (b.batch for b in verified if b.verified > until - margin)
    return min([floor, *pending, *late])


def success_paths(lines: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """UIDs (study, series, sop) of ``success.ndjson`` lines, deduplicated and sorted."""
    found: dict[tuple[str, str, str], None] = {}
    for line in lines:
        uids = (line.get("study"), line.get("series"), line.get("sop"))
        if line.get("status") not in SETTLED_STATUSES or not all(uids):
            continue
        found[(str(uids[0]), str(uids[1]), str(uids[2]))] = None
    return sorted(found)


# --- state in Cloud Storage -------------------------------------------------------------------


def _read_json(blob: storage.Blob) -> tuple[dict[str, Any], int] | None:
    # A fresh Blob: one that knows a generation would download that old version.
    blob = blob.bucket.blob(blob.name)
    try:
        raw = retry.call(blob.download_as_bytes)
    except gexc.NotFound:
        return None
    return json.loads(raw), int(blob.generation or 0)


def _write_json(blob: storage.Blob, doc: Mapping[str, Any], generation: int) -> int:
    """Write if the object is at ``generation`` (0: absent). Raises PreconditionFailed."""
    text = json.dumps(doc, sort_keys=True, indent=1)
    retry.call(
        lambda: blob.upload_from_string(
            text, content_type="application/json", if_generation_match=generation
        )
    )
    return int(blob.generation or 0)


def _marker_blob(ctx: Any, day: date) -> storage.Blob:
    return ctx.storage.bucket(ctx.settings.staging_bucket).blob(marker_name(day))


def read_marker(ctx: Any, day: date) -> tuple[dict[str, Any], int] | None:
    """The date's marker and its generation, or None."""
    return _read_json(_marker_blob(ctx, day))


def _update(ctx: Any, day: date, doc: dict[str, Any], generation: int) -> int | None:
    """CAS the marker; None when someone else changed it first."""
    try:
        return _write_json(_marker_blob(ctx, day), doc, generation)
    except gexc.PreconditionFailed:
        return None


# --- the Healthcare API -----------------------------------------------------------------------


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return retry.status_of(exc)


def _transient(exc: BaseException) -> bool:
    status = _http_status(exc)
    if status is not None:
        return status in (408, 429) or status >= 500
    return retry.should_retry(exc)


def qido_instances(ctx: Any, fields: list[str], study: str | None = None) -> list[dict[str, Any]]:
    """Every instance of the store (or of ``study``) as QIDO JSON, paged."""
    client = ctx.dicomweb()
    found: list[dict[str, Any]] = []
    offset = 0
    while True:
        page: list[dict[str, Any]] = retry.call(
            lambda start=offset: client.search_for_instances(  # type: ignore[misc]
                study_instance_uid=study, fields=fields, limit=QIDO_PAGE, offset=start
            ),
            predicate=_transient,
        )
        found.extend(page)
        if len(page) < QIDO_PAGE:
            return found
        offset += len(page)


def _qido_fields(mime_type: str) -> list[str]:
    return ["00280008", "00280010"] if is_image_mime(mime_type) else []


def _start_operation(ctx: Any, body: dict[str, Any]) -> str:
    store = str(ctx.settings.dicom_store)

    def call() -> Any:
        return (
            ctx.healthcare()
            .projects()
            .locations()
            .datasets()
            .dicomStores()
            .export(name=store, body=body)
            .execute()
        )

    operation = retry.call(call, deadline=START_RETRY_SECONDS, predicate=_transient)
    return str(operation["name"])


def get_operation(ctx: Any, name: str) -> dict[str, Any]:
    """``operations.get``, retried on transient errors."""
    result: dict[str, Any] = retry.call(
        lambda: (
            ctx.healthcare().projects().locations().datasets().operations().get(name=name).execute()
        ),
        predicate=_transient,
    )
    return result


# --- start ------------------------------------------------------------------------------------


def handle_event(ctx: Any, event: CloudEvent) -> dict[str, Any]:
    """The export function: start today's export unless the date already has one."""
    scheduled = tick_time(event)
    return start_export(
        ctx,
        export_day(scheduled),
        mode=ctx.settings.export_mode,
        mime_type=ctx.settings.export_mime_type,
        tick=scheduled,
        event_id=event["id"],
    )


def _new_marker(
    settings: Settings, day: date, mode: str, mime_type: str, tick: datetime, now: datetime
) -> dict[str, Any]:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "date": day.isoformat(),
        "attempt": 1,
        "state": STARTING,
        "store": str(settings.dicom_store),
        "mode": mode,
        "mimeType": mime_type,
        "destination": destination_uri(settings, day),
        "folder": dated_folder(settings, day),
        "tickTime": iso(tick),
        "claimedAt": iso(now),
        "firstClaimedAt": iso(now),
        "leaseUntil": iso(now + timedelta(seconds=START_LEASE_SECONDS)),
        "operation": None,
        "previous": [],
    }


def _summary(doc: Mapping[str, Any], status: str) -> dict[str, Any]:
    return {
        "status": status,
        "date": doc.get("date"),
        "attempt": doc.get("attempt"),
        "state": doc.get("state"),
        "operation": doc.get("operation"),
        "destination": doc.get("destination"),
        "expected": doc.get("expected"),
        "manifest": doc.get("manifest"),
    }


def start_export(
    ctx: Any,
    day: date,
    *,
    mode: str,
    mime_type: str,
    tick: datetime,
    force: bool = False,
    event_id: str | None = None,
) -> dict[str, Any]:
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
    claim = _new_marker(ctx.settings, day, mode, mime_type, tick, now)
    blob = _marker_blob(ctx, day)
    generation: int | None
    try:
        generation = _write_json(blob, claim, 0)
    except gexc.PreconditionFailed:
        generation = None
    while generation is None:
        found = read_marker(ctx, day)
        if found is None:  # removed by hand between our two calls: claim again
            try:
                generation = _write_json(blob, claim, 0)
            except gexc.PreconditionFailed:
                continue
            break
        doc, current = found
        lease_over = doc.get("state") == STARTING and parse_time(doc["leaseUntil"]) <= now
        if force and doc.get("state") in FINAL_STATES:
            claim["attempt"] = int(doc.get("attempt") or 1) + 1
            claim["previous"] = [
                *doc.get("previous", []),
                {k: doc.get(k) for k in ("attempt", "state", "operation", "manifest", "mode")},
            ]
        elif force:
            raise PermanentError(
                f"the export of {day} is {doc.get('state')} (attempt {doc.get('attempt')}); "
                "wait for it to finish before forcing a rerun"
            )
        elif lease_over:
            # The claimer crashed before starting the export: take over its attempt.
            claim["attempt"] = doc.get("attempt", 1)
            claim["previous"] = doc.get("previous", [])
            claim["tickTime"] = doc.get("tickTime", claim["tickTime"])
            claim["firstClaimedAt"] = doc.get("firstClaimedAt") or doc.get("claimedAt")
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
        generation = _update(ctx, day, claim, current)
    return _run_claimed(ctx, day, claim, generation, event_id)


def _last_complete(ctx: Any, before: date) -> dict[str, Any] | None:
    """The marker of the latest complete export dated before ``before`` (latest date first).

    Reads markers newest date first and stops at the first complete one, so the
    cost does not grow with the number of past exports.
    """
    for day in reversed(list_markers(ctx)):
        if day >= before:
            continue
        found = read_marker(ctx, day)
        if found is not None and found[0].get("state") == COMPLETE:
            return found[0]
    return None


def _pmap(fn: Callable[[str], Any], items: list[str]) -> list[Any]:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(READ_THREADS, len(items)), thread_name_prefix="export") as pool:
        return list(pool.map(fn, items))


def _pending_batches(staging: storage.Bucket) -> list[str]:
    """Batches not verified yet: open, queued or importing, or finished but not verified.

    A batch moves open -> active -> finished, each record created before the
    previous one is deleted, and ``state/finished/<id>`` goes only after the
    batch's ``summary.json`` exists, so a batch is always in one of them until
    it is verified.
    """
    found: list[str] = []
    for prefix in (batches.OPEN_PREFIX, batches.ACTIVE_PREFIX, batches.FINISHED_PREFIX):
        found.extend(batches.list_ids(staging, prefix))
    return found


def _verified_batches(ctx: Any, staging: storage.Bucket, start: str | None) -> list[VerifiedBatch]:
    """Every batch with a ``summary.json`` whose id is ``start`` or later: one GET per batch."""
    offset = f"{MANIFESTS_PREFIX}{start}" if start else None
    listed = retry.call(
        lambda: [
            (b.name, b.time_created)
            for b in ctx.storage.list_blobs(staging, prefix=MANIFESTS_PREFIX, start_offset=offset)
        ]
    )
    created: dict[str, datetime | None] = {}
    for name, when in listed:
        batch, _, leaf = name[len(MANIFESTS_PREFIX) :].partition("/")
        if leaf == SUMMARY_FILE and batch:
            created[batch] = when

    def read(batch: str) -> VerifiedBatch | None:
        summary = batches.read_json(staging, f"{MANIFESTS_PREFIX}{batch}/{SUMMARY_FILE}")
        if summary is None:
            return None
        raw = (summary.get("times") or {}).get("verifiedAt")
        when: datetime | None
        try:
            when = parse_time(str(raw))
        except ValueError:
            when = created[batch]  # not expected: fall back to the object's creation time
        if when is None:
            return None
        count = summary.get("success")
        return VerifiedBatch(batch, when, int(count) if isinstance(count, int) else None)

    return [v for v in _pmap(read, sorted(created)) if v is not None]


def _success_lines(staging: storage.Bucket, batch: str) -> list[dict[str, Any]]:
    """The lines of ``manifests/<batch>/success.ndjson`` (one GET)."""
    blob = staging.blob(f"{MANIFESTS_PREFIX}{batch}/{SUCCESS_FILE}")
    try:
        text = retry.call(blob.download_as_text)
    except gexc.NotFound:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _settled_since_last(ctx: Any, day: date, doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The instances of batches verified since the last complete export, up to the tick.

    Records ``since`` and ``scan`` on ``doc``. See the module docstring for the rule.
    """
    settings: Settings = ctx.settings
    staging = ctx.storage.bucket(settings.staging_bucket)
    previous = _last_complete(ctx, day)
    since = parse_time(previous["tickTime"]) if previous else None
    until = parse_time(doc["tickTime"])
    before = (previous or {}).get("scan") or {}
    start = before.get("nextFrom")  # None: no earlier scan, list manifests/ from its start
    exported = frozenset(before.get("recent") or ())
    now = ctx.clock()
    pending = _pending_batches(staging)  # before the manifests: see scan_floor
    verified = _verified_batches(ctx, staging, start)
    chosen = select_batches(verified, since, until, exported)
    wanted = [b.batch for b in chosen if b.success != 0]
    lines = _pmap(lambda batch: _success_lines(staging, batch), wanted)
    doc["since"] = iso(since) if since else None
    doc["scan"] = {
        "from": start,
        "summaries": len(verified),
        "batches": len(chosen),
        "recent": recent_batches(chosen, until),
        "nextFrom": scan_floor(verified, pending, now, until, settings.batch_window_seconds),
    }
    return success_paths(itertools.chain.from_iterable(lines))


def _prepare(ctx: Any, day: date, doc: dict[str, Any]) -> str | None:
    """Fill ``doc["expected"]``; write the filter file of an incremental export.

    Returns the filter file's URI (incremental), None (full), or ``EMPTY`` when an
    incremental export has nothing to export.
    """
    settings: Settings = ctx.settings
    mime_type = doc["mimeType"]
    fields = _qido_fields(mime_type)
    staging = ctx.storage.bucket(settings.staging_bucket)
    if doc["mode"] == "full":
        now = ctx.clock()
        pending = _pending_batches(staging)
        doc["expected"] = expected_counts(qido_instances(ctx, fields), mime_type).as_dict()
        # What was verified before now is in the store, so in this backup.
        doc["scan"] = {
            "recent": [],
            "nextFrom": scan_floor(
                [], pending, now, parse_time(doc["tickTime"]), settings.batch_window_seconds
            ),
        }
        return None
    uids = _settled_since_last(ctx, day, doc)
    if not uids:
        doc["expected"] = {"instances": 0, "objects": 0}
        return EMPTY
    counts = Counts(len(uids), len(uids))
    if is_image_mime(mime_type):
        wanted = set(uids)
        listed: list[dict[str, Any]] = []
        for study in sorted({s for s, _, _ in uids}):
            listed.extend(
                i
                for i in qido_instances(ctx, fields, study=study)
                if (study, _tag_value(i, "0020000E"), _tag_value(i, "00080018")) in wanted
            )
        counts = expected_counts(listed, mime_type)
    doc["expected"] = counts.as_dict()
    paths_name = paths_file_name(day, int(doc["attempt"]))
    text = "".join(resource_path(*u) + "\n" for u in uids)
    paths_blob = staging.blob(paths_name)
    retry.call(lambda: paths_blob.upload_from_string(text, content_type="text/plain"))
    paths_uri = f"gs://{settings.staging_bucket}/{paths_name}"
    doc["resourcePathsGcsUri"] = paths_uri
    return paths_uri


def _supersede_manifest(ctx: Any, doc: Mapping[str, Any]) -> None:
    """A forced rerun: the folder's manifest stops saying complete while objects change."""
    blob = ctx.storage.bucket(ctx.settings.backup_bucket).blob(doc["folder"] + MANIFEST_NAME)
    placeholder = {
        "schemaVersion": SCHEMA_VERSION,
        "state": "running",
        "complete": False,
        "problems": [f"attempt {doc['attempt']} is running"],
        "date": doc["date"],
        "attempt": doc["attempt"],
        "dicomStore": doc["store"],
        "mode": doc["mode"],
        "mimeType": doc["mimeType"],
        "destination": doc["destination"],
    }
    retry.call(
        lambda: blob.upload_from_string(
            json.dumps(placeholder, sort_keys=True, indent=1), content_type="application/json"
        )
    )


def _run_claimed(
    ctx: Any, day: date, doc: dict[str, Any], generation: int, event_id: str | None
) -> dict[str, Any]:
    """Count, start the operation and record it. ``doc`` is our claimed marker."""
    try:
        paths_uri = _prepare(ctx, day, doc)
    except BaseException:
        # Counting failed (QIDO, ledger or Storage down): end our lease now so that the
        # platform's retry of this event takes the date over at once.
        doc["leaseUntil"] = doc["claimedAt"]
        with contextlib.suppress(gexc.GoogleAPIError, TransientError):
            _update(ctx, day, doc, generation)
        raise
    if paths_uri == EMPTY:
        doc.update(state=EMPTY)
        doc["note"] = "no instances settled since the last complete export; nothing exported"
        _update(ctx, day, doc, generation)
        logger.info(
            "incremental export: nothing settled",
            extra=log.fields(date=day.isoformat(), since=doc.get("since"), eventId=event_id),
        )
        return _summary(doc, EMPTY)
    mime_type = doc["mimeType"]
    if int(doc["attempt"]) > 1:
        _supersede_manifest(ctx, doc)
    body = export_request(doc["destination"], mime_type, paths_uri)
    try:
        operation = _start_operation(ctx, body)
    except (HttpError, TransientError) as exc:
        cause = exc.__cause__ if isinstance(exc, TransientError) else exc
        status = _http_status(cause) if cause is not None else None
        doc.update(state=FAILED, error=f"export call failed: HTTP {status or '?'}")
        logger.error(
            "export call failed",
            extra=log.fields(date=day.isoformat(), status=status, eventId=event_id),
        )
        new_gen = _update(ctx, day, doc, generation)
        if new_gen is not None:
            _finish(ctx, day, doc, new_gen, None)
        return _summary(doc, FAILED)
    doc.update(state=RUNNING, operation=operation, startedAt=iso(ctx.clock()))
    if _update(ctx, day, doc, generation) is None:
        logger.warning(
            "export marker changed while starting; another attempt took over",
            extra=log.fields(date=day.isoformat(), operation=operation, eventId=event_id),
        )
    logger.info(
        "export started",
        extra=log.fields(
            date=day.isoformat(),
            operation=operation,
            mode=doc["mode"],
            mimeType=mime_type,
            expected=doc["expected"],
            eventId=event_id,
        ),
    )
    return _summary(doc, "started")


# --- settle (called by report's tick) ---------------------------------------------------------


def list_markers(ctx: Any) -> list[date]:
    """Dates that have an export marker."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    days: list[date] = []
    for blob in ctx.storage.list_blobs(bucket, prefix=EXPORTS_PREFIX):
        name = blob.name[len(EXPORTS_PREFIX) :]
        stem = name.removesuffix(".json")
        if stem == name or "." in stem:
            continue
        with contextlib.suppress(ValueError):
            days.append(date.fromisoformat(stem))
    return sorted(days)


def settle_exports(
    ctx: Any, now: datetime, days: Iterable[date] | None = None
) -> list[dict[str, Any]]:
    """Finish every unfinished export whose operation is done; one summary per marker looked at.

    Writes ``_MANIFEST.json``, publishes ``export_failed`` unless complete, and
    resumes starts whose claimer crashed. Markers already final are skipped.
    """
    results: list[dict[str, Any]] = []
    for day in list(days) if days is not None else list_markers(ctx):
        found = read_marker(ctx, day)
        if found is None:
            continue
        doc, generation = found
        state = doc.get("state")
        if state == STARTING:
            # Before the takeover: a takeover that dies at the timeout must not stop the alert.
            _alert_stuck_start(ctx, doc, now)
        if state == STARTING and parse_time(doc["leaseUntil"]) <= now:
            results.append(
                start_export(
                    ctx,
                    day,
                    mode=doc["mode"],
                    mime_type=doc["mimeType"],
                    tick=parse_time(doc["tickTime"]),
                )
            )
        elif state == RUNNING:
            try:
                operation = get_operation(ctx, doc["operation"])
            except HttpError as exc:
                if retry.status_of(exc) != 404:
                    raise
                # Gone (kept about 30 days, or deleted with its dataset): it cannot be
                # checked, so the backup cannot be called complete.
                doc["error"] = f"operation {doc['operation']} not found"
                results.append(_finish(ctx, day, doc, generation, None))
                continue
            if not operation.get("done"):
                results.append(_summary(doc, "running"))
                continue
            results.append(_finish(ctx, day, doc, generation, operation))
        elif state == FAILED and "finishedAt" not in doc:
            results.append(_finish(ctx, day, doc, generation, None))
    return results


def stuck_start_seconds(doc: Mapping[str, Any], now: datetime) -> float:
    """How long a ``starting`` marker has been starting: since its attempt's first claim."""
    first = doc.get("firstClaimedAt") or doc.get("claimedAt")
    return (now - parse_time(str(first))).total_seconds() if first else 0.0


def _alert_stuck_start(ctx: Any, doc: Mapping[str, Any], now: datetime) -> bool:
    """One ``stalled`` alert per date and attempt once a start outlives ``STALLED_START_SECONDS``.

    Takeovers keep the attempt and its ``firstClaimedAt``, so a scheduled export
    whose takeovers keep dying alerts exactly once for its date. The subject is
    not ``export_failed``'s: the export may still start (the takeovers go on),
    and a final failure later still raises its own ``export_failed``.
    """
    stuck = stuck_start_seconds(doc, now)
    if stuck <= STALLED_START_SECONDS:
        return False
    store = str(doc.get("store") or ctx.settings.dicom_store)
    alert = alerts.build_alert(
        "stalled",
        f"{store}/exports/{doc['date']}/attempt-{doc['attempt']}/starting",
        "ERROR",
        store,
        {
            "date": doc["date"],
            "attempt": doc["attempt"],
            "state": STARTING,
            "mode": doc.get("mode"),
            "mimeType": doc.get("mimeType"),
            "destination": doc.get("destination"),
            "tickTime": doc.get("tickTime"),
            "firstClaimedAt": doc.get("firstClaimedAt") or doc.get("claimedAt"),
            "takeovers": int(doc.get("takeovers") or 0),
            "stuckSeconds": int(stuck),
            "thresholdSeconds": STALLED_START_SECONDS,
            "marker": f"gs://{ctx.settings.staging_bucket}/{marker_name(parse_day(doc['date']))}",
        },
        now,
    )
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
    ctx: Any,
    day: date,
    doc: dict[str, Any],
    generation: int,
    operation: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Write the manifest, alert unless complete, and make the marker final. Idempotent."""
    settings: Settings = ctx.settings
    folder = doc["folder"]
    backups = ctx.storage.bucket(settings.backup_bucket)
    try:
        names = [b.name for b in ctx.storage.list_blobs(backups, prefix=folder)]
    except gexc.NotFound:
        names = []
    manifest = build_manifest(doc, operation, found_counts(names, folder), ctx.clock())
    manifest_uri: str | None = f"gs://{settings.backup_bucket}/{folder}{MANIFEST_NAME}"
    try:
        manifest = _put_manifest(backups.blob(folder + MANIFEST_NAME), manifest)
    except gexc.NotFound:
        # The backup bucket is gone: nothing to write into; the marker and the alert say so.
        manifest["complete"] = False
        manifest["problems"].append(f"backup bucket {settings.backup_bucket} not found")
        manifest_uri = None
    if not manifest["complete"]:
        alert = alerts.build_alert(
            "export_failed",
            f"{doc['store']}/exports/{doc['date']}/attempt-{doc['attempt']}",
            "ERROR",
            doc["store"],
            {
                "date": doc["date"],
                "attempt": doc["attempt"],
                "mode": doc["mode"],
                "mimeType": doc["mimeType"],
                "destination": doc["destination"],
                "operation": doc.get("operation"),
                "problems": manifest["problems"],
                "expected": manifest["expected"],
                "found": manifest["found"],
                "manifest": manifest_uri,
            },
            ctx.clock(),
        )
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


def _put_manifest(blob: storage.Blob, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest once per attempt; a repeat keeps what the first writer wrote."""
    while True:
        existing = _read_json(blob)
        if existing is None:
            try:
                _write_json(blob, manifest, 0)
                return manifest
            except gexc.PreconditionFailed:
                continue
        old, generation = existing
        if old.get("attempt") == manifest["attempt"] and old.get("state") == "finished":
            return old
        try:
            _write_json(blob, manifest, generation)
            return manifest
        except gexc.PreconditionFailed:
            continue


# --- by hand (``python -m dicomflow export``) ---------------------------------------------------


def run_command(
    ctx: Any,
    *,
    day: date | None,
    mode: str,
    mime_type: str,
    force: bool = False,
    wait: bool = False,
    timeout: float | None = None,
    poll_seconds: float = 2.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
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
        if state in FINAL_STATES:
            return {**_summary(doc, str(state)), "problems": doc.get("problems", [])}
        if state == RUNNING:
            operation = get_operation(ctx, doc["operation"])
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
            settle_exports(ctx, ctx.clock(), days=[day])
        if deadline is not None and time.monotonic() > deadline:
            return {**_summary(doc, "timeout"), "problems": ["still running at the timeout"]}
        time.sleep(poll_seconds)
