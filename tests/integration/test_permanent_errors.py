# test_report's fixture new_env is imported by name, and test functions take it as an argument.
# ruff: noqa: F811
"""Permanent errors and foreign events end in a recorded outcome and exactly one alert.

The refusals are real HTTP answers: a fault proxy (``localcloud.faultproxy``) stands
between the functions and Cloud Storage or the Healthcare API and answers chosen
requests with 403, as a changed IAM policy does; the client libraries see them as
they would on Google Cloud. Functions run through functions-framework and alerts are
pulled from the alerts topic (the environment of ``test_report``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from dicomflow import batches, export, feeds, log, objects, staging, stale
from dicomflow.clock import iso
from dicomflow.ops import outcomes, redrive, status
from dicomflow.staging import stuck_name
from localcloud.faultproxy import FaultProxy, FirstOfEach, healthcare_operation, storage_shape
from localcloud.healthcare import HealthcareServer
from localcloud.storage import StorageServer, client
from tests.ingest_support import PATIENT_NAME, finalize_event, make_instance, post, upload
from tests.integration.test_report import (  # noqa: F401  (fixture)
    Env,
    new_env,
    quarantine_close,
)

_clients: list[Any] = []


@pytest.fixture
def storage_proxy(gcs_server: StorageServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(gcs_server.url).start()
    yield proxy
    while _clients:
        _clients.pop().close()
    proxy.stop()


@pytest.fixture
def healthcare_proxy(healthcare_server: HealthcareServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(healthcare_server.url, classify=healthcare_operation).start()
    yield proxy
    proxy.stop()


def alerts_after_close(env: Env, ticks: int = 3) -> list[dict[str, Any]]:
    """The alerts of ``ticks`` report ticks a minute apart, once the windows are closed."""
    env.clock.advance(quarantine_close(env) + 60)
    for _ in range(ticks):
        assert env.report_tick() == 200
        env.clock.advance(60)
    return env.pull()


def through(env: Env, proxy: FaultProxy) -> None:
    """Send the functions' Cloud Storage requests through ``proxy``."""
    env.ctx.storage = client(proxy.url)
    _clients.append(env.ctx.storage)


def ingest_refused(env: Env, proxy: FaultProxy, name: str, operation: str, status: int) -> str:
    """Upload a valid file as ``name`` and ingest it while ``proxy`` answers every
    ``operation`` request with ``status``; the file's outcome as ``status: reason``."""
    obj = env.upload(name, make_instance())
    through(env, proxy)
    proxy.refuse = lambda method, path, op: status if op == operation else None
    env.ingest([obj])
    outcome = env.outcome(obj)
    return f"{outcome.status}: {outcome.reason}"


def in_clear(env: Env, messages: list[dict[str, Any]], *names: str) -> list[str]:
    """Which of ``names`` (and the sample patient name) appear in the alerts' text."""
    text = json.dumps(messages)
    return [n for n in (*names, PATIENT_NAME) if n in text]


def test_a_403_on_the_header_read_is_a_failed_record_and_one_alert(
    new_env: Callable[..., Env], storage_proxy: FaultProxy
) -> None:
    env = new_env()
    name = "Roe^Richard MRN-9999/x.dcm"
    obj = env.upload(name, make_instance())
    through(env, storage_proxy)
    storage_proxy.refuse = lambda method, path, op: (
        403 if op == "objects.download" and (env.landing in path) else None
    )

    # The function acknowledges the event (200): a retry cannot help, the record says why.
    env.ingest([obj], repeats=2)
    outcome = env.outcome(obj)
    assert outcome.status == "failed"
    assert outcome.reason == "permission-denied: HTTP 403 on the header read"
    bucket = env.gcs.bucket(env.staging)
    assert staging.has_record(bucket, outcome.key, outcome.window or "", env.ctx.settings)
    pairs = [(outcome.key, outcome.window or ""), ("0" * 46, outcome.window or "")]
    assert staging.recorded_keys(bucket, env.ctx.settings, pairs) == {outcome.key}
    assert [n.name for n in bucket.list_blobs(prefix="failed/")] == [
        staging.failed_name(outcome.window or "", outcome.key)
    ]

    got = alerts_after_close(env)
    assert [m["body"]["kind"] for m in got] == ["permission_denied"]
    details = got[0]["body"]["details"]
    assert details["files"] == 1 and details["reasons"] == {"permission-denied": 1}
    assert details["samples"] == [env.label(obj)]
    assert got[0]["body"]["severity"] == "ERROR"
    assert in_clear(env, got, name, "Roe^Richard") == []

    # dicomflow status counts it, with its reason; retry re-drives it once read access is back.
    held = status.read_holdings(env.ctx, env.clock())
    section, _ = status.files_section(held)
    assert section["totals"]["failed"] == 1
    assert section["reasons"]["failed"] == {"permission-denied": 1}
    storage_proxy.refuse = None
    found = outcomes.read_all(bucket)
    chosen = redrive.select(found, redrive.retried_keys(bucket))
    assert [o.key for o in chosen] == [outcome.key]
    result = redrive.redrive(env.ctx, chosen[0])
    assert (result.result, result.status) == (redrive.RESTAGED, "staged")
    assert outcomes.read_all(bucket)[result.retry_key or ""].status == "staged"
    section, _ = status.files_section(status.read_holdings(env.ctx, env.clock()))
    assert section["totals"]["failed"] == 0 and section["retried"] == 1


def test_a_403_on_qido_raises_verification_stuck_once(
    new_env: Callable[..., Env], healthcare_proxy: FaultProxy
) -> None:
    env = new_env(
        DICOMFLOW_HEALTHCARE_ENDPOINT=healthcare_proxy.url,
        DICOMFLOW_VERIFY_STUCK_MINUTES="20",
    )
    study = "1.2.826.0.1.3680043.8.498.99"
    stream = io.StringIO()
    log.configure(logging.INFO, stream)  # as the functions run
    files = [env.upload(f"s/{i}.dcm", make_instance(study=study)) for i in range(2)]
    env.ingest(files)
    env.clock.advance(
        env.ctx.settings.batch_window_seconds + env.ctx.settings.seal_grace_seconds + 1
    )
    env.ingest_tick()  # seal, note (one QIDO) and import
    bucket = env.gcs.bucket(env.staging)
    [batch] = batches.open_batches(bucket)
    healthcare_proxy.refuse = lambda method, path, op: 403 if op == "dicomWeb.search" else None

    # Poll until the import is done and the first verification meets the 403.
    for _ in range(100):
        assert env.report_tick() == 200  # a 403 is not raised to the platform
        if bucket.blob(stuck_name(batch)).exists():
            break
    assert bucket.blob(stuck_name(batch)).exists()
    assert env.pull() == []
    for _ in range(3):  # past the threshold: one alert, however many ticks follow
        env.clock.advance(10 * 60)
        assert env.report_tick() == 200
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["verification_stuck"]
    details = got[0]["body"]["details"]
    assert details["batch"] == batch and details["httpStatus"] == 403
    assert details["thresholdMinutes"] == 20 and details["stuckMinutes"] >= 20
    assert study not in json.dumps(got)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r for r in lines if study in json.dumps(r)] == []
    failing = [r for r in lines if r["message"] == "batch check failed"]
    assert failing and {(r["batch"], r["httpStatus"]) for r in failing} == {(batch, 403)}
    assert {f.key for f in batches.batch_records(bucket, batch)} == {
        staging.file_key(f.bucket, f.name, f.generation) for f in files
    }
    assert all(env.status(f) == "staged" for f in files)
    [shown] = status.list_batches(env.ctx, env.clock(), None)
    assert (shown["batch"], shown["state"], shown["verifyHttpStatus"]) == (
        batch,
        "verifying",
        403,
    )

    # Access back: the batch is verified and nothing else is alerted.
    healthcare_proxy.refuse = None
    env.clock.advance(60)
    assert env.report_tick() == 200
    assert [env.status(f) for f in files] == ["imported", "imported"]
    assert not bucket.blob(stuck_name(batch)).exists()
    assert env.pull() == []


def test_an_event_from_another_bucket_is_dropped_with_one_alert(
    new_env: Callable[..., Env], storage_proxy: FaultProxy
) -> None:
    env = new_env()
    backups = env.ctx.settings.backup_bucket
    name = "Roe^Richard/x.dcm"
    obj = upload(env.gcs, backups, name, make_instance(), created=env.clock())
    # The pipeline's own objects elsewhere are skipped unrecorded (no loop on its records).
    own = upload(env.gcs, env.staging, "state/x.dcm", b"{}", created=env.clock())
    through(env, storage_proxy)
    # Nothing may touch the foreign bucket: any request to it would be refused, and counted.
    storage_proxy.refuse = lambda method, path, op: 403 if backups in path else None
    ingest_client = env.client("ingest")
    for event in (finalize_event(obj, env.clock()), finalize_event(own, env.clock())):
        assert post(ingest_client, event) == 200
    assert post(ingest_client, finalize_event(obj, env.clock(), "again")) == 200
    # The foreign object is not read (nor copied): only the record is written.
    assert storage_proxy.snapshot()["refused"] == {}

    outcome = env.outcome(obj)
    assert (outcome.status, outcome.reason) == ("dropped", "foreign-bucket")
    found = outcomes.read_all(env.gcs.bucket(env.staging))
    assert staging.file_key(own.bucket, own.name, own.generation) not in found
    got = alerts_after_close(env)
    assert [m["body"]["kind"] for m in got] == ["dropped"]
    assert got[0]["body"]["details"]["reasons"] == {"foreign-bucket": 1}
    assert in_clear(env, got, name, "Roe^Richard") == []


def test_a_permanent_refusal_of_the_copy_is_a_failed_record(
    new_env: Callable[..., Env], storage_proxy: FaultProxy
) -> None:
    """A 400 on the copy (not a permission): ``unreadable``, with the step named."""
    env = new_env()
    outcome = ingest_refused(env, storage_proxy, "c/x.dcm", "objects.rewrite", 400)
    assert outcome == "failed: source-unreadable: HTTP 400 on the copy"
    env.clock.advance(quarantine_close(env) + 60)
    assert env.report_tick() == 200
    assert [m["body"]["kind"] for m in env.pull()] == ["unreadable"]
    assert feeds.failure_kind("permission-denied") == "permission_denied"


# --- writes that took effect but whose answer was lost ------------------------------------------


def test_a_lost_answer_at_each_step_loses_no_file_and_raises_no_false_alert(
    new_env: Callable[..., Env], gcs_server: StorageServer
) -> None:
    """The first write of each kind of object (staging copies, seal markers, file lists,
    import intents and records, manifests, alert markers ...) takes effect and its
    answer is lost (503); the client's retry meets its own write. Every file still ends in
    its one outcome, and the only alert is the one the broken file explains."""
    env = new_env()
    proxy = FaultProxy(gcs_server.url, area=storage_shape).start()
    first_of_each = FirstOfEach()

    try:
        study = "1.2.826.0.1.3680043.8.498.77"
        good = [env.upload(f"g/{i}.dcm", make_instance(study=study)) for i in range(4)]
        broken = env.upload("g/broken.dcm", b"not dicom" * 50)
        through(env, proxy)
        proxy.lose = first_of_each
        env.ingest([*good, broken], repeats=2)
        env.import_all()
        env.clock.advance(quarantine_close(env) + 60)
        for _ in range(2):
            assert env.report_tick() == 200
            env.clock.advance(60)
        got = env.pull()
        proxy.lose = None
        assert [env.status(f) for f in good] == ["imported"] * 4
        assert env.status(broken) == "quarantined"
        assert [m["body"]["kind"] for m in got] == ["quarantined"]
    finally:
        proxy.lose = None
        while _clients:
            _clients.pop().close()
        proxy.stop()
    # Each step's first write lost its answer: ingest's copy, the seal (its marker, the
    # file list, the queue record, its last step), the import (note, intent, slot,
    # operation record), the verification (manifests, summary) and the alert's marker.
    for step in (
        ("objects.rewrite", "batches/<w>/<id>.dcm"),
        ("objects.rewrite", "quarantine/<w>/<id>.dcm"),
        ("objects.insert", "state/sealed/<w>.json"),
        ("objects.insert", "batches/<w>/_files.ndjson"),
        ("objects.insert", "state/open/<w>.json"),
        ("objects.insert", "state/sealed/<w>.done"),
        ("objects.insert", "state/batch/<w>/note.json"),
        ("objects.insert", "state/batch/<w>/intent.json"),
        ("objects.insert", "state/slots/000.json"),
        ("objects.insert", "state/batch/<w>/operation.json"),
        ("objects.insert", "manifests/<w>/success.ndjson"),
        ("objects.insert", "manifests/<w>/summary.json"),
        ("objects.delete", "state/open/<w>.json"),
        ("objects.insert", "state/alerts/<id>.json"),
    ):
        assert step in first_of_each.lost, (step, first_of_each.lost)


def test_a_window_left_unsealed_past_the_bound_raises_stale_state_once(
    new_env: Callable[..., Env],
) -> None:
    """The ingest tick stops (no seal): the report names the oldest unsealed window, once."""
    env = new_env(DICOMFLOW_STALE_STATE_MINUTES="30")
    env.ingest_tick()  # the seal cursor is written; then ticks stop
    files = [env.upload(f"w/{i}.dcm", make_instance()) for i in range(2)]
    env.ingest(files)
    window = env.outcome(files[0]).window
    assert env.report_tick() == 200
    env.clock.advance(29 * 60)
    assert env.report_tick() == 200
    assert env.pull() == []
    for _ in range(3):
        env.clock.advance(2 * 60)
        assert env.report_tick() == 200
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["stale_state"]
    details = got[0]["body"]["details"]
    assert (details["state"], details["oldest"], details["count"]) == ("window", window, 1)
    assert details["thresholdMinutes"] == 30 and details["oldestAgeMinutes"] > 30
    # Ticks resume: the window is sealed and imported, and nothing more is alerted.
    env.import_all()
    assert [env.status(f) for f in files] == ["imported", "imported"]
    assert env.pull() == []


def test_a_batch_that_never_imports_raises_stale_state_once(
    new_env: Callable[..., Env], healthcare_proxy: FaultProxy
) -> None:
    """Every import call meets 429: the sealed batch waits. Its age counts from its seal."""
    env = new_env(
        DICOMFLOW_HEALTHCARE_ENDPOINT=healthcare_proxy.url,
        DICOMFLOW_STALE_STATE_MINUTES="30",
        DICOMFLOW_BACKLOG_SECONDS="36000",
    )
    healthcare_proxy.refuse = lambda method, path, op: 429 if op == "import" else None
    env.ingest_tick()  # the seal cursor is written
    files = [env.upload(f"b/{i}.dcm", make_instance()) for i in range(2)]
    env.ingest(files)
    env.clock.advance(20 * 60)  # the window is old, but sealed only now
    env.ingest_tick()
    bucket = env.gcs.bucket(env.staging)
    [batch] = batches.open_batches(bucket)
    for minutes in (15, 14, 2, 2):
        env.clock.advance(minutes * 60)
        env.ingest_tick()
        assert env.report_tick() == 200
    got = env.pull()
    assert [(m["body"]["kind"], m["body"]["details"]["state"]) for m in got] == [
        ("stale_state", "batch")
    ]
    assert got[0]["body"]["details"]["oldest"] == batch
    assert healthcare_proxy.snapshot()["refused"]["import"] >= 4


def test_a_foreign_event_older_than_the_maximum_is_recorded_in_the_current_window(
    new_env: Callable[..., Env],
) -> None:
    """Its object's window may be reported long ago: the record goes where it is alerted."""
    env = new_env(DICOMFLOW_MAX_EVENT_AGE_SECONDS="3600")
    created = env.clock() - timedelta(days=2)
    obj = upload(env.gcs, env.ctx.settings.backup_bucket, "x.dcm", make_instance(), created)
    assert post(env.client("ingest"), finalize_event(obj, created)) == 200
    outcome = env.outcome(obj)
    now_window = staging.window_id(env.clock(), env.ctx.settings.batch_window_seconds)
    assert (outcome.status, outcome.reason, outcome.window) == (
        "dropped",
        "foreign-bucket",
        now_window,
    )
    got = alerts_after_close(env)
    assert [(m["body"]["kind"], m["body"]["details"]["window"]) for m in got] == [
        ("dropped", now_window)
    ]


def test_a_refused_sniff_leaves_the_decision_to_the_header_read(
    new_env: Callable[..., Env], storage_proxy: FaultProxy
) -> None:
    """A name no glob matches is sniffed; a 403 there cannot tell, so the header read
    meets it too and records the failure (a DICOM file is never skipped unseen)."""
    env = new_env()
    outcome = ingest_refused(env, storage_proxy, "scanner/IM0001", "objects.download", 403)
    assert outcome == "failed: permission-denied: HTTP 403 on the header read"
    assert storage_proxy.snapshot()["refused"] == {"objects.download": 2}


def test_an_export_not_final_past_the_bound_is_a_stale_state(new_env: Callable[..., Env]) -> None:
    """stale.report alone (the tick's export step would settle this made-up export)."""
    env = new_env(DICOMFLOW_STALE_STATE_MINUTES="60")
    bucket = env.gcs.bucket(env.staging)
    claimed = env.clock() - timedelta(minutes=61)
    day = claimed.date()
    objects.create(bucket, export.open_entry_name(day), {"date": day.isoformat(), "attempt": 1})
    marker = {"state": export.RUNNING, "date": day.isoformat(), "attempt": 1}
    objects.create(bucket, export.marker_name(day), {**marker, "firstClaimedAt": iso(claimed)})
    subjects = [stale.report(env.ctx, env.clock(), []) for _ in range(2)]
    assert subjects == [[f"stale/export/{day.isoformat()}"]] * 2
    got = env.pull()
    assert [(m["body"]["kind"], m["body"]["details"]["state"]) for m in got] == [
        ("stale_state", "export")
    ]
    # A final marker is not stale, however old.
    objects.write_text(
        bucket,
        export.marker_name(day),
        objects.dumps({**marker, "state": export.COMPLETE}),
        "application/json",
    )
    assert stale.report(env.ctx, env.clock(), []) == []
