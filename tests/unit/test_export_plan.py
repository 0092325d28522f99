"""Export planning: dated folders, the date of a (retried) tick, counts, manifests, selection."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.http import CloudEvent

from dicomflow import backup, export, export_plan
from dicomflow.clock import iso
from dicomflow.config import Settings, load_settings
from dicomflow.errors import ConfigError, PermanentError
from dicomflow.staging import FileRecord, parse_batch, parse_window

STORE = "projects/p/locations/l/datasets/d/dicomStores/s"


def _settings(**env: str) -> Settings:
    base = {
        "DICOMFLOW_DICOM_STORE": STORE,
        "DICOMFLOW_LANDING_BUCKET": "landing",
        "DICOMFLOW_STAGING_BUCKET": "staging",
        "DICOMFLOW_BACKUP_BUCKET": "backups-bucket",
        "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
    }
    base.update(env)
    return load_settings(base)


def _tick(publish: str | None, scheduled: str | None = None, ce_time: str | None = None) -> Any:
    message: dict[str, Any] = {"data": "e30=", "messageId": "1"}
    if publish:
        message["publishTime"] = publish
    if scheduled:
        message["attributes"] = {"scheduledTime": scheduled}
    attrs = {"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//pubsub"}
    if ce_time:
        attrs["time"] = ce_time
    return CloudEvent(attrs, {"subscription": "s", "message": message})


# --- destination ---


def test_default_folder_is_prefix_and_iso_date() -> None:
    settings = _settings()
    day = date(2026, 11, 25)
    assert backup.dated_folder(settings, day) == "backups/2026-11-25/"
    assert backup.destination_uri(settings, day) == "gs://backups-bucket/backups/2026-11-25/"
    assert export.marker_name(day) == "state/exports/2026-11-25.json"
    # The report tick lists the entries of exports not final yet, never the markers.
    assert export.open_entry_name(day) == "state/exports-open/2026-11-25.json"


@pytest.mark.parametrize(
    ("layout", "prefix", "expected"),
    [
        ("%Y/%m/%d", "backups", "gs://backups-bucket/backups/2026/03/07/"),
        ("%Y%m%d", "nightly/dicom", "gs://backups-bucket/nightly/dicom/20260307/"),
        ("year=%Y/month=%m/day=%d", "b", "gs://backups-bucket/b/year=2026/month=03/day=07/"),
    ],
)
def test_configurable_layout(layout: str, prefix: str, expected: str) -> None:
    settings = _settings(DICOMFLOW_EXPORT_DATE_LAYOUT=layout, DICOMFLOW_BACKUP_PREFIX=prefix)
    assert backup.destination_uri(settings, date(2026, 3, 7)) == expected
    # The marker keys on the ISO date whatever the layout.
    assert export.marker_name(date(2026, 3, 7)) == "state/exports/2026-03-07.json"


def test_layout_without_day_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="DICOMFLOW_EXPORT_DATE_LAYOUT"):
        _settings(DICOMFLOW_EXPORT_DATE_LAYOUT="%Y-%m")


# --- the date of a tick ---


def test_tick_date_comes_from_publish_time_in_utc() -> None:
    event = _tick("2026-11-25T02:00:00.123456789Z")
    assert backup.tick_time(event) == datetime(2026, 11, 25, 2, 0, 0, 123456, tzinfo=UTC)
    assert backup.export_day(backup.tick_time(event)) == date(2026, 11, 25)


def test_scheduled_time_attribute_wins_over_publish_time() -> None:
    event = _tick("2026-11-25T00:00:03Z", scheduled="2026-11-24T23:59:59Z")
    assert backup.export_day(backup.tick_time(event)) == date(2026, 11, 24)


def test_a_retry_delivered_after_midnight_lands_on_the_ticks_date() -> None:
    # The tick was published at 23:59:30 UTC; the platform redelivers the same
    # message 40 minutes later (after midnight). The wall clock plays no part.
    event = _tick("2026-11-25T23:59:30Z", ce_time="2026-11-25T23:59:30Z")
    retried_at = datetime(2026, 11, 26, 0, 40, tzinfo=UTC)
    day = backup.export_day(backup.tick_time(event))
    assert day == date(2026, 11, 25) != retried_at.date()
    assert backup.destination_uri(_settings(), day).endswith("/backups/2026-11-25/")


def test_offsets_are_converted_to_utc() -> None:
    event = _tick("2026-11-25T23:30:00-05:00")
    assert backup.export_day(backup.tick_time(event)) == date(2026, 11, 26)
    local = datetime(2026, 11, 25, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert backup.export_day(local) == date(2026, 11, 26)


def test_cloudevent_time_is_the_last_fallback_and_no_time_is_permanent() -> None:
    assert backup.tick_time(_tick(None, ce_time="2026-01-02T03:04:05Z")).day == 2
    with pytest.raises(PermanentError, match="publishTime"):
        backup.tick_time({"data": {"message": {}}})
    with pytest.raises(ValueError, match="timezone-aware"):
        backup.export_day(datetime(2026, 1, 1))


def test_parse_day() -> None:
    assert backup.parse_day("2026-02-28") == date(2026, 2, 28)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        backup.parse_day("28/02/2026")


# --- modes and formats ---


def test_modes() -> None:
    assert backup.check_mode("incremental") == "incremental"
    with pytest.raises(ValueError, match="valid: full, incremental"):
        backup.check_mode("differential")


@pytest.mark.parametrize(
    ("mime", "image"),
    [
        ("application/dicom", False),
        ("application/dicom; transfer-syntax=*", False),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", False),
        ("image/png", True),
        ("image/jpeg", True),
        ("application/octet-stream", True),
    ],
)
def test_image_mime_types(mime: str, image: bool) -> None:
    assert backup.is_image_mime(mime) is image


@pytest.mark.parametrize("bad", ["image/gif", "application/dicom; transfer-syntax=9.9"])
def test_bad_mime_type_fails_start_up_listing_valid_ones(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(DICOMFLOW_EXPORT_MIME_TYPE=bad)
    assert "DICOMFLOW_EXPORT_MIME_TYPE" in str(info.value)
    assert "valid:" in str(info.value)


def test_export_request_body() -> None:
    body = backup.export_request("gs://b/backups/2026-11-25/", "image/png", None)
    assert body == {
        "gcsDestination": {"uriPrefix": "gs://b/backups/2026-11-25", "mimeType": "image/png"}
    }
    body = backup.export_request("gs://b/x/", "application/dicom", "gs://s/p.txt")
    assert body["filterConfig"] == {"resourcePathsGcsUri": "gs://s/p.txt"}


# --- counts ---


def _qido(sop: str, rows: int | None = None, frames: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00080018": {"vr": "UI", "Value": [sop]}}
    if rows is not None:
        item["00280010"] = {"vr": "US", "Value": [rows]}
    if frames is not None:
        item["00280008"] = {"vr": "IS", "Value": [frames]}
    return item


def test_expected_counts_dicom_is_one_object_per_instance() -> None:
    items = [_qido("1", 10, 5), _qido("2"), _qido("3", 4)]
    assert backup.expected_counts(items, "application/dicom; transfer-syntax=*") == backup.Counts(
        3, 3
    )


def test_expected_counts_images_are_per_frame_and_skip_instances_without_pixels() -> None:
    items = [_qido("1", 10, 5), _qido("2"), _qido("3", 4), _qido("4", 4, 1)]
    assert backup.expected_counts(items, "image/png") == backup.Counts(3, 5 + 1 + 1, skipped=1)
    # Raw pixel data is one object per instance, whatever the frames.
    raw = backup.expected_counts(items, "application/octet-stream")
    assert raw == backup.Counts(3, 3, skipped=1)


def test_expected_counts_images_when_server_ignores_includefield() -> None:
    assert backup.expected_counts([_qido("1"), _qido("2")], "image/jpeg") == backup.Counts(2, 2)


def test_found_counts_group_frames_into_instances_and_skip_the_manifest() -> None:
    folder = "backups/2026-11-25/"
    names = [
        folder + "1.2/1.2.3/1.2.3.4.dcm",
        folder + "1.2/1.2.3/1.2.3.5.dcm",
        folder + "1.2/1.2.3/1.2.3.6/1.png",
        folder + "1.2/1.2.3/1.2.3.6/2.png",
        folder + "1.2/1.2.3/1.2.3.7",  # octet-stream: no extension
        folder + "_MANIFEST.json",
        "backups/2026-11-250/9/9/9.dcm",  # another folder sharing the text prefix
    ]
    assert backup.found_counts(names, folder) == backup.Counts(instances=4, objects=5)


def test_instance_key_keeps_dots_of_uids() -> None:
    assert backup.instance_key("1.2/1.2.3/1.2.3.4.dcm") == "1.2/1.2.3/1.2.3.4"
    assert backup.instance_key("1.2/1.2.3/1.2.3.4") == "1.2/1.2.3/1.2.3.4"
    assert backup.instance_key("1.2/1.2.3/1.2.3.4/7.jpg") == "1.2/1.2.3/1.2.3.4"
    assert backup.instance_key("stray.txt") is None


# --- manifest ---

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def _marker(mode: str = "full", instances: int = 3, objects: int = 3) -> dict[str, Any]:
    return {
        "date": "2026-11-25",
        "attempt": 1,
        "store": STORE,
        "mode": mode,
        "mimeType": "application/dicom; transfer-syntax=*",
        "destination": "gs://b/backups/2026-11-25/",
        "tickTime": "2026-11-25T02:00:00Z",
        "operation": "projects/p/locations/l/datasets/d/operations/9",
        "expected": {"instances": instances, "objects": objects},
    }


def _operation(error: bool = False, failure: str = "0") -> dict[str, Any]:
    op: dict[str, Any] = {
        "name": "projects/p/locations/l/datasets/d/operations/9",
        "done": True,
        "metadata": {
            "createTime": "2026-11-25T02:00:01Z",
            "endTime": "2026-11-25T02:03:00Z",
            "counter": {"success": "3", "failure": failure},
        },
    }
    if error:
        op["error"] = {"code": 13, "message": "internal"}
    else:
        op["response"] = {}
    return op


def test_manifest_complete_when_everything_matches() -> None:
    manifest = backup.build_manifest(_marker(), _operation(), backup.Counts(3, 3), NOW)
    assert manifest["complete"] is True and manifest["problems"] == []
    assert manifest["dicomStore"] == STORE and manifest["mode"] == "full"
    assert manifest["mimeType"] == "application/dicom; transfer-syntax=*"
    assert manifest["operation"] == {
        "name": "projects/p/locations/l/datasets/d/operations/9",
        "done": True,
        "createTime": "2026-11-25T02:00:01Z",
        "endTime": "2026-11-25T02:03:00Z",
        "counter": {"success": 3, "failure": 0},
        "error": None,
    }
    assert manifest["expected"] == {"instances": 3, "objects": 3}
    assert manifest["found"] == {"instances": 3, "objects": 3}
    assert manifest["writtenAt"] == "2026-11-25T03:00:00Z"


def test_full_export_may_find_more_than_counted_at_start() -> None:
    assert backup.build_manifest(_marker(), _operation(), backup.Counts(4, 4), NOW)["complete"]


def test_failures_of_instances_without_pixels_are_allowed_in_image_exports() -> None:
    marker = {**_marker(), "expected": {"instances": 3, "objects": 3, "skipped": 1}}
    assert backup.build_manifest(marker, _operation(failure="1"), backup.Counts(3, 3), NOW)[
        "complete"
    ]
    manifest = backup.build_manifest(marker, _operation(failure="2"), backup.Counts(3, 3), NOW)
    assert manifest["problems"] == ["operation counted 2 failures"]


def test_incremental_must_match_exactly() -> None:
    manifest = backup.build_manifest(_marker("incremental"), _operation(), backup.Counts(4, 4), NOW)
    assert manifest["complete"] is False
    assert "expected 3 instances, found 4" in manifest["problems"]


@pytest.mark.parametrize(
    ("operation", "found", "problem"),
    [
        (_operation(error=True), backup.Counts(3, 3), "operation failed: code 13"),
        (_operation(failure="1"), backup.Counts(3, 3), "operation counted 1 failures"),
        (_operation(), backup.Counts(2, 2), "expected 3 instances, found 2"),
        (None, backup.Counts(3, 3), "no export operation"),
    ],
)
def test_partial_or_failed_backup_is_never_complete(
    operation: dict[str, Any] | None, found: backup.Counts, problem: str
) -> None:
    manifest = backup.build_manifest(_marker(), operation, found, NOW)
    assert manifest["complete"] is False
    assert problem in manifest["problems"]


# --- incremental selection ---

T_PREV = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
T_NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def _vb(batch: str, verified: datetime, success: int | None = 1) -> export_plan.VerifiedBatch:
    return export_plan.VerifiedBatch(batch, verified, success)


def test_select_batches_takes_the_window_since_the_last_export_with_its_margin() -> None:
    margin = export_plan.MANIFEST_MARGIN
    verified = [
        _vb("old", T_PREV - margin),  # on the margin's edge: the previous export had it
        _vb("edge-seen", T_PREV - timedelta(minutes=5)),  # the previous export chose it
        _vb("edge-missed", T_PREV - timedelta(minutes=5)),  # written after it listed
        _vb("day", T_PREV + timedelta(hours=12)),
        _vb("at-tick", T_NOW),
        _vb("late", T_NOW + timedelta(seconds=1)),  # verified after the tick: next export
    ]
    chosen = export_plan.select_batches(verified, T_PREV, T_NOW, exported={"edge-seen"})
    assert [b.batch for b in chosen] == ["at-tick", "day", "edge-missed"]
    # No previous export: everything verified up to the tick.
    assert [b.batch for b in export_plan.select_batches(verified, None, T_NOW)] == [
        "at-tick",
        "day",
        "edge-missed",
        "edge-seen",
        "old",
    ]
    # What this export records for the next one: the chosen batches near its tick.
    assert export_plan.recent_batches(chosen, T_NOW) == ["at-tick"]


def test_consecutive_exports_take_every_batch_once() -> None:
    """Batches verified around two ticks, with summaries written up to 9 min late."""
    t1, t2 = T_PREV, T_NOW
    write_delay = timedelta(minutes=9)  # the report tick runs at most 540 s
    stamps = [t1 + timedelta(minutes=m) for m in range(-40, 40, 3)]
    stamps += [t2 + timedelta(minutes=m) for m in range(-40, 40, 3)]
    every = [_vb(f"b{i:03d}", v) for i, v in enumerate(stamps)]
    # Worst case: each summary appears write_delay after its verifiedAt.
    listed_at_1 = [b for b in every if b.verified + write_delay <= t1]
    first = export_plan.select_batches(listed_at_1, None, t1)
    listed_at_2 = [b for b in every if b.verified + write_delay <= t2]
    second = export_plan.select_batches(listed_at_2, t1, t2, export_plan.recent_batches(first, t1))
    third = export_plan.select_batches(
        every, t2, t2 + timedelta(days=1), export_plan.recent_batches(second, t2)
    )
    names = [b.batch for b in [*first, *second, *third]]
    assert sorted(names) == sorted(b.batch for b in every)  # none missed
    assert len(names) == len(set(names))  # none twice


def test_scan_floor_keeps_every_batch_the_next_export_may_need() -> None:
    now = T_NOW + timedelta(minutes=3)
    seen = [
        _vb("20261124T100000Z-000", T_NOW - timedelta(hours=16)),
        _vb("20261125T000000Z-000", T_NOW + timedelta(minutes=1)),  # the next export's
    ]
    # The clock's window less the margin.
    assert export_plan.scan_floor([], [], now, T_NOW, 60) == "20261125T014300Z"
    # A batch verified after the tick but named long before it.
    assert export_plan.scan_floor(seen, [], now, T_NOW, 60) == "20261125T000000Z-000"
    # A batch still importing from two days ago.
    pending = ["20261123T080000Z-001", "20261125T015900Z-000"]
    assert export_plan.scan_floor(seen, pending, now, T_NOW, 60) == "20261123T080000Z-001"
    # The seal cursor: windows from it on may not be sealed yet, so have no open record.
    assert export_plan.scan_floor(seen, ["20261124T235900Z"], now, T_NOW, 60) == "20261124T235900Z"
    # Window ids sort before the batch ids of that window.
    assert "20261125T014300Z" < "20261125T014300Z-000"


def _line(status: str, sop: str, **uids: str | None) -> dict[str, Any]:
    """A ``success.ndjson`` line as report writes it: a file record plus its outcome."""
    record = FileRecord(
        key=f"000000{sop.encode().hex():0<40}"[:46],
        bucket="landing",
        name=f"in/{sop}.dcm",
        generation="1",
        size=10,
        home="20261125T010000Z",
        window="20261125T010000Z",
        study=uids.get("study", "1"),
        series=uids.get("series", "1.1"),
        sop=sop,
    )
    return {**record.line(), "status": status, "batch": "20261125T010000Z-0"}


def test_success_paths_from_file_record_lines() -> None:
    lines = [
        _line("imported", "b"),
        _line("duplicate", "a"),
        _line("imported", "a"),  # the same instance in two batches
        _line("failed", "f"),  # a failure line never counts, wherever it is
        _line("imported", "n", study=None),  # a record without UIDs names no instance
    ]
    assert export_plan.success_paths(lines) == [("1", "1.1", "a"), ("1", "1.1", "b")]
    assert backup.resource_path("1", "1.1", "a") == "/studies/1/series/1.1/instances/a"


def test_batch_ids_sort_by_their_window() -> None:
    """scan_floor compares ids as text: that order is the order of their windows."""
    ids = ["20261125T014300Z-1", "20261124T235900Z", "20261125T014300Z", "20261125T014300Z-01"]
    by_time = sorted(ids, key=lambda b: (parse_window(parse_batch(b)[0]), parse_batch(b)[1]))
    assert sorted(ids) == by_time
    assert export_plan.paths_file_name(date(2026, 11, 25), 2) == (
        "state/exports/2026-11-25.2.paths.txt"
    )


def test_stuck_start_is_measured_from_the_first_claim() -> None:
    marker = export._new_marker(
        _settings(), date(2026, 11, 25), "full", "application/dicom", T_NOW, T_NOW
    )
    assert marker["firstClaimedAt"] == marker["claimedAt"] == "2026-11-25T02:00:00Z"
    later = T_NOW + timedelta(seconds=export.STALLED_START_SECONDS + 1)
    # A takeover renews claimedAt but keeps firstClaimedAt.
    marker["claimedAt"] = iso(later - timedelta(seconds=30))
    assert export.stuck_start_seconds(marker, later) == export.STALLED_START_SECONDS + 1
