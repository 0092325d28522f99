"""The pure parts of permanent-error handling: which answers are permanent, the alert
kind of a failure record, the names a key's record may have, and the new settings."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc

from dicomflow import feeds, retry, staging
from dicomflow.config import load_settings
from dicomflow.errors import ConfigError
from tests.unit.test_config import BASE


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (gexc.Forbidden("x"), True),
        (gexc.Unauthorized("x"), True),
        (gexc.BadRequest("x"), True),
        (gexc.RequestRangeNotSatisfiable("x"), True),
        (gexc.TooManyRequests("x"), False),
        (gexc.ServiceUnavailable("x"), False),
        (gexc.InternalServerError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_permanent_answers_are_4xx_other_than_408_and_429(exc: Exception, permanent: bool) -> None:
    assert retry.is_permanent(exc) is permanent
    assert retry.should_retry(exc) is (not permanent and retry.status_of(exc) is not None)


def test_408_is_not_permanent() -> None:
    assert not retry.is_permanent_status(408) and retry.is_permanent_status(416)


def test_failure_kind_follows_the_reason_code() -> None:
    assert feeds.failure_kind("permission-denied") == "permission_denied"
    assert feeds.failure_kind("source-unreadable") == "unreadable"


def test_a_keys_record_names_cover_every_place_ingest_writes_one() -> None:
    settings = load_settings(BASE)
    key = staging.file_key("land-bkt", "a/b.dcm", 7)
    home = "20261125T125300Z"
    names = staging.record_names(key, home, settings)
    late = staging.late_home_window(home, settings)
    assert names == [
        f"batches/{home}/{key}.dcm",
        f"batches/{late}/{key}.dcm",
        f"quarantine/{home}/{key}.dcm",
        f"state/dropped/{home}/{key}.json",
        f"failed/{home}/{key}.json",
        f"state/late/{key}.json",
    ]
    assert late == "20261125T125000L"  # the late window holding the home window's seal


def test_failure_records_are_pipeline_objects() -> None:
    settings = load_settings(BASE)
    assert settings.is_pipeline_object("stage-bkt", "failed/20261125T125300Z/k.json")
    assert not settings.is_pipeline_object("land-bkt", "failed/x.dcm")


def test_stuck_and_stale_bounds_default_and_validate() -> None:
    s = load_settings(BASE)
    assert (s.verify_stuck_minutes, s.stale_state_minutes) == (30, 360)
    s = load_settings(
        {**BASE, "DICOMFLOW_VERIFY_STUCK_MINUTES": "5", "DICOMFLOW_STALE_STATE_MINUTES": "60"}
    )
    assert (s.verify_stuck_minutes, s.stale_state_minutes) == (5, 60)
    for name in ("DICOMFLOW_VERIFY_STUCK_MINUTES", "DICOMFLOW_STALE_STATE_MINUTES"):
        with pytest.raises(ConfigError, match=f"{name}: 0 is below 1"):
            load_settings({**BASE, name: "0"})
