"""What one backup is: its date, its folder, the export request, its counts and manifest. Pure.

The date. A tick is Cloud Scheduler -> Pub/Sub -> Eventarc, a ``messagePublished``
CloudEvent. Its date is taken from the message's ``scheduledTime`` attribute
when present (localcloud sets it; a Scheduler job may be configured to), else
from the message's ``publishTime``, else the CloudEvent ``time``. All three are
fixed when the message is published, and a redelivery carries the same
message, so a retry lands on the tick's date even after midnight. The wall
clock is never used for the date of a tick (so the schedule should stay clear of
midnight UTC). The folder is ``gs://BACKUP/PREFIX/<date in export_date_layout>/``.

Expected counts. For ``application/dicom`` one object per instance is expected.
For images (``image/png``, ``image/jpeg``, ``application/octet-stream``) only
instances with pixel data (``Rows`` present) count, with one object per frame
for multi-frame instances and one object otherwise. A backup is complete only
when the operation succeeded, reported no failures, and the objects and
distinct instances found under the folder match the expected counts (in full
mode at least the expected counts, since ingest may add instances while the
export runs). ``build_manifest`` writes that verdict into ``_MANIFEST.json``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from cloudevents.http import CloudEvent

from dicomflow.config import EXPORT_MODES, Settings, parse_mime_type
from dicomflow.errors import PermanentError
from dicomflow.staging import iso, parse_time

SCHEMA_VERSION = 1
MANIFEST_NAME = "_MANIFEST.json"
_EXTENSIONS = (".dcm", ".png", ".jpg", ".jpeg")
ROWS_TAG = "00280010"
FRAMES_TAG = "00280008"


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
        moment = parse_time(raw)
        if moment is not None:
            return moment.astimezone(UTC)
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


def qido_fields(mime_type: str) -> list[str]:
    """The QIDO fields ``expected_counts`` needs under ``mime_type``."""
    return [FRAMES_TAG, ROWS_TAG] if is_image_mime(mime_type) else []


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


def tag_value(instance: Mapping[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in one QIDO JSON instance, or None."""
    values = (instance.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def expected_counts(qido_instances: Iterable[Mapping[str, Any]], mime_type: str) -> Counts:
    """What an export of these instances (QIDO JSON) should write under ``mime_type``."""
    items = list(qido_instances)
    if not is_image_mime(mime_type):
        return Counts(len(items), len(items))
    # A server that honours includefield=Rows omits it only for instances without pixels.
    rows_reported = any(ROWS_TAG in item for item in items)
    per_frame = is_per_frame_mime(mime_type)
    instances = objects = skipped = 0
    for item in items:
        if rows_reported and tag_value(item, ROWS_TAG) is None:
            skipped += 1
            continue
        try:
            frames = int(tag_value(item, FRAMES_TAG) or 1)
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


def series_counts(names: Iterable[str], folder: str) -> dict[str, int]:
    """``study/series`` -> objects under ``folder``: what a restore checks each series against."""
    found: dict[str, int] = {}
    for name in names:
        if not name.startswith(folder):
            continue
        key = instance_key(name[len(folder) :])
        if key:
            series = key.rsplit("/", 1)[0]
            found[series] = found.get(series, 0) + 1
    return dict(sorted(found.items()))


def _counter(operation: Mapping[str, Any], name: str) -> int | None:
    raw = ((operation.get("metadata") or {}).get("counter") or {}).get(name)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _operation_view(operation: Mapping[str, Any]) -> dict[str, Any]:
    meta = operation.get("metadata") or {}
    error = operation.get("error")
    return {
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


def build_manifest(
    marker: Mapping[str, Any],
    operation: Mapping[str, Any] | None,
    found: Counts,
    now: datetime,
    series: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``_MANIFEST.json`` of a finished export attempt.

    ``series`` (``series_counts``) is kept in the manifest, so that a restore can tell
    the objects the export wrote from those still in the folder.

    ``complete`` is True only when the operation finished without error or
    failures and what was found matches what the store should have exported.
    """
    expected = marker.get("expected") or {}
    problems: list[str] = []
    if marker.get("error"):
        problems.append(f"export did not start: {marker['error']}")
    if operation is None:
        if not marker.get("error"):
            problems.append("no export operation")
    else:
        if not operation.get("done"):
            problems.append("operation not done")
        if operation.get("error"):
            problems.append(f"operation failed: code {operation['error'].get('code')}")
        failures = _counter(operation, "failure") or 0
        if failures > int(expected.get("skipped") or 0):
            problems.append(f"operation counted {failures} failures")
    # A full export also writes instances stored after it was counted: at least, not exactly.
    exact = marker.get("mode") != "full"
    for what, got in (("instances", found.instances), ("objects", found.objects)):
        want = expected.get(what)
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
        "operation": None if operation is None else _operation_view(operation),
        "expected": dict(expected),
        "found": found.as_dict(),
        "series": dict(series or {}),
        "writtenAt": iso(now),
    }


def running_manifest(marker: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest a forced rerun puts in place while the folder's objects change."""
    return {
        "schemaVersion": SCHEMA_VERSION,
        "state": "running",
        "complete": False,
        "problems": [f"attempt {marker['attempt']} is running"],
        "date": marker["date"],
        "attempt": marker["attempt"],
        "dicomStore": marker["store"],
        "mode": marker["mode"],
        "mimeType": marker["mimeType"],
        "destination": marker["destination"],
    }
