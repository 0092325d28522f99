"""Alert building: determinism, the message schema, and no PHI."""

from __future__ import annotations

import base64
import json
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from dicomflow import alerts
from dicomflow.config import load_settings
from tests.deployment_key import KEY_FILE

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
STORE = "projects/p/locations/l/datasets/d/dicomStores/s"


def _settings(**env: str) -> object:
    base = {
        "DICOMFLOW_DICOM_STORE": STORE,
        "DICOMFLOW_LANDING_BUCKET": "landing",
        "DICOMFLOW_STAGING_BUCKET": "staging",
        "DICOMFLOW_BACKUP_BUCKET": "backups",
        "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
        "DICOMFLOW_KEY_FILE": KEY_FILE,
    }
    base.update(env)
    return load_settings(base)


def test_same_kind_and_subject_give_the_same_id_whatever_else_changes() -> None:
    a = alerts.build_alert("export_failed", "exports/2026-11-25", "ERROR", STORE, {"n": 1}, NOW)
    b = alerts.build_alert(
        "export_failed", "exports/2026-11-25", "CRITICAL", STORE, {"n": 2}, NOW + timedelta(1)
    )
    assert a.alert_id == b.alert_id
    assert len(a.alert_id) == 32
    assert a == alerts.build_alert(
        "export_failed", "exports/2026-11-25", "ERROR", STORE, {"n": 1}, NOW
    )


def test_other_kind_or_subject_give_another_id() -> None:
    ids = {
        alerts.build_alert(kind, subject, "ERROR", STORE, {}, NOW).alert_id
        for kind in ("export_failed", "stalled")
        for subject in ("exports/2026-11-25", "exports/2026-11-26")
    }
    assert len(ids) == 4


def test_message_schema_and_attributes() -> None:
    alert = alerts.build_alert(
        "quarantined", "obj:1", "WARNING", STORE, {"reason": "not DICOM", "count": 3}, NOW
    )
    msg = alert.pubsub_message()
    body = json.loads(base64.b64decode(msg["data"]))
    assert body == {
        "schemaVersion": alerts.SCHEMA_VERSION,
        "alertId": alert.alert_id,
        "kind": "quarantined",
        "severity": "WARNING",
        "dicomStore": STORE,
        "subject": "obj:1",
        "time": "2026-11-25T12:00:00Z",
        "details": {"reason": "not DICOM", "count": 3},
    }
    assert msg["attributes"] == {
        "kind": "quarantined",
        "severity": "WARNING",
        "dicomStore": STORE,
        "alertId": alert.alert_id,
        "schemaVersion": "2",
    }
    assert all(isinstance(v, str) for v in msg["attributes"].values())


@pytest.mark.parametrize(
    ("kind", "severity", "now", "fragment"),
    [
        ("exploded", "ERROR", NOW, "unknown alert kind 'exploded'"),
        ("stalled", "LOUD", NOW, "unknown severity 'LOUD'"),
        ("stalled", "ERROR", NOW.replace(tzinfo=None), "timezone-aware"),
    ],
)
def test_bad_arguments_are_refused(kind: str, severity: str, now: datetime, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        alerts.build_alert(kind, "s", severity, STORE, {}, now)


@pytest.mark.parametrize(
    "key",
    [
        "PatientName",
        "patient_name",
        "patientID",
        "PatientBirthDate",
        "ReferringPhysicianName",
        "OperatorsName",
        "StudyDate",
        "AccessionNumber",
        "InstitutionName",
        "00100010",
        "(0010,0030)",
        "(0008,0090)",
    ],
)
def test_phi_detail_keys_are_refused_anywhere(key: str) -> None:
    with pytest.raises(ValueError, match="PHI"):
        alerts.build_alert("conflict", "s", "ERROR", STORE, {key: "x"}, NOW)
    with pytest.raises(ValueError, match="PHI"):
        alerts.build_alert("conflict", "s", "ERROR", STORE, {"files": [{key: "x"}]}, NOW)


def test_uid_and_count_keys_are_allowed() -> None:
    details = {
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "SOPInstanceUID": "1.2.3.4.5",
        "counts": {"success": 3, "failure": 1},
        "operation": "projects/p/locations/l/datasets/d/operations/1",
    }
    assert alerts.build_alert("conflict", "s", "ERROR", STORE, details, NOW).details == details


def test_non_json_values_are_refused() -> None:
    name = pydicom.valuerep.PersonName("Doe^John")
    with pytest.raises(ValueError, match="PersonName"):
        alerts.build_alert("conflict", "s", "ERROR", STORE, {"who": name}, NOW)
    with pytest.raises(ValueError, match="bytes"):
        alerts.build_alert("conflict", "s", "ERROR", STORE, {"raw": b"x"}, NOW)


def test_samples_are_capped() -> None:
    settings = _settings(DICOMFLOW_ALERT_SAMPLE_FILES="3")
    objs = [("landing", f"f{i}.dcm") for i in range(8)]
    details = alerts.samples(settings, objs)  # type: ignore[arg-type]
    assert len(details["samples"]) == 3 and details["sampleTotal"] == 8
    raw = {"samples": [f"x{i}" for i in range(8)]}
    built = alerts.build_alert("quarantined", "s", "WARNING", STORE, raw, NOW, max_samples=2)
    assert built.details == {"samples": ["x0", "x1"], "sampleTotal": 8}


def test_object_label_hash_and_plain() -> None:
    hashed = alerts.object_label(_settings(), "landing", "Doe^John/ct.dcm")  # type: ignore[arg-type]
    assert hashed.startswith("h:") and len(hashed) == len("h:12345678:") + 32
    assert "Doe" not in hashed
    assert hashed == alerts.object_label(_settings(), "landing", "Doe^John/ct.dcm")  # type: ignore[arg-type]
    assert hashed != alerts.object_label(_settings(), "landing", "Doe^John/mr.dcm")  # type: ignore[arg-type]
    plain = alerts.object_label(
        _settings(DICOMFLOW_ALERT_OBJECT_NAMES="plain"),  # type: ignore[arg-type]
        "landing",
        "a/b.dcm",
    )
    assert plain == "gs://landing/a/b.dcm"


def _patient_names() -> list[str]:
    """Patient names and ids found in pydicom's sample files (at least a few)."""
    found: set[str] = set()
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
        except Exception:  # broken samples are part of the corpus
            continue
        for part in str(ds.get("PatientName", "")).replace("^", " ").split():
            if len(part) >= 4:
                found.add(part)
    return sorted(found)


def test_alert_built_from_sample_files_never_holds_their_patient_names() -> None:
    names = _patient_names()
    assert len(names) >= 5
    settings = _settings()
    # Files named after their patients, as uploaders do.
    objects = [("landing", f"{n}/{Path(n).name}.dcm") for n in names]
    details = {**alerts.samples(settings, objects), "count": len(objects)}  # type: ignore[arg-type]
    alert = alerts.build_alert(
        "quarantined", "batch:20261125T120000Z", "WARNING", STORE, details, NOW, max_samples=50
    )
    text = base64.b64decode(alert.pubsub_message()["data"]).decode() + json.dumps(
        alert.attributes()
    )
    leaked = [n for n in names if n.lower() in text.lower()]
    assert leaked == []


def test_pipeline_dates_are_not_mistaken_for_phi() -> None:
    details = {"date": "2026-11-25", "time": "x", "createTime": "y", "endTime": "z"}
    assert alerts.build_alert("export_failed", "s", "ERROR", STORE, details, NOW).details == details


def test_uid_label_hash_and_plain() -> None:
    sop = "1.2.826.0.1.3680043.8.498.1"
    hashed = alerts.uid_label(_settings(), sop)  # type: ignore[arg-type]
    assert hashed is not None and hashed.startswith("h:") and sop not in hashed
    assert hashed == alerts.uid_label(_settings(), sop)  # type: ignore[arg-type]
    plain = _settings(DICOMFLOW_ALERT_UIDS="plain")
    assert alerts.uid_label(plain, sop) == sop  # type: ignore[arg-type]
    assert alerts.uid_label(_settings(), None) is None  # type: ignore[arg-type]


def test_operation_errors_in_alerts_name_objects_and_uids_by_label() -> None:
    from types import SimpleNamespace

    from dicomflow import report

    settings = _settings()
    sop = "1.2.826.0.1.3680043.8.498.1"
    text = f"reading gs://landing/Doe^John/ct.dcm (instance {sop}) failed"
    redacted = report._redact(SimpleNamespace(settings=settings), text)  # type: ignore[arg-type]
    label = alerts.object_label(settings, "landing", "Doe^John/ct.dcm")  # type: ignore[arg-type]
    uid = alerts.uid_label(settings, sop)  # type: ignore[arg-type]
    assert redacted == f"reading {label} (instance {uid}) failed"


def test_a_message_that_is_no_alert_decodes_to_a_kind_no_alert_has() -> None:
    from dicomflow import subscription

    for data in (b"not base64!", base64.b64encode(b"[1, 2]")):
        got = subscription.decode({"message": {"data": data, "messageId": "m1"}})
        assert got["kind"] == subscription.UNDECODABLE
        assert got["kind"] not in alerts.ALERT_KINDS
