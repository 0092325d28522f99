"""Pure parts of the operator commands: file totals, histogram, timeline span, batch list,
re-drive selection and keys, the page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomflow import clock
from dicomflow.ops import outcomes, redrive, status, status_page
from dicomflow.ops.outcomes import Outcome
from dicomflow.staging import FileRecord, file_key, is_key

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
W0 = "20261125T120000Z"
W1 = "20261125T120100Z"


def _record(i: int, name: str = "in/x.dcm", via: str | None = None) -> FileRecord:
    return FileRecord(
        key=file_key("landing", name, i),
        bucket="landing",
        name=name,
        generation=str(i),
        size=10,
        home=W0,
        window=W0,
        via=via,
    )


def _outcome(i: int, state: str, name: str = "in/x.dcm", batch: str | None = None) -> Outcome:
    record = _record(i, name)
    return Outcome(record.key, state, None, batch, W0, record)


def _summary(batch: str, window: str, **counts: int) -> dict[str, object]:
    full = dict.fromkeys(("imported", "duplicate", "conflict", "failed"), 0) | counts
    return {
        "batch": batch,
        "window": window,
        "counts": {**full, "total": sum(full.values())},
        "failure": full["conflict"] + full["failed"],
        "times": {"sealedAt": "2026-11-25T12:01:03Z", "verifiedAt": "2026-11-25T12:02:30Z"},
        "operation": {"name": "projects/p/locations/l/datasets/d/operations/7"},
    }


def test_file_totals_count_each_file_once_a_redriven_one_by_its_retry() -> None:
    q1, q2 = _record(1), _record(2)
    held = status.Holdings(
        summaries={
            W0: _summary(W0, W0, imported=3, failed=1),
            f"{W1}-0": _summary(f"{W1}-0", W1, imported=1),
        },
        quarantined=[(q1.key, W0, "not-dicom: no preamble"), (q2.key, W0, "no-uids: x")],
        dropped=[(_record(3).key, W1)],
        open_windows={"20261125T120300Z": {"files": 2, "bytes": 20}},
        open_batches={"20261125T120200Z": {"window": "20261125T120200Z", "count": 4}},
        # The failed file was re-driven (now imported in W1-0), q2 is being re-driven.
        markers=[
            {"key": "k-failed", "previous": "failed", "window": W0},
            {"key": q2.key, "previous": "quarantined", "window": W0},
        ],
        failures=[{"key": "k-failed", "status": "failed", "reason": "not-in-store"}],
    )
    section, points = status.files_section(held)
    assert section["totals"] == {
        "imported": 4,
        "duplicate": 0,
        "conflict": 0,
        "failed": 0,
        "quarantined": 1,
        "dropped": 1,
        "staged": 6,
    }
    assert section["files"] == 12 and section["retried"] == 2
    assert section["outcomes"]["in progress"] == 6
    assert section["reasons"] == {"quarantined": {"not-dicom": 1}}
    # The timeline's points add up to the same files.
    assert sum(n for _, _, n in points) == 12


def test_batch_list_orders_states_and_filters_by_window() -> None:
    held = status.Holdings(
        summaries={W0: _summary(W0, W0, imported=2)},
        open_windows={"20261125T120300Z": {"files": 2, "bytes": 20}},
        open_batches={
            f"{W1}-0": {"count": 3, "sealedAt": "2026-11-25T12:02:03Z", "_operation": None},
            f"{W1}-1": {
                "count": 1,
                "sealedAt": "2026-11-25T12:02:03Z",
                "_operation": {"operation": "ops/1", "startedAt": "2026-11-25T12:02:10Z"},
            },
            "20261125T120200Z": {
                "count": 1,
                "_operation": {"operation": "ops/2", "done": True, "finishedAt": "x"},
            },
        },
    )
    now = T0 + timedelta(minutes=5)
    items = status.batch_list(held, now, None, 60)
    assert [(b["batch"], b["state"]) for b in items] == [
        (W0, "verified"),
        (f"{W1}-0", "sealed"),
        (f"{W1}-1", "importing"),
        ("20261125T120200Z", "verifying"),
        ("20261125T120300Z", "open"),
    ]
    assert items[0]["files"] == 2 and items[0]["counts"]["imported"] == 2
    assert items[2]["ageSeconds"] == 170  # since the import started
    later = status.batch_list(held, now, T0 + timedelta(minutes=3), 60)
    assert [b["batch"] for b in later] == ["20261125T120200Z", "20261125T120300Z"]


def test_upload_bins_cover_the_span_and_count_by_status() -> None:
    points = [(T0 + timedelta(seconds=s), st, 1) for s, st in ((0, "imported"), (1, "failed"))]
    points += [(T0 + timedelta(seconds=119), "imported", 2), (T0 - timedelta(seconds=1), "x", 1)]
    points += [(T0, "failed", -1)]  # a re-driven file leaves its old outcome
    bins = status.upload_bins(points, T0, T0 + timedelta(seconds=120), bins=60)
    assert bins["binSeconds"] == 2 and bins["total"] == 3
    assert bins["bins"] == [
        {"time": "2026-11-25T12:00:00Z", "counts": {"imported": 1}},
        {"time": "2026-11-25T12:01:58Z", "counts": {"imported": 2}},
    ]


def test_timeline_zooms_to_the_busy_span_of_the_window() -> None:
    points = [(T0, "imported", 10)]
    op: dict[str, object] = {
        "id": "1",
        "kind": "import",
        "createTime": clock.iso_seconds(T0 + timedelta(seconds=20)),
        "endTime": None,
        "failed": False,
        "done": False,
        "counter": {},
    }
    seals = [
        {"batch": "20261125T120000Z-0", "sealedAt": clock.iso_seconds(T0 + timedelta(seconds=15))}
    ]
    now = T0 + timedelta(seconds=40)
    tl = status.timeline(points, seals, [op], [], T0 - timedelta(hours=24), now)
    start, end = clock.parse_time(tl["start"]), clock.parse_time(tl["end"])
    assert start is not None and end is not None
    # From the first window to now (the operation still runs), padded by 3 %.
    assert T0 - timedelta(seconds=3) <= start < T0
    assert now < end <= now + timedelta(seconds=3)
    assert tl["uploads"]["total"] == 10
    assert tl["operations"][0]["state"] == "running"
    [seal] = tl["seals"]
    assert seal == {"batch": seals[0]["batch"], "time": seals[0]["sealedAt"], "files": None}


def test_select_filters_and_picks_up_interrupted_redrives() -> None:
    a = _outcome(1, "failed", "in/a.dcm", "b1")
    b = _outcome(2, "quarantined", "other/b.dcm")
    c = _outcome(3, "imported", "in/c.dcm", "b1")
    d = _outcome(4, "failed", "in/d.dcm", "b1")  # re-driven; its retry is not staged yet
    e = _outcome(5, "failed", "in/e.dcm", "b1")  # re-driven; its retry has an outcome
    f = _outcome(6, "conflict", "in/f.dcm", "b2")
    assert e.record is not None
    retry_of_e = Outcome(redrive.retry_key(e.record), "staged", record=_record(50))
    found = {o.key: o for o in (a, b, c, d, e, f, retry_of_e)}
    retried = {d.key, e.key}
    names = [o.record.name for o in redrive.select(found, retried) if o.record]
    assert sorted(names) == ["in/a.dcm", "in/d.dcm", "other/b.dcm"]
    chosen = redrive.select(found, retried, prefix="gs://landing/in/")
    assert sorted(o.record.name for o in chosen if o.record) == ["in/a.dcm", "in/d.dcm"]
    assert redrive.select(found, retried, prefix="gs://elsewhere/in/") == []
    assert [o.key for o in redrive.select(found, retried, ("conflict",), batch="b2")] == [f.key]
    with pytest.raises(ValueError, match="imported"):
        redrive.select(found, retried, ("imported",))


def test_retry_keys_are_keys_and_never_repeat_along_a_chain() -> None:
    first = _record(7)
    second_key = redrive.retry_key(first)
    second = FileRecord(**{**first.line(), "key": second_key, "via": "retry"})
    third_key = redrive.retry_key(second)
    assert len({first.key, second_key, third_key}) == 3
    assert all(is_key(k) for k in (second_key, third_key))
    assert redrive.retry_key(first) == second_key  # a repeat stages under the same name
    # A re-staged straggler keeps its key, so its re-drive still gets a new one.
    restaged = FileRecord(**{**second.line(), "via": "restaged"})
    assert redrive.retry_key(restaged) == third_key


def _status(**totals: int) -> dict[str, object]:
    section, _ = status.files_section(status.Holdings())
    return {
        "generatedAt": clock.iso_seconds(T0),
        "window": {
            "since": clock.iso_seconds(T0 - timedelta(hours=1)),
            "until": clock.iso_seconds(T0),
        },
        "dicomStore": "projects/p/locations/l/datasets/d/dicomStores/<s>",
        "files": section | {"totals": dict.fromkeys(outcomes.STATUSES, 0) | totals},
        "batches": {
            "counts": {},
            "open": [],
            "sealed": [],
            "importing": [],
            "verifying": [],
            "verified": 0,
        },
        "operations": {"running": []},
        "alerts": {"total": 1, "byKind": {"backlog": 1}, "publishing": 0, "recent": []},
        "exports": [],
        "timeline": status.timeline([], [], [], [], T0 - timedelta(hours=1), T0),
    }


def test_the_page_escapes_text_and_has_no_script_or_remote_resource() -> None:
    page = status_page.render(_status(imported=3))
    assert "<script" not in page
    assert "&lt;s&gt;" in page and "<s>" not in page
    assert 'id="timeline"' in page
    without_svg_ns = page.replace("http://www.w3.org/2000/svg", "")
    assert "http://" not in without_svg_ns and "https://" not in without_svg_ns


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (5, "5s"), (125, "2m 5s"), (3 * 3600 + 60, "3h 1m"), (90000, "1d 1h")],
)
def test_durations_read_at_a_glance(seconds: int | None, text: str) -> None:
    assert status_page.duration(seconds) == text
