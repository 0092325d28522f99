"""Pure parts of the operator commands: histogram, timeline span, re-drive selection, the page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomflow import ledger, redrive, status, status_page
from dicomflow.ledger import Entry, Source

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def _entry(i: int, state: str, name: str = "in/x.dcm", batch: str | None = None) -> Entry:
    entry = Entry(
        key=f"{i:040x}", source=Source("landing", name, str(i), 10), status=state, batch=batch
    )
    entry.mark("event", T0 + timedelta(seconds=i))
    return entry


def test_upload_bins_cover_the_span_and_count_by_status() -> None:
    points = [(T0 + timedelta(seconds=s), st) for s, st in ((0, "imported"), (1, "failed"))]
    points += [(T0 + timedelta(seconds=119), "imported"), (T0 - timedelta(seconds=1), "x")]
    bins = status.upload_bins(points, T0, T0 + timedelta(seconds=120), bins=60)
    assert bins["binSeconds"] == 2 and bins["total"] == 3
    assert bins["bins"] == [
        {"time": "2026-11-25T12:00:00Z", "counts": {"failed": 1, "imported": 1}},
        {"time": "2026-11-25T12:01:58Z", "counts": {"imported": 1}},
    ]


def test_timeline_zooms_to_the_busy_span_of_the_window() -> None:
    entries = [_entry(i, ledger.IMPORTED) for i in range(10)]
    op = {
        "id": "1",
        "kind": "import",
        "createTime": status.iso(T0 + timedelta(seconds=20)),
        "endTime": None,
        "failed": False,
        "done": False,
        "counter": {},
    }
    seals = [{"batch": "20261125T120000Z-000", "sealedAt": status.iso(T0 + timedelta(seconds=15))}]
    now = T0 + timedelta(seconds=40)
    tl = status.timeline(entries, seals, [op], [], T0 - timedelta(hours=24), now)
    start, end = status.parse_time(tl["start"]), status.parse_time(tl["end"])
    assert start is not None and end is not None
    # From the first upload to now (the operation still runs), padded by 3 %.
    assert T0 - timedelta(seconds=3) <= start < T0
    assert now < end <= now + timedelta(seconds=3)
    assert tl["uploads"]["total"] == 10
    assert tl["operations"][0]["state"] == "running"
    [seal] = tl["seals"]
    assert seal == {"batch": seals[0]["batch"], "time": seals[0]["sealedAt"], "files": None}


def test_select_filters_and_picks_up_interrupted_redrives() -> None:
    pending = _entry(4, ledger.CLAIMED, "in/d.dcm")
    pending.detail["retries"] = [{"status": "failed"}]
    entries = [
        _entry(1, ledger.FAILED, "in/a.dcm", "b1"),
        _entry(2, ledger.QUARANTINED, "other/b.dcm"),
        _entry(3, ledger.IMPORTED, "in/c.dcm", "b1"),
        pending,
        _entry(5, ledger.CLAIMED, "in/e.dcm"),  # a live ingest, not ours
        _entry(6, ledger.CONFLICT, "in/f.dcm", "b2"),
    ]
    keys = [e.source.name for e in redrive.select(entries)]
    assert keys == ["in/a.dcm", "other/b.dcm", "in/d.dcm"]
    assert [e.source.name for e in redrive.select(entries, prefix="gs://landing/in/")] == [
        "in/a.dcm",
        "in/d.dcm",
    ]
    assert redrive.select(entries, prefix="gs://elsewhere/in/") == []
    chosen = redrive.select(entries, ("conflict",), batch="b2")
    assert [e.source.name for e in chosen] == ["in/f.dcm"]
    with pytest.raises(ValueError, match="imported"):
        redrive.select(entries, ("imported",))


def _status(**ledger_totals: int) -> dict[str, object]:
    totals = dict.fromkeys(ledger.STATUSES, 0) | ledger_totals
    return {
        "generatedAt": status.iso(T0),
        "window": {"since": status.iso(T0 - timedelta(hours=1)), "until": status.iso(T0)},
        "dicomStore": "projects/p/locations/l/datasets/d/dicomStores/<s>",
        "ledger": status.ledger_section([]) | {"totals": totals},
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
