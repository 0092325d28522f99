"""Ingest end to end on the local cloud: fake-gcs-server plus the Healthcare API emulator.

The burst (the session's, shared with the report tests: ``tests.integration.burst``),
crash safety at each stage, overlapping ticks, the import cap against the emulator's
concurrency quota, stragglers, and what an idle tick costs. Outcomes are read as
operators read them (``dicomflow.ops.outcomes``); the report function runs its ticks too,
with alert publishing recorded instead of sent (report's own tests cover Pub/Sub).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from io import BytesIO
from typing import Any

import pydicom
import pytest
from google.cloud import storage

from dicomflow import alerts, batches, functions, ingest, objects, report, runtime, store
from dicomflow.events import StorageObject
from dicomflow.ops import outcomes
from dicomflow.staging import SLOTS_PREFIX, parse_batch, seal_time, window_id
from dicomflow.verify import CONFLICT, SUCCESS
from tests.ingest_support import (
    Clock,
    Uploaded,
    finalize_event,
    make_instance,
)
from tests.integration.burst import Burst, check_one_outcome_each, expected_sop
from tests.integration.sites import Pipeline, PipelineFactory


class Crash(BaseException):
    """The process dies here (BaseException, so no code under test catches it)."""


@pytest.fixture
def make(pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Pipeline]:
    """A factory of pipelines (own buckets, dataset and store) on the session's emulators."""

    def build(**extra: str) -> Pipeline:
        p = pipeline(
            Pipeline,
            clock=Clock(),
            counted=True,
            settings={"DICOMFLOW_SEAL_GRACE_SECONDS": "5", **extra},
        )
        start_import = store.start_import

        def recording(c: runtime.Context, uri: str, *args: Any) -> dict[str, Any]:
            p.imports.append(uri)
            return start_import(c, uri, *args)

        def published(c: Any, alert: alerts.Alert, **kwargs: Any) -> bool:
            p.alerts.append(alert.kind)
            return True

        monkeypatch.setattr(store, "start_import", recording)
        monkeypatch.setattr(alerts, "publish_once", published)
        return p

    return build


# ---- the burst ------------------------------------------------------------------------------


@pytest.mark.slow
def test_burst_of_2000_instances_and_the_sample_corpus_delivered_twice(burst: Burst) -> None:
    p, files, deliveries = burst.p, burst.files, burst.deliveries
    assert burst.statuses.count(200) == len(deliveries), sorted(set(burst.statuses))
    eligible = [u for u in burst.uploads if u.name.lower().endswith(".dcm")]
    expected = {u.name: expected_sop(files[u.name]) for u in eligible}
    valid = {n for n, sop in expected.items() if sop}

    found = check_one_outcome_each(p, eligible)
    by_name = {o.record.name: o for o in found.values() if o.record}
    totals = outcomes.totals(found.values())
    assert totals[outcomes.QUARANTINED] == len(eligible) - len(valid)
    for name, outcome in by_name.items():
        if name not in valid:
            assert outcome.status == outcomes.QUARANTINED and outcome.reason, name
    # Per SOP Instance UID: the files that succeeded carry one content (the stored one);
    # every file of that UID with other bytes is a conflict.
    by_sop: dict[str, list[str]] = {}
    for name in valid:
        by_sop.setdefault(expected[name] or "", []).append(name)
    for names in by_sop.values():
        good = {files[n] for n in names if by_name[n].status in SUCCESS}
        assert len(good) == 1, [(n, by_name[n].status) for n in names]
        for n in names:
            assert (by_name[n].status == CONFLICT) == (files[n] not in good), n
    stored = p.stored_sops()
    assert len(stored) == len(set(stored))
    assert set(stored) == set(by_sop)

    # Few, large imports: one per batch, far fewer than files; copies = files.
    summaries = p.summaries()
    assert len(p.import_operations()) == len(p.imports) == len(summaries)
    assert len(summaries) <= len(files) // 100
    assert sum(s["counts"]["total"] for s in summaries) == len(valid)
    ingest_calls = burst.ingest_calls
    eligible_deliveries = sum(d.name.lower().endswith(".dcm") for d in deliveries)
    assert ingest_calls["objects.rewrite"] == eligible_deliveries  # one copy per delivery
    print(
        f"\nburst: {len(files)} files ({len(eligible)} eligible, {len(valid)} valid), "
        f"{len(deliveries)} deliveries, ingest calls {dict(ingest_calls)}, "
        f"{len(summaries)} batches, {len(p.imports)} imports, {burst.ticks} ticks, "
        f"{len(stored)} instances stored, {totals}; healthy round "
        f"{burst.seconds['healthy']:.1f}s, total {burst.seconds['total']:.1f}s"
    )


# ---- crash safety ---------------------------------------------------------------------------


def _crash_after(target: Any, attribute: str, when: Callable[..., bool], hits: list[int]) -> Any:
    original = getattr(target, attribute)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if not hits and when(*args, **kwargs):
            hits.append(1)
            raise Crash(attribute)
        return result

    return wrapper


def _named(part: str) -> Callable[..., bool]:
    return lambda bucket, name, *a, **k: part in name


STAGES: dict[str, tuple[Any, str, Callable[..., bool]]] = {
    "copy": (ingest, "copy_object", lambda *a, **k: True),
    "seal-marker": (objects, "create", _named("state/sealed/")),
    "file-list": (objects, "create_text", _named("/_files.ndjson")),
    "queued": (objects, "create", _named("state/open/")),
    "intent": (objects, "create", _named("/intent.json")),
    "import-call": (store, "start_import", lambda *a, **k: True),
    "manifests": (report, "crashpoint", lambda step: step == "manifests"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_each_stage_then_replay_loses_nothing(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    p = make()
    files = {f"crash/{i}.dcm": make_instance() for i in range(6)}
    uploads = p.upload_many(files)
    target, attribute, when = STAGES[stage]
    hits: list[int] = []
    monkeypatch.setattr(target, attribute, _crash_after(target, attribute, when, hits))

    crashed = 0
    for obj in uploads:  # first delivery; one of them may die at the stage
        try:
            p.deliver(obj)
        except Crash:
            crashed += 1
    for _ in range(4):  # ticks; one of them may die at the stage
        p.clock.advance(p.settings.batch_window_seconds + p.settings.seal_grace_seconds)
        for tick in (p.tick, p.report_tick):
            try:
                tick()
            except Crash:
                crashed += 1
        time.sleep(0.05)
    assert crashed == 1 and hits == [1]

    # Replay every event (the platform retries) and let the schedule run on.
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.clock.advance(p.settings.import_restart_seconds)
    p.drain()

    found = check_one_outcome_each(p, uploads)
    assert {o.status for o in found.values()} == {"imported"}
    assert sorted(p.stored_sops()) == sorted(expected_sop(d) or "" for d in files.values())
    # Only a crash between the import call and its record can import a batch again.
    extra = 1 if stage == "import-call" else 0
    assert len(p.import_operations()) == len(p.summaries()) + extra
    assert p.alerts == []  # no false alert


# ---- overlapping ticks, the import cap ----------------------------------------------------


def _slots_held(p: Pipeline) -> int:
    return len(objects.names(p.bucket, SLOTS_PREFIX))


def test_two_overlapping_ticks_start_one_import_per_batch_and_at_most_k(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="2", DICOMFLOW_MAX_RUNNING_IMPORTS="2")
    uploads = p.upload_many({f"two/{i}.dcm": make_instance() for i in range(12)})
    for obj in uploads:
        assert p.deliver(obj) == 200
    held: list[int] = []
    start_import = store.start_import

    def counting(c: runtime.Context, uri: str, *args: Any) -> dict[str, Any]:
        held.append(_slots_held(p))
        return start_import(c, uri, *args)

    monkeypatch.setattr(store, "start_import", counting)

    def both_ticks() -> None:
        barrier = threading.Barrier(2)

        def one() -> None:  # as two instances would: no per-instance lock between them
            barrier.wait()
            try:
                functions.run_ingest_tick(p.ctx)
            finally:
                p.ctx.close_clients()  # the API clients this pool thread made

        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(one), pool.submit(one)]:
                future.result()

    p.knobs(operation_latency=0.2)
    try:
        p.drain(max_ticks=80, tick=both_ticks)
    finally:
        p.knobs(operation_latency=0.0)
    found = check_one_outcome_each(p, uploads)
    assert {o.status for o in found.values()} == {"imported"}
    batch_ids = sorted(s["batch"] for s in p.summaries())
    assert len(batch_ids) >= 3
    uris = [s["importUri"] for s in p.summaries()]
    assert sorted(p.imports) == sorted(uris)  # exactly one import call per batch
    assert len(p.import_operations()) == len(batch_ids)
    assert max(held) <= 2
    assert _max_overlap(p.import_operations()) <= 2  # as the service saw it


def test_the_cap_absorbs_the_services_429_and_imports_every_batch(
    make: Callable[..., Pipeline],
) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="3", DICOMFLOW_MAX_RUNNING_IMPORTS="5")
    files = {f"cap/{i}.dcm": make_instance() for i in range(24)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.knobs(max_concurrent_ops=2, operation_latency=0.4)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(functions.ingest_tick(p.ctx)))
    finally:
        p.knobs(max_concurrent_ops=0, operation_latency=0.0)
    assert any(r["throttled"] for r in results)  # the 429s happened...
    assert max(r["running"] for r in results) <= 5
    started = [b for r in results for b in r["started"]]
    assert started == sorted(started)  # sealed batches start in queue order
    summaries = p.summaries()
    assert len(summaries) >= 8
    assert all(s["operation"]["error"] is None for s in summaries)  # ...and were absorbed
    assert len(p.import_operations()) == len(summaries)
    check_one_outcome_each(p, uploads)
    assert sorted(p.stored_sops()) == sorted(expected_sop(d) or "" for d in files.values())


def test_transient_healthcare_errors_are_retried(make: Callable[..., Pipeline]) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="4")
    files = {f"flaky/{i}.dcm": make_instance() for i in range(12)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.knobs(faults="import=0.5:503,operations.get=0.3:500")
    try:
        p.drain(max_ticks=50)
    finally:
        p.knobs(faults="")
    summaries = p.summaries()
    assert summaries and all(s["operation"]["error"] is None for s in summaries)
    found = check_one_outcome_each(p, uploads)
    assert {o.status for o in found.values()} == {"imported"}
    assert sorted(p.stored_sops()) == sorted(expected_sop(d) or "" for d in files.values())


def _max_overlap(operations: list[dict[str, Any]]) -> int:
    events = []
    for op in operations:
        meta = op["metadata"]
        events += [(meta["createTime"], 1), (meta["endTime"], -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_at_most_k_imports_run_at_once(make: Callable[..., Pipeline]) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="2", DICOMFLOW_MAX_RUNNING_IMPORTS="2")
    files = {f"k/{i}.dcm": make_instance() for i in range(14)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.knobs(operation_latency=0.3)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(functions.ingest_tick(p.ctx)))
    finally:
        p.knobs(operation_latency=0.0)
    assert max(r["running"] for r in results) <= 2
    assert not any(r["throttled"] for r in results)
    operations = p.import_operations()
    assert len(operations) == len(p.summaries()) >= 4
    assert _max_overlap(operations) <= 2  # as the service saw it
    check_one_outcome_each(p, uploads)


# ---- stragglers --------------------------------------------------------------------------------


def test_a_copy_that_lands_after_its_seal_listing_is_restaged_and_ends_once(
    make: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make()
    uploads = p.upload_many({f"s/{i}.dcm": make_instance() for i in range(3)})
    for obj in uploads:
        assert p.deliver(obj) == 200
    window = window_id(p.clock(), p.settings.batch_window_seconds)
    straggler = p.upload("s/straggler.dcm", make_instance())
    began = p.clock()  # its delivery began in time; its copy lands after the listing
    original = objects.blobs

    def listing_then_copy(bucket: storage.Bucket, prefix: str, *args: Any) -> Any:
        found = original(bucket, prefix, *args)
        if prefix == f"batches/{window}/" and not straggled:
            straggled.append(stage_as_delivered(p, straggler, began))
        return found

    straggled: list[dict[str, Any]] = []
    monkeypatch.setattr(objects, "blobs", listing_then_copy)
    p.clock.advance(p.settings.batch_window_seconds + p.settings.seal_grace_seconds)
    p.tick()
    monkeypatch.setattr(objects, "blobs", original)
    assert straggled and straggled[0]["window"] == window
    listed = [r.key for r in batches.read_files(p.bucket, window) or []]
    assert p.key(straggler) not in listed and len(listed) == 3

    p.drain()
    found = check_one_outcome_each(p, [*uploads, straggler])
    assert all(o.status in SUCCESS for o in found.values())
    late = found[p.key(straggler)]
    assert late.batch is not None
    later = parse_batch(late.batch)[0]
    assert seal_time(later, p.settings) > seal_time(window, p.settings)
    assert late.record is not None and late.record.via == "restaged"
    first = next(s for s in p.summaries() if s["batch"] == window)
    assert first["restaged"] == 1
    assert straggler.name not in [
        o.record.name for o in found.values() if o.batch == window and o.record
    ]


def stage_as_delivered(p: Pipeline, obj: Uploaded, began: datetime) -> dict[str, Any]:
    """What a delivery that chose its window at ``began`` copies (its UIDs read)."""
    source = StorageObject.from_data(finalize_event(obj, began).data)
    assert source.time_created is not None
    record = ingest.record_of(p.ctx, source, "straggler", source.time_created)
    ds = pydicom.dcmread(BytesIO(p.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes()))
    record = dataclasses.replace(
        record,
        study=str(ds.StudyInstanceUID),
        series=str(ds.SeriesInstanceUID),
        sop=str(ds.SOPInstanceUID),
    )
    blob = p.ctx.storage.bucket(obj.bucket).blob(obj.name, generation=obj.generation)
    return ingest.stage(p.ctx, blob, record, began)


# ---- what a tick costs -----------------------------------------------------------------------


def _idle_tick_calls(p: Pipeline) -> Counter[str]:
    """The Storage calls of an ingest tick a minute after another one, nothing to do."""
    p.tick()
    p.clock.advance(60)
    p.calls.reset()
    p.tick()
    return p.calls.counts(p.calls.taken())


def test_an_idle_tick_costs_the_same_after_0_files_and_after_hundreds(
    make: Callable[..., Pipeline],
) -> None:
    fresh = _idle_tick_calls(make())
    p = make(DICOMFLOW_BATCH_MAX_FILES="100")
    uploads: list[Uploaded] = []
    for window in range(3):  # 300 files over three windows
        uploads += p.upload_many({f"w{window}/{i}.dcm": make_instance() for i in range(100)})
        p.clock.advance(p.settings.batch_window_seconds)
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(p.deliver, uploads)) == {200}
    p.drain()
    check_one_outcome_each(p, uploads)
    p.clock.advance(batches.LOOKBACK_SECONDS + p.settings.batch_window_seconds)
    busy = _idle_tick_calls(p)
    print(f"\nidle ingest tick: {dict(fresh)} (0 files), {dict(busy)} (300 files)")
    assert busy == fresh
    assert sum(fresh.values()) <= 6


# ---- files without an extension (the sniff) ------------------------------------------


def test_extensionless_dicom_is_imported_and_other_files_ignored_one_read_each(
    make: Callable[..., Pipeline],
) -> None:
    p = make()
    dicom = {f"modality/IM{i:06d}": make_instance() for i in range(5)}
    other = {f"modality/NOTES{i}": b"plain text, no preamble " * (16 + i) for i in range(5)}
    uploads = p.upload_many({**dicom, **other})
    p.calls.reset()
    for obj in uploads:
        assert p.deliver(obj) == 200
    sniffs = [
        c
        for c in p.calls.taken()
        if c.operation == "objects.download" and c.headers.get("range") == "bytes=128-131"
    ]
    assert len(sniffs) == 10  # one 4-byte read per extensionless object, DICOM or not
    p.drain()
    found = {o.record.name: o.status for o in p.outcomes().values() if o.record}
    assert found == dict.fromkeys(dicom, "imported")  # the others left no record
    assert len(p.stored_sops()) == 5
