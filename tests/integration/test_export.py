"""Scheduled exports on the local cloud: one per date, complete or alerted, cheap to settle.

fake-gcs-server, the Healthcare emulator and Pub/Sub (emulator or fallback).
Ticks go through functions-framework as Cloud Scheduler -> Pub/Sub -> Eventarc
would deliver them; report's part (``settle_exports``) is called directly.
Verified batches are seeded as report leaves them: instances in the store,
``manifests/<batch>/success.ndjson`` of file records, ``summary.json`` last, and
``state/open/<batch>.json`` until then.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pydicom
import pytest
from cloudevents.http import CloudEvent
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomflow import (
    backup,
    batches,
    clock,
    export,
    export_plan,
    functions,
    manifests,
    objects,
    operations,
    report,
    restore,
    staging,
    store,
    verify,
)
from dicomflow.events import MESSAGE_PUBLISHED
from dicomflow.ops import status
from localcloud.corpus import sample_files
from localcloud.faultproxy import FaultProxy, FirstOfEach, storage_shape
from localcloud.storage import StorageServer
from localcloud.storage import client as storage_client
from tests.ingest_support import PATIENT_NAME, Clock, make_instance, post
from tests.integration.sites import PipelineFactory, Site

DAY = date(2026, 11, 25)
TICK = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


class Env(Site):
    """A site with the export function's tick, report's part of it, and the backup."""

    def tick(self, publish: datetime, message_id: str | None = None) -> int:
        """Deliver one export tick; the same ``message_id`` is a redelivery."""
        return post(self.apps["export"].test_client(), export_tick(publish, message_id))

    def settle(self, day: date = DAY, timeout: float = 60.0) -> dict[str, Any]:
        """Run report's part until the date's marker is final; the marker."""
        deadline = time.monotonic() + timeout
        while True:
            export.settle_exports(self.ctx, self.clock())
            found = export.read_marker(self.ctx, day)
            assert found is not None
            if found[0]["state"] in export.FINAL_STATES:
                return found[0]
            assert time.monotonic() < deadline, f"export still {found[0]['state']}"
            time.sleep(0.2)

    def objects(self, day: date = DAY) -> dict[str, bytes]:
        folder = backup.dated_folder(self.ctx.settings, day)
        return {
            b.name.removeprefix(folder): b.download_as_bytes()
            for b in self.gcs.list_blobs(self.backups, prefix=folder)
        }

    def manifest(self, day: date = DAY) -> dict[str, Any]:
        return dict(json.loads(self.objects(day)[backup.MANIFEST_NAME]))

    def export_operations(self) -> list[dict[str, Any]]:
        ops = (
            self.ctx.healthcare()
            .projects()
            .locations()
            .datasets()
            .operations()
            .list(name=self.dataset, pageSize=100)
            .execute()
            .get("operations", [])
        )
        return [o for o in ops if "Export" in o.get("metadata", {}).get("apiMethodName", "")]

    def alerts(self) -> list[dict[str, Any]]:
        """New alerts on the topic, acknowledged; also kept in ``received``."""
        return self.pull(100)

    def store_instances(self, files: list[bytes]) -> None:
        client = self.ctx.dicomweb()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datasets = [pydicom.dcmread(io.BytesIO(f)) for f in files]
        client.store_instances(datasets=datasets)


def export_tick(publish: datetime, message_id: str | None = None) -> CloudEvent:
    """A Cloud Scheduler tick as Eventarc delivers it (messagePublished)."""
    published = publish.isoformat().replace("+00:00", "Z")
    message_id = message_id or uuid.uuid4().hex[:16]
    return CloudEvent(
        {
            "type": MESSAGE_PUBLISHED,
            "source": "//pubsub.googleapis.com/projects/local/topics/dicomflow-export",
            "id": message_id,
            "time": published,
        },
        {
            "subscription": "projects/local/subscriptions/dicomflow-export",
            "message": {
                "data": base64.b64encode(b'{"tick":"export"}').decode(),
                "messageId": message_id,
                "publishTime": published,
            },
        },
    )


@pytest.fixture
def make_env(pipeline: PipelineFactory) -> Callable[..., Env]:
    def make(**extra: str) -> Env:
        return pipeline(
            Env,
            clock=Clock(TICK + timedelta(minutes=5)),
            settings={
                "DICOMFLOW_SEAL_GRACE_SECONDS": "1",
                "DICOMFLOW_RESTORE_DRILL_DAYS": "0",  # the drill tests turn it on
                **extra,
            },
        )

    return make


def image(rows: int, columns: int, frames: int = 1, study: str | None = None) -> bytes:
    """A small 8-bit MONOCHROME2 secondary capture with a patient name to look for."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName = PATIENT_NAME
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes((i * 7) % 256 for i in range(rows * columns * frames))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sop_of(data: bytes) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return str(ds.SOPInstanceUID)


def stored_sops(env: Env) -> set[str]:
    return {i["00080018"]["Value"][0] for i in export_plan.qido_instances(env.ctx, [])}


def wait_operation(env: Env, name: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        op = store.get_operation(env.ctx, name)
        if op.get("done"):
            return op
        assert time.monotonic() < deadline
        time.sleep(0.2)


# --- full backup of the pydicom corpus ----------------------------------------------------------


def test_full_backup_of_the_corpus_round_trips_byte_for_byte(make_env: Any) -> None:
    env = make_env()
    sources: dict[str, bytes] = {
        f"corpus/{i:03d}-{p.name}": p.read_bytes() for i, p in enumerate(sample_files())
    }
    bucket = env.gcs.bucket(env.landing)
    for name, data in sources.items():
        bucket.blob(name).upload_from_string(data)
    op = (
        env.ctx.healthcare()
        .projects()
        .locations()
        .datasets()
        .dicomStores()
        .import_(
            name=str(env.ctx.settings.dicom_store),
            body={"gcsSource": {"uri": f"gs://{env.landing}/corpus/**"}},
        )
        .execute()
    )
    wait_operation(env, op["name"], timeout=120)
    in_store = stored_sops(env)
    assert len(in_store) > 50  # the corpus, less its broken and duplicate files

    assert env.tick(TICK) == 200
    marker = env.settle()
    assert marker["state"] == export.COMPLETE, marker.get("problems")

    objects = env.objects()
    dcm = {n: d for n, d in objects.items() if n != backup.MANIFEST_NAME}
    assert all(n.endswith(".dcm") and n.count("/") == 2 for n in dcm)
    # Every stored instance comes back, and each file is identical to an uploaded one.
    assert {sop_of(d) for d in dcm.values()} == in_store
    assert len(dcm) == len(in_store)
    source_hashes = {hashlib.sha256(d).hexdigest() for d in sources.values()}
    assert {hashlib.sha256(d).hexdigest() for d in dcm.values()} <= source_hashes
    for name, data in dcm.items():
        assert name.split("/")[2] == sop_of(data) + ".dcm"

    manifest = env.manifest()
    assert manifest["complete"] is True and manifest["problems"] == []
    assert manifest["dicomStore"] == str(env.ctx.settings.dicom_store)
    assert manifest["mode"] == "full"
    assert manifest["mimeType"] == "application/dicom; transfer-syntax=*"
    assert manifest["date"] == "2026-11-25"
    assert manifest["destination"] == f"gs://{env.backups}/backups/2026-11-25/"
    assert manifest["operation"]["name"] == marker["operation"]
    assert manifest["operation"]["createTime"] and manifest["operation"]["endTime"]
    assert manifest["operation"]["counter"]["success"] == len(in_store)
    assert manifest["expected"] == {"instances": len(in_store), "objects": len(in_store)}
    assert manifest["found"] == {"instances": len(dcm), "objects": len(dcm)}
    assert env.alerts() == []


# --- retried and concurrent ticks ---------------------------------------------------------------


def test_retried_and_concurrent_ticks_start_one_export(make_env: Any) -> None:
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(3)])

    assert env.tick(TICK, "msg-1") == 200
    assert env.tick(TICK, "msg-1") == 200  # the platform redelivers the same message

    def concurrent(n: int) -> int:
        try:
            return int(env.tick(TICK + timedelta(seconds=n), f"msg-c{n}"))
        finally:
            env.ctx.close_clients()

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(concurrent, range(6))) == [200] * 6
    # A late retry after midnight still lands on the tick's date.
    env.clock.advance(24 * 3600)
    assert env.tick(TICK + timedelta(hours=21, minutes=59), "msg-late") == 200

    ops = env.export_operations()
    assert len(ops) == 1
    # Recorded as dicomflow's own, so the report never alerts it as started outside.
    assert operations.is_ours(env.ctx, ops[0]["name"])
    assert export.open_days(env.ctx) == [DAY]
    marker = env.settle()
    assert marker["operation"] == ops[0]["name"]
    assert export.open_days(env.ctx) == []
    assert marker["state"] == export.COMPLETE
    assert env.manifest()["found"] == {"instances": 3, "objects": 3}
    assert env.alerts() == []

    # The next date gets its own export.
    assert env.tick(TICK + timedelta(days=1)) == 200
    assert len(env.export_operations()) == 2


def left_by_a_crash(env: Env, claim: dict[str, Any]) -> None:
    """The marker and open entry of a starter that died after claiming ``claim``."""
    export._open(env.ctx, DAY, int(claim["attempt"]), env.clock())
    assert objects.create(env.gcs.bucket(env.staging), export.marker_name(DAY), claim)


def crashed_start(env: Env, **fields: Any) -> datetime:
    """Two instances stored, and a full export of DAY claimed now by a starter that died
    before the export call (``fields`` added to its claim); when it was claimed."""
    env.store_instances([image(4, 4) for _ in range(2)])
    claimed_at = env.clock()
    claim = export._new_marker(
        env.ctx.settings, DAY, "full", env.ctx.settings.export_mime_type, TICK, claimed_at
    )
    left_by_a_crash(env, {**claim, **fields})
    return claimed_at


def test_start_that_crashed_after_its_claim_is_taken_over_by_the_retry_once(
    make_env: Any,
) -> None:
    env = make_env()
    # Event "msg-crash" claimed the date and died before calling export (its lease runs).
    crashed_start(env, eventId="msg-crash")
    # Its redelivery asks the platform to retry later; another tick of the date does not.
    assert env.tick(TICK, "msg-crash") == 500
    assert env.tick(TICK, "another-tick") == 200
    export.settle_exports(env.ctx, env.clock())
    assert env.export_operations() == []  # a live claim is left alone
    env.clock.advance(export.START_LEASE_SECONDS + 1)
    export.settle_exports(env.ctx, env.clock())  # report's tick never takes it over
    assert env.export_operations() == []
    assert env.tick(TICK, "msg-crash") == 200  # the platform's retry does
    assert env.tick(TICK, "late-retry") == 200  # and a later one does not start another
    assert env.settle()["state"] == export.COMPLETE
    assert len(env.export_operations()) == 1
    assert env.alerts() == []


def test_report_never_starts_an_export_the_next_export_tick_takes_the_dead_start_over(
    make_env: Any,
) -> None:
    """The report function's role has no dicomStores.export: here the emulator refuses
    every export call with 403, as IAM would, while report's tick runs."""
    env = make_env()
    claimed_at = crashed_start(env)
    env.clock.advance(export.STALLED_START_SECONDS + 1)  # lease over, and stuck
    env.knobs(faults="export=1.0:403")
    try:
        for _ in range(2):
            assert report.run_tick(env.ctx)["exports"] == [export.STARTING]
    finally:
        env.knobs(faults="")
    found = export.read_marker(env.ctx, DAY)
    assert found is not None
    assert found[0]["state"] == export.STARTING and "error" not in found[0]  # no call made
    assert [a["body"]["kind"] for a in env.alerts()] == ["stalled"]  # alerted once
    assert env.export_operations() == []
    # The next day's export tick starts its own date and takes the dead start over.
    next_tick = TICK + timedelta(days=1)
    env.clock.now = next_tick + timedelta(minutes=1)
    assert env.tick(next_tick) == 200
    assert len(env.export_operations()) == 2
    marker = env.settle()
    assert marker["state"] == export.COMPLETE and marker["takeovers"] == 1
    assert marker["firstClaimedAt"] == clock.iso(claimed_at)
    assert env.settle(DAY + timedelta(days=1))["state"] == export.COMPLETE
    assert env.alerts() == []


# --- incremental --------------------------------------------------------------------------------


def window_of(env: Env, at: datetime) -> str:
    return staging.window_id(at, env.ctx.settings.batch_window_seconds)


def open_batch(env: Env, batch: str) -> None:
    """A sealed batch not verified yet, as the seal leaves it."""
    bucket = env.gcs.bucket(env.staging)
    objects.create(bucket, staging.open_name(batch), {"batch": batch})


def seed_batch(env: Env, batch: str, files: list[bytes], verified_at: datetime) -> set[str]:
    """Store ``files`` and write ``batch``'s manifests as report does once it verified them:
    success.ndjson, then summary.json (``times.verifiedAt``), then the open record goes.
    Returns the SOP Instance UIDs."""
    env.store_instances(files)
    window, _ = staging.parse_batch(batch)
    results = []
    for i, data in enumerate(files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        name = f"in/{batch}/{i}.dcm"
        record = staging.FileRecord(
            key=staging.file_key(env.landing, name, 1),
            bucket=env.landing,
            name=name,
            generation="1",
            size=len(data),
            home=window,
            window=window,
            study=str(ds.StudyInstanceUID),
            series=str(ds.SeriesInstanceUID),
            sop=str(ds.SOPInstanceUID),
        )
        results.append(verify.FileResult(record, verify.IMPORTED))
    bucket = env.gcs.bucket(env.staging)
    operation = {"operation": f"{env.dataset}/operations/import-{batch}"}
    manifests.write_lists(bucket, batch, operation["operation"], results)
    queued = {"window": window, "uri": staging.import_uri(env.staging, batch)}
    summary = manifests.build_summary(batch, queued, operation, results, 0, verified_at)
    manifests.write_summary(bucket, summary)
    objects.delete(bucket, staging.open_name(batch))
    return {r.record.sop for r in results if r.record.sop}


def test_incremental_exports_exactly_the_newly_verified_instances(make_env: Any) -> None:
    env = make_env(DICOMFLOW_EXPORT_MODE="incremental")
    settings = env.ctx.settings
    day1_at = TICK - timedelta(days=2)
    seed_batch(env, window_of(env, day1_at), [make_instance() for _ in range(5)], day1_at)

    # Day 1: a full backup (by hand, as the CLI does) sets the baseline.
    day1 = (TICK - timedelta(days=1)).date()
    env.clock.now = TICK - timedelta(days=1)
    started = export.start_export(
        env.ctx, day1, mode="full", mime_type=settings.export_mime_type, tick=env.clock()
    )
    assert started["status"] == "started"
    assert env.settle(day1)["state"] == export.COMPLETE

    # 10 more instances are verified during the day, in the two halves of one window.
    during = TICK - timedelta(hours=5)
    window = window_of(env, during)
    new_sops = seed_batch(env, f"{window}-0", [make_instance() for _ in range(6)], during)
    new_sops |= seed_batch(env, f"{window}-1", [make_instance() for _ in range(4)], during)

    env.clock.now = TICK + timedelta(minutes=1)
    assert env.tick(TICK) == 200
    marker = env.settle()
    assert marker["state"] == export.COMPLETE, marker.get("problems")
    assert marker["mode"] == "incremental"
    exported = {n: d for n, d in env.objects().items() if n != backup.MANIFEST_NAME}
    assert {sop_of(d) for d in exported.values()} == new_sops
    assert len(exported) == 10
    paths_name = export_plan.paths_file_name(DAY, 1)
    paths = env.gcs.bucket(env.staging).blob(paths_name).download_as_text()
    assert len(paths.splitlines()) == 10
    manifest = env.manifest()
    assert manifest["complete"] is True
    assert manifest["expected"] == {"instances": 10, "objects": 10}
    assert manifest["resourcePathsGcsUri"] == f"gs://{env.staging}/{paths_name}"

    # Nothing verified since: no export is started, and that is recorded.
    operations_before = len(env.export_operations())
    next_day = TICK + timedelta(days=1)
    env.clock.now = next_day
    assert env.tick(next_day) == 200
    found = export.read_marker(env.ctx, next_day.date())
    assert found is not None and found[0]["state"] == export.EMPTY
    assert len(env.export_operations()) == operations_before
    assert export.open_days(env.ctx) == []
    assert env.alerts() == []


def count_storage_requests(env: Env, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (method, unquoted URL) of every Cloud Storage request made through ``env.gcs``."""
    session = env.gcs._http
    original = session.request
    seen: list[tuple[str, str]] = []

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        seen.append((method, urllib.parse.unquote(url)))
        return original(method, url, *args, **kwargs)

    monkeypatch.setattr(session, "request", request)
    return seen


def object_reads(requests: list[tuple[str, str]], prefix: str) -> list[str]:
    """Names of the objects under ``prefix`` that were downloaded."""
    names = []
    for method, url in requests:
        path = url.split("?", 1)[0]
        if method == "GET" and "/download/" in path and f"/o/{prefix}" in path:
            names.append(path.split("/o/", 1)[1])
    return names


def per_file_requests(requests: list[tuple[str, str]]) -> list[str]:
    """Requests that touch staging copies or quarantine: one object per file."""
    return [
        url
        for _, url in requests
        if any(f"/o/{p}" in url or f"prefix={p}" in url for p in ("batches/", "quarantine/"))
    ]


def test_incremental_reads_the_manifests_verified_since_the_last_export_and_no_file(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(DICOMFLOW_EXPORT_MODE="incremental")
    settings = env.ctx.settings
    requests = count_storage_requests(env, monkeypatch)
    bucket = env.gcs.bucket(env.staging)

    # a: before a full baseline backup (day 1) that holds it.
    at_a = TICK - timedelta(days=2)
    batch_a = window_of(env, at_a)
    seed_batch(env, batch_a, [make_instance() for _ in range(2)], at_a + timedelta(minutes=2))
    day1 = (TICK - timedelta(days=1)).date()
    env.clock.now = TICK - timedelta(days=1)
    export.start_export(
        env.ctx, day1, mode="full", mime_type=settings.export_mime_type, tick=env.clock()
    )
    baseline = env.settle(day1)
    assert baseline["state"] == export.COMPLETE
    # b: during the day. c: verified 22 s after the day-2 tick, before that tick arrives.
    at_b, at_c = TICK - timedelta(hours=23), TICK - timedelta(seconds=40)
    batch_b, batch_c = f"{window_of(env, at_b)}-0", window_of(env, at_c)
    sops_b = seed_batch(env, batch_b, [make_instance() for _ in range(3)], at_b)
    sops_c = seed_batch(
        env, batch_c, [make_instance() for _ in range(2)], TICK + timedelta(seconds=22)
    )
    # d: uploaded two hours before the tick and imported late (a backlog): still open when
    # the day-2 export counts. A window an hour old is not sealed yet (the seal cursor).
    batch_d = f"{window_of(env, TICK - timedelta(hours=2))}-1"
    open_batch(env, batch_d)
    unsealed = window_of(env, TICK - timedelta(hours=1))
    objects.write_text(
        bucket, batches.SEAL_CURSOR, objects.dumps({"window": unsealed}), "application/json"
    )
    assert export_plan.pending_batches(bucket) == [batch_d, unsealed]
    assert batch_a < baseline["scan"]["nextFrom"] < min(batch_b, batch_c, batch_d)

    # The day-2 tick is delivered late.
    env.clock.now = TICK + timedelta(minutes=2)
    first = len(requests)
    assert env.tick(TICK) == 200
    day2_requests = requests[first:]
    # d is verified by a report tick that began 3 min before the day-2 tick, and its
    # summary is written after the export listed manifests/.
    sops_d = seed_batch(
        env, batch_d, [make_instance() for _ in range(2)], TICK - timedelta(minutes=3)
    )

    # Day 2 holds exactly b: not a (in the baseline), not c (verified after the tick),
    # not d (not verified when the export counted).
    marker = env.settle()
    assert marker["state"] == export.COMPLETE, marker.get("problems")
    exported = {n: d for n, d in env.objects().items() if n != backup.MANIFEST_NAME}
    assert {sop_of(d) for d in exported.values()} == sops_b
    assert marker["expected"] == {"instances": 3, "objects": 3}
    assert marker["scan"]["from"] == baseline["scan"]["nextFrom"]
    # No per-file object at all; one GET per summary from the baseline's floor on, one per
    # success list chosen.
    assert per_file_requests(day2_requests) == []
    assert sorted(object_reads(day2_requests, "manifests/")) == sorted(
        [
            staging.success_name(batch_b),
            staging.summary_name(batch_b),
            staging.summary_name(batch_c),
        ]
    )
    # d was pending, with an id older than the margin: the next export lists from it.
    assert marker["scan"]["nextFrom"] == batch_d

    # Day 3 holds exactly c and d.
    day3 = TICK + timedelta(days=1)
    env.clock.now = day3 + timedelta(minutes=1)
    first = len(requests)
    assert env.tick(day3) == 200
    day3_requests = requests[first:]
    marker3 = env.settle(day3.date())
    assert marker3["state"] == export.COMPLETE, marker3.get("problems")
    exported3 = {n: d for n, d in env.objects(day3.date()).items() if n != backup.MANIFEST_NAME}
    assert {sop_of(d) for d in exported3.values()} == sops_c | sops_d
    assert len(exported3) == 4
    assert marker3["since"] == clock.iso(TICK)
    assert per_file_requests(day3_requests) == []
    reads = object_reads(day3_requests, "manifests/")
    # b's summary is below day 2's floor: not even listed.
    assert sorted(reads) == sorted(
        name(batch)
        for batch in (batch_c, batch_d)
        for name in (staging.summary_name, staging.success_name)
    )
    assert env.alerts() == []


# --- what the report tick costs -------------------------------------------------------------------


def test_idle_settle_costs_one_listing_after_1_or_30_days_of_exports(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.store_instances([image(4, 4)])
    assert env.tick(TICK) == 200
    marker = env.settle()
    assert marker["state"] == export.COMPLETE
    assert export.open_days(env.ctx) == []  # a final export leaves no open entry
    requests = count_storage_requests(env, monkeypatch)

    def idle_tick() -> list[tuple[str, str]]:
        first = len(requests)
        assert export.settle_exports(env.ctx, env.clock()) == []
        return requests[first:]

    after_one_day = idle_tick()
    bucket = env.gcs.bucket(env.staging)
    for n in range(1, 30):
        day = DAY - timedelta(days=n)
        objects.create(bucket, export.marker_name(day), {**marker, "date": day.isoformat()})
    assert len(export.list_markers(env.ctx)) == 30
    after_thirty_days = idle_tick()
    assert len(after_one_day) == len(after_thirty_days) == 1
    method, url = after_thirty_days[0]
    assert method == "GET" and f"prefix={export.OPEN_PREFIX}" in url


def test_open_entries_outlive_no_export_and_no_start(make_env: Any) -> None:
    env = make_env()
    env.store_instances([image(4, 4)])
    # A starter wrote its entry and died before claiming the marker.
    export._open(env.ctx, DAY, 1, env.clock())
    assert export.settle_exports(env.ctx, env.clock()) == []
    assert export.open_days(env.ctx) == [DAY]  # it may still be claiming
    env.clock.advance(export.START_LEASE_SECONDS + 1)
    assert export.settle_exports(env.ctx, env.clock()) == []
    assert export.open_days(env.ctx) == []

    # A final marker whose closer died before deleting the entry: the next tick does.
    assert env.tick(TICK) == 200
    assert env.settle()["state"] == export.COMPLETE
    export._open(env.ctx, DAY, 1, env.clock())
    export.settle_exports(env.ctx, env.clock())
    assert export.open_days(env.ctx) == []
    # A forced rerun that has written its entry but not yet claimed the marker keeps it.
    export._open(env.ctx, DAY, 2, env.clock())
    export.settle_exports(env.ctx, env.clock())
    assert export.open_days(env.ctx) == [DAY]


class Killed(BaseException):
    """The function timeout ending an invocation in the middle of a start."""


def test_start_stuck_in_starting_raises_exactly_one_stalled_alert(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    claimed_at = crashed_start(env)
    original = export_plan.plan

    def dies(*args: Any) -> Any:
        raise Killed

    def retry_dies() -> None:
        """The platform's retry of the tick takes the start over, and dies again."""
        with pytest.raises(Killed):
            functions.export(env.ctx, export_tick(TICK, "msg-1"))

    # Every takeover dies at the timeout while counting (a slow store, a huge scan).
    monkeypatch.setattr(export_plan, "plan", dies)
    env.clock.advance(export.START_LEASE_SECONDS + 1)
    retry_dies()
    export.settle_exports(env.ctx, env.clock())
    assert env.alerts() == []  # one lease late: not yet
    env.clock.now = claimed_at + timedelta(seconds=export.STALLED_START_SECONDS - 1)
    retry_dies()
    export.settle_exports(env.ctx, env.clock())
    assert env.alerts() == []
    for _ in range(3):  # past two leases; every retry still dies, report alerts once
        env.clock.advance(export.START_LEASE_SECONDS)
        retry_dies()
        export.settle_exports(env.ctx, env.clock())
    got = env.alerts()
    assert [a["body"]["kind"] for a in got] == ["stalled"]
    alert = got[0]
    assert alert["attributes"]["severity"] == "ERROR"
    assert alert["body"]["subject"].endswith("/exports/2026-11-25/attempt-1/starting")
    details = alert["body"]["details"]
    assert details["date"] == "2026-11-25" and details["attempt"] == 1
    assert details["state"] == export.STARTING
    assert details["firstClaimedAt"] == clock.iso(claimed_at)
    assert details["stuckSeconds"] > export.STALLED_START_SECONDS
    assert details["takeovers"] >= 2
    found = export.read_marker(env.ctx, DAY)
    assert found is not None and found[0]["state"] == export.STARTING
    assert found[0]["firstClaimedAt"] == clock.iso(claimed_at)

    # The store recovers: the next takeover starts the export; no further alert.
    monkeypatch.setattr(export_plan, "plan", original)
    env.clock.advance(export.START_LEASE_SECONDS)
    assert env.tick(TICK, "msg-1") == 200
    assert env.settle()["state"] == export.COMPLETE
    assert len(env.export_operations()) == 1
    assert env.alerts() == []


# --- images -------------------------------------------------------------------------------------


def test_png_export_writes_one_png_per_frame(make_env: Any) -> None:
    env = make_env(DICOMFLOW_EXPORT_MIME_TYPE="image/png")
    files = [image(12, 16, frames=3), image(8, 10), image(20, 6)]
    env.store_instances(files)
    sizes: dict[str, tuple[int, int, int]] = {}
    for data in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            sizes[str(ds.SOPInstanceUID)] = (
                int(ds.Columns),
                int(ds.Rows),
                int(ds.get("NumberOfFrames", 1) or 1),
            )

    assert env.tick(TICK) == 200
    marker = env.settle()
    assert marker["state"] == export.COMPLETE, marker.get("problems")
    pngs = {n: d for n, d in env.objects().items() if n != backup.MANIFEST_NAME}
    assert len(pngs) == 3 + 1 + 1
    per_instance: dict[str, int] = {}
    for name, data in pngs.items():
        assert name.endswith(".png")
        parts = name.split("/")
        sop = parts[2].removesuffix(".png")
        per_instance[sop] = per_instance.get(sop, 0) + 1
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "PNG"
            assert img.size == sizes[sop][:2]
    assert per_instance == {sop: frames for sop, (_, _, frames) in sizes.items()}
    assert env.manifest()["expected"] == {"instances": 3, "objects": 5}


# --- failures -----------------------------------------------------------------------------------


def test_injected_export_fault_raises_exactly_one_alert_and_no_complete_manifest(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(2)])
    monkeypatch.setattr(export, "START_RETRY_SECONDS", 1.0)
    env.knobs(faults="export=1.0:500")
    try:
        assert env.tick(TICK, "msg-1") == 200
        assert env.tick(TICK, "msg-1") == 200  # redelivery
        assert env.tick(TICK + timedelta(seconds=30), "msg-2") == 200  # another tick, same date
        export.settle_exports(env.ctx, env.clock())
        export.settle_exports(env.ctx, env.clock())
    finally:
        env.knobs(faults="")
    got = env.alerts()
    assert [a["body"]["kind"] for a in got] == ["export_failed"]
    alert = got[0]
    assert alert["attributes"]["kind"] == "export_failed"
    assert alert["attributes"]["dicomStore"] == str(env.ctx.settings.dicom_store)
    assert alert["body"]["details"]["date"] == "2026-11-25"
    assert "HTTP 500" in json.dumps(alert["body"]["details"]["problems"])
    assert "Confidential" not in json.dumps(alert)  # the instances' patient name
    manifest = env.manifest()
    assert manifest["complete"] is False
    found = export.read_marker(env.ctx, DAY)
    assert found is not None and found[0]["state"] == export.FAILED
    assert env.export_operations() == []


def test_partial_backup_is_never_complete_and_alerts_once(make_env: Any) -> None:
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(4)])
    assert env.tick(TICK) == 200
    marker = export.read_marker(env.ctx, DAY)
    assert marker is not None
    wait_operation(env, marker[0]["operation"])
    # One exported file goes missing before report looks (a partial backup).
    folder = backup.dated_folder(env.ctx.settings, DAY)
    victim = next(iter(env.gcs.list_blobs(env.backups, prefix=folder)))
    victim.delete()
    assert env.settle()["state"] == export.FAILED
    export.settle_exports(env.ctx, env.clock())
    got = env.alerts()
    assert [a["body"]["kind"] for a in got] == ["export_failed"]
    assert "expected 4 instances, found 3" in got[0]["body"]["details"]["problems"]
    manifest = env.manifest()
    assert manifest["complete"] is False
    assert manifest["found"] == {"instances": 3, "objects": 3}


def test_missing_backup_bucket_fails_the_operation_and_alerts(make_env: Any) -> None:
    env = make_env()
    env.store_instances([image(4, 4)])
    env.gcs.bucket(env.backups).delete()
    assert env.tick(TICK) == 200
    marker = env.settle()
    assert marker["state"] == export.FAILED
    assert any("operation failed" in p for p in marker["problems"])
    assert [a["body"]["kind"] for a in env.alerts()] == ["export_failed"]


# --- command line -------------------------------------------------------------------------------


def test_cli_runs_waits_refuses_a_repeat_and_forces_a_rerun(
    make_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("dicomflow.ops.cli")
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(2)])
    argv = ["export", "--date", "2026-11-20", "--wait", "--json"]
    assert cli.main(argv, make_ctx=lambda: env.ctx) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "complete" and first["attempt"] == 1
    assert first["manifest"] == f"gs://{env.backups}/backups/2026-11-20/_MANIFEST.json"

    assert cli.main(["export", "--date", "2026-11-20", "--json"], make_ctx=lambda: env.ctx) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["status"] == "exists" and again["operation"] == first["operation"]

    assert cli.main([*argv, "--force"], make_ctx=lambda: env.ctx) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["status"] == "complete" and forced["attempt"] == 2
    assert forced["operation"] != first["operation"]
    assert forced["manifest"] == f"gs://{env.backups}/backups/2026-11-20/rerun-2/_MANIFEST.json"
    assert env.manifest(date(2026, 11, 20))["attempt"] == 1  # the first run's, untouched
    assert len(env.export_operations()) == 2


def test_run_command_waits_refuses_a_repeat_and_forces_a_rerun(make_env: Any) -> None:
    """What ``dicomflow export`` calls: the schedule's path, by hand."""
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(2)])
    day = date(2026, 11, 20)
    options: dict[str, Any] = {
        "day": day,
        "mode": "full",
        "mime_type": env.ctx.settings.export_mime_type,
        "poll_seconds": 0.1,
    }
    progress: list[dict[str, Any]] = []
    first = export.run_command(env.ctx, wait=True, on_progress=progress.append, **options)
    assert first["status"] == export.COMPLETE and first["attempt"] == 1
    assert first["problems"] == [] and all(p["state"] == export.RUNNING for p in progress)
    assert export.run_command(env.ctx, **options)["status"] == "exists"
    forced = export.run_command(env.ctx, wait=True, force=True, **options)
    assert forced["status"] == export.COMPLETE and forced["attempt"] == 2
    assert forced["operation"] != first["operation"]
    assert env.manifest(day)["attempt"] == 1
    assert json.loads(env.objects(day)["rerun-2/_MANIFEST.json"])["attempt"] == 2
    assert [operations.is_ours(env.ctx, o["name"]) for o in env.export_operations()] == [True] * 2
    assert export.open_days(env.ctx) == []


def test_vanished_operation_is_settled_as_failed(make_env: Any) -> None:
    env = make_env()
    env.store_instances([image(4, 4)])
    claim = export._new_marker(
        env.ctx.settings, DAY, "full", env.ctx.settings.export_mime_type, TICK, env.clock()
    )
    claim.update(
        state=export.RUNNING,
        operation=f"{env.dataset}/operations/does-not-exist",
        expected={"instances": 1, "objects": 1},
    )
    left_by_a_crash(env, claim)
    marker = env.settle()
    assert marker["state"] == export.FAILED
    assert any("not found" in p for p in marker["problems"])
    assert env.manifest()["complete"] is False
    assert [a["body"]["kind"] for a in env.alerts()] == ["export_failed"]


def wait_options(env: Env) -> dict[str, Any]:
    """``run_command`` options: a full export of DAY, waited for."""
    mime_type = env.ctx.settings.export_mime_type
    return {"day": DAY, "mode": "full", "mime_type": mime_type, "poll_seconds": 0.1, "wait": True}


def test_a_forced_rerun_that_fails_again_raises_its_own_alert(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed attempt is one incident; the next failed attempt of the date is another."""
    env = make_env()
    env.store_instances([image(4, 4)])
    monkeypatch.setattr(export, "START_RETRY_SECONDS", 1.0)
    options = wait_options(env)
    env.knobs(faults="export=1.0:500")
    try:
        first = export.run_command(env.ctx, **options)
        export.settle_exports(env.ctx, env.clock())  # a repeat of the same attempt
        forced = export.run_command(env.ctx, force=True, **options)
    finally:
        env.knobs(faults="")
    assert (first["status"], first["attempt"]) == (export.FAILED, 1)
    assert (forced["status"], forced["attempt"]) == (export.FAILED, 2)
    got = [a["body"] for a in env.alerts()]
    assert [(a["kind"], a["details"]["attempt"]) for a in got] == [
        ("export_failed", 1),
        ("export_failed", 2),
    ]
    assert got[0]["alertId"] != got[1]["alertId"]
    assert got[1]["subject"].endswith("/exports/2026-11-25/attempt-2")


def test_forced_reruns_under_retention_write_their_own_folders_and_restore_takes_the_latest(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the backups bucket's retention policy nothing written can be overwritten:
    each rerun goes to rerun-N/ with its own manifest, the first run stays as it was,
    and a restore takes the latest complete attempt."""
    env = make_env()
    retained = env.gcs.bucket(env.backups)
    retained.retention_period = 3600
    retained.patch()
    monkeypatch.setattr(export, "START_RETRY_SECONDS", 1.0)
    env.store_instances([image(4, 4) for _ in range(2)])
    options = wait_options(env)
    first = export.run_command(env.ctx, **options)
    assert (first["status"], first["attempt"]) == (export.COMPLETE, 1)
    before = {b.name: (b.generation, b.md5_hash) for b in env.gcs.list_blobs(env.backups)}
    assert len(before) == 3  # two instances and the manifest
    folder = backup.dated_folder(env.ctx.settings, DAY)

    env.store_instances([image(4, 4)])
    env.knobs(faults="export=1.0:500")
    try:
        failed = export.run_command(env.ctx, force=True, **options)
    finally:
        env.knobs(faults="")
    assert (failed["status"], failed["attempt"]) == (export.FAILED, 2)
    # The failed rerun leaves the first run in use; its folder now holds rerun-2/, so a
    # whole restore copies the first run's objects instead of importing the folder.
    source = restore.load_backup(env.ctx, DAY)
    assert (source.folder, source.manifest["attempt"], source.nested) == (folder, 1, True)
    assert len(source.objects) == 2
    uri = restore.stage_source(env.ctx, source, source.studies(), "rerun-test")
    assert restore.is_copy(env.ctx, uri) and restore.clean_up(env.ctx, "rerun-test") == 2

    forced = export.run_command(env.ctx, force=True, **options)
    assert (forced["status"], forced["attempt"]) == (export.COMPLETE, 3), forced
    after = {b.name: (b.generation, b.md5_hash) for b in env.gcs.list_blobs(env.backups)}
    assert {n: after[n] for n in before} == before  # nothing of the first run rewritten
    added = sorted(n.removeprefix(folder) for n in set(after) - set(before))
    assert added[0] == "rerun-2/_MANIFEST.json"
    assert len(added) == 5 and all(n.startswith("rerun-3/") for n in added[1:])
    first_manifest = env.manifest()
    assert first_manifest["attempt"] == 1 and first_manifest["found"]["instances"] == 2
    third = json.loads(env.objects()["rerun-3/_MANIFEST.json"])
    assert (third["attempt"], third["complete"], third["found"]["instances"]) == (3, True, 3)
    # The first run's folder still counts as two instances: no rerun is in it.
    assert backup.found_counts(after, folder).instances == 2

    source = restore.load_backup(env.ctx, DAY)
    assert source.folder == f"{folder}rerun-3/" and source.manifest["attempt"] == 3
    assert len(source.objects) == 3 and source.nested is False
    marker = export.read_marker(env.ctx, DAY)
    assert marker is not None
    assert [p["folder"] for p in marker[0]["previous"]] == [folder, f"{folder}rerun-2/"]
    shown = status.exports_section(env.ctx, TICK - timedelta(days=1))
    assert [e["backup"] for e in shown] == [f"gs://{env.backups}/{folder}rerun-3/"]
    assert [a["body"]["details"]["attempt"] for a in env.alerts()] == [2]  # export_failed


def test_lost_answers_of_the_exports_writes_make_one_complete_backup_and_no_alert(
    make_env: Any, gcs_server: StorageServer
) -> None:
    """The first write of each kind (the open entry, the date's marker and its updates,
    the operation's record, the backup's manifest, deletes) takes effect and its answer
    is lost (503): the retry meets the write, and the export is still started once and
    found complete, with no alert."""
    env = make_env()
    env.store_instances([image(4, 4) for _ in range(3)])
    proxy = FaultProxy(gcs_server.url, area=storage_shape).start()
    first_of_each = FirstOfEach()

    direct = env.ctx.storage
    env.ctx.storage = storage_client(proxy.url)
    try:
        proxy.lose = first_of_each
        assert env.tick(TICK) == 200
        marker = env.settle()
        proxy.lose = None
        assert marker["state"] == export.COMPLETE
        assert len(env.export_operations()) == 1
        assert env.manifest()["found"] == {"instances": 3, "objects": 3}
        assert export.open_days(env.ctx) == []
        assert env.alerts() == []
    finally:
        env.ctx.storage.close()
        env.ctx.storage = direct
        proxy.stop()
    for step in (
        ("objects.insert", "state/exports-open/2026-11-25.json"),
        ("objects.insert", "state/exports/2026-11-25.json"),
        ("objects.insert", "backups/2026-11-25/_MANIFEST.json"),
        ("objects.delete", "state/exports-open/2026-11-25.json"),
    ):
        assert step in first_of_each.lost, (step, first_of_each.lost)
    # The record that the operation is dicomflow's own (state/ops/<operation id>.json).
    assert any(n.startswith("state/ops/") for op, n in first_of_each.lost if op == "objects.insert")
