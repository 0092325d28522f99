"""The reconciliation sweep and landing retention, on fake-gcs-server and the Healthcare
emulator, with the functions' ticks on a settable clock (the pipeline of
``test_ingest_pipeline``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dicomflow import alerts, functions
from dicomflow.config import DROPPED_PREFIX
from dicomflow.ops import outcomes
from dicomflow.staging import file_key
from dicomflow.verify import SUCCESS
from tests.ingest_support import Uploaded, finalize_event, make_instance, post
from tests.integration.sites import Pipeline
from tests.integration.test_ingest_pipeline import make

__all__ = ["make"]  # the pipeline tests' fixture, used here

EVENT_AGE = 1800
SWEEP = {
    "DICOMFLOW_MAX_EVENT_AGE_SECONDS": str(EVENT_AGE),
    "DICOMFLOW_SWEEP_HOURS": "1",
    "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": "1",
}


def sweeping(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> tuple[Pipeline, list[alerts.Alert]]:
    """A pipeline, and the alerts it sends. Its clock starts now: the sweep compares it
    with the ``timeCreated`` that fake-gcs-server gives each upload. Uploads stay younger
    than the event age while the pipeline drains (a minute a round)."""
    p = make(**SWEEP)
    p.clock.now = datetime.now(UTC)
    sent: list[alerts.Alert] = []

    def published(c: Any, alert: alerts.Alert, **kwargs: Any) -> bool:
        sent.append(alert)
        return True

    monkeypatch.setattr(alerts, "publish_once", published)
    return p, sent


def daily(p: Pipeline) -> dict[str, Any]:
    """Move to the next sweep period and tick; what the period's pass did."""
    p.clock.advance(3600)
    result = functions.ingest_tick(p.ctx)
    assert "daily" in result, result
    daily_result: dict[str, Any] = result["daily"]
    return daily_result


def missed(sent: list[alerts.Alert]) -> list[alerts.Alert]:
    return [a for a in sent if a.kind == "missed_event"]


def test_sweep_ingests_the_50_of_500_uploads_whose_event_never_came(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, sent = sweeping(make, monkeypatch)
    files = {f"study/{i:03d}.dcm": make_instance() for i in range(480)}
    files.update({f"broken/{i:02d}.dcm": b"not DICOM " * (20 + i) for i in range(10)})
    files.update({f"modality/IM{i:06d}": make_instance() for i in range(10)})  # sniffed
    uploads = p.upload_many(files)
    # Withheld: every tenth upload, so broken and extensionless files are among them.
    withheld = uploads[::10]
    assert len(withheld) == 50 and {u.name.split("/")[0] for u in withheld} == {
        "study",
        "broken",
        "modality",
    }
    delivered = [u for u in uploads if u not in withheld]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(p.deliver, delivered)) == {200}
    p.drain()
    assert len(p.outcomes()) == 450

    swept = daily(p)["sweep"]  # an hour later: the event age has passed
    assert swept["landing"] == 500 and swept["missed"] == 50, swept
    p.drain()
    found = p.outcomes()
    keys = {file_key(u.bucket, u.name, u.generation): u for u in uploads}
    assert set(found) == set(keys)
    statuses = Counter(o.status for o in found.values())
    assert statuses[outcomes.QUARANTINED] == 10
    assert sum(statuses[s] for s in SUCCESS) == 490, statuses
    assert len(p.stored_sops()) == 490

    (alert,) = missed(sent)
    assert alert.details["count"] == 50
    body = json.dumps(alert.body(), ensure_ascii=False)
    assert not any(u.name in body for u in uploads)  # the count, never the names

    # The next sweep finds nothing and sends nothing.
    again = daily(p)["sweep"]
    assert again["missed"] == 0 and not again["alerted"], again
    assert len(missed(sent)) == 1

    # The withheld events come at last (their time is the upload's): no second record.
    late = [withheld[0], next(u for u in withheld if u.name.startswith("broken/"))]
    client = p.apps["ingest"].test_client()
    for obj in late:
        assert obj.time_created is not None
        assert post(client, finalize_event(obj, obj.time_created)) == 200
    assert not list(p.gcs.list_blobs(p.settings.staging_bucket, prefix=DROPPED_PREFIX))
    assert p.outcomes().keys() == found.keys()
    assert [o.status for o in p.outcomes().values()] == [o.status for o in found.values()]


def test_landing_retention_deletes_verified_uploads_but_never_a_new_generation(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, sent = sweeping(make, monkeypatch)
    files = {f"keep/{i}.dcm": make_instance() for i in range(6)}
    files["bad/x.dcm"] = b"not DICOM " * 30
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.drain()
    landing = p.gcs.bucket(p.landing)

    # A new upload under a verified file's name, delivered as usual.
    again = p.upload("keep/0.dcm", make_instance())
    assert p.deliver(again) == 200
    assert daily(p)["retention"]["deleted"] == 0  # verified less than a day ago

    p.clock.advance(24 * 3600)
    result = daily(p)["retention"]
    assert result == {"batches": 1, "deleted": 5, "waiting": result["waiting"]}
    left = {b.name: b.generation for b in landing.list_blobs()}
    # The quarantined upload stays (for retry), and so does the new generation.
    assert left == {"bad/x.dcm": _generation(uploads, "bad/x.dcm"), "keep/0.dcm": again.generation}
    assert daily(p)["retention"]["deleted"] == 0
    assert not missed(sent)  # every upload had its event


def _generation(uploads: list[Uploaded], name: str) -> int:
    return next(u.generation for u in uploads if u.name == name)


def test_the_sweep_looks_only_between_the_event_age_and_the_copies_expiry(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging copy expires after DICOMFLOW_STAGING_COPY_RETENTION_DAYS (7 here), so an
    older upload would look unrecorded: the sweep leaves uploads older than 6 days alone,
    and those younger than the event age too."""
    p, sent = sweeping(make, monkeypatch)
    from dicomflow import sweep

    p.upload_many({f"lost/{i}.dcm": make_instance() for i in range(3)})
    first = sweep.run_due(p.ctx, p.clock())
    assert first is not None and first["sweep"]["landing"] == 3
    assert first["sweep"]["candidates"] == 0  # within the event age
    p.clock.advance(6 * 24 * 3600)
    late = daily(p)["sweep"]
    assert late["landing"] == 3 and late["candidates"] == 0  # older than 7 days less one
    assert not missed(sent) and not p.outcomes()


def test_a_pass_runs_once_per_period_and_is_taken_over_after_its_lease(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomflow import objects, sweep

    p, sent = sweeping(make, monkeypatch)
    p.clock.now = p.clock.now.replace(minute=0, second=1)  # the start of a period
    now = p.clock()
    period = sweep.period_id(now, 1)
    bucket = p.ctx.storage.bucket(p.settings.staging_bucket)
    # A pass that died: its marker says running, with a lease.
    lease = {"state": "running", "leaseUntil": _iso(now + timedelta(seconds=60)), "attempt": 1}
    assert objects.create(bucket, sweep.marker_name(period), lease)
    assert sweep.run_due(p.ctx, now) is None  # the lease is live
    p.clock.advance(sweep.LEASE_SECONDS)
    taken = sweep.run_due(p.ctx, p.clock())
    assert taken is not None and taken["attempt"] == 2
    assert sweep.run_due(p.ctx, p.clock()) is None  # done for the period
    assert (objects.read_json(bucket, sweep.marker_name(period)) or {})["state"] == "done"
    assert not sent


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
