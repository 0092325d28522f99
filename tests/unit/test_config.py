"""Settings: defaults, validation, and errors that name the setting and the fix."""

from __future__ import annotations

import io
import json
import logging

import pytest

from dicomflow import log
from dicomflow.config import SETTINGS_DOC, load_settings, parse_mime_type
from dicomflow.errors import ConfigError
from dicomflow.names import DatasetName, DicomStoreName, OperationName, TopicName

STORE = "projects/p1/locations/us-central1/datasets/ds/dicomStores/st"
STORE_FORM = "projects/P/locations/L/datasets/D/dicomStores/S"  # as error messages show it
BASE = {
    "DICOMFLOW_DICOM_STORE": STORE,
    "DICOMFLOW_LANDING_BUCKET": "land-bkt",
    "DICOMFLOW_STAGING_BUCKET": "stage-bkt",
    "DICOMFLOW_BACKUP_BUCKET": "backup-bkt",
    "DICOMFLOW_ALERTS_TOPIC": "projects/p1/topics/alerts",
}


def test_defaults() -> None:
    s = load_settings(BASE)
    assert str(s.dicom_store) == STORE
    assert s.include_globs == ("*.dcm",)
    assert s.batch_window_seconds == 60 and s.max_running_imports == 5
    assert s.healthcare_api_root == "https://healthcare.googleapis.com/"
    assert s.export_mime_type == "application/dicom; transfer-syntax=*"


# setting -> (a bad value, what its error message must say)
BAD_SETTINGS = {
    "DICOMFLOW_LANDING_BUCKET": ("", "export DICOMFLOW_LANDING_BUCKET="),
    "DICOMFLOW_STAGING_BUCKET": ("Bad_Bucket!", "lowercase"),
    "DICOMFLOW_DICOM_STORE": ("projects/p/stores/x", STORE_FORM),
    "DICOMFLOW_ALERTS_TOPIC": ("alerts", "projects/P/topics/T"),
    "DICOMFLOW_BATCH_WINDOW_SECONDS": ("soon", "whole number"),
    "DICOMFLOW_MAX_RUNNING_IMPORTS": ("0", "1 or more"),
    "DICOMFLOW_EXPORT_MODE": ("weekly", "full, incremental"),
    "DICOMFLOW_EXPORT_MIME_TYPE": ("image/gif", "image/png"),
    "DICOMFLOW_EXPORT_DATE_LAYOUT": ("%Y", "%Y/%m/%d"),
}


@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_bad_setting_names_setting_and_fix(name: str) -> None:
    value, fix = BAD_SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, name: value})
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert fix in message
    assert "\n" not in message


def test_gs_prefix_is_accepted_for_buckets() -> None:
    assert (
        load_settings({**BASE, "DICOMFLOW_LANDING_BUCKET": "gs://land-bkt/"}).landing_bucket
        == "land-bkt"
    )


def test_pipeline_prefixes_are_ignored_in_a_shared_bucket() -> None:
    s = load_settings(
        {**BASE, "DICOMFLOW_STAGING_BUCKET": "land-bkt", "DICOMFLOW_BACKUP_BUCKET": "land-bkt"}
    )
    for name in (
        "batches/x/a.dcm",
        "quarantine/a.dcm",
        "manifests/b/s.ndjson",
        "backups/2026-11-25/a.dcm",
    ):
        assert s.is_pipeline_object("land-bkt", name), name
    assert not s.is_pipeline_object("land-bkt", "incoming/a.dcm")
    assert not s.is_pipeline_object("other-bkt", "batches/x/a.dcm")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/dicom", ("application/dicom", None)),
        ("application/dicom; transfer-syntax=*", ("application/dicom", "*")),
        (
            "application/dicom;transfer-syntax=1.2.840.10008.1.2.5",
            ("application/dicom", "1.2.840.10008.1.2.5"),
        ),
        ("image/png", ("image/png", None)),
        ("image/jpeg", ("image/jpeg", None)),
        ("application/octet-stream", ("application/octet-stream", None)),
    ],
)
def test_mime_types(value: str, expected: tuple[str, str | None]) -> None:
    assert parse_mime_type(value) == expected


@pytest.mark.parametrize(
    "value", ["text/plain", "application/dicom; transfer-syntax=1.2.3", "image/png; q=1"]
)
def test_bad_mime_types(value: str) -> None:
    with pytest.raises(ValueError):
        parse_mime_type(value)


def test_every_documented_setting_is_read() -> None:
    import inspect

    from dicomflow import config

    source = inspect.getsource(config.load_settings)
    for env_name, _, _ in SETTINGS_DOC:
        if env_name != "STORAGE_EMULATOR_HOST":
            assert f'"{env_name}"' in source, env_name


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (DatasetName, "projects/p/locations/l/datasets/d"),
        (DicomStoreName, STORE),
        (OperationName, "projects/p/locations/l/datasets/d/operations/123"),
        (TopicName, "projects/p/topics/t"),
    ],
)
def test_names_round_trip(
    cls: type[DatasetName | DicomStoreName | OperationName | TopicName], text: str
) -> None:
    assert str(cls.from_string(text)) == text


@pytest.mark.parametrize(
    "text", ["", "projects/p", "projects/p/locations/l/datasets/d e", "x/p/locations/l/datasets/d"]
)
def test_bad_dataset_names(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        DatasetName.from_string(text)


def test_json_log_lines_carry_severity_message_and_fields() -> None:
    stream = io.StringIO()
    log.configure(stream=stream)
    logging.getLogger("dicomflow.test").warning(
        "staged %s", "x", extra=log.fields(eventId="e1", batch=None)
    )
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "staged x"
    assert entry["eventId"] == "e1"
    assert "batch" not in entry


def test_readme_documents_every_setting_with_its_default() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for env_name, default, _ in SETTINGS_DOC:
        assert f"| `{env_name}` | `{default}` |" in readme, env_name


def test_sweep_and_landing_retention_defaults_and_bounds() -> None:
    s = load_settings(BASE)
    assert (s.sweep_hours, s.staging_copy_retention_days, s.landing_delete_after_days) == (24, 7, 0)
    # 3 days cover the event age (25 h), the seal grace and one sweep period (24 h).
    assert load_settings({**BASE, "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": "3"})
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": "2"})
    assert str(info.value).startswith("DICOMFLOW_LANDING_DELETE_AFTER_DAYS:")
    assert "set it to 3 or more" in str(info.value)
    # With the sweep off, one day less: the event age and the grace only.
    off = {**BASE, "DICOMFLOW_SWEEP_HOURS": "0", "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": "2"}
    assert load_settings(off).landing_delete_after_days == 2
    # The sweep needs a whole period between the event age and the copies' expiry.
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "DICOMFLOW_STAGING_COPY_RETENTION_DAYS": "3"})
    assert str(info.value).startswith("DICOMFLOW_STAGING_COPY_RETENTION_DAYS:")
    assert "to 4 or more" in str(info.value)
    assert load_settings({**BASE, "DICOMFLOW_STAGING_COPY_RETENTION_DAYS": "4"})
    assert load_settings(
        {**BASE, "DICOMFLOW_SWEEP_HOURS": "6", "DICOMFLOW_STAGING_COPY_RETENTION_DAYS": "3"}
    )
