"""Quarantined, dropped and failed files, alerted once per closed window (a burst is one
alert).

``report`` lists one feed's windows from its cursor and publishes what is new, keeping
each window's progress in ``state/report/<root>/<window>.json``; ``failure_kind`` maps a
failure record's reason to ``permission_denied`` or ``unreadable``.

See docs/architecture.md#feeds-quarantined-dropped-and-failed-files
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from google.cloud import storage

from dicomflow import alerts, objects
from dicomflow.batches import CURSOR_STEP_SECONDS
from dicomflow.clock import iso
from dicomflow.config import (
    DROPPED_PREFIX,
    FAILED_PREFIX,
    QUARANTINE_PREFIX,
    STATE_PREFIX,
    Settings,
)
from dicomflow.json_types import JSON
from dicomflow.pool import pmap
from dicomflow.runtime import Context
from dicomflow.staging import FileRecord, parse_window, window_id

REPORT_PREFIX = f"{STATE_PREFIX}report/"


@dataclass(frozen=True)
class Feed:
    """Per-window files that ingest writes and the report alerts, one kind each."""

    kind: str
    root: str
    prefix: str
    suffix: str
    prefix_detail: str
    # The record is the listed object's metadata (else the object's JSON body).
    in_metadata: bool = False
    # The alert kind of a reason code, when records of one feed raise several kinds.
    kind_of: Callable[[str], str] | None = None

    @property
    def markers(self) -> str:
        return f"{REPORT_PREFIX}{self.root}/"

    @property
    def done(self) -> str:
        return f"{REPORT_PREFIX}{self.root}-done/"

    @property
    def cursor(self) -> str:
        return f"{REPORT_PREFIX}{self.root}-cursor.json"


def failure_kind(reason_code: str) -> str:
    """The alert kind of a failure record's reason code."""
    return "permission_denied" if reason_code == "permission-denied" else "unreadable"


QUARANTINE = Feed(
    "quarantined", "quarantine", QUARANTINE_PREFIX, ".dcm", "quarantinePrefix", in_metadata=True
)
DROPPED = Feed("dropped", "dropped", DROPPED_PREFIX, ".json", "recordPrefix")
FAILED = Feed(
    "failed", "failed", FAILED_PREFIX, ".json", "recordPrefix", True, kind_of=failure_kind
)


def horizon(settings: Settings) -> timedelta:
    """How long after its start a window can still receive a file.

    A file's window is fixed by its object's creation time, and ingest drops events
    older than ``max_event_age_seconds`` into the current window; that bounds it.
    """
    return timedelta(
        seconds=settings.max_event_age_seconds
        + settings.batch_window_seconds
        + settings.seal_grace_seconds
        + settings.feed_grace_seconds
    )


def closes(settings: Settings, start: datetime) -> datetime:
    return start + timedelta(
        seconds=settings.batch_window_seconds
        + settings.seal_grace_seconds
        + settings.feed_grace_seconds
    )


def report(ctx: Context, feed: Feed, now: datetime) -> list[str]:
    """Alert what is new in every closed window of ``feed``; the windows alerted."""
    settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    cursor = str((objects.read_json(bucket, feed.cursor) or {}).get("window") or "")
    start = f"{feed.prefix}{cursor}" if cursor else None
    found = [w for w in objects.folders(bucket, feed.prefix, start) if w >= cursor]
    done_start = f"{feed.done}{cursor}" if cursor else None
    done = {n[len(feed.done) : -len(".json")] for n in objects.names(bucket, feed.done, done_start)}
    reported: list[str] = []
    for window in found:
        if window in done:
            continue
        try:
            begins = parse_window(window)
        except ValueError:
            continue
        if now < closes(settings, begins):
            continue
        if _settle(ctx, feed, window, begins, now):
            reported.append(window)
        if now - begins > horizon(settings) and objects.exists(bucket, f"{feed.done}{window}.json"):
            done.add(window)
    floor = window_id(now - horizon(settings), CURSOR_STEP_SECONDS)
    waiting = [w for w in found if w not in done]
    target = min([floor, *waiting[:1]])
    if target > cursor:
        objects.write_text(
            bucket, feed.cursor, objects.dumps({"window": target}), "application/json"
        )
    return reported


def _files(ctx: Context, feed: Feed, window: str) -> JSON:
    """Key -> the blob of each file in ``window``."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    prefix = f"{feed.prefix}{window}/"
    return {
        b.name[len(prefix) : -len(feed.suffix)]: b
        for b in objects.blobs(bucket, prefix)
        if b.name.endswith(feed.suffix)
    }


def _settle(ctx: Context, feed: Feed, window: str, begins: datetime, now: datetime) -> bool:
    """Alert what is new in ``window``; True when this call published an alert."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    name = f"{feed.markers}{window}.json"
    sent = False
    for _ in range(10):
        found = objects.read(bucket, name)
        doc: JSON = found[0] if found is not None else {"window": window}
        generation = found[1] if found is not None else 0
        pending = doc.get("pending")
        if pending:
            keys = [str(k) for k in pending["keys"]]
            _alert(ctx, feed, window, str(pending["subject"]), keys, now)
            sent = True
            settled = {
                **doc,
                "keys": sorted({*(doc.get("keys") or []), *keys}),
                "alerts": int(doc.get("alerts") or 0) + 1,
                "pending": None,
                "reportedAt": iso(now),
            }
            objects.swap(bucket, name, settled, generation)
            continue  # read again: the swap may have lost to another tick
        alerted = set(doc.get("keys") or [])
        new = sorted(set(_files(ctx, feed, window)) - alerted)
        if not new:
            if now - begins > horizon(ctx.settings):
                objects.create(
                    bucket, f"{feed.done}{window}.json", {"window": window, "doneAt": iso(now)}
                )
            return sent
        if found is None:
            subject = f"{feed.root}/{window}"
        else:
            digest = hashlib.sha256("\n".join(new).encode()).hexdigest()[:16]
            subject = f"{feed.root}/{window}/late/{digest}"
        intent = {**doc, "keys": sorted(alerted), "pending": {"subject": subject, "keys": new}}
        objects.swap(bucket, name, intent, generation)
    return sent


def _record(ctx: Context, feed: Feed, window: str, key: str, blob: storage.Blob | None) -> JSON:
    """What the alert says of one file: its reason and object label, never its name."""
    if blob is None:
        return {"key": key, "reason": "record-missing", "object": None}
    if feed.in_metadata:
        record = FileRecord.from_blob(blob, window)
        if record is None:
            return {"key": key, "reason": "record-missing", "object": None}
        label = alerts.object_label(ctx.settings, record.bucket, record.name)
        return {"key": key, "reason": record.reason, "object": label}
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    doc = objects.read_json(bucket, blob.name) or {}
    return {"key": key, "reason": doc.get("reason"), "object": doc.get("objectLabel")}


def reason_code(reason: object) -> str:
    """The stable code of a header-check reason (``code: detail``), never a tag value."""
    return str(reason or "unknown").split(":", 1)[0].strip()[:80] or "unknown"


def _alert(
    ctx: Context, feed: Feed, window: str, subject: str, keys: list[str], now: datetime
) -> None:
    files = _files(ctx, feed, window)
    records = pmap(lambda k: _record(ctx, feed, window, k, files.get(k)), keys)
    if feed.kind_of is None:
        _publish(ctx, feed, feed.kind, window, subject, subject, records, now)
        return
    kinds: dict[str, list[JSON]] = {}
    for record in records:
        kinds.setdefault(feed.kind_of(reason_code(record["reason"])), []).append(record)
    for kind, chosen in sorted(kinds.items()):
        _publish(ctx, feed, kind, window, subject, f"{subject}/{kind}", chosen, now)


def _publish(
    ctx: Context,
    feed: Feed,
    kind: str,
    window: str,
    subject: str,
    alert_subject: str,
    records: list[JSON],
    now: datetime,
) -> None:
    settings = ctx.settings
    labels = [r["object"] for r in records if r["object"]]
    details: JSON = {
        "window": window,
        "files": len(records),
        "reasons": dict(sorted(Counter(reason_code(r["reason"]) for r in records).items())),
        feed.prefix_detail: f"gs://{settings.staging_bucket}/{feed.prefix}{window}/",
        "followUp": subject != f"{feed.root}/{window}",
        "sampleFiles": [
            {"object": r["object"], "key": r["key"], "reason": reason_code(r["reason"])}
            for r in records[: settings.alert_sample_files]
        ],
        alerts.SAMPLES_KEY: labels[: settings.alert_sample_files],
        "sampleTotal": len(labels),
    }
    alert = alerts.build_alert(
        kind,
        alert_subject,
        # A failed file is not imported until someone acts: an error, not a warning.
        "ERROR" if feed.kind_of is not None else "WARNING",
        str(settings.dicom_store),
        details,
        now,
        max_samples=settings.alert_sample_files,
    )
    alerts.publish_once(ctx, alert)
