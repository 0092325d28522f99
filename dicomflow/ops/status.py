"""The pipeline's state at a glance, gathered into one plain dict.

``gather(ctx, now, since)`` reads what the functions leave in the staging bucket and
what the Healthcare API says, and returns a JSON-ready dict, which ``dicomflow status``
prints as tables, dumps as ``--json`` or draws as a page (``dicomflow.ops.status_page``).

See docs/architecture.md#status
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from google.cloud import storage

from dicomflow import (
    alerts,
    batches,
    drill,
    export,
    manifests,
    objects,
    operations,
    tombstones,
)
from dicomflow.clock import iso_seconds, parse_time
from dicomflow.config import BATCHES_PREFIX, DROPPED_PREFIX, QUARANTINE_PREFIX, Settings
from dicomflow.json_types import JSON
from dicomflow.ops import outcomes, redrive
from dicomflow.runtime import Context
from dicomflow.staging import (
    SEALED_PREFIX,
    FileRecord,
    failure_name,
    files_name,
    import_uri,
    intent_name,
    is_key,
    open_name,
    operation_name,
    parse_batch,
    parse_window,
    sealed_name,
    stuck_name,
    success_name,
    summary_name,
    window_id,
)
from dicomflow.verify import CONFLICT, DUPLICATE, FAILED, IMPORTED, OUTCOMES

SCHEMA_VERSION = 2
# Below the storage client's connection pool (10), so no connection is thrown away.
THREADS = 8
# The timeline's file histogram has at most this many bins.
UPLOAD_BINS = 60

Progress = Callable[[str, int, int | None], None]
T = TypeVar("T")
R = TypeVar("R")

# Outcome groups as an operator reads them (statuses in each).
GROUPS = {
    "imported": (IMPORTED,),
    "duplicate": (DUPLICATE,),
    "quarantined": (outcomes.QUARANTINED,),
    "conflict": (CONFLICT,),
    "failed": (FAILED,),
    "dropped": (outcomes.DROPPED,),
    "in progress": (outcomes.STAGED,),
}
BATCH_STATES = ("open", "sealed", "importing", "verifying", "verified")


def reason_code(reason: str | None) -> str:
    """The stable code of a reason (``code: detail``); details are for the manifests."""
    return (reason or "unknown").split(":", 1)[0].strip()[:80] or "unknown"


def age_seconds(since: datetime | None, now: datetime) -> int | None:
    return None if since is None else max(0, int((now - since).total_seconds()))


def _window_start(window: object) -> datetime | None:
    try:
        return parse_window(str(window))
    except ValueError:
        return None


def _batch_start(batch: str) -> datetime | None:
    try:
        return parse_window(parse_batch(batch)[0])
    except ValueError:
        return None


def _pmap(fn: Callable[[T], R], items: list[T], progress: Progress | None, label: str) -> list[R]:
    """``fn`` over ``items`` in a thread pool, results in order, reporting progress."""
    if progress:
        progress(label, 0, len(items))
    if not items:
        return []
    done = 0
    results: list[R] = []
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="status") as pool:
        for result in pool.map(fn, items):
            results.append(result)
            done += 1
            if progress and (done % 50 == 0 or done == len(items)):
                progress(label, done, len(items))
    return results


def _read_json(bucket: storage.Bucket, name: str) -> JSON | None:
    try:
        return objects.read_json(bucket, name)
    except json.JSONDecodeError:
        return None


# --- what the bucket holds ---------------------------------------------------------------------


@dataclass
class Holdings:
    """Everything the file totals and the batch list are built from (see ``read_holdings``)."""

    summaries: dict[str, JSON] = field(default_factory=dict)
    quarantined: list[tuple[str, str, str | None]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    # (key, window, reason) of the failure records ingest wrote.
    failed: list[tuple[str, str, str | None]] = field(default_factory=list)
    open_windows: dict[str, dict[str, int]] = field(default_factory=dict)
    open_batches: dict[str, JSON] = field(default_factory=dict)
    markers: list[JSON] = field(default_factory=list)
    failures: list[JSON] = field(default_factory=list)


def read_summaries(
    bucket: storage.Bucket,
    progress: Progress | None = None,
    floor: datetime | None = None,
) -> dict[str, JSON]:
    """Batch -> summary of every verified batch (whose window starts at ``floor`` or later)."""
    ids = [
        b
        for b in outcomes.batch_ids(bucket)
        if (start := _batch_start(b)) is not None and (floor is None or start >= floor)
    ]
    found = _pmap(lambda b: _read_json(bucket, summary_name(b)), ids, progress, "summaries")
    return {b: s for b, s in zip(ids, found, strict=True) if s is not None}


def read_quarantine(bucket: storage.Bucket) -> list[tuple[str, str, str | None]]:
    """(key, window, reason) of every quarantine copy, from one listing (its metadata)."""
    found = []
    for blob in objects.blobs(bucket, QUARANTINE_PREFIX):
        window = blob.name[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
        record = FileRecord.from_blob(blob, window)
        if record is not None:
            found.append((record.key, window, record.reason))
    return found


def read_drops(bucket: storage.Bucket) -> list[tuple[str, str]]:
    """(key, window) of every drop record, from its name (one listing)."""
    found = []
    for name in objects.names(bucket, DROPPED_PREFIX):
        window, _, rest = name[len(DROPPED_PREFIX) :].partition("/")
        key = rest.removesuffix(".json")
        if is_key(key):
            found.append((key, window))
    return found


def open_windows(ctx: Context, now: datetime) -> dict[str, dict[str, int]]:
    """Window -> {files, bytes} of each window not sealed yet: the windows from the seal
    cursor (as the ingest tick lists them), each listed once."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    floor = window_id(
        now - timedelta(seconds=batches.LOOKBACK_SECONDS), settings.batch_window_seconds
    )
    cursor = str((_read_json(bucket, batches.SEAL_CURSOR) or {}).get("window") or floor)
    start = min(cursor, floor)
    windows = [
        w
        for w in objects.folders(bucket, BATCHES_PREFIX, f"{BATCHES_PREFIX}{start}")
        if w >= start and _window_start(w) is not None
    ]
    sealed = {
        n[len(SEALED_PREFIX) : -len(".done")]
        for n in objects.names(bucket, SEALED_PREFIX, f"{SEALED_PREFIX}{start}")
        if n.endswith(".done")
    }
    found: dict[str, dict[str, int]] = {}
    for window in windows:
        if window in sealed:
            continue
        copies = [
            b
            for b in objects.blobs(bucket, f"{BATCHES_PREFIX}{window}/")
            if b.name.endswith(".dcm")
        ]
        if copies:
            found[window] = {"files": len(copies), "bytes": sum(int(b.size or 0) for b in copies)}
    return found


def read_open_batches(bucket: storage.Bucket, progress: Progress | None = None) -> dict[str, JSON]:
    """Batch -> its queue record (``state/open``) with its operation record as ``_operation``."""
    ids = batches.open_batches(bucket)

    def load(batch: str) -> JSON:
        doc = _read_json(bucket, open_name(batch)) or {"batch": batch}
        doc["_operation"] = _read_json(bucket, operation_name(batch))
        if doc["_operation"] is None:
            doc["_intent"] = _read_json(bucket, intent_name(batch))
        elif doc["_operation"].get("done"):
            doc["_stuck"] = _read_json(bucket, stuck_name(batch))
        return doc

    return dict(zip(ids, _pmap(load, ids, progress, "open batches"), strict=True))


def read_failures(bucket: storage.Bucket, summaries: Mapping[str, JSON]) -> list[JSON]:
    """The failure manifest lines of the batches whose summary counts failures."""
    ids = [b for b, s in summaries.items() if s.get("failure")]
    found = _pmap(lambda b: manifests.read_lines(bucket, failure_name(b)), ids, None, "")
    return [line for lines in found for line in lines]


def read_holdings(ctx: Context, now: datetime, progress: Progress | None = None) -> Holdings:
    """Everything ``files_section`` and ``batch_list`` need, read once."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    summaries = read_summaries(bucket, progress)
    opened = read_open_batches(bucket, progress)
    return Holdings(
        summaries=summaries,
        quarantined=read_quarantine(bucket),
        dropped=read_drops(bucket),
        failed=[(r.key, w, r.reason) for w, r in outcomes.failure_records(bucket)],
        open_windows=open_windows(ctx, now),
        open_batches={b: d for b, d in opened.items() if b not in summaries},
        markers=redrive.markers(bucket),
        failures=read_failures(bucket, summaries),
    )


# --- file totals ------------------------------------------------------------------------------


def files_section(held: Holdings) -> tuple[JSON, list[tuple[datetime, str, int]]]:
    """Totals by status and by outcome group, reasons, re-drives; and the timeline's
    (window start, status, files) points. Pure.

    A re-driven file's old outcome is taken off (its marker names it), so each file
    counts once, by its retry's outcome.
    """
    totals = dict.fromkeys(outcomes.STATUSES, 0)
    points: list[tuple[datetime, str, int]] = []

    def add(window: object, status: str, n: int) -> None:
        totals[status] += n
        start = _window_start(window)
        if start is not None and n:
            points.append((start, status, n))

    for batch, summary in held.summaries.items():
        window = summary.get("window") or parse_batch(batch)[0]
        counts = summary.get("counts") or {}
        for status in OUTCOMES:
            add(window, status, int(counts.get(status) or 0))
    for _, window, _ in held.quarantined:
        add(window, outcomes.QUARANTINED, 1)
    for _, window in held.dropped:
        add(window, outcomes.DROPPED, 1)
    for _, window, _ in held.failed:
        add(window, FAILED, 1)
    for window, found in held.open_windows.items():
        add(window, outcomes.STAGED, found["files"])
    for batch, doc in held.open_batches.items():
        add(doc.get("window") or parse_batch(batch)[0], outcomes.STAGED, int(doc.get("count") or 0))
    superseded = set()
    for marker in held.markers:
        if marker.get("previous") in totals:
            add(marker.get("window"), str(marker["previous"]), -1)
            superseded.add(marker.get("key"))

    reasons: dict[str, Counter[str]] = {
        s: Counter() for s in (outcomes.QUARANTINED, FAILED, CONFLICT)
    }
    for key, _, reason in held.quarantined:
        if key not in superseded:
            reasons[outcomes.QUARANTINED][reason_code(reason)] += 1
    for line in held.failures:
        if line.get("key") not in superseded and line.get("status") in reasons:
            reasons[line["status"]][reason_code(line.get("reason"))] += 1
    for key, _, reason in held.failed:
        if key not in superseded:
            reasons[FAILED][reason_code(reason)] += 1
    section = {
        "files": sum(totals.values()),
        "totals": totals,
        "outcomes": {name: sum(totals[s] for s in statuses) for name, statuses in GROUPS.items()},
        "reasons": {s: dict(c.most_common()) for s, c in reasons.items() if c},
        "retried": len(held.markers),
    }
    return section, points


# --- batches ------------------------------------------------------------------------------------


def batch_list(
    held: Holdings, now: datetime, since: datetime | None, window_seconds: int
) -> list[JSON]:
    """Every batch whose window starts at or after ``since`` (all when None), oldest first.
    Pure.

    Each is ``{batch, state, files, bytes?, sealedAt?, operation?, startedAt?,
    finishedAt?, verifiedAt?, counts?, error?, verifyFailingSince?, verifyHttpStatus?,
    ageSeconds}`` (``verifyFailing...``: a verification that keeps failing, from
    ``state/batch/<batch>/stuck.json``), where state is ``open``
    (its window is not sealed yet), ``sealed`` (queued for import), ``importing``,
    ``verifying`` or ``verified``.
    """
    found: list[JSON] = []
    for window, files in held.open_windows.items():
        found.append({"batch": window, "state": "open", **files, "since": window})
    for batch, doc in held.open_batches.items():
        op = doc.get("_operation")
        item: JSON = {
            "batch": batch,
            "state": "sealed",
            "files": doc.get("count"),
            "bytes": doc.get("bytes"),
            "sealedAt": doc.get("sealedAt"),
            "since": doc.get("sealedAt"),
        }
        if op is not None:
            item.update(operation=op.get("operation"), startedAt=op.get("startedAt"))
            item["state"] = "verifying" if op.get("done") else "importing"
            item["since"] = op.get("finishedAt") if op.get("done") else op.get("startedAt")
            if op.get("done"):
                item["finishedAt"] = op.get("finishedAt")
                item["error"] = bool(op.get("error")) or None
                stuck = doc.get("_stuck") or {}
                item["verifyFailingSince"] = stuck.get("since")
                item["verifyHttpStatus"] = stuck.get("httpStatus")
        elif doc.get("_intent"):
            item["state"] = "importing"
            item["since"] = doc["_intent"].get("requestedAt")
        found.append(item)
    for batch, summary in held.summaries.items():
        times = summary.get("times") or {}
        counts = dict(summary.get("counts") or {})
        found.append(
            {
                "batch": batch,
                "state": "verified",
                "files": counts.pop("total", None),
                "bytes": summary.get("bytes"),
                "counts": counts,
                "sealedAt": times.get("sealedAt"),
                "startedAt": times.get("startedAt"),
                "finishedAt": times.get("finishedAt"),
                "verifiedAt": times.get("verifiedAt"),
                "operation": (summary.get("operation") or {}).get("name"),
                "since": times.get("verifiedAt"),
            }
        )
    floor = since - timedelta(seconds=window_seconds) if since else None
    out = []
    for item in found:
        start = _batch_start(item["batch"])
        if start is None or (floor is not None and start < floor):
            continue
        since_state = item.pop("since")
        began = parse_time(since_state) or _window_start(since_state) or start
        item["ageSeconds"] = age_seconds(began, now)
        out.append({k: v for k, v in item.items() if v is not None})
    return sorted(out, key=lambda b: str(b["batch"]))


def list_batches(
    ctx: Context, now: datetime, since: datetime | None, progress: Progress | None = None
) -> list[JSON]:
    """``batch_list`` of what the bucket holds now (summaries read from ``since`` only)."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    floor = since - timedelta(seconds=settings.batch_window_seconds) if since else None
    summaries = read_summaries(bucket, progress, floor)
    opened = read_open_batches(bucket, progress)
    held = Holdings(
        summaries=summaries,
        open_windows=open_windows(ctx, now),
        open_batches={b: d for b, d in opened.items() if b not in summaries},
    )
    return batch_list(held, now, since, settings.batch_window_seconds)


def batch_detail(ctx: Context, batch: str) -> JSON | None:
    """Everything about one batch: its records, its file list and its manifest lines.

    Files and manifest lines name their source object by ``alerts.object_label``
    (hashed by default), never by its name. None when the batch left no trace.

    Raises:
        ValueError: not a batch id.
    """
    window, bits = parse_batch(batch)
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    names = {
        "seal": sealed_name(window),
        "open": open_name(batch),
        "importIntent": intent_name(batch),
        "operationRecord": operation_name(batch),
        "summary": summary_name(batch),
    }
    docs = _pmap(lambda n: _read_json(bucket, n), list(names.values()), None, "")
    found = dict(zip(names, docs, strict=True))
    lines = {
        which: manifests.read_lines(bucket, name)
        for which, name in (
            ("success", success_name(batch)),
            ("failure", failure_name(batch)),
        )
    }
    listed = batches.read_files(bucket, window)
    if listed is None:
        # Not sealed yet: the window's copies are its files so far.
        prefix = f"{BATCHES_PREFIX}{window}/{bits}"
        records = [
            r
            for b in objects.blobs(bucket, prefix)
            if b.name.endswith(".dcm") and (r := FileRecord.from_blob(b, window)) is not None
        ]
    else:
        records = [r for r in listed if r.key.startswith(bits)]
    batch_docs = [found[k] for k in ("open", "importIntent", "operationRecord", "summary")]
    unsealed = listed is None and bool(records)
    if not any(batch_docs) and not any(lines.values()) and not unsealed:
        return None
    op = found["operationRecord"] or {}
    if found["summary"]:
        state = "verified"
    elif op.get("done"):
        state = "verifying"
    elif op or found["importIntent"]:
        state = "importing"
    elif found["open"]:
        state = "sealed"
    else:
        state = "open"
    return {
        "batch": batch,
        "window": window,
        "state": state,
        "importUri": import_uri(settings.staging_bucket, batch),
        "records": {k: v for k, v in found.items() if v is not None},
        "fileList": {
            "name": None if listed is None else files_name(window),
            "count": len(records),
            "bytes": sum(r.size for r in records),
            "sealedAt": (found["seal"] or {}).get("sealedAt"),
            "files": [_safe_file(settings, r) for r in records],
        },
        "manifest": {
            "success": [_safe_line(settings, line) for line in lines["success"]],
            "failure": [_safe_line(settings, line) for line in lines["failure"]],
        },
    }


def _safe_file(settings: Settings, record: FileRecord) -> JSON:
    """A file-list entry with the source object named by its label, not its name."""
    out: JSON = {
        "key": record.key,
        "size": record.size,
        "object": alerts.object_label(settings, record.bucket, record.name),
        "home": record.home,
    }
    if record.sop:
        out["sop"] = record.sop
    if record.via:
        out["via"] = record.via
    return out


def _safe_line(settings: Settings, line: JSON) -> JSON:
    """A manifest line with the source object named by its label, not its name."""
    out = {k: v for k, v in line.items() if k not in ("bucket", "name")}
    if line.get("bucket") and line.get("name"):
        out["object"] = alerts.object_label(settings, str(line["bucket"]), str(line["name"]))
    return out


# --- operations, alerts, exports --------------------------------------------------------------


def operations_section(ctx: Context, now: datetime, since: datetime) -> JSON:
    """Running operations, and every import and export that overlaps the window."""
    listed = operations.list_operations(ctx)
    running, recent = [], []
    for op in sorted(listed, key=lambda o: o.created or now):
        item = {
            "name": op.name,
            "id": op.op_id,
            "kind": op.kind,
            "done": op.done,
            "failed": op.failed,
            "createTime": iso_seconds(op.created) if op.created else None,
            "endTime": iso_seconds(op.ended) if op.ended else None,
            "counter": dict(op.counter),
        }
        if not op.done:
            item["runningSeconds"] = int(op.running_seconds(now) or 0)
            running.append(item)
        if not op.done or (op.ended or op.created or now) >= since:
            recent.append(item)
    return {"running": running, "inWindow": recent}


def alerts_section(
    ctx: Context, since: datetime, progress: Progress | None = None, limit: int = 200
) -> JSON:
    """Alerts published in the window, by kind, from their delivery markers."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    names = [n for n in objects.names(bucket, alerts.ALERTS_PREFIX) if n.endswith(".json")]
    docs = _pmap(lambda n: _read_json(bucket, n), names, progress, "alerts")
    published, publishing = [], 0
    for doc in docs:
        if doc is None:
            continue
        if doc.get("state") != "published":
            publishing += 1
            continue
        at = parse_time(doc.get("publishedAt"))
        if at is not None and at >= since:
            published.append(
                {"alertId": doc.get("alertId"), "kind": doc.get("kind"), "time": iso_seconds(at)}
            )
    published.sort(key=lambda a: str(a["time"]))
    return {
        "total": len(published),
        "byKind": dict(Counter(str(a["kind"]) for a in published).most_common()),
        "publishing": publishing,
        "recent": published[-limit:],
    }


def exports_section(ctx: Context, since: datetime) -> list[JSON]:
    """Backups dated on or after ``since``'s date."""
    out = []
    for day in export.list_markers(ctx):
        if day < since.date():
            continue
        found = export.read_marker(ctx, day)
        if found is None:
            continue
        doc = found[0]
        manifest = doc.get("manifest")
        usable = export.complete_attempt(doc)
        out.append(
            {
                "date": day.isoformat(),
                "state": doc.get("state"),
                "attempt": doc.get("attempt"),
                "operation": doc.get("operation"),
                "destination": doc.get("destination"),
                "manifest": manifest if isinstance(manifest, str) else None,
                # What a restore of the date takes: the latest complete attempt's folder.
                "backup": usable.get("destination") if usable else None,
            }
        )
    return out


# --- timeline -----------------------------------------------------------------------------------


def upload_bins(
    points: Iterable[tuple[datetime, str, int]],
    start: datetime,
    end: datetime,
    bins: int = UPLOAD_BINS,
) -> JSON:
    """(time, status, files) points as a histogram over ``[start, end]``. Pure.

    Returns ``{binSeconds, total, bins: [{time, counts: {status: n}}]}``, empty bins and
    zero counts left out.
    """
    inside = [(t, status, n) for t, status, n in points if start <= t <= end]
    width = max(1, -(-int(max(1.0, (end - start).total_seconds())) // bins))
    counts: dict[int, Counter[str]] = {}
    for moment, status, n in inside:
        slot = int((moment - start).total_seconds() // width)
        counts.setdefault(slot, Counter())[status] += n
    kept = {slot: {s: n for s, n in sorted(c.items()) if n} for slot, c in counts.items()}
    return {
        "binSeconds": width,
        "total": sum(n for _, _, n in inside),
        "bins": [
            {"time": iso_seconds(start + timedelta(seconds=slot * width)), "counts": kept[slot]}
            for slot in sorted(kept)
            if kept[slot]
        ],
    }


def timeline(
    points: Iterable[tuple[datetime, str, int]],
    batch_items: list[JSON],
    ops: list[JSON],
    alert_list: list[JSON],
    since: datetime,
    now: datetime,
) -> JSON:
    """The events of the window to draw, over the span that holds them (padded). Pure.

    ``points`` are files by the start of their window and their status (``files_section``).
    """
    files = list(points)
    seals = [
        {"batch": b["batch"], "time": b["sealedAt"], "files": b.get("files")}
        for b in batch_items
        if b.get("sealedAt") and (t := parse_time(b["sealedAt"])) and t >= since
    ]
    bars = [
        {
            "id": o["id"],
            "kind": o["kind"],
            "start": o["createTime"],
            "end": o["endTime"],
            "state": "failed" if o["failed"] else ("done" if o["done"] else "running"),
            "counter": o["counter"],
        }
        for o in ops
        if o.get("createTime")
    ]
    times = [t for t, _, n in files if since <= t and n > 0]
    times += [t for s in seals if (t := parse_time(s["time"]))]
    times += [t for b in bars if (t := parse_time(b["start"]))]
    times += [parse_time(b["end"]) or now if b["end"] else now for b in bars]
    times += [t for a in alert_list if (t := parse_time(a["time"]))]
    start = max(since, min(times)) if times else since
    end = min(now, max(times)) if times else now
    pad = timedelta(seconds=max(1.0, (end - start).total_seconds() * 0.03))
    start, end = start - pad, end + pad
    return {
        "start": iso_seconds(start),
        "end": iso_seconds(end),
        "uploads": upload_bins(files, start, end),
        "seals": seals,
        "operations": bars,
        "alerts": alert_list,
    }


# --- all of it ----------------------------------------------------------------------------------


def gather(ctx: Context, now: datetime, since: datetime, progress: Progress | None = None) -> JSON:
    """The whole status dict (see the module docstring)."""
    held = read_holdings(ctx, now, progress)
    files, points = files_section(held)
    items = batch_list(held, now, since, ctx.settings.batch_window_seconds)
    ops = operations_section(ctx, now, since)
    alert_info = alerts_section(ctx, since, progress)
    by_state: dict[str, list[JSON]] = {s: [] for s in BATCH_STATES}
    for b in items:
        by_state[b["state"]].append(b)
    return {
        "schemaVersion": SCHEMA_VERSION,
        "generatedAt": iso_seconds(now),
        "window": {"since": iso_seconds(since), "until": iso_seconds(now)},
        "dicomStore": str(ctx.settings.dicom_store),
        "files": files,
        "batches": {
            "counts": {s: len(v) for s, v in by_state.items()},
            "open": by_state["open"],
            "sealed": by_state["sealed"],
            "importing": by_state["importing"],
            "verifying": by_state["verifying"],
            "verified": len(by_state["verified"]),
        },
        "operations": {"running": ops["running"]},
        "alerts": alert_info,
        "exports": exports_section(ctx, since),
        "drills": drill.status_section(ctx),
        "erasures": tombstones.count(ctx),
        "timeline": timeline(points, items, ops["inWindow"], alert_info["recent"], since, now),
    }
