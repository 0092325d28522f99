"""Ingest end to end on the local cloud: fake-gcs-server plus the Healthcare API emulator.

The acceptance tests of issue 4: the burst, crash safety at each stage, the
import cap against the emulator's concurrency quota.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import functions_framework
import pydicom
import pytest
from google.cloud import storage
from pydicom.uid import UID

from dicomflow import batches, healthcare, ingest, ledger, runtime
from dicomflow.config import Settings
from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.storage import StorageServer
from tests.ingest_support import (
    Clock,
    Uploaded,
    finalize_event,
    make_instance,
    make_settings,
    names,
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
def app() -> Any:
    return functions_framework.create_app("ingest", MAIN, "cloudevent")


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
    client: storage.Client
    settings: Settings
    clock: Clock
    app: Any
    ctx: runtime.Context
    dataset: str
    uploads: list[Uploaded] = field(default_factory=list)

    @property
    def landing(self) -> str:
        return self.settings.landing_bucket

    @property
    def staging_bucket(self) -> storage.Bucket:
        return self.client.bucket(self.settings.staging_bucket)

    def deliver(self, obj: Uploaded) -> int:
        return post(self.app.test_client(), finalize_event(obj, self.clock()))

    def tick(self) -> int:
        return post(self.app.test_client(), tick_event(self.clock()))

    def entries(self) -> list[ledger.Entry]:
        return list(ledger.list_entries(self.staging_bucket))

    def pending(self) -> list[str]:
        bucket = self.staging_bucket
        return batches.list_ids(bucket, batches.OPEN_PREFIX) + batches.list_ids(
            bucket, batches.ACTIVE_PREFIX
        )

    def drain(self, max_ticks: int = 60, tick: Callable[[], Any] | None = None) -> int:
        """Tick (a window later each time) until nothing is open or importing; the tick count."""
        for count in range(1, max_ticks + 1):
            self.clock.advance(self.settings.batch_window_seconds + 1)
            if tick is None:
                assert self.tick() == 200
            else:
                tick()
            if not self.pending():
                return count
            time.sleep(0.05)
        raise AssertionError(f"still pending after {max_ticks} ticks: {self.pending()}")

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

    def finished(self) -> list[dict[str, Any]]:
        bucket = self.staging_bucket
        return [
            batches.read_json(bucket, batches.finished_name(b)) or {}
            for b in batches.list_ids(bucket, batches.FINISHED_PREFIX)
        ]


def make_pipeline(gcs: StorageServer, hc: HealthcareServer, app: Any, **extra: str) -> Pipeline:
    client = gcs.client()
    landing, staging = unique("landing"), unique("staging")
    client.create_bucket(landing)
    client.create_bucket(staging)
    dataset_id = unique("ds")
    dataset = f"{PARENT}/datasets/{dataset_id}"
    store = f"{dataset}/dicomStores/store"
    extra.setdefault("DICOMFLOW_SEAL_GRACE_SECONDS", "5")
    settings = make_settings(
        landing,
        staging,
        DICOMFLOW_DICOM_STORE=store,
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
    return Pipeline(client, settings, clock, app, ctx, dataset)


_contexts: list[runtime.Context] = []


@pytest.fixture
def cleanup() -> Iterator[None]:
    """Close the clients a test's Context opened in this thread (no socket left behind)."""
    yield
    runtime.set_context(None)
    while _contexts:
        ctx = _contexts.pop()
        ctx.close_clients()


def upload_many(p: Pipeline, files: dict[str, bytes]) -> list[Uploaded]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda item: upload(p.client, p.landing, *item), files.items()))


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


# ---- the burst ------------------------------------------------------------------------------


@pytest.mark.slow
def test_burst_of_2000_instances_and_the_sample_corpus_delivered_twice(
    gcs_server: StorageServer, hc: HealthcareServer, app: Any, cleanup: None
) -> None:
    started = time.monotonic()
    p = make_pipeline(gcs_server, hc, app, DICOMFLOW_BATCH_MAX_FILES="400")
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
    uploads = upload_many(p, files)
    print(f"\nuploaded {len(files)} files in {time.monotonic() - started:.1f}s")
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

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(deliver, enumerate(deliveries)))
    assert statuses.count(200) == len(deliveries), sorted(set(statuses))
    ingested_at = time.monotonic()
    ticks = p.drain()
    drained_at = time.monotonic()

    entries = {e.source.name: e for e in p.entries()}
    assert set(entries) == {u.name for u in eligible}  # ledger totals match the uploads
    totals = ledger.totals(list(entries.values()))
    assert totals[ledger.STAGED] == len(valid)
    assert totals[ledger.QUARANTINED] == len(eligible) - len(valid)
    assert totals[ledger.STAGED] + totals[ledger.QUARANTINED] == len(entries)
    for name, entry in entries.items():
        assert (entry.status == ledger.STAGED) == (name in valid), (name, entry.reason)
        if entry.status == ledger.QUARANTINED:
            assert entry.reason and entry.quarantine
    quarantined = names(p.client, p.settings.staging_bucket, "quarantine/")
    assert len([n for n in quarantined if n.endswith(".json")]) == totals[ledger.QUARANTINED]
    assert len([n for n in quarantined if n.endswith(".dcm")]) == totals[ledger.QUARANTINED]

    # One staging copy per staged file, each in exactly one sealed file list.
    staged = [
        n for n in names(p.client, p.settings.staging_bucket, "batches/") if n.endswith(".dcm")
    ]
    assert sorted(staged) == sorted(e.staged or "" for e in entries.values() if e.staged)
    finished = p.finished()
    listed: list[str] = []
    for record in finished:
        file_list = batches.read_file_list(p.staging_bucket, record["batch"])
        assert file_list is not None
        listed += file_list.keys
    assert sorted(listed) == sorted(e.key for e in entries.values() if e.staged)

    # The only per-file import failures are the corpus's conflicts: files that share
    # UIDs with another file but differ in bytes (report turns these into alerts).
    contents: dict[str, set[bytes]] = {}
    for name in valid:
        contents.setdefault(expected[name] or "", set()).add(files[name])
    conflicts = sum(len(c) - 1 for c in contents.values())
    failures = sum(int((r.get("counter") or {}).get("failure", 0)) for r in finished)
    assert failures == conflicts
    assert (
        sum(int((r.get("counter") or {}).get("success", 0)) for r in finished)
        == len(valid) - conflicts
    )

    # The store holds every valid instance exactly once.
    stored = p.stored_sops()
    assert len(stored) == len(set(stored))
    assert set(stored) == {expected[n] for n in valid}

    # Few, large imports: one per batch, far fewer than files.
    operations = p.import_operations()
    assert len(operations) == len(finished)
    assert len(operations) <= len(files) // 100
    print(
        f"\nburst: {len(files)} files ({len(eligible)} eligible, {len(valid)} valid), "
        f"{len(deliveries)} deliveries, {len(finished)} batches, {len(operations)} imports, "
        f"{ticks} ticks, {len(stored)} instances stored, {conflicts} conflicts; ingest "
        f"{ingested_at - started:.1f}s, imports {drained_at - ingested_at:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
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


STAGES: dict[str, tuple[Any, str, Callable[..., bool]]] = {
    "claim": (ledger, "create", lambda *a, **k: True),
    "copy": (ingest, "copy_object", lambda *a, **k: True),
    "seal": (batches, "create_json", lambda bucket, name, data: name.endswith("/_seal.json")),
    "import-call": (healthcare, "start_import", lambda *a, **k: True),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_each_stage_then_replay_loses_nothing(
    gcs_server: StorageServer,
    hc: HealthcareServer,
    app: Any,
    cleanup: None,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    p = make_pipeline(gcs_server, hc, app)
    files = {f"crash/{i}.dcm": make_instance() for i in range(6)}
    uploads = upload_many(p, files)
    target, attribute, when = STAGES[stage]
    hits: list[int] = []
    monkeypatch.setattr(target, attribute, _crash_after(target, attribute, when, hits))

    crashed = 0
    for obj in uploads:  # first delivery; one of them dies at the stage
        try:
            p.deliver(obj)
        except Crash:
            crashed += 1
    for _ in range(3):  # ticks; one of them may die at the stage
        p.clock.advance(p.settings.batch_window_seconds + p.settings.seal_grace_seconds)
        try:
            p.tick()
        except Crash:
            crashed += 1
    assert crashed == 1 and hits == [1]

    # Replay every event (the platform retries) and let the schedule run on.
    for obj in uploads:
        assert p.deliver(obj) == 200
    p.clock.advance(p.settings.import_restart_seconds)
    p.drain()

    entries = p.entries()
    assert len(entries) == len(uploads)
    assert {e.status for e in entries} == {ledger.STAGED}
    stored = p.stored_sops()
    assert sorted(stored) == sorted({expected_sop(d) or "" for d in files.values()})
    finished = p.finished()
    assert all("error" not in f for f in finished)
    keys: list[str] = []
    for record in finished:
        file_list = batches.read_file_list(p.staging_bucket, record["batch"])
        assert file_list is not None
        keys += file_list.keys
    assert sorted(keys) == sorted(e.key for e in entries)  # each file in one batch
    operations = p.import_operations()
    # Only a crash between the import call and its record can import a batch again.
    extra = 1 if stage == "import-call" else 0
    assert len(operations) == len(finished) + extra


# ---- the import cap ---------------------------------------------------------------------------


def test_cap_absorbs_the_services_429_and_imports_every_batch(
    gcs_server: StorageServer, hc: HealthcareServer, app: Any, cleanup: None
) -> None:
    p = make_pipeline(
        gcs_server, hc, app, DICOMFLOW_BATCH_MAX_FILES="3", DICOMFLOW_MAX_RUNNING_IMPORTS="5"
    )
    files = {f"cap/{i}.dcm": make_instance() for i in range(24)}
    uploads = upload_many(p, files)
    for obj in uploads:
        assert p.deliver(obj) == 200
    set_knobs(hc, max_concurrent_ops=2, operation_latency=0.4)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(ingest.tick(p.ctx)))
    finally:
        set_knobs(hc, max_concurrent_ops=0, operation_latency=0.0)
    assert any(r["throttled"] for r in results)  # the 429s happened...
    assert max(r["running"] for r in results) <= 5
    started = [b for r in results for b in r["started"]]
    assert started == sorted(started)  # sealed batches start in queue order
    finished = p.finished()
    assert len(finished) >= 8
    assert all("error" not in f for f in finished)  # ...and were absorbed
    assert len(p.import_operations()) == len(finished)
    assert sorted(p.stored_sops()) == sorted(expected_sop(d) or "" for d in files.values())


def test_transient_healthcare_errors_are_retried(
    gcs_server: StorageServer, hc: HealthcareServer, app: Any, cleanup: None
) -> None:
    p = make_pipeline(gcs_server, hc, app, DICOMFLOW_BATCH_MAX_FILES="4")
    files = {f"flaky/{i}.dcm": make_instance() for i in range(12)}
    for obj in upload_many(p, files):
        assert p.deliver(obj) == 200
    set_knobs(hc, faults="import=0.5:503,operations.get=0.3:500")
    try:
        p.drain(max_ticks=50)
    finally:
        set_knobs(hc, faults="")
    finished = p.finished()
    assert finished and all("error" not in f for f in finished)
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


def test_at_most_k_imports_run_at_once(
    gcs_server: StorageServer, hc: HealthcareServer, app: Any, cleanup: None
) -> None:
    p = make_pipeline(
        gcs_server, hc, app, DICOMFLOW_BATCH_MAX_FILES="2", DICOMFLOW_MAX_RUNNING_IMPORTS="2"
    )
    files = {f"k/{i}.dcm": make_instance() for i in range(14)}
    for obj in upload_many(p, files):
        assert p.deliver(obj) == 200
    set_knobs(hc, operation_latency=0.3)
    try:
        results: list[dict[str, Any]] = []
        p.drain(max_ticks=200, tick=lambda: results.append(ingest.tick(p.ctx)))
    finally:
        set_knobs(hc, operation_latency=0.0)
    assert max(r["running"] for r in results) <= 2
    assert not any(r["throttled"] for r in results)
    operations = p.import_operations()
    assert len(operations) == len(p.finished()) >= 7
    assert _max_overlap(operations) <= 2  # as the service saw it
    assert sorted(p.stored_sops()) == sorted(expected_sop(d) or "" for d in files.values())
