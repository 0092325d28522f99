"""Pure parts of the report: operation reading, redaction, verdicts, summaries."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dicomflow import ledger, manifests, operations, verify
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


def test_verdicts_without_and_with_bytes() -> None:
    assert verify.decide_without_bytes("k1", "md5:a", None) == "imported"
    assert (
        verify.decide_without_bytes("k1", "md5:a", {"key": "k1", "checksum": "md5:b"}) == "imported"
    )
    assert (
        verify.decide_without_bytes("k2", "md5:a", {"key": "k1", "checksum": "md5:a"})
        == "duplicate"
    )
    assert verify.decide_without_bytes("k2", "md5:a", {"key": "k1", "checksum": "md5:b"}) is None
    index = {"key": "k1", "checksum": "md5:a"}
    assert verify.decide_with_bytes("k2", "md5:b", "md5:a", index) == "conflict"
    assert verify.decide_with_bytes("k2", "md5:a", "md5:a", index) == "duplicate"
    assert verify.decide_with_bytes("k2", "md5:b", "md5:b", index) == "imported"
    assert verify.decide_with_bytes("k2", None, "md5:b", None) == "conflict"


def _result(key: str, sop: str, checksum: str) -> FileResult:
    source = ledger.Source("b", f"{key}.dcm", "1", 10, md5Hash=checksum)
    uids = ledger.Uids("1.2", "1.2.3", sop, "1.2.840", "1.2.840.10008.1.2.1")
    entry = ledger.Entry(key=key, source=source, uids=uids)
    return FileResult(key, entry, checksum=f"md5:{checksum}")


def test_only_same_uid_different_bytes_is_ambiguous() -> None:
    results = [_result("a", "9.1", "x"), _result("b", "9.1", "y"), _result("c", "9.2", "x")]
    results.append(_result("d", "9.2", "x"))
    assert verify.ambiguous_in_batch(results) == {"a", "b"}


def test_checksums_match_what_cloud_storage_reports() -> None:
    assert verify.checksum_of(b"hello", "md5") == "md5:XUFAKrxLKna5cZ2REBfFkg=="
    assert verify.checksum_of(b"hello", "crc32c") == "crc32c:mnG7TA=="


def test_summary_counts_each_outcome() -> None:
    results = [_result("a", "1", "x"), _result("b", "2", "y"), _result("c", "3", "z")]
    results[0].status, results[1].status = "imported", "duplicate"
    results[2].status, results[2].reason = "failed", "not-in-store"
    view = operations.view(op(done=True))
    summary = manifests.build_summary("B", {"uri": "gs://s/batches/B/**.dcm"}, view, results, NOW)
    assert summary["counts"] == {
        "imported": 1,
        "duplicate": 1,
        "conflict": 0,
        "failed": 1,
        "total": 3,
    }
    assert (summary["success"], summary["failure"]) == (2, 1)
    assert summary["operation"]["counter"] == {"success": 7, "failure": 2}
    lines = manifests.ndjson(r.line("B", view.name) for r in results).splitlines()
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

    def tick_event(event_id: str) -> CloudEvent:
        attrs = {"type": report.MESSAGE_PUBLISHED, "source": "//pubsub/test", "id": event_id}
        return CloudEvent(attrs, {"message": {"data": ""}})

    results: list[dict[str, object]] = []
    first = threading.Thread(
        target=lambda: results.append(report.handle_event(None, tick_event("1")))
    )
    first.start()
    assert entered.wait(10)
    assert report.handle_event(None, tick_event("2")) == {"status": "busy"}
    release.set()
    first.join(10)
    assert results == [{"status": "tick"}]
    # The lock is free again once the running tick returns.
    assert report.handle_event(None, tick_event("3")) == {"status": "tick"}
    assert calls == ["1", "3"]
