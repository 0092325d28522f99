"""Ingest's finalize path and the seal, through functions-framework against fake-gcs-server.

No Healthcare API here: these stop at staging, quarantine, drop records and sealed
file lists. Storage requests are counted at the function's client (``StorageCalls``).

Times: the test clock starts at 12:53:05 in window ``W0`` (12:53:00-12:54:00), whose
seal is due at 12:54:20 (grace 20 s). A delivery is late when now plus the copy's
deadline (grace / 2 = 10 s) reaches the seal, so from 12:54:10.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from cloudevents.http import CloudEvent
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from pydicom.uid import generate_uid

from dicomflow import alerts, batches, ingest, log, objects, runtime, staging
from dicomflow.config import Settings
from dicomflow.events import StorageObject
from dicomflow.ops import outcomes
from dicomflow.staging import FileRecord, file_key, window_id
from localcloud.storage import StorageServer
from tests.ingest_support import (
    PATIENT_NAME,
    Call,
    Clock,
    StorageCalls,
    Uploaded,
    counted_client,
    finalize_event,
    make_instance,
    make_settings,
    names,
    post,
    unique,
    upload,
)

W0, W1, W2 = "20261125T125300Z", "20261125T125400Z", "20261125T125500Z"
# Late windows, as long as the regular ones here (DICOMFLOW_LATE_WINDOW_SECONDS=60).
L1 = "20261125T125400L"


class Crash(BaseException):
    """Stands for the process dying at a chosen line (not caught by the code under test)."""


@pytest.fixture
def app(apps: dict[str, Any]) -> Any:
    """The session's ingest function (see ``apps``)."""
    return apps["ingest"]


@dataclass
class Env:
    gcs: storage.Client  # the test's own client, not counted
    calls: StorageCalls  # the function's client's requests
    ctx: runtime.Context
    clock: Clock
    app: Any

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def landing(self) -> str:
        return self.settings.landing_bucket

    @property
    def staging(self) -> str:
        return self.settings.staging_bucket

    @property
    def bucket(self) -> storage.Bucket:
        return self.gcs.bucket(self.staging)

    def at(self, clock_time: str) -> None:
        """Set the clock to ``HH:MM:SS`` of the test day."""
        hour, minute, second = (int(p) for p in clock_time.split(":"))
        self.clock.now = self.clock.now.replace(hour=hour, minute=minute, second=second)

    def upload(self, name: str, data: bytes, created: datetime | None = None) -> Uploaded:
        return upload(self.gcs, self.landing, name, data, created or self.clock())

    def deliver(self, obj: Uploaded, event_id: str | None = None) -> int:
        return post(self.app.test_client(), finalize_event(obj, self.clock(), event_id))

    def key(self, obj: Uploaded) -> str:
        return file_key(obj.bucket, obj.name, obj.generation)

    def staged(self) -> list[str]:
        return [n for n in names(self.gcs, self.staging, "batches/") if n.endswith(".dcm")]

    def record(self, name: str) -> FileRecord:
        blob = self.bucket.get_blob(name)
        assert blob is not None, name
        record = FileRecord.from_blob(blob, name.split("/")[1])
        assert record is not None
        return record

    def outcomes(self) -> dict[str, outcomes.Outcome]:
        return outcomes.read_all(self.bucket)

    def files(self, window: str) -> list[FileRecord] | None:
        return batches.read_files(self.bucket, window)


def make_env(gcs: StorageServer, app: Any, shared: bool = False, **extra: str) -> Env:
    client, calls = counted_client(gcs.url)
    test_client = gcs.client()
    landing = unique("landing")
    staging_bucket = landing if shared else unique("staging")
    for bucket in {landing, staging_bucket}:
        test_client.create_bucket(bucket)
    settings = make_settings(
        landing, staging_bucket, **{"DICOMFLOW_LATE_WINDOW_SECONDS": "60", **extra}
    )
    clock = Clock()
    ctx = runtime.Context(settings=settings, storage=client, clock=clock)
    runtime.set_context(ctx)
    calls.reset()
    return Env(test_client, calls, ctx, clock, app)


@pytest.fixture
def env(gcs_server: StorageServer, app: Any) -> Iterator[Env]:
    yield make_env(gcs_server, app)
    runtime.set_context(None)


def ops(calls: list[Call]) -> list[tuple[str, int]]:
    return [(c.operation, c.status) for c in calls]


# ---- two calls per file ----------------------------------------------------------------------


def test_a_delivery_is_one_ranged_read_and_one_copy(env: Env) -> None:
    obj = env.upload("study/a.dcm", make_instance())
    assert env.deliver(obj) == 200
    read, copy = env.calls.taken()
    assert (read.operation, read.bucket, read.name) == ("objects.download", env.landing, obj.name)
    assert read.headers.get("range", read.headers.get("Range", "")).startswith("bytes=0-")
    assert read.query.get("generation") == [str(obj.generation)]
    target = staging.staged_name(W0, env.key(obj))
    assert (copy.operation, copy.bucket, copy.name, copy.status) == (
        "objects.rewrite",
        env.staging,
        target,
        200,
    )
    assert copy.query["ifGenerationMatch"] == ["0"]
    assert env.staged() == [target]


def test_a_duplicate_delivery_is_the_same_two_calls_and_meets_412(env: Env) -> None:
    obj = env.upload("study/a.dcm", make_instance())
    assert env.deliver(obj, event_id="first") == 200
    env.calls.reset()
    assert env.deliver(obj, event_id="second") == 200
    assert ops(env.calls.taken()) == [("objects.download", 206), ("objects.rewrite", 412)]
    (name,) = env.staged()
    assert env.record(name).event == "first"  # the first copy stands, untouched


def test_twenty_concurrent_deliveries_of_one_object_make_one_copy_and_one_record(
    env: Env,
) -> None:
    obj = env.upload("hot/a.dcm", make_instance())
    barrier = threading.Barrier(20)

    def deliver(i: int) -> int:
        barrier.wait()
        return env.deliver(obj, event_id=f"e{i}")

    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(deliver, range(20))) == {200}
    copies = [c for c in env.calls.taken() if c.operation == "objects.rewrite"]
    assert sorted(c.status for c in copies) == [200] + [412] * 19
    assert env.staged() == [staging.staged_name(W0, env.key(obj))]
    found = env.outcomes()
    assert list(found) == [env.key(obj)]
    assert found[env.key(obj)].status == outcomes.STAGED


def test_each_file_is_staged_once_under_duplicate_and_concurrent_deliveries(env: Env) -> None:
    files = [env.upload(f"study/{i:03d}.dcm", make_instance()) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(env.deliver, [f for f in files for _ in range(3)])) == {200}
    for f in files[:5]:  # and once more, later, with another event id
        assert env.deliver(f, event_id="redelivery") == 200
    counts = env.calls.counts()
    assert counts == {"objects.download": 77, "objects.rewrite": 77}
    staged = env.staged()
    assert sorted(staged) == sorted(staging.staged_name(W0, env.key(f)) for f in files)
    found = env.outcomes()
    assert sorted(found) == sorted(env.key(f) for f in files)
    assert {o.status for o in found.values()} == {outcomes.STAGED}
    source = env.gcs.bucket(env.landing).blob(files[0].name).download_as_bytes()
    copy = env.bucket.blob(staging.staged_name(W0, env.key(files[0])))
    assert copy.download_as_bytes() == source


def test_the_staging_copy_carries_the_file_record(env: Env) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    obj = env.upload("rec/a.dcm", make_instance(study, series, sop))
    assert env.deliver(obj, event_id="ev-1") == 200
    name = staging.staged_name(W0, env.key(obj))
    blob = env.bucket.get_blob(name)
    assert blob is not None and blob.content_type == "application/dicom"
    record = FileRecord.from_blob(blob, W0)
    assert record == FileRecord(
        key=env.key(obj),
        bucket=env.landing,
        name=obj.name,
        generation=str(obj.generation),
        size=obj.size,
        home=W0,
        window=W0,
        event="ev-1",
        md5=obj.md5,
        crc32c=obj.crc32c,
        study=study,
        series=series,
        sop=sop,
    )
    assert record.checksum == f"md5:{obj.md5}"
    assert FileRecord.from_line(record.line()) == record
    assert PATIENT_NAME not in json.dumps(blob.metadata)
    assert "df-window" not in (blob.metadata or {})  # the copy's folder says that


def test_the_window_is_that_of_time_created_else_that_of_the_event(env: Env) -> None:
    created = env.clock() - timedelta(seconds=30)  # 12:52:35, the window before
    early = env.upload("t/early.dcm", make_instance(), created=created)
    assert env.deliver(early) == 200
    plain = env.upload("t/plain.dcm", make_instance())
    plain = dataclasses.replace(plain, time_created=None)
    assert env.deliver(plain) == 200
    assert env.staged() == sorted(
        [
            staging.staged_name("20261125T125200Z", env.key(early)),
            staging.staged_name(W0, env.key(plain)),
        ]
    )


# ---- late deliveries -------------------------------------------------------------------------


def test_a_late_delivery_copies_into_the_late_window_of_its_homes_seal_without_a_claim(
    env: Env,
) -> None:
    obj = env.upload("late/a.dcm", make_instance())
    env.at("12:54:09")  # the last moment a copy into W0 is sure to land before its seal
    on_time = env.upload("late/b.dcm", make_instance(), created=obj.time_created)
    assert env.deliver(on_time) == 200
    assert [c.name for c in env.calls.taken()][1] == staging.staged_name(W0, env.key(on_time))
    env.at("12:54:10")
    assert env.deliver(obj) == 200
    key = env.key(obj)
    # W0 is sealed at 12:54:10; the late window holding that moment is L1. Every late
    # delivery of the object computes the same, so two calls still do it.
    assert [(c.operation, c.name) for c in env.calls.taken()] == [
        ("objects.download", obj.name),
        ("objects.rewrite", staging.staged_name(L1, key)),
    ]
    assert not objects.exists(env.bucket, staging.late_name(key))
    record = env.record(staging.staged_name(L1, key))
    assert (record.home, record.window, record.via) == (W0, L1, "late")
    # With no claim, the record is still found from the key and home window alone.
    assert staging.has_record(env.bucket, key, W0, env.settings)
    assert staging.recorded_keys(env.bucket, env.settings, [(key, W0)]) == {key}
    env.calls.reset()
    env.at("12:54:50")  # a redelivery, still before L1's seal: the same copy, a 412
    assert env.deliver(obj, event_id="again") == 200
    calls = [(c.operation, c.name, c.status) for c in env.calls.taken()]
    assert calls == [
        ("objects.download", obj.name, 206),
        ("objects.rewrite", staging.staged_name(L1, key), 412),
    ]


def test_a_delivery_after_the_late_window_is_sealed_claims_the_current_one(env: Env) -> None:
    obj = env.upload("late/a.dcm", make_instance())
    env.at("12:56:00")  # W0 and L1 are both past their seals
    assert env.deliver(obj, event_id="first") == 200
    key = env.key(obj)
    claim = objects.read_json(env.bucket, staging.late_name(key))
    current = "20261125T125600L"
    assert claim is not None and claim["window"] == current
    record = env.record(staging.staged_name(current, key))
    assert (record.home, record.window, record.via) == (W0, current, "claimed")
    # Sealed at 12:57:10 with the file; a later redelivery finds it listed and copies nothing.
    env.at("12:57:20")
    assert batches.seal_due(env.ctx, env.clock()) == [current]
    env.calls.reset()
    env.at("12:58:00")
    assert env.deliver(obj, event_id="second") == 200
    assert not [c for c in env.calls.taken() if c.operation == "objects.rewrite"]
    assert [n for n in env.staged() if key in n] == [staging.staged_name(current, key)]


def test_the_later_seal_drops_a_late_copy_whose_home_list_holds_the_key(env: Env) -> None:
    obj = env.upload("late/a.dcm", make_instance())
    other = env.upload("late/b.dcm", make_instance(), created=env.clock().replace(minute=54))
    assert env.deliver(obj, event_id="on-time") == 200
    env.at("12:54:15")
    assert env.deliver(obj, event_id="late") == 200  # a redelivery, after W0's copy landed
    assert env.deliver(other) == 200
    key = env.key(obj)
    assert env.staged() == sorted(
        [
            staging.staged_name(W0, key),
            staging.staged_name(L1, key),
            staging.staged_name(W1, env.key(other)),
        ]
    )
    env.at("12:55:20")
    # L1 is sealed too, with an empty list: its only copy was the double.
    assert batches.seal_due(env.ctx, env.clock()) == [W0, W1]
    assert [r.key for r in env.files(W0) or []] == [key]
    assert [r.key for r in env.files(W1) or []] == [env.key(other)]
    assert staging.staged_name(L1, key) not in env.staged()  # the double is gone
    found = env.outcomes()
    assert found[key].window == W0 and len(found) == 2


def test_a_window_whose_first_copy_lands_while_ticks_stop_is_still_sealed(env: Env) -> None:
    """The seal lists windows from the last tick's floor: a late window that got its
    first copy after a tick, and started before the next tick's own floor, is found."""
    assert batches.seal_due(env.ctx, env.clock()) == []  # 12:53:05
    obj = env.upload("gap/a.dcm", make_instance())
    env.at("12:54:30")
    assert env.deliver(obj) == 200  # into L1
    env.at("13:30:00")  # no tick for half an hour
    assert batches.seal_due(env.ctx, env.clock()) == [L1]
    assert [r.key for r in env.files(L1) or []] == [env.key(obj)]


def test_the_first_tick_of_a_deployment_seals_windows_older_than_its_lookback(env: Env) -> None:
    """No tick has run yet (no cursor): uploads from hours ago are sealed, not left behind."""
    obj = env.upload("first/a.dcm", make_instance())
    assert env.deliver(obj) == 200  # 12:53:05, into W0
    assert [n for n in env.staged() if env.key(obj) in n] == [staging.staged_name(W0, env.key(obj))]
    env.at("18:00:00")  # the first ingest tick comes five hours later
    assert batches.seal_due(env.ctx, env.clock()) == [W0]
    assert [r.key for r in env.files(W0) or []] == [env.key(obj)]


def test_a_late_window_that_starts_with_a_cursor_step_is_listed(env: Env) -> None:
    """A late window (``...L``) that starts on a cursor step: the cursor holds a time, not a
    window of one kind, so windows of both kinds that start then sort after it."""
    obj = env.upload("step/a.dcm", make_instance(), created=env.clock().replace(minute=54))
    env.at("12:55:30")  # W1 was sealed at 12:55:10: into the late window holding that, 12:55L
    assert env.deliver(obj) == 200
    late = "20261125T125500L"
    assert [n for n in env.staged() if env.key(obj) in n] == [
        staging.staged_name(late, env.key(obj))
    ]
    env.at("13:01:30")  # the first tick: its floor is 12:55:00, where the late window starts
    assert batches.seal_due(env.ctx, env.clock()) == [late]


def test_the_later_seal_keeps_a_late_copy_whose_home_list_lacks_the_key(env: Env) -> None:
    obj = env.upload("late/a.dcm", make_instance())
    env.at("12:54:15")
    assert env.deliver(obj) == 200
    env.at("12:55:20")
    assert batches.seal_due(env.ctx, env.clock()) == [L1]
    assert env.files(W0) == []  # sealed first, to be sure it lacks the key
    (record,) = env.files(L1) or []
    assert (record.key, record.home, record.window, record.via) == (env.key(obj), W0, L1, "late")
    assert batches.open_batches(env.bucket) == [L1]


def test_a_late_claim_whose_window_is_sealed_sends_the_retry_elsewhere(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = env.upload("late/a.dcm", make_instance())
    neighbour = env.upload("late/b.dcm", make_instance(), created=env.clock().replace(minute=54))
    env.at("12:54:15")
    assert env.deliver(neighbour) == 200
    original = ingest.copy_object

    def crash(*args: Any) -> bool:
        raise Crash

    monkeypatch.setattr(ingest, "copy_object", crash)
    with pytest.raises(Crash):  # chose L1, died before the copy
        env.deliver(obj)
    monkeypatch.setattr(ingest, "copy_object", original)
    env.at("12:55:20")
    assert batches.seal_due(env.ctx, env.clock()) == [W1]  # listed without the file
    env.at("12:55:30")
    assert env.deliver(obj) == 200  # the platform's retry
    (copy,) = [n for n in env.staged() if env.key(obj) in n]
    window = copy.split("/")[1]
    assert not objects.exists(env.bucket, staging.sealed_name(window)), copy


# ---- the seal --------------------------------------------------------------------------------


def _due(env: Env, count: int = 3) -> list[Uploaded]:
    files = [env.upload(f"seal/{i}.dcm", make_instance()) for i in range(count)]
    for f in files:
        assert env.deliver(f) == 200
    env.at("12:54:20")
    env.calls.reset()
    return files


def test_seal_creates_its_marker_then_lists_then_writes_the_file_list(env: Env) -> None:
    _due(env)
    assert batches.seal_due(env.ctx, env.clock()) == [W0]
    steps = [
        (c.operation, c.name)
        for c in env.calls.taken()
        if c.name.startswith((f"batches/{W0}", staging.sealed_name(W0)))
    ]
    marker = ("objects.insert", staging.sealed_name(W0))
    listing = ("objects.list", f"batches/{W0}/")
    written = ("objects.insert", staging.files_name(W0))
    assert marker in steps and listing in steps and written in steps
    assert steps.index(marker) < steps.index(listing) < steps.index(written)


def test_the_file_list_holds_exactly_the_copies_present_at_the_listing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _due(env)
    straggler = env.upload("seal/straggler.dcm", make_instance(), created=files[0].time_created)
    began = env.clock() - timedelta(seconds=30)  # its delivery began in time
    original = objects.blobs

    def listing_then_copy(bucket: storage.Bucket, prefix: str, *args: Any) -> Any:
        found = original(bucket, prefix, *args)
        if prefix == f"batches/{W0}/" and not any(env.key(straggler) in n for n in env.staged()):
            stage_as_delivered(env, straggler, began)
        return found

    monkeypatch.setattr(objects, "blobs", listing_then_copy)
    assert batches.seal_due(env.ctx, env.clock()) == [W0]
    listed = sorted(r.key for r in env.files(W0) or [])
    assert listed == sorted(env.key(f) for f in files)
    assert staging.staged_name(W0, env.key(straggler)) in env.staged()  # re-staged later


def stage_as_delivered(env: Env, obj: Uploaded, began: datetime) -> dict[str, Any]:
    """What a delivery that decided on its window at ``began`` copies (its uids read)."""
    event = finalize_event(obj, began)
    source = StorageObject.from_data(event.data)
    assert source.time_created is not None
    record = ingest.record_of(env.ctx, source, "straggler", source.time_created)
    record = dataclasses.replace(record, study="1.2.3", series="1.2.3.4", sop=generate_uid())
    blob = env.ctx.storage.bucket(obj.bucket).blob(obj.name, generation=obj.generation)
    return ingest.stage(env.ctx, blob, record, began)


def test_sealing_twice_or_in_two_ticks_at_once_gives_one_file_list(env: Env) -> None:
    files = _due(env, 8)
    barrier = threading.Barrier(2)

    def seal() -> list[str]:
        barrier.wait()
        return batches.seal_due(env.ctx, env.clock())

    with ThreadPoolExecutor(2) as pool:
        made = [f.result() for f in [pool.submit(seal), pool.submit(seal)]]
    # One seal made the batch; the other found the window sealed, or made the same one.
    assert sorted(b for m in made for b in m) in ([W0], [W0, W0])
    first = env.bucket.get_blob(staging.files_name(W0))
    assert first is not None
    assert batches.seal(env.ctx, W0, env.clock()) == [W0]
    assert batches.seal_due(env.ctx, env.clock()) == []
    again = env.bucket.get_blob(staging.files_name(W0))
    assert again is not None and again.generation == first.generation
    assert sorted(r.key for r in env.files(W0) or []) == sorted(env.key(f) for f in files)
    assert batches.open_batches(env.bucket) == [W0]


def test_a_window_over_the_cap_is_split_by_key_bits(gcs_server: StorageServer, app: Any) -> None:
    env = make_env(gcs_server, app, DICOMFLOW_BATCH_MAX_FILES="10")
    try:
        files = [env.upload(f"s/{i}.dcm", make_instance()) for i in range(40)]
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(env.deliver, files)) == {200}
        env.at("12:54:20")
        made = batches.seal_due(env.ctx, env.clock())
        keys = sorted(env.key(f) for f in files)
        depth = len(made[0]) - len(W0) - 1
        assert depth >= 2  # 40 files, at most 10 a part
        parts: dict[str, list[str]] = {}
        for batch in made:
            window, bits = staging.parse_batch(batch)
            assert window == W0 and len(bits) == depth and batch == f"{W0}-{bits}"
            queued = objects.read_json(env.bucket, staging.open_name(batch))
            assert queued is not None
            uri = f"gs://{env.staging}/batches/{W0}/{bits}*.dcm"
            assert queued["uri"] == uri == staging.import_uri(env.staging, batch)
            parts[bits] = [k for k in keys if k.startswith(bits)]
            assert 1 <= queued["count"] == len(parts[bits]) <= 10
        assert sorted(k for part in parts.values() for k in part) == keys
        shallower = {k[: depth - 1] for k in keys}
        assert any(sum(k.startswith(b) for k in keys) > 10 for b in shallower)
        assert sorted(r.key for r in env.files(W0) or []) == keys  # one list for the window
    finally:
        runtime.set_context(None)


# ---- bad files, drops, filters ---------------------------------------------------------------


def test_bad_files_go_to_quarantine_with_their_reason(env: Env) -> None:
    bad = {
        "notdicom.dcm": b"this is not a DICOM file at all" * 20,
        "nostudy.dcm": make_instance(omit=("StudyInstanceUID",)),
        "badsop.DCM": make_instance(overrides={"SOPInstanceUID": "1.2.x"}),
        "truncated.dcm": make_instance()[:150],
    }
    uploaded = [env.upload(f"in/{n}", d) for n, d in bad.items()]
    for obj in uploaded:
        assert env.deliver(obj) == 200
        assert env.deliver(obj) == 200
    assert env.staged() == []
    found = {o.record.name: o for o in env.outcomes().values() if o.record}
    assert {o.status for o in found.values()} == {outcomes.QUARANTINED}
    assert (found["in/notdicom.dcm"].reason or "").startswith("not-dicom")
    assert found["in/nostudy.dcm"].reason == "missing-uid: missing StudyInstanceUID"
    assert (found["in/badsop.DCM"].reason or "").startswith("invalid-uid")
    assert (found["in/truncated.dcm"].reason or "").split(":")[0] in {"truncated", "unreadable"}
    stored = names(env.gcs, env.staging, "")
    expected = sorted(staging.quarantine_name(W0, env.key(o)) for o in uploaded)
    assert stored == expected  # nothing else: no staging copy, no marker
    for name in stored:
        blob = env.bucket.get_blob(name)
        assert blob is not None
        record = FileRecord.from_blob(blob, W0)
        assert record is not None and record.reason == found[record.name].reason
        assert PATIENT_NAME not in json.dumps(blob.metadata)
        assert blob.md5_hash == next(o.md5 for o in uploaded if o.name == record.name)


def test_a_damaged_vr_is_quarantined_not_retried(env: Env) -> None:
    """A VR byte of StudyInstanceUID damaged: pydicom raises on reading the value."""
    data = make_instance()
    tag = b"\x20\x00\x0d\x00UI"
    i = data.index(tag)
    data = data[: i + 4] + b"U\xfd" + data[i + 6 :]
    obj = env.upload("p/corrupt.dcm", data)
    assert env.deliver(obj) == 200  # not 500: a retry cannot repair the bytes
    assert env.deliver(obj) == 200
    (outcome,) = env.outcomes().values()
    assert outcome.status == outcomes.QUARANTINED
    assert outcome.reason == "unreadable: header values could not be read (NotImplementedError)"
    assert names(env.gcs, env.staging, "") == [staging.quarantine_name(W0, env.key(obj))]


def test_an_event_too_old_leaves_a_drop_record(env: Env) -> None:
    obj = env.upload("late.dcm", make_instance())
    env.clock.advance(env.settings.max_event_age_seconds + 5)
    event = finalize_event(obj, obj.time_created or env.clock())
    assert post(env.app.test_client(), event) == 200
    assert post(env.app.test_client(), event) == 200
    assert not any(c.bucket == env.landing for c in env.calls.taken())
    (outcome,) = env.outcomes().values()
    assert (outcome.status, outcome.reason) == (outcomes.DROPPED, "event-too-old")
    now = window_id(env.clock(), env.settings.batch_window_seconds)
    assert names(env.gcs, env.staging, "") == sorted(
        [staging.dropped_name(now, env.key(obj)), staging.late_name(env.key(obj))]
    )


def test_a_source_gone_leaves_a_drop_record(env: Env) -> None:
    gone = env.upload("gone/a.dcm", make_instance())
    env.gcs.bucket(env.landing).blob(gone.name).delete()
    replaced = env.upload("gone/b.dcm", make_instance())
    env.upload("gone/b.dcm", make_instance())  # a new generation: the event's is gone
    for obj in (gone, replaced):
        assert env.deliver(obj) == 200
        assert env.deliver(obj) == 200
    found = env.outcomes()
    assert sorted(found) == sorted([env.key(gone), env.key(replaced)])
    assert {(o.status, o.reason) for o in found.values()} == {(outcomes.DROPPED, "source-missing")}
    assert env.staged() == []
    assert names(env.gcs, env.staging, "") == sorted(
        staging.dropped_name(W0, env.key(o)) for o in (gone, replaced)
    )


def test_skipped_objects_leave_no_trace(env: Env) -> None:
    empty = env.upload("empty.dcm", b"")
    other = env.upload("notes.txt", b"hello")
    assert env.deliver(empty) == 200
    assert env.deliver(other) == 200
    assert env.calls.taken() == []
    assert names(env.gcs, env.staging, "") == []


def test_loop_guard_pipeline_prefixes_in_the_landing_bucket(
    gcs_server: StorageServer, app: Any
) -> None:
    env = make_env(gcs_server, app, shared=True)
    try:
        good = env.upload("upload/a.dcm", make_instance())
        bad = env.upload("upload/b.dcm", b"junk" * 100)
        assert env.deliver(good) == 200 and env.deliver(bad) == 200
        before = names(env.gcs, env.landing, "")
        planted = [
            env.upload(f"{p}planted.dcm", make_instance())
            for p in ("batches/x/", "quarantine/w/", "manifests/", "state/")
        ]
        own = [
            Uploaded(env.landing, n, 1, 10, "", None, env.clock())
            for n in before
            if not n.startswith("upload/")
        ]
        assert len(own) == 2
        for obj in planted + own:
            assert env.deliver(obj) == 200
        after = names(env.gcs, env.landing, "")
        assert sorted(set(after) - {p.name for p in planted}) == before
        assert len(env.outcomes()) == 2
    finally:
        runtime.set_context(None)


# ---- errors, logs, large and nasty files -----------------------------------------------------


def test_a_crash_after_the_copy_then_the_retry_acknowledges(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = env.upload("c.dcm", make_instance())
    original = ingest.copy_object

    def copy_then_crash(*args: Any) -> bool:
        original(*args)
        raise Crash

    monkeypatch.setattr(ingest, "copy_object", copy_then_crash)
    with pytest.raises(Crash):
        env.deliver(obj, event_id="first")
    monkeypatch.setattr(ingest, "copy_object", original)
    assert env.deliver(obj, event_id="retry") == 200
    assert env.staged() == [staging.staged_name(W0, env.key(obj))]
    assert env.record(env.staged()[0]).event == "first"


def test_a_storage_error_on_the_copy_is_retried_by_the_platform(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = env.upload("r.dcm", make_instance())

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise api_exceptions.ServiceUnavailable("busy")

    monkeypatch.setattr(storage.Blob, "rewrite", unavailable)
    assert env.deliver(obj) == 500  # raised: the platform redelivers
    monkeypatch.undo()
    assert env.deliver(obj) == 200
    assert env.staged() == [staging.staged_name(W0, env.key(obj))]


def test_logs_never_name_the_object(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Object names can be patient names: every log line names objects by hash and key."""
    stream = io.StringIO()
    log.configure(logging.INFO, stream)  # as the functions run
    good = env.upload("incoming/DOE^JOHN_19700101.dcm", make_instance())
    bad = env.upload("incoming/DOE^JOHN_19700101b.dcm", b"x" * 500)
    text = env.upload("incoming/DOE^JOHN_19700101.txt", b"notes")
    for i, obj in enumerate((good, bad, text, good)):
        assert env.deliver(obj, event_id=f"90000{i}") == 200
    env.at("12:54:15")
    late = env.upload("incoming/DOE^JOHN_19700101d.dcm", make_instance(), created=good.time_created)
    assert env.deliver(late, event_id="900005") == 200
    # Storage errors whose messages quote the request URL, as google-cloud-storage's do:
    # a 403 (the file's failure record) and an unexpected error (retried by the platform).
    failing = env.upload("incoming/DOE^JOHN_19700101c.dcm", make_instance())
    erring = env.upload("incoming/DOE^JOHN_19700101e.dcm", make_instance())
    original = storage.Blob.download_as_bytes

    def forbidden(self: storage.Blob, *args: Any, **kwargs: Any) -> bytes:
        if self.bucket.name == env.landing:
            url = (
                f"GET {env.gcs._connection.API_BASE_URL}/download/storage/v1/b/"
                f"{env.landing}/o/{quote(self.name, safe='')}?alt=media: no access to {self.name}"
            )
            if self.name == erring.name:
                raise RuntimeError(url)
            raise api_exceptions.Forbidden(url)
        result: bytes = original(self, *args, **kwargs)
        return result

    monkeypatch.setattr(storage.Blob, "download_as_bytes", forbidden)
    assert env.deliver(failing, event_id="900009") == 200
    assert env.deliver(erring, event_id="900010") == 500
    monkeypatch.setattr(storage.Blob, "download_as_bytes", original)

    lines = stream.getvalue().splitlines()
    for line in lines:
        for secret in ("DOE", "JOHN", "19700101"):
            assert secret not in line, line
    records = [json.loads(line) for line in lines]
    assert {r["message"] for r in records} >= {
        "staged",
        "quarantined",
        "skipped",
        "failed",
        "ingest failed; the event will be retried",
    }
    label = alerts.object_label(env.settings, env.landing, good.name)
    assert label.startswith("h:")
    assert any(r.get("object") == label and r.get("key") == env.key(good) for r in records)
    staged_late = [r for r in records if r.get("key") == env.key(late)]
    assert [r.get("window") for r in staged_late] == [L1]
    failed = next(r for r in records if r["message"] == "failed")
    assert failed["reason"] == "permission-denied: HTTP 403 on the header read"
    assert failed["key"] == env.key(failing)
    erred = next(r for r in records if r["message"].startswith("ingest failed"))
    assert (erred["errorType"], erred.get("httpStatus")) == ("RuntimeError", None)
    assert any("exception" in r for r in records)  # the platform's log of the 500


def test_header_check_uses_ranged_reads_on_a_50_mb_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_instance(rows=4096, pixel_bytes=50 * 1024 * 1024)
    obj = env.upload("big/ct.dcm", data)
    del data
    for method in ("download_to_file", "download_to_filename", "open"):
        monkeypatch.setattr(
            storage.Blob, method, lambda *a, **k: pytest.fail("whole-file download")
        )
    tracemalloc.start()
    try:
        assert env.deliver(obj) == 200
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    read, copy = env.calls.taken()
    assert read.headers.get("range", read.headers.get("Range")) == "bytes=0-65535"
    assert copy.operation == "objects.rewrite" and copy.status == 200
    assert peak < 8 * 1024 * 1024, peak
    blob = env.bucket.get_blob(staging.staged_name(W0, env.key(obj)))
    assert blob is not None and blob.size == obj.size


def test_nasty_files_under_nasty_names_end_in_their_outcome(env: Env) -> None:
    """The bad-input corpus (small files) under hostile names, through the real ingest path.

    Every name carries NASTY: object names can be patient names, so no log line may
    hold one, whatever characters it has.
    """
    stream = io.StringIO()
    log.configure(logging.INFO, stream)
    good = make_instance()
    preamble = b"\0" * 128 + b"DICM"
    corpus: dict[str, tuple[bytes, tuple[str, str | None]]] = {
        # name: (bytes, (outcome, reason code), or ("skipped", skip reason))
        "in/NASTY*?[a-z]\\x.dcm": (bytes(range(256)) * 12, (outcomes.QUARANTINED, "not-dicom")),
        "../NASTY up.dcm": (preamble + b"\xff" * 64, (outcomes.QUARANTINED, "no-file-meta")),
        "in/../../NASTY\tline.dcm": (good[:300], (outcomes.QUARANTINED, "truncated")),
        "in/**/NASTY\x7f\x1b.dcm": (good[:-1], (outcomes.QUARANTINED, "truncated")),
        "in/NASTY Müller Ωmega 患者\u2028.DCM": (good, (outcomes.STAGED, None)),
        "in/%2e%2e/NASTY.dcm": (b"", ("skipped", "empty")),
        # No glob matches, but the sniff finds DICM at byte 128 (DICOMFLOW_SNIFF, on).
        "in/NASTY.dcm\u0085": (good, (outcomes.STAGED, None)),
        "in/NASTY.txt": (b"plain text, no DICOM preamble" * 10, ("skipped", "pattern")),
    }
    client = env.app.test_client()

    def deliver(data: dict[str, Any]) -> int:
        # The name only in the payload, as the payload is what ingest reads.
        attributes = finalize_event(Uploaded(env.landing, "x", 1, 9, "", None), env.clock())
        return post(client, CloudEvent(attributes.get_attributes(), data))

    # Cloud Storage refuses names with CR or LF (and so does localcloud's storage front).
    for refused in ("in/NASTY\nline.dcm", "in/NASTY\r.dcm"):
        with pytest.raises(api_exceptions.BadRequest):
            env.upload(refused, good)
    for name, (content, _) in corpus.items():
        obj = env.upload(name, content)
        assert deliver(dict(finalize_event(obj, env.clock()).get_data() or {})) == 200
    # Payloads no upload can produce: a lone surrogate (JSON carries it, UTF-8 cannot),
    # a null name, a generation that is not a number.
    payloads: list[dict[str, Any]] = [
        {"bucket": env.landing, "name": "in/NASTY\ud800.dcm", "generation": "1", "size": "9"},
        {"bucket": env.landing, "name": None, "generation": "1", "size": "9"},
        {"bucket": env.landing, "name": "in/NASTY.dcm", "generation": "NASTY", "size": "9"},
    ]
    for payload in payloads:
        assert deliver(payload) == 200

    found = {
        o.record.name: (o.status, o.reason.split(":")[0] if o.reason else None)
        for o in env.outcomes().values()
        if o.record
    }
    expected = {name: outcome for name, (_, outcome) in corpus.items() if outcome[0] != "skipped"}
    assert found == expected
    records = [json.loads(line) for line in stream.getvalue().rstrip("\n").split("\n")]
    for record in records:
        assert "NASTY" not in json.dumps(record, ensure_ascii=False), record
    assert sum(r["message"] == "skipped" for r in records) == 2
    assert sum(r["message"].startswith("permanent error: ") for r in records) == 3
