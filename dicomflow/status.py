"""The pipeline's state at a glance, gathered into one plain dict.

``gather(ctx, now, since)`` reads what the functions leave in the staging
bucket and what the Healthcare API says, and returns a JSON-ready dict. The
same dict is printed as tables by ``dicomflow status``, dumped by ``--json``
and drawn by ``dicomflow.status_page`` as an HTML page. Sources::

    ledger/*.json                  totals by outcome, reasons, upload times
    state/open|active|finished/    open, sealed, importing and verifying batches
    batches/<id>/_operation.json   the import operation of an active batch
    manifests/<id>/summary.json    verified batches (seal, start, finish times, counts)
    operations.list                running operations; imports and exports for the timeline
    state/alerts/*.json            alerts published (kind, time), from their delivery markers
    state/exports/<date>.json      backups

Ledger totals cover every entry (invariant 1: they must add up to the files
ingested); everything else is limited to the window ``[since, now]``.

Cost: one read per ledger entry and per alert marker, in a thread pool. That is
fine for a few hundred thousand files; a larger ledger wants a summary index.

No PHI: object names are never copied out; entries give statuses, reason codes,
times and batch ids only.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import storage

from dicomflow import alerts, batches, export, ledger, manifests, operations, retry
from dicomflow.config import LEDGER_PREFIX, MANIFESTS_PREFIX

SCHEMA_VERSION = 1
# Below the storage client's connection pool (10), so no connection is thrown away.
THREADS = 8
# The timeline's upload histogram has at most this many bins.
UPLOAD_BINS = 60

Progress = Callable[[str, int, int | None], None]
T = TypeVar("T")
R = TypeVar("R")

# Outcome groups as an operator reads them (ledger statuses in each).
OUTCOMES = {
    "imported": (ledger.IMPORTED,),
    "duplicate": (ledger.DUPLICATE,),
    "quarantined": (ledger.QUARANTINED,),
    "conflict": (ledger.CONFLICT,),
    "failed": (ledger.FAILED,),
    "dropped": (ledger.DROPPED,),
    "in progress": (ledger.CLAIMED, ledger.STAGED),
}


def iso(moment: datetime) -> str:
    """``2026-11-25T12:53:00Z`` (UTC, seconds)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: Any) -> datetime | None:
    """A time written by the pipeline, or None when absent or unreadable."""
    if not text:
        return None
    try:
        return export.parse_time(str(text))
    except ValueError:
        return None


def reason_code(reason: str | None) -> str:
    """The stable code of a reason (``code: detail``); details are for the manifests."""
    return (reason or "unknown").split(":", 1)[0].strip()[:80] or "unknown"


def age_seconds(since: datetime | None, now: datetime) -> int | None:
    return None if since is None else max(0, int((now - since).total_seconds()))


def _pmap(fn: Callable[[T], R], items: list[T], progress: Progress | None, label: str) -> list[R]:
    """``fn`` over ``items`` in a thread pool, results in order, reporting progress."""
    if progress:
        progress(label, 0, len(items))
    if not items:
        return []
    done = 0

    def one(item: T) -> R:
        return fn(item)

    results: list[R] = []
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="status") as pool:
        for result in pool.map(one, items):
            results.append(result)
            done += 1
            if progress and (done % 50 == 0 or done == len(items)):
                progress(label, done, len(items))
    return results


def _names(client: storage.Client, bucket: storage.Bucket, prefix: str) -> list[str]:
    return retry.call(lambda: [b.name for b in client.list_blobs(bucket, prefix=prefix)])


def _read_json(bucket: storage.Bucket, name: str) -> dict[str, Any] | None:
    try:
        return batches.read_json(bucket, name)
    except json.JSONDecodeError:
        return None


# --- ledger -------------------------------------------------------------------------------------


def read_ledger(ctx: Any, progress: Progress | None = None) -> list[ledger.Entry]:
    """Every ledger entry, read in parallel."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    names = [n for n in _names(ctx.storage, bucket, LEDGER_PREFIX) if n.endswith(".json")]

    def load(name: str) -> ledger.Entry | None:
        key = name[len(LEDGER_PREFIX) : -len(".json")]
        with contextlib.suppress(gexc.NotFound):
            found = ledger.read(bucket, key)
            return found[0] if found else None
        return None

    return [e for e in _pmap(load, names, progress, "ledger") if e is not None]


def upload_time(entry: ledger.Entry) -> datetime | None:
    """When the file arrived: its event time, else when it was claimed."""
    return parse_time(entry.times.get("event")) or parse_time(entry.times.get("claimed"))


def ledger_section(entries: list[ledger.Entry]) -> dict[str, Any]:
    """Totals by status and by outcome group, and the reasons of the bad ones."""
    totals = ledger.totals(entries)
    reasons: dict[str, Counter[str]] = {
        s: Counter() for s in (ledger.QUARANTINED, ledger.FAILED, ledger.CONFLICT, ledger.DROPPED)
    }
    retried = 0
    for entry in entries:
        if entry.status in reasons:
            reasons[entry.status][reason_code(entry.reason)] += 1
        if entry.detail.get("retries"):
            retried += 1
    return {
        "entries": len(entries),
        "totals": totals,
        "outcomes": {
            name: sum(totals.get(s, 0) for s in statuses) for name, statuses in OUTCOMES.items()
        },
        "reasons": {s: dict(c.most_common()) for s, c in reasons.items() if c},
        "retried": retried,
    }


# --- batches ------------------------------------------------------------------------------------


def _batch_start(batch: str) -> datetime | None:
    try:
        return batches.parse_batch_id(batch)[0]
    except ValueError:
        return None


def list_batches(
    ctx: Any, now: datetime, since: datetime | None, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Every batch whose window starts at or after ``since`` (all when None), oldest first.

    Each is ``{batch, state, files, bytes, openedAt?, sealedAt?, operation?,
    startedAt?, finishedAt?, verifiedAt?, counts?, ageSeconds}``, where state is
    ``open``, ``sealed`` (queued for import), ``importing``, ``verifying`` or ``verified``.
    """
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    floor = since - timedelta(seconds=ctx.settings.batch_window_seconds) if since else None

    def wanted(batch: str) -> bool:
        start = _batch_start(batch)
        return start is not None and (floor is None or start >= floor)

    found: dict[str, dict[str, Any]] = {}
    for state, prefix in (
        ("open", batches.OPEN_PREFIX),
        ("sealed", batches.ACTIVE_PREFIX),
        ("verifying", batches.FINISHED_PREFIX),
    ):
        for batch in batches.list_ids(bucket, prefix):
            if wanted(batch):
                found[batch] = {"batch": batch, "state": state, "_record": prefix}
    summary_ids = sorted(
        {
            n[len(MANIFESTS_PREFIX) :].split("/", 1)[0]
            for n in _names(ctx.storage, bucket, MANIFESTS_PREFIX)
            if n.endswith("/summary.json")
        }
    )
    for batch in summary_ids:
        if wanted(batch) and batch not in found:
            found[batch] = {"batch": batch, "state": "verified", "_record": None}

    def load(item: dict[str, Any]) -> dict[str, Any]:
        batch, prefix = item["batch"], item.pop("_record")
        out = dict(item)
        if prefix is None:
            summary = manifests.read_summary(bucket, batch) or {}
            times = summary.get("times") or {}
            op = summary.get("operation") or {}
            counts = dict(summary.get("counts") or {})
            sealed_at = times.get("sealedAt")
            if not sealed_at:
                sealed_at = (_read_json(bucket, batches.seal_name(batch)) or {}).get("sealedAt")
            out.update(
                files=counts.pop("total", None),
                counts=counts,
                sealedAt=sealed_at,
                startedAt=times.get("startedAt") or op.get("createTime"),
                finishedAt=times.get("finishedAt") or op.get("endTime"),
                verifiedAt=times.get("verifiedAt"),
                operation=op.get("name"),
            )
        else:
            record = _read_json(bucket, f"{prefix}{batch}.json") or {}
            out["openedAt"] = record.get("openedAt")
            out["sealedAt"] = record.get("sealedAt")
            out["files"] = record.get("count")
            out["bytes"] = record.get("bytes")
            if prefix != batches.OPEN_PREFIX:
                op = _read_json(bucket, batches.operation_name(batch))
                if op is not None:
                    out["operation"] = op.get("operation")
                    out["startedAt"] = op.get("startedAt")
                    if prefix == batches.ACTIVE_PREFIX:
                        out["state"] = "importing"
                if prefix == batches.FINISHED_PREFIX:
                    out["finishedAt"] = record.get("finishedAt")
                    if record.get("error"):
                        out["error"] = True
        since_state = {
            "open": out.get("openedAt"),
            "sealed": out.get("sealedAt"),
            "importing": out.get("startedAt"),
            "verifying": out.get("finishedAt"),
            "verified": out.get("verifiedAt"),
        }[out["state"]]
        started = parse_time(since_state) or _batch_start(batch)
        out["ageSeconds"] = age_seconds(started, now)
        return {k: v for k, v in out.items() if v is not None}

    return _pmap(load, [found[b] for b in sorted(found)], progress, "batches")


def batch_detail(ctx: Any, batch: str) -> dict[str, Any] | None:
    """Everything about one batch: its records, its summary and its manifest lines.

    Manifest lines name their source object by ``alerts.object_label`` (hashed by
    default), never by its name. None when the batch left no trace.
    """
    batches.parse_batch_id(batch)  # ValueError on a bad id
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    records = {
        "seal": batches.seal_name(batch),
        "fileList": batches.files_name(batch),
        "importIntent": batches.intent_name(batch),
        "operationRecord": batches.operation_name(batch),
        "open": batches.open_name(batch),
        "active": batches.active_name(batch),
        "finished": batches.finished_name(batch),
        "summary": manifests.summary_name(batch),
    }
    docs = _pmap(lambda n: _read_json(bucket, n), list(records.values()), None, "")
    found = dict(zip(records, docs, strict=True))
    lines = {
        which: manifests.read_lines(bucket, name)
        for which, name in (
            ("success", manifests.success_name(batch)),
            ("failure", manifests.failure_name(batch)),
        )
    }
    if not any(found.values()) and not any(lines.values()):
        return None
    if found["summary"]:
        state = "verified"
    elif found["finished"]:
        state = "verifying"
    elif found["active"]:
        state = "importing" if found["operationRecord"] else "sealed"
    elif found["open"] or not found["seal"]:
        state = "open"
    else:
        state = "sealed"
    file_list = found.pop("fileList")
    files: list[dict[str, Any]] = []
    if file_list:
        for f in file_list.get("files") or []:
            files.append({"key": f.get("key"), "size": f.get("size")})
    return {
        "batch": batch,
        "state": state,
        "importUri": batches.import_uri(settings.staging_bucket, batch),
        "records": {k: v for k, v in found.items() if v is not None},
        "fileList": None
        if file_list is None
        else {
            "count": file_list.get("count"),
            "bytes": file_list.get("bytes"),
            "sealedAt": file_list.get("sealedAt"),
            "files": files,
        },
        "manifest": {
            "success": [_safe_line(settings, line) for line in lines["success"]],
            "failure": [_safe_line(settings, line) for line in lines["failure"]],
        },
    }


def _safe_line(settings: Any, line: dict[str, Any]) -> dict[str, Any]:
    """A manifest line with the source object named by its label, not its name."""
    out = {k: v for k, v in line.items() if k != "source"}
    source = line.get("source") or {}
    uri = str(source.get("uri") or "")
    if uri.startswith("gs://"):
        bucket, _, name = uri[len("gs://") :].partition("/")
        out["object"] = alerts.object_label(settings, bucket, name)
        out["size"] = source.get("size")
    return out


# --- operations, alerts, exports --------------------------------------------------------------


def operations_section(ctx: Any, now: datetime, since: datetime) -> dict[str, Any]:
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
            "createTime": iso(op.created) if op.created else None,
            "endTime": iso(op.ended) if op.ended else None,
            "counter": dict(op.counter),
        }
        if not op.done:
            item["runningSeconds"] = int(op.running_seconds(now) or 0)
            running.append(item)
        if not op.done or (op.ended or op.created or now) >= since:
            recent.append(item)
    return {"running": running, "inWindow": recent}


def alerts_section(
    ctx: Any, since: datetime, progress: Progress | None = None, limit: int = 200
) -> dict[str, Any]:
    """Alerts published in the window, by kind, from their delivery markers."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    names = [n for n in _names(ctx.storage, bucket, alerts.ALERTS_PREFIX) if n.endswith(".json")]
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
                {"alertId": doc.get("alertId"), "kind": doc.get("kind"), "time": iso(at)}
            )
    published.sort(key=lambda a: str(a["time"]))
    return {
        "total": len(published),
        "byKind": dict(Counter(str(a["kind"]) for a in published).most_common()),
        "publishing": publishing,
        "recent": published[-limit:],
    }


def exports_section(ctx: Any, since: datetime) -> list[dict[str, Any]]:
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
        out.append(
            {
                "date": day.isoformat(),
                "state": doc.get("state"),
                "attempt": doc.get("attempt"),
                "operation": doc.get("operation"),
                "destination": doc.get("destination"),
                "manifest": manifest if isinstance(manifest, str) else None,
            }
        )
    return out


# --- timeline -----------------------------------------------------------------------------------


def upload_bins(
    points: list[tuple[datetime, str]], start: datetime, end: datetime, bins: int = UPLOAD_BINS
) -> dict[str, Any]:
    """(upload time, status) points as a histogram over ``[start, end]``. Pure.

    Returns ``{binSeconds, total, bins: [{time, counts: {status: n}}]}``, empty bins left out.
    """
    inside = [(t, status) for t, status in points if start <= t <= end]
    width = max(1, -(-int(max(1.0, (end - start).total_seconds())) // bins))
    counts: dict[int, Counter[str]] = {}
    for moment, status in inside:
        slot = int((moment - start).total_seconds() // width)
        counts.setdefault(slot, Counter())[status] += 1
    return {
        "binSeconds": width,
        "total": len(inside),
        "bins": [
            {
                "time": iso(start + timedelta(seconds=slot * width)),
                "counts": dict(sorted(counts[slot].items())),
            }
            for slot in sorted(counts)
        ],
    }


def timeline(
    entries: Iterable[ledger.Entry],
    batch_list: list[dict[str, Any]],
    ops: list[dict[str, Any]],
    alert_list: list[dict[str, Any]],
    since: datetime,
    now: datetime,
) -> dict[str, Any]:
    """The events of the window to draw, over the span that holds them (padded). Pure."""
    uploads = [(t, e.status) for e in entries if (t := upload_time(e)) and since <= t <= now]
    seals = [
        {"batch": b["batch"], "time": b["sealedAt"], "files": b.get("files")}
        for b in batch_list
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
    times = [t for t, _ in uploads]
    times += [t for s in seals if (t := parse_time(s["time"]))]
    times += [t for b in bars if (t := parse_time(b["start"]))]
    times += [parse_time(b["end"]) or now if b["end"] else now for b in bars]
    times += [t for a in alert_list if (t := parse_time(a["time"]))]
    start = max(since, min(times)) if times else since
    end = min(now, max(times)) if times else now
    pad = timedelta(seconds=max(1.0, (end - start).total_seconds() * 0.03))
    start, end = start - pad, end + pad
    return {
        "start": iso(start),
        "end": iso(end),
        "uploads": upload_bins(uploads, start, end),
        "seals": seals,
        "operations": bars,
        "alerts": alert_list,
    }


# --- all of it ----------------------------------------------------------------------------------


def gather(
    ctx: Any, now: datetime, since: datetime, progress: Progress | None = None
) -> dict[str, Any]:
    """The whole status dict (see the module docstring)."""
    entries = read_ledger(ctx, progress)
    batch_list = list_batches(ctx, now, since, progress)
    ops = operations_section(ctx, now, since)
    alert_info = alerts_section(ctx, since, progress)
    by_state: dict[str, list[dict[str, Any]]] = {
        s: [] for s in ("open", "sealed", "importing", "verifying", "verified")
    }
    for b in batch_list:
        by_state[b["state"]].append(b)
    return {
        "schemaVersion": SCHEMA_VERSION,
        "generatedAt": iso(now),
        "window": {"since": iso(since), "until": iso(now)},
        "dicomStore": str(ctx.settings.dicom_store),
        "ledger": ledger_section(entries),
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
        "timeline": timeline(
            entries,
            batch_list,
            ops["inWindow"],
            alert_info["recent"],
            since,
            now,
        ),
    }
