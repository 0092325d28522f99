"""Ingest end to end on the local cloud: fake-gcs-server plus the Healthcare API emulator.

The burst, crash safety at each stage, overlapping ticks, the import cap against the
emulator's concurrency quota, stragglers, and what an idle tick costs. Outcomes are
read as operators read them (``dicomflow.ops.outcomes``); the report function runs its
ticks too, with alert publishing recorded instead of sent (report's own tests cover
Pub/Sub).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import functions_framework
import pydicom
import pytest
from google.cloud import storage
from pydicom.uid import UID

from dicomflow import alerts, batches, functions, ingest, objects, report, runtime, store
from dicomflow.config import Settings
from dicomflow.events import StorageObject
from dicomflow.ops import outcomes
from dicomflow.staging import SLOTS_PREFIX, file_key, parse_batch, seal_time, window_id
from dicomflow.verify import CONFLICT, SUCCESS
from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.storage import StorageServer
from tests.ingest_support import (
    Clock,
    StorageCalls,
    Uploaded,
    counted_client,
    finalize_event,
    make_instance,
    make_settings,
    post,
    tick_event,
    unique,
    upload,
    value_cut_short,
)

MAIN = str(Path(__file__).resolve().parents[2] / "main.py")
PARENT = "projects/local/locations/us-central1"


class Crash(BaseException):
    """The process dies here (BaseException, so no code under test catches it)."""


@pytest.fixture(scope="module")
def hc(gcs_server: StorageServer) -> Iterator[HealthcareServer]:
    """This module's own emulator, so that its knobs can change freely."""
    server = start_healthcare(storage_endpoint=gcs_server.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    return {
        name: functions_framework.create_app(name, MAIN, "cloudevent")
        for name in ("ingest", "report")
    }


def set_knobs(server: HealthcareServer, **values: object) -> None:
    request = urllib.request.Request(
        f"{server.url}/_emulator/knobs",
        data=json.dumps(values).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        response.read()


@dataclass
class Pipeline:
    gcs: storage.Client  # the test's own client, not counted
    calls: StorageCalls  # the functions' client's requests
    ctx: runtime.Context
    clock: Clock
    apps: dict[str, Any]
    dataset: str
    imports: list[str] = field(default_factory=list)  # import URIs, in call order
    alerts: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def landing(self) -> str:
        return self.settings.landing_bucket

    @property
    def bucket(self) -> storage.Bucket:
        return self.gcs.bucket(self.settings.staging_bucket)

    def upload(self, name: str, data: bytes) -> Uploaded:
        return upload(self.gcs, self.landing, name, data, self.clock())

    def upload_many(self, files: dict[str, bytes]) -> list[Uploaded]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda item: self.upload(*item), files.items()))

    def deliver(self, obj: Uploaded) -> int:
        return post(self.apps["ingest"].test_client(), finalize_event(obj, self.clock()))

    def tick(self) -> None:
        assert post(self.apps["ingest"].test_client(), tick_event(self.clock())) == 200

    def report_tick(self) -> None:
        assert post(self.apps["report"].test_client(), tick_event(self.clock())) == 200

    def outcomes(self) -> dict[str, outcomes.Outcome]:
        return outcomes.read_all(self.bucket)

    def drain(self, max_ticks: int = 60, tick: Callable[[], Any] | None = None) -> int:
        """Tick ingest and report (a window later each time) until every file has a final
        outcome and no batch is open; the number of rounds."""
        for count in range(1, max_ticks + 1):
            self.clock.advance(self.settings.batch_window_seconds + 1)
            if tick is None:
                self.tick()
            else:
                tick()
            self.report_tick()
            if not batches.open_batches(self.bucket) and all(
                o.status in outcomes.FINAL for o in self.outcomes().values()
            ):
                return count
            time.sleep(0.05)  # imports run in the emulator's threads
        raise AssertionError(f"still open after {max_ticks} ticks: {self.open()}")

    def open(self) -> list[str]:
        return batches.open_batches(self.bucket)

    def import_operations(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        api = self.ctx.healthcare().projects().locations().datasets().operations()
        token = None
        while True:
            page = api.list(name=self.dataset, pageToken=token).execute()
            ops += page.get("operations", [])
            token = page.get("nextPageToken")
            if not token:
                break
        return [o for o in ops if "Import" in o.get("metadata", {}).get("apiMethodName", "")]

    def stored_sops(self) -> list[str]:
        found = self.ctx.dicomweb().search_for_instances(limit=50000)
        return [i["00080018"]["Value"][0] for i in found]

    def summaries(self) -> list[dict[str, Any]]:
        return outcomes.summaries(self.bucket)

    def key(self, obj: Uploaded) -> str:
        return file_key(obj.bucket, obj.name, obj.generation)


_contexts: list[runtime.Context] = []


@pytest.fixture
def make(
    gcs_server: StorageServer,
    hc: HealthcareServer,
    apps: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Pipeline]]:
    """A factory of pipelines (own buckets, dataset and store); closes their clients after."""

    def build(**extra: str) -> Pipeline:
        client, calls = counted_client(gcs_server.url)
        landing, staging_bucket = unique("landing"), unique("staging")
        test_client = gcs_server.client()
        test_client.create_bucket(landing)
        test_client.create_bucket(staging_bucket)
        dataset_id = unique("ds")
        dataset = f"{PARENT}/datasets/{dataset_id}"
        extra.setdefault("DICOMFLOW_SEAL_GRACE_SECONDS", "5")
        settings = make_settings(
            landing,
            staging_bucket,
            DICOMFLOW_DICOM_STORE=f"{dataset}/dicomStores/store",
            DICOMFLOW_HEALTHCARE_ENDPOINT=hc.url,
            **extra,
        )
        clock = Clock()
        ctx = runtime.Context(settings=settings, storage=client, clock=clock)
        datasets = ctx.healthcare().projects().locations().datasets()
        datasets.create(parent=PARENT, datasetId=dataset_id, body={}).execute()
        datasets.dicomStores().create(parent=dataset, dicomStoreId="store", body={}).execute()
        runtime.set_context(ctx)
        _contexts.append(ctx)
        p = Pipeline(test_client, calls, ctx, clock, apps, dataset)
        start_import = store.start_import

        def recording(c: runtime.Context, uri: str, *args: Any) -> dict[str, Any]:
            p.imports.append(uri)
            return start_import(c, uri, *args)

        def published(c: Any, alert: alerts.Alert, **kwargs: Any) -> bool:
            p.alerts.append(alert.kind)
            return True

        monkeypatch.setattr(store, "start_import", recording)
        monkeypatch.setattr(alerts, "publish_once", published)
        calls.reset()
        return p

    yield build
    runtime.set_context(None)
    while _contexts:
        _contexts.pop().close_clients()


# ---- an oracle for validity, independent of dicomflow.header --------------------------------


def expected_sop(data: bytes) -> str | None:
    """The SOP Instance UID if a full pydicom read finds an acceptable file, else None."""
    if data[128:132] != b"DICM":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(BytesIO(data))
        except Exception:
            return None
        if value_cut_short(ds):
            return None
        if not str(ds.file_meta.get("TransferSyntaxUID", "") or ""):
            return None
        values = []
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = str(getattr(ds, keyword, "") or "").strip()
            if not value or not UID(value).is_valid:
                return None
            values.append(value)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        photometric = str(getattr(ds, "PhotometricInterpretation", ""))
        if "PixelData" in ds and not syntax.is_compressed and "422" not in photometric:
            try:
                frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            except ValueError:
                frames = 1
            expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * frames * ds.BitsAllocated // 8
            if len(ds.PixelData) < expected:
                return None  # truncated
    return values[2]


def corpus() -> dict[str, bytes]:
    """The real sample files shipped by pydicom and pydicom-data, with their own names."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec and spec.origin:
        roots.append(Path(spec.origin).parent / "data")
    files = {}
    for root in roots:
        for path in sorted(root.iterdir()):
            if path.is_file():
                files[f"corpus/{root.parent.name}/{path.name}"] = path.read_bytes()
    return files


def check_one_outcome_each(p: Pipeline, uploads: list[Uploaded]) -> dict[str, outcomes.Outcome]:
    """Every upload has exactly one final outcome, and nothing else has one."""
    found = p.outcomes()
    assert sorted(found) == sorted({p.key(u) for u in uploads})
    assert all(o.status in outcomes.FINAL for o in found.values())
    listed: Counter[str] = Counter()
    for summary in p.summaries():
        window, bits = parse_batch(summary["batch"])
        keys = [r.key for r in batches.read_files(p.bucket, window) or []]
        listed.update(k for k in keys if k.startswith(bits))
    assert max(listed.values(), default=1) == 1  # no file in two batches
    return found


# ---- the burst ------------------------------------------------------------------------------


@pytest.mark.slow
def test_burst_of_2000_instances_and_the_sample_corpus_delivered_twice(
    make: Callable[..., Pipeline],
) -> None:
    started = time.monotonic()
    p = make(DICOMFLOW_BATCH_MAX_FILES="400")
    files: dict[str, bytes] = {}
    for study in range(20):
        study_uid = pydicom.uid.generate_uid()
        series_uid = pydicom.uid.generate_uid()
        for i in range(100):
            files[f"burst/{study:02d}/IM{i:04d}.dcm"] = make_instance(study_uid, series_uid)
    for i in range(10):
        files[f"broken/notdicom{i}.dcm"] = b"%PDF-1.4 not an image " * (i + 10)
        files[f"broken/nouid{i}.dcm"] = make_instance(omit=("SOPInstanceUID",))
        files[f"broken/cut{i}.dcm"] = make_instance()[: 140 + i]
    files.update(corpus())
    uploads = p.upload_many(files)
    uploaded_at = time.monotonic()
    eligible = [u for u in uploads if u.name.lower().endswith(".dcm")]
    expected = {u.name: expected_sop(files[u.name]) for u in eligible}
    valid = {n for n, sop in expected.items() if sop}

    # Every event twice: half of the repeats right behind the first (concurrent in the
    # pool), half at the end; the clock moves on so that several windows are used.
    rng = random.Random(4)
    order = list(uploads)
    rng.shuffle(order)
    deliveries = [u for u in order for _ in range(2)]
    deliveries = deliveries[::2] + deliveries[1::2][: len(order) // 2]
    deliveries[len(order) :] = rng.sample(deliveries[len(order) :], len(deliveries) - len(order))
    deliveries += order[len(order) // 2 :]

    def deliver(index_obj: tuple[int, Uploaded]) -> int:
        index, obj = index_obj
        if index % 1500 == 1499:
            p.clock.advance(30)
        return p.deliver(obj)

    p.calls.reset()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(deliver, enumerate(deliveries)))
    assert statuses.count(200) == len(deliveries), sorted(set(statuses))
    ingest_calls = p.calls.counts(p.calls.taken())
    ingested_at = time.monotonic()
    ticks = p.drain()
    drained_at = time.monotonic()

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
    eligible_deliveries = sum(d.name.lower().endswith(".dcm") for d in deliveries)
    assert ingest_calls["objects.rewrite"] == eligible_deliveries  # one copy per delivery
    print(
        f"\nburst: {len(files)} files ({len(eligible)} eligible, {len(valid)} valid), "
        f"{len(deliveries)} deliveries, ingest calls {dict(ingest_calls)}, "
        f"{len(summaries)} batches, {len(p.imports)} imports, {ticks} ticks, "
        f"{len(stored)} instances stored, {totals}; upload {uploaded_at - started:.1f}s, "
        f"ingest {ingested_at - uploaded_at:.1f}s, "
        f"imports {drained_at - ingested_at:.1f}s, total {time.monotonic() - started:.1f}s"
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
    make: Callable[..., Pipeline], hc: HealthcareServer, monkeypatch: pytest.MonkeyPatch
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

    set_knobs(hc, operation_latency=0.2)
    try:
        p.drain(max_ticks=80, tick=both_ticks)
    finally:
        set_knobs(hc, operation_latency=0.0)
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
    make: Callable[..., Pipeline], hc: HealthcareServer
) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="3", DICOMFLOW_MAX_RUNNING_IMPORTS="5")
    files = {f"cap/{i}.dcm": make_instance() for i in range(24)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    set_knobs(hc, max_concurrent_ops=2, operation_latency=0.4)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(functions.ingest_tick(p.ctx)))
    finally:
        set_knobs(hc, max_concurrent_ops=0, operation_latency=0.0)
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


def test_transient_healthcare_errors_are_retried(
    make: Callable[..., Pipeline], hc: HealthcareServer
) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="4")
    files = {f"flaky/{i}.dcm": make_instance() for i in range(12)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    set_knobs(hc, faults="import=0.5:503,operations.get=0.3:500")
    try:
        p.drain(max_ticks=50)
    finally:
        set_knobs(hc, faults="")
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


def test_at_most_k_imports_run_at_once(make: Callable[..., Pipeline], hc: HealthcareServer) -> None:
    p = make(DICOMFLOW_BATCH_MAX_FILES="2", DICOMFLOW_MAX_RUNNING_IMPORTS="2")
    files = {f"k/{i}.dcm": make_instance() for i in range(14)}
    uploads = p.upload_many(files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    set_knobs(hc, operation_latency=0.3)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(functions.ingest_tick(p.ctx)))
    finally:
        set_knobs(hc, operation_latency=0.0)
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
