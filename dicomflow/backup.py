"""What one backup is: its date, its folder, the export request, its counts and manifest. Pure.

``export_day`` takes a tick's date from its message, never from the wall clock;
``dated_folder`` and ``attempt_folder`` name where an attempt writes; ``expected_counts``,
``found_counts`` and ``build_manifest`` decide whether a backup is complete;
``pick_attempt`` chooses the latest complete attempt for a reader.

See docs/architecture.md#export-and-backups
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from cloudevents.http import CloudEvent

from dicomflow.clock import iso, parse_time
from dicomflow.config import EXPORT_MODES, Settings, parse_mime_type
from dicomflow.errors import PermanentError
from dicomflow.json_types import JSON

SCHEMA_VERSION = 1
MANIFEST_NAME = "_MANIFEST.json"
RERUN_PREFIX = "rerun-"
_EXTENSIONS = (".dcm", ".png", ".jpg", ".jpeg")
ROWS_TAG = "00280010"
FRAMES_TAG = "00280008"


def tick_time(event: CloudEvent | JSON) -> datetime:
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


def attempt_folder(settings: Settings, day: date, attempt: int = 1) -> str:
    """Where attempt ``attempt`` of ``day``'s export writes: the dated folder for the
    first, ``<dated folder>rerun-<attempt>/`` for a forced rerun."""
    folder = dated_folder(settings, day)
    return folder if attempt <= 1 else f"{folder}{RERUN_PREFIX}{attempt}/"


def destination_uri(settings: Settings, day: date, attempt: int = 1) -> str:
    """``gs://BACKUP_BUCKET/PREFIX/<date>/[rerun-N/]``: the export's ``uriPrefix``."""
    return f"gs://{settings.backup_bucket}/{attempt_folder(settings, day, attempt)}"


def attempt_of(relative: str) -> int | None:
    """The attempt of a manifest named relative to the dated folder: 1 for
    ``_MANIFEST.json``, N for ``rerun-N/_MANIFEST.json``; None for anything else."""
    if relative == MANIFEST_NAME:
        return 1
    head, _, leaf = relative.partition("/")
    number = head.removeprefix(RERUN_PREFIX)
    if leaf != MANIFEST_NAME or not head.startswith(RERUN_PREFIX) or not number.isdigit():
        return None
    return int(number) if int(number) > 1 else None


def relative_name(name: str, folder: str) -> str | None:
    """``name`` below ``folder``, or None when it is outside it or in a rerun's sub-prefix
    (a rerun's objects are never counted into the folder that holds them)."""
    if not name.startswith(folder):
        return None
    relative = name[len(folder) :]
    return None if relative.startswith(RERUN_PREFIX) else relative


def pick_attempt(manifests: Mapping[int, JSON]) -> int | None:
    """The attempt a reader should use: the latest whose manifest is finished and
    complete, else the latest that has a manifest (whose state then says why not). Pure."""
    complete = [
        n for n, m in manifests.items() if m.get("state") == "finished" and m.get("complete")
    ]
    return max(complete or manifests, default=None)


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


def export_request(destination: str, mime_type: str, paths_uri: str | None) -> JSON:
    """The body of ``dicomStores.export``."""
    body: JSON = {"gcsDestination": {"uriPrefix": destination.rstrip("/"), "mimeType": mime_type}}
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


def tag_value(instance: JSON, tag: str) -> str | int | float | None:
    """The first value of ``tag`` (a string or number tag) in one QIDO JSON instance, or None."""
    values = (instance.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def expected_counts(qido_instances: Iterable[JSON], mime_type: str) -> Counts:
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
        relative = relative_name(name, folder)
        if relative is None or relative == MANIFEST_NAME or relative.endswith("/"):
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
        relative = relative_name(name, folder)
        key = instance_key(relative) if relative is not None else None
        if key:
            series = key.rsplit("/", 1)[0]
            found[series] = found.get(series, 0) + 1
    return dict(sorted(found.items()))


def _counter(operation: JSON, name: str) -> int | None:
    raw = ((operation.get("metadata") or {}).get("counter") or {}).get(name)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _operation_view(operation: JSON) -> JSON:
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
    marker: JSON,
    operation: JSON | None,
    found: Counts,
    now: datetime,
    series: Mapping[str, int] | None = None,
) -> JSON:
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
