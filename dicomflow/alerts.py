"""Alerts: one versioned JSON message per subject on the alerts topic, never carrying PHI.

``build_alert`` (pure) builds an alert of one of ``ALERT_KINDS``; ``publish_once`` sends
it once per ``alertId`` (a hash of kind, subject and store), through a delivery marker
``state/alerts/<alertId>.json`` that works as a lease. ``object_label`` and ``uid_label``
name objects and UIDs in details (keyed labels by default).

See docs/architecture.md#alerts
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import storage
from googleapiclient.errors import HttpError

from dicomflow import keys, log, objects
from dicomflow.config import STATE_PREFIX, Settings
from dicomflow.errors import PermanentError, TransientError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
ALERTS_PREFIX = f"{STATE_PREFIX}alerts/"
ALERT_KINDS = (
    "import_failed",
    "conflict",
    "quarantined",
    "dropped",
    "export_failed",
    "operation_failed",
    "stalled",
    "backlog",
    "permission_denied",
    "unreadable",
    "verification_stuck",
    "stale_state",
    "restore_drill_failed",
    "restore_drill_overdue",
    "missed_event",
)
SEVERITIES = ("INFO", "WARNING", "ERROR", "CRITICAL")
SAMPLES_KEY = "samples"
_PUBLISH_RETRIES = 3


def _phi_keywords() -> frozenset[str]:
    """Normalised DICOM keywords that identify or describe a patient, or date their care."""
    from pydicom._dicom_dict import DicomDictionary

    found: set[str] = set()
    for tag, entry in DicomDictionary.items():
        vr, keyword = entry[0], entry[4]
        if not keyword:
            continue
        # The whole patient group, every person name, and every date/time of care.
        if tag >> 16 == 0x0010 or vr in ("PN", "DA", "DT", "TM"):
            found.add(_normalise(keyword))
    found.update(
        _normalise(k)
        for k in (
            "AccessionNumber",
            "InstitutionName",
            "InstitutionAddress",
            "InstitutionalDepartmentName",
            "StationName",
            "StudyID",
            "StudyDescription",
            "SeriesDescription",
            "RequestedProcedureDescription",
            "AdmissionID",
            "IssuerOfAdmissionIDSequence",
            "DeviceSerialNumber",
            "PerformedProcedureStepDescription",
            "ImageComments",
            "AdditionalPatientHistory",
            "PatientComments",
            "OtherPatientIDs",
            "MedicalRecordLocator",
            "ReferringPhysicianAddress",
            "ReferringPhysicianTelephoneNumbers",
            "PatientTelephoneNumbers",
        )
    )
    # Generic words that are also DICOM keywords; the pipeline's own dates (the export
    # date, creation times of objects and operations) are not about a patient.
    found.difference_update(
        {"date", "time", "datetime", "creationdate", "creationtime", "expirydate"}
    )
    found.discard("templateversion")
    return frozenset(found)


def _normalise(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


_PHI_KEYS: frozenset[str] | None = None


def phi_keywords() -> frozenset[str]:
    """The normalised detail keys ``build_alert`` refuses (computed once)."""
    global _PHI_KEYS
    if _PHI_KEYS is None:
        _PHI_KEYS = _phi_keywords()
    return _PHI_KEYS


def _is_phi_key(key: str) -> bool:
    norm = _normalise(key)
    if norm in phi_keywords():
        return True
    # Tags written as numbers: 00100010, (0010,0010), 0010_0010 ...
    if len(norm) == 8 and all(c in "0123456789abcdef" for c in norm):
        from pydicom.datadict import dictionary_keyword

        try:
            keyword = dictionary_keyword(int(norm, 16))
        except KeyError:
            return norm.startswith("0010")
        return _normalise(keyword) in phi_keywords()
    return False


def alert_id(kind: str, subject: str, store: str) -> str:
    """The deterministic id of the alert for ``subject``: 32 hex digits of SHA-256 over the
    kind, the subject and the DICOM store, so that two deployments whose windows and batches
    have the same names never share an id."""
    digest = hashlib.sha256(f"dicomflow-alert\n{kind}\n{subject}\n{store}".encode())
    return digest.hexdigest()[:32]


def object_label(settings: Settings, bucket: str, name: str) -> str:
    """How an object is named in an alert: its keyed label (default) or ``gs://b/n``.

    Object names can carry patient names (uploaders name files after patients),
    so the default is an HMAC of the full ``gs://`` URI under the deployment key
    (``keys.OBJECT``); ``dicomflow label`` maps a label back to its object.
    """
    uri = f"gs://{bucket}/{name}"
    if settings.alert_object_names == "plain":
        return uri
    return keys.load(settings).hash(keys.OBJECT, uri)


def uid_label(settings: Settings, uid: str | None) -> str | None:
    """How a DICOM UID appears in an alert: its keyed label (default) or the UID."""
    if not uid or settings.alert_uids == "plain":
        return uid
    return keys.load(settings).hash(keys.UID, uid)


def samples(settings: Settings, objects: Iterable[tuple[str, str]]) -> JSON:
    """Detail fields listing at most ``settings.alert_sample_files`` objects, and the total."""
    labels = [object_label(settings, b, n) for b, n in objects]
    return {SAMPLES_KEY: labels[: settings.alert_sample_files], "sampleTotal": len(labels)}


@dataclass(frozen=True)
class Alert:
    """One alert, ready to publish."""

    alert_id: str
    kind: str
    severity: str
    store: str
    subject: str
    time: datetime
    details: JSON = field(default_factory=dict)

    def body(self) -> JSON:
        """The JSON message."""
        return {
            "schemaVersion": SCHEMA_VERSION,
            "alertId": self.alert_id,
            "kind": self.kind,
            "severity": self.severity,
            "dicomStore": self.store,
            "subject": self.subject,
            "time": _iso(self.time),
            "details": dict(self.details),
        }

    def attributes(self) -> dict[str, str]:
        """Routing attributes (Pub/Sub attribute values are strings)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "dicomStore": self.store,
            "alertId": self.alert_id,
            "schemaVersion": str(SCHEMA_VERSION),
        }

    def pubsub_message(self) -> JSON:
        """The message for ``topics.publish``; googleapiclient does not encode ``data``."""
        data = json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()
        return {"data": base64.b64encode(data).decode("ascii"), "attributes": self.attributes()}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_details(value: object, path: str) -> object:
    """A plain-JSON copy of ``value``; raise ValueError on PHI keys or non-JSON values."""
    if isinstance(value, Mapping):
        return _check_mapping(value, path)
    if isinstance(value, list | tuple):
        return [_check_details(item, path) for item in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    # pydicom's PersonName, bytes, datasets...: never copied into an alert.
    raise ValueError(f"detail {path.rstrip('.') or 'details'!r} has type {type(value).__name__}")


def _check_mapping(value: Mapping[str, object], path: str) -> JSON:
    out: JSON = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"detail key {key!r} at {path or 'details'} is not a string")
        if _is_phi_key(key):
            raise ValueError(
                f"detail {path + key!r} is a PHI attribute; alerts carry UIDs, counts "
                "and object labels only"
            )
        out[key] = _check_details(item, f"{path}{key}.")
    return out


def build_alert(
    kind: str,
    subject: str,
    severity: str,
    store: str,
    details: JSON,
    now: datetime,
    *,
    max_samples: int | None = None,
) -> Alert:
    """Build a checked alert. Pure: the same arguments give the same alert.

    Args:
        kind: one of ``ALERT_KINDS``.
        subject: what the alert is about (batch id, operation name, export date...);
            it decides ``alertId``. It must not hold PHI: use ``object_label`` for objects.
        severity: one of ``SEVERITIES``.
        store: the DICOM store's resource name.
        details: plain JSON; keys naming PHI attributes are refused.
        now: the alert's time (timezone-aware).
        max_samples: cut the ``samples`` list to this length (``settings.alert_sample_files``).

    Raises:
        ValueError: an unknown kind or severity, a naive time, or details that could hold PHI.
    """
    if kind not in ALERT_KINDS:
        raise ValueError(f"unknown alert kind {kind!r}; valid: {', '.join(ALERT_KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; valid: {', '.join(SEVERITIES)}")
    if not subject:
        raise ValueError("an alert needs a subject")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    checked = _check_mapping(details, "")
    listed = checked.get(SAMPLES_KEY)
    if max_samples is not None and isinstance(listed, list) and len(listed) > max_samples:
        checked[SAMPLES_KEY] = listed[:max_samples]
        checked.setdefault("sampleTotal", len(listed))
    return Alert(alert_id(kind, subject, store), kind, severity, store, subject, now, checked)


def marker_name(alert_id_: str) -> str:
    """The staging-bucket object that records an alert's delivery."""
    return f"{ALERTS_PREFIX}{alert_id_}.json"


def publish_once(ctx: Context, alert: Alert, *, lease_seconds: float = 60.0) -> bool:
    """Publish ``alert`` unless it was already published; True when this call published it.

    Args:
        ctx: the runtime Context (settings, storage client, ``pubsub()``, ``clock``).
        alert: from ``build_alert``.
        lease_seconds: how long a claim protects a publisher before others take over.

    Raises:
        TransientError: Pub/Sub or Cloud Storage answered 429/5xx; call again later.
        PermanentError: the topic rejected the message (missing topic, no permission).
    """
    settings: Settings = ctx.settings
    bucket = ctx.storage.bucket(settings.staging_bucket)
    name = marker_name(alert.alert_id)
    generation = _claim(ctx, alert, bucket, name, lease_seconds)
    if generation is None:
        return False
    try:
        message_id = _publish(ctx, settings, alert)
    except BaseException:
        # Let the next caller publish at once instead of waiting out the lease.
        with contextlib.suppress(gexc.GoogleAPIError, TransientError):
            objects.delete(bucket, name, generation)
        raise
    done = {
        "state": "published",
        "alertId": alert.alert_id,
        "kind": alert.kind,
        "messageId": message_id,
        "publishedAt": _iso(ctx.clock()),
        "leaseUntil": _iso(ctx.clock()),
    }
    # None: our lease ran out and another caller took over; it publishes the same id.
    objects.swap(bucket, name, done, generation)
    logger.info(
        "alert published",
        extra=log.fields(
            alertId=alert.alert_id, kind=alert.kind, severity=alert.severity, messageId=message_id
        ),
    )
    return True


def _claim(
    ctx: Context, alert: Alert, bucket: storage.Bucket, name: str, lease_seconds: float
) -> int | None:
    """Own the marker and return its generation, or None when the alert is already out.

    The marker is a lease: created if absent, or taken over (compare-and-swap) once the
    ``leaseUntil`` of a crashed publisher has passed, or once this call has waited a
    whole lease for it. ``objects`` tells our own write from another's after a lost
    response, so a retried write never waits out its own lease.
    """
    waited_until = time.monotonic() + lease_seconds
    while True:
        until = ctx.clock() + timedelta(seconds=lease_seconds)
        claim = {
            "state": "publishing",
            "alertId": alert.alert_id,
            "kind": alert.kind,
            "leaseUntil": _iso(until),
        }
        found = objects.read(bucket, name)
        if found is None:
            created = objects.create(bucket, name, claim)
            if created is not None:
                return created
            continue  # someone claimed it between our read and write: look again
        doc, generation = found
        if doc.get("state") == "published":
            return None
        lease_until = _lease_until(doc)
        if lease_until <= ctx.clock() or time.monotonic() > waited_until:
            taken = objects.swap(bucket, name, claim, generation)
            if taken is not None:
                return taken
            continue
        time.sleep(0.2)


def _lease_until(doc: JSON) -> datetime:
    """The marker's ``leaseUntil``; an unreadable one counts as expired."""
    try:
        moment = datetime.fromisoformat(str(doc.get("leaseUntil")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo is not None else datetime.min.replace(tzinfo=UTC)


def _publish(ctx: Context, settings: Settings, alert: Alert) -> str:
    try:
        response = (
            ctx.pubsub()
            .projects()
            .topics()
            .publish(topic=str(settings.alerts_topic), body={"messages": [alert.pubsub_message()]})
            .execute(num_retries=_PUBLISH_RETRIES)
        )
    except HttpError as exc:
        status = int(getattr(exc, "status_code", 0) or exc.resp.status)
        if status == 429 or status >= 500:
            raise TransientError(f"publishing alert {alert.alert_id}: HTTP {status}") from exc
        raise PermanentError(
            f"publishing alert {alert.alert_id} to {settings.alerts_topic}: HTTP {status} "
            f"{exc.reason}"
        ) from exc
    except (TimeoutError, OSError) as exc:
        raise TransientError(f"publishing alert {alert.alert_id}: {exc}") from exc
    ids: Sequence[str] = response.get("messageIds") or []
    if not ids:
        raise TransientError(f"publishing alert {alert.alert_id}: no message id returned")
    return str(ids[0])
