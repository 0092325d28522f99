"""Alerts: one versioned JSON message per subject on the alerts topic, never carrying PHI.

An alert is built by the pure ``build_alert`` and sent by ``publish_once``.

Message (the Pub/Sub ``data``, JSON)::

    {"schemaVersion": 2, "alertId": "...", "kind": "export_failed", "severity": "ERROR",
     "dicomStore": "projects/.../dicomStores/S", "subject": "...", "time": "...Z",
     "details": {...}}

Kinds (``ALERT_KINDS``), each with its subject (see ``dicomflow.report``):

- ``import_failed`` (ERROR): files of a batch not in the store after its import.
- ``conflict`` (WARNING): the same UIDs already stored with different bytes.
- ``quarantined`` (WARNING): files that failed the header check, one per window.
- ``dropped`` (WARNING): files ingest gave up on without importing them (reason
  ``event-too-old``: the event came later than ``DICOMFLOW_MAX_EVENT_AGE_SECONDS``;
  ``source-missing``: the object was gone; ``foreign-bucket``: the event named another
  bucket), one per window, from ingest's drop
  records ``state/dropped/<window>/<key>.json``; late records get follow-ups.
- ``permission_denied`` (ERROR): files ingest could not read or copy for want of
  permission (401, 403); ``unreadable`` (ERROR): files whose read or copy met another
  permanent answer (400, 416 ...). One per kind and window, from the failure records
  ``failed/<window>/<key>.json``.
- ``verification_stuck`` (ERROR): a finished import whose verification kept failing
  for ``DICOMFLOW_VERIFY_STUCK_MINUTES``, once per batch.
- ``stale_state`` (WARNING): an unsealed window, an open batch or an open export older
  than ``DICOMFLOW_STALE_STATE_MINUTES``, once per episode of each (``dicomflow.stale``).
- ``export_failed`` (ERROR), ``operation_failed`` (ERROR, an operation started
  outside dicomflow), ``stalled`` (WARNING), ``backlog`` (WARNING).
- ``restore_drill_failed`` (ERROR): a restore drill did not bring the backup back whole;
  ``restore_drill_overdue`` (WARNING): no drill finished within its period
  (``dicomflow.drill``).
- ``missed_event`` (WARNING): uploads whose finalize event never came, found and
  ingested by the reconciliation sweep (``dicomflow.sweep``); one per sweep, with the
  count and no names.

Attributes, for routing without decoding: ``kind``, ``severity``, ``dicomStore``,
``alertId`` and ``schemaVersion``.

``alertId`` is a hash of (kind, subject) only, so every repeat of an alert for
the same subject carries the same id and subscribers can drop repeats.

Delivery. ``publish_once`` keeps a marker ``state/alerts/<alertId>.json`` in the
staging bucket and works as a lease:

1. Create the marker ``{"state": "publishing", "leaseUntil": ...}`` with
   create-if-absent. If it exists and says ``published``, return False. If it
   says ``publishing`` and the lease is live, another caller is publishing:
   wait for it. If the lease ran out (that caller crashed), take the marker
   over with a compare-and-swap on its generation.
2. Publish.
3. Rewrite the marker as ``published`` (compare-and-swap on our generation).

So concurrent callers publish once, and a crash anywhere leads to a repeat
with the same ``alertId`` at the next call (at-least-once), never to a loss.

No PHI: details hold counts, object names through ``object_label`` and DICOM UIDs
through ``uid_label``. ``build_alert`` rejects detail keys that are DICOM PHI
attributes (patient module, person names, dates of care and the like) and
values that are not plain JSON.

Labels (schema version 2). By default an object is named by its label
``h:<key id>:<32 hex>``, an HMAC-SHA256 of its ``gs://`` URI under the
deployment key (``dicomflow.keys``), and so is a UID (``DICOMFLOW_ALERT_UIDS``).
Labels are stable within a deployment (the same object or UID always gets the
same label, across functions and restarts) and differ between deployments;
they change when the key is rotated, and ``<key id>`` says which key made
them. Without the key a label cannot be checked against a guessed path or UID.
Operators who can read staging resolve one with ``dicomflow label LABEL``.
``DICOMFLOW_ALERT_OBJECT_NAMES=plain`` and ``DICOMFLOW_ALERT_UIDS=plain`` put
names and UIDs in clear instead. Version 1 labelled objects with an unkeyed
``sha256:<16 hex>`` and carried UIDs in clear.
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
from typing import Any

from google.api_core import exceptions as gexc
from googleapiclient.errors import HttpError

from dicomflow import keys, log, objects
from dicomflow.config import STATE_PREFIX, Settings
from dicomflow.errors import PermanentError, TransientError

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


def samples(settings: Settings, objects: Iterable[tuple[str, str]]) -> dict[str, Any]:
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
    details: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
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

    def pubsub_message(self) -> dict[str, Any]:
        """The message for ``topics.publish``; googleapiclient does not encode ``data``."""
        data = json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()
        return {"data": base64.b64encode(data).decode("ascii"), "attributes": self.attributes()}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_details(value: Any, path: str) -> Any:
    """A plain-JSON copy of ``value``; raise ValueError on PHI keys or non-JSON values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
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
    if isinstance(value, list | tuple):
        return [_check_details(item, path) for item in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    # pydicom's PersonName, bytes, datasets...: never copied into an alert.
    raise ValueError(f"detail {path.rstrip('.') or 'details'!r} has type {type(value).__name__}")


def build_alert(
    kind: str,
    subject: str,
    severity: str,
    store: str,
    details: Mapping[str, Any],
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
    checked: dict[str, Any] = _check_details(details, "")
    listed = checked.get(SAMPLES_KEY)
    if max_samples is not None and isinstance(listed, list) and len(listed) > max_samples:
        checked[SAMPLES_KEY] = listed[:max_samples]
        checked.setdefault("sampleTotal", len(listed))
    return Alert(alert_id(kind, subject, store), kind, severity, store, subject, now, checked)


def marker_name(alert_id_: str) -> str:
    """The staging-bucket object that records an alert's delivery."""
    return f"{ALERTS_PREFIX}{alert_id_}.json"


def publish_once(ctx: Any, alert: Alert, *, lease_seconds: float = 60.0) -> bool:
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


def _claim(ctx: Any, alert: Alert, bucket: Any, name: str, lease_seconds: float) -> int | None:
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


def _lease_until(doc: dict[str, Any]) -> datetime:
    """The marker's ``leaseUntil``; an unreadable one counts as expired."""
    try:
        moment = datetime.fromisoformat(str(doc.get("leaseUntil")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo is not None else datetime.min.replace(tzinfo=UTC)


def _publish(ctx: Any, settings: Settings, alert: Alert) -> str:
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
