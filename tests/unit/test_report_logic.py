"""Pure parts of the report: operation reading, redaction, verdicts, summaries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dicomflow import events, functions, manifests, objects, operations, staging, verify
from dicomflow.verify import FileResult

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
IMPORT_METHOD = "google.cloud.healthcare.v1.dicom.DicomService.ImportDicomData"


def op(**extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "projects/p/locations/l/datasets/d/operations/123",
        "metadata": {
            "apiMethodName": IMPORT_METHOD,
            "createTime": "2026-11-25T10:00:00.123456789Z",
            "counter": {"success": "7", "failure": "2"},
        },
    }
    body.update(extra)
    return body


def test_operation_view_reads_string_counters_and_errors() -> None:
    view = operations.view(op(done=True, error={"code": 3, "message": "2 of 9 failed"}))
    assert view.kind == "import" and view.op_id == "123"
    assert view.counter == {"success": 7, "failure": 2}
    assert view.failed and view.error_code == 3
    assert view.created == datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)
    assert view.running_seconds(NOW) is None


def test_cancelled_is_not_failed_and_running_time_counts() -> None:
    meta = {"apiMethodName": IMPORT_METHOD, "createTime": "2026-11-25T11:00:00Z"}
    cancelled = operations.view(
        {
            "name": "x/operations/1",
            "done": True,
            "error": {"code": 1},
            "metadata": {**meta, "cancelRequested": True},
        }
    )
    assert not cancelled.failed
    running = operations.view({"name": "x/operations/2", "metadata": meta})
    assert running.running_seconds(NOW) == 3600
    other = {"name": "x/operations/3", "metadata": {"apiMethodName": "x.CreateDataset"}}
    assert operations.kind_of(other) is None


def test_redact_replaces_object_uris() -> None:
    text = "cannot read gs://landing/Doe^John/1.dcm, see logs"
    out = operations.redact(text, lambda uri: "sha256:abc")
    assert out == "cannot read sha256:abc, see logs"


def _result(key: str, sop: str, checksum: str, status: str = "failed") -> FileResult:
    record = staging.FileRecord(
        key=key,
        bucket="b",
        name=f"{key}.dcm",
        generation="1",
        size=10,
        home="20261125T125300Z",
        window="20261125T125300Z",
        md5=checksum,
        study="1.2",
        series="1.2.3",
        sop=sop,
    )
    return FileResult(record, status=status)


def test_suspects_are_uids_stored_before_or_carried_with_other_bytes() -> None:
    results = [_result("a", "9.1", "x"), _result("b", "9.1", "y"), _result("c", "9.2", "x")]
    results += [_result("d", "9.2", "x"), _result("e", "9.3", "x")]
    assert verify.suspects(results, before=set()) == {"9.1"}
    assert verify.suspects(results, before={"9.3"}) == {"9.1", "9.3"}


def test_successes_are_imported_unless_stored_before_or_earlier() -> None:
    present = [_result("b", "9.1", "x"), _result("a", "9.1", "x"), _result("c", "9.2", "x")]
    present += [_result("d", "9.3", "x"), _result("e", "9.4", "y")]
    present[3].status = "conflict"
    verify.name_successes(present, before={"9.2"}, earlier={("9.4", "md5:y"), ("9.1", "md5:z")})
    by_key = {r.key: r.status for r in present}
    # The lowest key of two identical files is the one imported; the UID stored before
    # the import is a duplicate; an earlier overlapping batch imported e's bytes.
    assert by_key == {
        "a": "imported",
        "b": "duplicate",
        "c": "duplicate",
        "d": "conflict",
        "e": "duplicate",
    }


def test_counted_failures_need_counters() -> None:
    assert verify.failures_counted(None) is None
    assert verify.failures_counted({"done": True}) is None
    assert verify.failures_counted({"counter": {"success": "3"}}) == 0
    with_error = {"error": {"code": 2}, "counter": {"success": "3", "failure": "2"}}
    assert verify.failures_counted(with_error) == 2


def test_earlier_copies_come_from_earlier_open_batches_that_did_not_see_the_uid() -> None:
    files = {
        "20261125T125200Z": [_result("a", "9.1", "x").record, _result("b", "9.2", "x").record],
        "20261125T125300Z": [_result("c", "9.3", "x").record],
        "20261125T125500Z": [_result("d", "9.4", "x").record],
    }
    notes: dict[str, dict[str, Any]] = {
        "20261125T125200Z": {"sops": ["9.2"]},
        "20261125T125500Z": {"sops": []},
    }
    note = {"open": sorted(files)}
    found = verify.earlier_copies(files.__getitem__, notes.get, "20261125T125400Z", note)
    # Not the one that saw 9.2 stored, not the one without a note yet, not the later one.
    assert found == {("9.1", "md5:x")}


def test_checksums_match_what_cloud_storage_reports() -> None:
    assert verify.checksum_of(b"hello", "md5") == "md5:XUFAKrxLKna5cZ2REBfFkg=="
    assert verify.checksum_of(b"hello", "crc32c") == "crc32c:mnG7TA=="


def test_summary_counts_each_outcome() -> None:
    results = [_result("a", "1", "x"), _result("b", "2", "y"), _result("c", "3", "z")]
    results[0].status, results[1].status = "imported", "duplicate"
    results[2].status, results[2].reason = "failed", "not-in-store"
    record = {"operation": "ops/1", "counter": {"success": "7", "failure": "2"}}
    queued = {"uri": "gs://s/batches/B/*.dcm", "window": "B"}
    summary = manifests.build_summary("B", queued, record, results, 0, NOW)
    assert summary["counts"] == {
        "imported": 1,
        "duplicate": 1,
        "conflict": 0,
        "failed": 1,
        "total": 3,
    }
    assert (summary["success"], summary["failure"]) == (2, 1)
    assert summary["operation"]["counter"] == {"success": 7, "failure": 2}
    lines = objects.ndjson(r.line("B", "ops/1") for r in results).splitlines()
    assert [line.count('"status"') for line in lines] == [1, 1, 1]


def test_a_tick_meeting_a_running_tick_in_its_instance_returns_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from cloudevents.http import CloudEvent

    from dicomflow import report

    entered, release = threading.Event(), threading.Event()
    calls: list[str | None] = []

    def slow_tick(ctx: object, event_id: str | None = None) -> dict[str, object]:
        calls.append(event_id)
        entered.set()
        assert release.wait(10)
        return {"status": "tick"}

    monkeypatch.setattr(report, "run_tick", slow_tick)
    no_ctx: Any = None  # slow_tick stands for the tick: no context is used

    def tick_event(event_id: str) -> CloudEvent:
        attrs = {"type": events.MESSAGE_PUBLISHED, "source": "//pubsub/test", "id": event_id}
        return CloudEvent(attrs, {"message": {"data": ""}})

    results: list[dict[str, object]] = []
    first = threading.Thread(
        target=lambda: results.append(functions.report(no_ctx, tick_event("1")))
    )
    first.start()
    assert entered.wait(10)
    assert functions.report(no_ctx, tick_event("2")) == {"status": "busy"}
    release.set()
    first.join(10)
    assert results == [{"status": "tick"}]
    # The lock is free again once the running tick returns.
    assert functions.report(no_ctx, tick_event("3")) == {"status": "tick"}
    assert calls == ["1", "3"]
