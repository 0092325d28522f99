"""The report function on the local cloud: fake-gcs-server, the Healthcare emulator, Pub/Sub.

Files go through the real ingest function (finalize events, then the tick that
seals and imports), the emulator imports them, and the report function is
driven through functions-framework exactly as Cloud Functions would run it.
Alerts are read back from a pull subscription on the alerts topic.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydicom
import pytest

from dicomflow import (
    alerts,
    batches,
    export,
    functions,
    ingest,
    keys,
    log,
    manifests,
    objects,
    operations,
    report,
    staging,
    store,
    verify,
)
from dicomflow.config import DROPPED_PREFIX
from dicomflow.errors import TransientError
from dicomflow.ops import outcomes
from localcloud.corpus import generate_studies, sample_files
from tests.ingest_support import (
    PATIENT_NAME,
    Uploaded,
    finalize_event,
    make_instance,
    post,
    tick_event,
    upload,
)
from tests.integration.burst import PER_SERIES, RESENT, SERIES, STUDIES, Burst
from tests.integration.sites import PipelineFactory, Site


class Crash(Exception):
    """Injected crash: the function dies at this line (the platform sees a 500)."""


class Env(Site):
    """A site with the ingest and report functions' events and ticks, and outcomes."""

    def client(self, name: str) -> Any:
        return self.apps[name].test_client()

    def upload(self, name: str, data: bytes) -> Uploaded:
        """Upload ``data``; its events carry the test clock's time as ``timeCreated``."""
        return upload(self.gcs, self.landing, name, data, created=self.clock())

    def ingest(self, uploads: list[Uploaded], repeats: int = 1, threads: int = 8) -> None:
        """Deliver each finalize event ``repeats`` times, concurrently."""
        local = threading.local()

        def deliver(obj: Uploaded) -> int:
            if not hasattr(local, "client"):
                local.client = self.client("ingest")
            return post(local.client, finalize_event(obj, self.clock()))

        work = [o for o in uploads for _ in range(repeats)]
        with ThreadPoolExecutor(threads) as pool:
            statuses = list(pool.map(deliver, work))
        assert set(statuses) == {200}, statuses

    def ingest_tick(self) -> dict[str, Any]:
        assert post(self.client("ingest"), tick_event(self.clock())) == 200
        return {}

    def report_tick(self) -> int:
        return post(self.client("report"), tick_event(self.clock()))

    def import_all(self, timeout: float = 120.0) -> None:
        """Seal every open batch and tick ingest and report until nothing is left to do."""
        self.clock.advance(
            self.ctx.settings.batch_window_seconds + self.ctx.settings.seal_grace_seconds + 1
        )
        deadline = time.monotonic() + timeout
        bucket = self.gcs.bucket(self.staging)
        while True:
            self.ingest_tick()
            assert self.report_tick() == 200
            pending = batches.open_batches(bucket)
            if not pending:
                return
            assert time.monotonic() < deadline, f"batches still pending: {pending}"
            time.sleep(0.3)

    def label(self, obj: Uploaded) -> str:
        return alerts.object_label(self.ctx.settings, obj.bucket, obj.name)

    def key(self, obj: Uploaded) -> str:
        return staging.file_key(obj.bucket, obj.name, obj.generation)

    def outcome(self, obj: Uploaded) -> outcomes.Outcome:
        return outcomes.read_all(self.gcs.bucket(self.staging))[self.key(obj)]

    def status(self, obj: Uploaded) -> str:
        return self.outcome(obj).status


@pytest.fixture
def new_env(pipeline: PipelineFactory) -> Callable[..., Env]:
    """A factory of sites for this module's tests; keyword arguments are settings."""

    def make(**extra: str) -> Env:
        return pipeline(Env, settings={"DICOMFLOW_SEAL_GRACE_SECONDS": "10", **extra})

    return make


@pytest.fixture
def env(new_env: Callable[..., Env]) -> Env:
    return new_env()


def by_kind(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        out.setdefault(m["body"]["kind"], []).append(m)
    return out


def stored_sops(env: Env) -> set[str]:
    items = env.ctx.dicomweb().search_for_instances(limit=50000)
    return {i["00080018"]["Value"][0] for i in items}


def manifest_lines(env: Env, batch: str, which: str) -> list[dict[str, Any]]:
    bucket = env.gcs.bucket(env.staging)
    name = staging.success_name(batch) if which == "success" else staging.failure_name(batch)
    return manifests.read_lines(bucket, name)


def verified_batches(env: Env) -> list[str]:
    names = [b.name for b in env.gcs.list_blobs(env.staging, prefix="manifests/")]
    return sorted({n.split("/")[1] for n in names if n.endswith("summary.json")})


# --- import checks -----------------------------------------------------------------------------


def conflict_scenario(env: Env) -> dict[str, Uploaded]:
    """Batch 1: one file. Batch 2: its conflicting twin, its identical re-send, a file the
    emulator rejects (truncated pixel data passes the header check), and valid files."""
    study, series, sop = (pydicom.uid.generate_uid() for _ in range(3))
    first = env.upload("a/first.dcm", make_instance(study, series, sop))
    env.ingest([first])
    env.import_all()
    files = {
        "first": first,
        "twin": env.upload("b/twin.dcm", make_instance(study, series, sop, rows=6)),
        "resent": env.upload("b/resent.dcm", make_instance(study, series, sop)),
        "broken": env.upload("b/broken.dcm", make_instance(rows=8, pixel_bytes=10)),
    }
    for i in range(3):
        files[f"ok{i}"] = env.upload(
            f"b/ok{i}.dcm", make_instance(study, pydicom.uid.generate_uid())
        )
    env.ingest([f for k, f in files.items() if k != "first"])
    env.import_all()
    return files


def test_import_checks_alert_once_per_subject_and_manifests_match_the_store(env: Env) -> None:
    files = conflict_scenario(env)
    alerts_seen = env.pull()
    kinds = by_kind(alerts_seen)
    assert sorted(kinds) == ["conflict", "import_failed"], kinds
    assert len(kinds["conflict"]) == 1 and len(kinds["import_failed"]) == 1
    failed, conflict = kinds["import_failed"][0], kinds["conflict"][0]
    assert failed["body"]["details"]["samples"] == [env.label(files["broken"])]
    assert failed["body"]["details"]["reasons"] == {"not-in-store": 1}
    assert conflict["body"]["details"]["samples"] == [env.label(files["twin"])]
    assert conflict["body"]["details"]["reasons"] == {"checksum-mismatch": 1}
    # UIDs are keyed labels (DICOMFLOW_ALERT_UIDS=hash by default), never in clear.
    twin = env.outcome(files["twin"]).record
    assert twin is not None and twin.sop
    [sample] = conflict["body"]["details"]["sampleFiles"]
    assert sample["sopInstanceUid"] == alerts.uid_label(env.ctx.settings, twin.sop) != twin.sop
    for m in alerts_seen:
        assert m["body"]["schemaVersion"] == 2
        assert m["attributes"]["dicomStore"] == env.store
        assert m["attributes"]["kind"] == m["body"]["kind"]
        assert m["attributes"]["alertId"] == m["body"]["alertId"]

    expected = {
        "first": "imported",
        "resent": "duplicate",
        "twin": "conflict",
        "broken": "failed",
        "ok0": "imported",
        "ok1": "imported",
        "ok2": "imported",
    }
    assert {name: env.status(obj) for name, obj in files.items()} == expected

    # The manifests agree with the store, file by file.
    sops = stored_sops(env)
    second = verified_batches(env)[-1]
    success = manifest_lines(env, second, "success")
    failure = manifest_lines(env, second, "failure")
    assert {line["key"]: line["status"] for line in success + failure} == {
        env.key(f): s for n, f in files.items() if n != "first" for s in [expected[n]]
    }
    for line in success:
        assert line["sop"] in sops
    for line in failure:
        if line["status"] == "failed":
            assert line["sop"] not in sops
        else:
            assert line["reason"] == "checksum-mismatch"
            assert line["storedChecksum"] != line["checksum"]
    summary = manifests.read_summary(env.gcs.bucket(env.staging), second)
    assert summary is not None
    assert summary["counts"] == {
        "imported": 3,
        "duplicate": 1,
        "conflict": 1,
        "failed": 1,
        "total": 6,
    }
    assert summary["operation"]["counter"]["failure"] == 2
    # Two failures counted, one file not stored: one conflict to find. The twin and the
    # re-send share the suspect SOP UID (stored before the import): one WADO for both.
    assert summary["fetchedForChecksum"] == 1

    # Every staging copy stays (the claim of its generation; a lifecycle rule expires it).
    staged = {b.name for b in env.gcs.list_blobs(env.staging, prefix="batches/")}
    for obj in files.values():
        outcome = env.outcome(obj)
        assert outcome.window is not None
        assert staging.staged_name(outcome.window, env.key(obj)) in staged

    # More ticks change nothing and send nothing.
    env.clock.advance(120)
    assert env.report_tick() == 200
    assert env.pull() == []


# --- outside operations, stalls ----------------------------------------------------------------


def test_failing_import_started_outside_is_reported_once(env: Env) -> None:
    api = env.ctx.healthcare()
    env.upload("manual/not-dicom.dcm", b"this is not a DICOM file" * 10)
    env.upload("manual/good.dcm", make_instance())
    stores = api.projects().locations().datasets().dicomStores()
    bad = stores.import_(
        name=env.store, body={"gcsSource": {"uri": f"gs://{env.landing}/manual/**.dcm"}}
    ).execute()
    env.upload("manual2/good.dcm", make_instance())
    good = stores.import_(
        name=env.store, body={"gcsSource": {"uri": f"gs://{env.landing}/manual2/**.dcm"}}
    ).execute()
    operations_api = api.projects().locations().datasets().operations()
    for op in (bad, good):
        deadline = time.monotonic() + 30
        while not operations_api.get(name=op["name"]).execute().get("done"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert env.report_tick() == 200
    assert env.pull() == []  # ingest may be about to record it as its own
    env.clock.advance(env.ctx.settings.import_restart_seconds + report.RECORD_MARGIN_SECONDS + 1)
    for _ in range(3):
        assert env.report_tick() == 200
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["operation_failed"]
    body = got[0]["body"]
    assert body["subject"] == bad["name"]
    assert body["details"]["operationCounter"] == {"success": 1, "failure": 1}
    assert "gs://" not in json.dumps(body)  # object names are labelled, not spelled out


def test_export_held_past_the_threshold_raises_one_stalled_alert(
    new_env: Callable[..., Env],
) -> None:
    env = new_env(DICOMFLOW_STALLED_SECONDS="2")
    api = env.ctx.healthcare()
    env.knobs(operation_latency=6.0)
    try:
        op = (
            api.projects()
            .locations()
            .datasets()
            .dicomStores()
            .export(
                name=env.store,
                body={"gcsDestination": {"uriPrefix": f"gs://{env.ctx.settings.backup_bucket}/x"}},
            )
            .execute()
        )
        assert env.report_tick() == 200
        assert env.pull() == []  # not running long enough yet
        time.sleep(2.5)
        env.clock.advance(2.5)
        for _ in range(3):
            assert env.report_tick() == 200
    finally:
        env.knobs(operation_latency=0.0)
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["stalled"]
    assert got[0]["body"]["details"]["operation"] == op["name"]
    assert got[0]["body"]["details"]["operationKind"] == "export"


def test_a_dead_export_start_is_alerted_once_and_report_never_starts_an_export(env: Env) -> None:
    """Report's role has no dicomStores.export: here the emulator refuses every export call
    with 403, as IAM would. The export function takes a dead start over, not report."""
    day = env.clock().date()
    mime = env.ctx.settings.export_mime_type
    claim = export._new_marker(env.ctx.settings, day, "full", mime, env.clock(), env.clock())
    export._open(env.ctx, day, 1, env.clock())
    assert objects.create(env.gcs.bucket(env.staging), export.marker_name(day), claim)
    env.clock.advance(export.STALLED_START_SECONDS + 1)  # its lease is long over
    env.knobs(faults="export=1.0:403")
    try:
        for _ in range(3):
            assert env.report_tick() == 200
    finally:
        env.knobs(faults="")
    found = export.read_marker(env.ctx, day)
    assert found is not None
    assert {k: found[0][k] for k in claim} == claim  # neither taken over nor failed
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["stalled"]
    assert got[0]["body"]["subject"] == f"{env.store}/exports/{day}/attempt-1/starting"
    dataset = env.store.rsplit("/dicomStores/", 1)[0]
    ops = env.ctx.healthcare().projects().locations().datasets().operations()
    listed = ops.list(name=dataset, pageSize=100).execute().get("operations", [])
    assert [o for o in listed if "Export" in o["metadata"].get("apiMethodName", "")] == []


# --- healthy burst -----------------------------------------------------------------------------


def healthy_burst(env: Env, studies: int, resend: int, redeliver: int) -> None:
    """``studies`` x 2 series x 50 generated instances; ``resend`` of them uploaded again under
    a new name, ``redeliver`` events delivered twice (at-least-once delivery)."""
    logging.getLogger().setLevel(logging.WARNING)  # thousands of INFO lines are noise here
    instances = list(generate_studies(studies, 2, 50))

    def put(item: tuple[int, Any]) -> Uploaded:
        number, generated = item
        return env.upload(f"burst/{number:05d}.dcm", generated.data)

    with ThreadPoolExecutor(8) as pool:
        uploaded = list(pool.map(put, enumerate(instances)))
    resent = [env.upload(f"again/{i:05d}.dcm", instances[i].data) for i in range(resend)]
    half = len(uploaded) // 2
    # Some repeats land while the first delivery of the same event is still running.
    env.ingest(uploaded[:half] + resent + uploaded[:redeliver] + uploaded[half:])
    env.import_all(timeout=400)
    assert env.pull() == []
    totals = outcomes.totals(outcomes.read_all(env.gcs.bucket(env.staging)).values())
    assert totals["imported"] == len(instances) and totals["duplicate"] == resend, str(totals)
    assert sum(totals.values()) == len(instances) + resend
    assert len(stored_sops(env)) == len(instances)


def test_healthy_burst_with_duplicate_deliveries_gives_zero_alerts(
    new_env: Callable[..., Env],
) -> None:
    """400 instances in 3 batches (the session's 2,000-file burst is checked below)."""
    env = new_env(DICOMFLOW_BATCH_MAX_FILES="160")
    healthy_burst(env, studies=4, resend=20, redeliver=60)


@pytest.mark.slow
def test_healthy_burst_of_2000_gives_zero_alerts(burst: Burst) -> None:
    """The session's burst (``tests.integration.burst``): its healthy round, 2,000
    instances and 50 of them again under new names, every event delivered twice."""
    healthy = burst.healthy
    instances = STUDIES * SERIES * PER_SERIES
    assert set(healthy.statuses) == {200}, healthy.statuses
    assert healthy.alerts == []
    totals = healthy.totals
    assert totals["imported"] == instances and totals["duplicate"] == RESENT, str(totals)
    assert sum(totals.values()) == instances + RESENT == len(healthy.files)
    assert healthy.stored == instances


# --- crash safety ------------------------------------------------------------------------------


CRASHPOINTS = [
    "listed",
    "outside",
    "exports",
    "quarantine",
    "restaged",
    "verified",
    "manifests",
    "alerts",
    "summary",
    "backlog",
]


def crash_at(monkeypatch: pytest.MonkeyPatch, points: set[str]) -> list[str]:
    """Crash the first time the tick reaches each of ``points``; returns where it crashed."""
    hit: list[str] = []

    def point(step: str) -> None:
        if step in points and step not in hit:
            hit.append(step)
            raise Crash(step)

    monkeypatch.setattr(report, "crashpoint", point)
    return hit


def crash_after_publish(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each alert's first publish reaches Pub/Sub, then the function dies."""
    original = alerts._publish
    crashed: list[str] = []

    def publish(ctx: Any, settings: Any, alert: alerts.Alert) -> str:
        message_id = original(ctx, settings, alert)
        if alert.alert_id not in crashed:
            crashed.append(alert.alert_id)
            raise Crash(f"after publishing {alert.kind}")
        return message_id

    monkeypatch.setattr(alerts, "_publish", publish)
    return crashed


def crash_scenario(env: Env) -> None:
    """Files giving import_failed, conflict and quarantined; a failing outside import."""
    study, series, sop = (pydicom.uid.generate_uid() for _ in range(3))
    files = [
        env.upload("c/a.dcm", make_instance(study, series, sop)),
        env.upload("c/b.dcm", make_instance(study, series, sop, rows=6)),
        env.upload("c/broken.dcm", make_instance(rows=8, pixel_bytes=10)),
        env.upload("c/ok.dcm", make_instance()),
        env.upload("c/junk.dcm", b"not dicom at all" * 20),
    ]
    env.ingest(files)
    env.upload("manual/junk.dcm", b"junk" * 100)
    api = env.ctx.healthcare()
    api.projects().locations().datasets().dicomStores().import_(
        name=env.store, body={"gcsSource": {"uri": f"gs://{env.landing}/manual/**.dcm"}}
    ).execute()


def run_until_settled(env: Env, limit: int = 60) -> list[int]:
    settings = env.ctx.settings
    # Past the seals, and past the delay after which an unknown failed import is reported.
    env.clock.advance(
        settings.batch_window_seconds
        + settings.seal_grace_seconds
        + settings.import_restart_seconds
        + report.RECORD_MARGIN_SECONDS
        + 1
    )
    statuses: list[int] = []
    bucket = env.gcs.bucket(env.staging)
    for _ in range(limit):
        env.ingest_tick()
        statuses.append(env.report_tick())
        busy = bool(batches.open_batches(bucket))
        if not busy and statuses[-1] == 200 and statuses[-2:] == [200, 200]:
            return statuses
        time.sleep(0.2)
    raise AssertionError(f"not settled: {statuses}")


def test_without_crashes_each_alert_arrives_exactly_once(env: Env) -> None:
    crash_scenario(env)
    run_until_settled(env)
    got = env.pull()
    assert sorted(m["body"]["kind"] for m in got) == [
        "conflict",
        "import_failed",
        "operation_failed",
        "quarantined",
    ]
    assert len({m["body"]["alertId"] for m in got}) == 4


@pytest.mark.parametrize("mode", ["steps", "publish"])
def test_crash_at_each_step_repeats_alerts_with_the_same_id(
    env: Env, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    crash_scenario(env)
    if mode == "steps":
        hit = crash_at(monkeypatch, set(CRASHPOINTS))
    else:
        hit = crash_after_publish(monkeypatch)
    statuses = run_until_settled(env, limit=80)
    assert 500 in statuses
    got = env.pull()
    subjects: dict[tuple[str, str], set[str]] = {}
    for m in got:
        subjects.setdefault((m["body"]["kind"], m["body"]["subject"]), set()).add(
            m["body"]["alertId"]
        )
    assert sorted(k for k, _ in subjects) == [
        "conflict",
        "import_failed",
        "operation_failed",
        "quarantined",
    ]
    assert all(len(ids) == 1 for ids in subjects.values()), subjects
    if mode == "steps":
        assert {"listed", "verified", "manifests", "alerts", "summary"} <= set(hit)
    else:
        assert len(hit) == 4 and len(got) >= 8  # each alert went out twice, same id


# --- no PHI ------------------------------------------------------------------------------------


def phi_values() -> set[str]:
    """PatientName and PatientID of every readable sample file, and the name's parts."""
    found: set[str] = set()
    for path in sample_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                values = [str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")]
        except Exception:
            continue
        for value in values:
            found.update(v for v in (value.strip(), *value.split("^")) if _specific(v.strip()))
    return found


def _specific(value: str) -> bool:
    """Long enough to identify someone rather than to occur by chance.

    Skipped: values under 4 characters, numbers under 6 digits (they turn up in
    ports, sizes and tag numbers), and the placeholder words sample files use.
    """
    if len(value) < 4 or (value.isdigit() and len(value) < 6):
        return False
    return value.upper() not in {"NAME", "NONE", "ANONYMOUS", "ANONYMIZED", "TEST", "UNKNOWN"}


def test_no_phi_in_logs_or_alerts_from_the_sample_corpus(env: Env) -> None:
    values = phi_values()
    assert len(values) > 10  # the corpus does carry names and ids
    stream = io.StringIO()
    log.configure(logging.DEBUG, stream)
    files = [
        env.upload(f"corpus/{i:04d}.dcm", path.read_bytes())
        for i, path in enumerate(sample_files())
    ]
    # One file that passes the header check but not the import, with the test's own name.
    files.append(env.upload("corpus/truncated.dcm", make_instance(rows=8, pixel_bytes=10)))
    values.update({PATIENT_NAME, *PATIENT_NAME.split("^"), "PID-0001"})
    env.ingest(files)
    env.import_all(timeout=150)
    env.clock.advance(600)
    assert env.report_tick() == 200
    got = env.pull()
    kinds = {m["body"]["kind"] for m in got}
    # The corpus has broken files and files sharing UIDs with other bytes.
    assert {"quarantined", "import_failed", "conflict"} <= kinds, kinds
    texts = stream.getvalue().splitlines() + [
        json.dumps(m["body"]) + json.dumps(m["attributes"]) for m in got
    ]
    assert len(texts) > 100
    patterns = [
        re.compile(r"(?<![0-9A-Za-z])" + re.escape(v) + r"(?![0-9A-Za-z])", re.IGNORECASE)
        for v in sorted(values)
    ]
    # The scan itself finds a name where there is one.
    assert any(p.search(f'{{"message": "{PATIENT_NAME}"}}') for p in patterns)
    hits = [(p.pattern, t[:200]) for t in texts for p in patterns if p.search(t)]
    assert sorted({p for p, _ in hits}) == [], hits[:5]


# --- a check that the checks can fail ----------------------------------------------------------


def wait_finished(env: Env, seconds: float, count: int = 1) -> list[str]:
    """Run ingest ticks until ``count`` batches' imports are done, within ``seconds``."""
    bucket = env.gcs.bucket(env.staging)
    deadline = time.monotonic() + seconds
    while True:
        env.ingest_tick()
        done = [
            b
            for b in batches.open_batches(bucket)
            if (objects.read_json(bucket, staging.operation_name(b)) or {}).get("done")
        ]
        if len(done) >= count:
            return done
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_verification_sees_an_instance_deleted_behind_its_back(env: Env) -> None:
    """The verdict comes from the store, not the operation: delete one instance before
    the report runs, and that file becomes import_failed even though the import succeeded."""
    files = [env.upload(f"d/{i}.dcm", make_instance()) for i in range(3)]
    env.ingest(files)
    env.clock.advance(env.ctx.settings.batch_window_seconds + env.ctx.settings.seal_grace_seconds)
    env.ingest_tick()
    wait_finished(env, 30)
    victim = env.outcome(files[1]).record
    assert victim is not None and victim.study and victim.series and victim.sop
    env.ctx.dicomweb().delete_instance(victim.study, victim.series, victim.sop)
    assert env.report_tick() == 200
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["import_failed"]
    assert got[0]["body"]["details"]["samples"] == [env.label(files[1])]
    assert [env.status(o) for o in files] == ["imported", "failed", "imported"]


# --- quarantine: late and half-written records ---------------------------------------------


def quarantine_close(env: Env) -> float:
    """Seconds from a window's start until the report treats it as closed."""
    s = env.ctx.settings
    return s.batch_window_seconds + s.seal_grace_seconds + s.feed_grace_seconds + 1


def test_quarantine_copy_landing_in_a_reported_window_gets_a_follow_up_alert(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried delivery writes its quarantine copy after the window was alerted."""
    first = env.upload("q/bad1.dcm", b"not dicom" * 100)
    late = env.upload("q/bad2.dcm", b"also not dicom" * 100)
    env.ingest([first])
    real_copy = ingest.copy_object

    def failing_copy(*args: Any) -> bool:
        raise TransientError("simulated: storage 503s until the retry deadline")

    monkeypatch.setattr(ingest, "copy_object", failing_copy)
    assert post(env.client("ingest"), finalize_event(late, env.clock())) == 500
    monkeypatch.setattr(ingest, "copy_object", real_copy)
    sent = env.clock()
    env.clock.advance(quarantine_close(env) + 60)
    assert env.report_tick() == 200
    got = env.pull()
    assert [(m["body"]["kind"], m["body"]["details"]["files"]) for m in got] == [("quarantined", 1)]
    assert got[0]["body"]["details"]["samples"] == [env.label(first)]
    window = got[0]["body"]["details"]["window"]

    # The platform retries the delivery: the copy lands in its home window, already alerted.
    assert post(env.client("ingest"), finalize_event(late, sent)) == 200
    assert env.outcome(late).status == "quarantined" and env.outcome(late).window == window
    env.clock.advance(60)
    assert env.report_tick() == 200
    again = env.pull()
    assert [m["body"]["kind"] for m in again] == ["quarantined"]
    body = again[0]["body"]
    assert body["details"]["files"] == 1 and body["details"]["samples"] == [env.label(late)]
    assert body["details"]["window"] == window and body["subject"] != got[0]["body"]["subject"]
    # Exactly once: more ticks send nothing more.
    for _ in range(2):
        env.clock.advance(60)
        assert env.report_tick() == 200
    assert env.pull() == []


# --- operations of our own --------------------------------------------------------------------


def test_a_failed_import_of_ours_is_never_reported_as_outside(env: Env) -> None:
    """Our import fails a file: the per-file alert only, never operation_failed, however
    long after it ended the report looks at the operation again."""
    good = env.upload("o/good.dcm", make_instance())
    broken = env.upload("o/broken.dcm", make_instance(rows=8, pixel_bytes=10))
    env.ingest([good, broken])
    env.import_all()
    for minutes in (1, 10, 60):
        env.clock.advance(minutes * 60)
        result = report.run_tick(env.ctx)
        assert result["outside"] == []
    assert [m["body"]["kind"] for m in env.pull()] == ["import_failed"]


# --- verification cost of a failed batch ------------------------------------------------------


def test_failed_study_needs_no_per_file_lookup_and_the_rest_run_in_parallel(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Study A: every file rejected by the store -> failed without one QIDO per file.
    Study B: one file stored, three rejected -> their SOP lookups run concurrently."""
    study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [
        env.upload(f"a/{i}.dcm", make_instance(study_a, rows=8, pixel_bytes=10)) for i in range(5)
    ]
    files += [env.upload("b/ok.dcm", make_instance(study_b))]
    files += [
        env.upload(f"b/{i}.dcm", make_instance(study_b, rows=8, pixel_bytes=10)) for i in range(3)
    ]
    env.ingest(files)
    looked_up: list[str] = []
    running, peak = [0], [0]
    lock = threading.Lock()
    real = verify.search_sop

    def search_sop(ctx: Any, sop: str) -> Any:
        with lock:
            looked_up.append(sop)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)
            return real(ctx, sop)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(verify, "search_sop", search_sop)
    env.import_all()
    assert [env.status(f) for f in files] == ["failed"] * 5 + ["imported"] + ["failed"] * 3
    b_sops = {env.outcome(f).record.sop for f in files[6:]}  # type: ignore[union-attr]
    assert set(looked_up) == b_sops and len(looked_up) == 3
    assert peak[0] > 1
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["import_failed"]
    assert got[0]["body"]["details"]["reasons"] == {"not-in-store": 8}


# --- unreadable operations ---------------------------------------------------------------------


def test_unreadable_operation_does_not_block_the_tick(env: Env) -> None:
    """The batch's operation answers 404 (expired, deleted): the batch is verified from
    the store like any other, the tick goes on, and the summary says why."""
    files = [env.upload(f"x/{i}.dcm", make_instance()) for i in range(2)]
    env.ingest(files)
    env.clock.advance(env.ctx.settings.batch_window_seconds + env.ctx.settings.seal_grace_seconds)
    env.ingest_tick()
    bucket = env.gcs.bucket(env.staging)
    [batch] = batches.open_batches(bucket)
    found = objects.read(bucket, staging.operation_name(batch))
    assert found is not None
    record = found[0]
    operations_api = env.ctx.healthcare().projects().locations().datasets()
    deadline = time.monotonic() + 30
    while not operations_api.operations().get(name=record["operation"]).execute().get("done"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    gone = record["operation"].rsplit("/", 1)[0] + "/404404404"
    assert objects.swap(
        bucket, staging.operation_name(batch), {**record, "operation": gone}, found[1]
    )
    assert env.report_tick() == 200
    assert env.report_tick() == 200
    assert [env.status(o) for o in files] == ["imported", "imported"]
    summary = manifests.read_summary(bucket, batch)
    assert summary is not None and "404" in summary["operation"]["error"]["message"]
    assert not batches.open_batches(bucket)
    assert env.pull() == []


# --- bounded per-tick cost -----------------------------------------------------------------------


def test_quarantine_windows_past_the_horizon_are_not_listed_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = env.gcs.bucket(env.staging)
    seconds = env.ctx.settings.batch_window_seconds
    old = staging.window_id(env.clock() - timedelta(days=3), seconds)
    record = staging.FileRecord(
        key="0" * 46,
        bucket=env.landing,
        name="o",
        generation="1",
        size=4,
        home=old,
        window=old,
        reason="not-dicom: x",
    )
    blob = bucket.blob(staging.quarantine_name(old, record.key))
    blob.metadata = record.metadata()
    blob.upload_from_string(b"junk")
    env.ingest([env.upload("q/new.dcm", b"not dicom" * 100)])
    assert env.report_tick() == 200
    assert [m["body"]["subject"] for m in env.pull()] == [f"quarantine/{old}"]
    listed: list[dict[str, Any]] = []
    real = env.gcs.list_blobs

    def list_blobs(*args: Any, **kwargs: Any) -> Any:
        listed.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(env.gcs, "list_blobs", list_blobs)
    assert report.run_tick(env.ctx)["quarantine"] == []
    offsets = [k.get("start_offset") for k in listed if k.get("prefix") == "quarantine/"]
    assert offsets and all(o and o > f"quarantine/{old}" for o in offsets), offsets
    # The recent window is still reported once it closes.
    env.clock.advance(quarantine_close(env))
    assert len(report.run_tick(env.ctx)["quarantine"]) == 1


class CountingHttp:
    """Counts the Storage client's HTTP requests by method and path kind."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        session = client._http
        real = session.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(f"{method} {url.split('?')[0].rsplit('/o', 1)[-1][:30]}")
            return real(method, url, *args, **kwargs)

        monkeypatch.setattr(session, "request", request)


class CountingHealthcare:
    """Counts the Healthcare and DICOMweb requests the report makes."""

    def __init__(self, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        real = operations.list_operations
        real_get = store.get_operation

        def list_operations(ctx: Any) -> Any:
            self.calls.append("operations.list")
            return real(ctx)

        def get_operation(ctx: Any, name: str) -> Any:
            self.calls.append("operations.get")
            return real_get(ctx, name)

        monkeypatch.setattr(operations, "list_operations", list_operations)
        monkeypatch.setattr(store, "get_operation", get_operation)


def idle_ticks(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The Storage and Healthcare calls of one idle ingest tick and one idle report tick."""
    with monkeypatch.context() as patch:
        storage_calls = CountingHttp(env.gcs, patch)
        healthcare_calls = CountingHealthcare(env, patch)
        functions.ingest_tick(env.ctx)
        report.run_tick(env.ctx)
    return sorted(storage_calls.calls), sorted(healthcare_calls.calls)


def test_an_idle_tick_costs_the_same_after_hundreds_of_files_as_after_none(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ticks list what is open (windows from a cursor, open batches, slots), never history."""
    env.clock.advance(3600)
    idle_ticks(env, monkeypatch)  # cursors settle
    before = idle_ticks(env, monkeypatch)
    study = pydicom.uid.generate_uid()
    for round_ in range(3):  # three windows, three batches
        files = [env.upload(f"h{round_}/{i}.dcm", make_instance(study)) for i in range(60)]
        files.append(env.upload(f"h{round_}/junk.dcm", b"not dicom" * 50))
        env.ingest(files)
        env.clock.advance(env.ctx.settings.batch_window_seconds)
    env.import_all()
    env.clock.advance(86_400 * 2)  # past the lookback and the feeds' horizon
    for _ in range(2):
        idle_ticks(env, monkeypatch)
    after = idle_ticks(env, monkeypatch)
    assert after == before, (before, after)
    assert before[1] == ["operations.list"]


# --- dropped files --------------------------------------------------------------------------------


def deliver_too_old(env: Env, uploads: list[Uploaded]) -> None:
    """Finalize events older than the max event age: ingest drops them (event-too-old)."""
    when = env.clock() - timedelta(seconds=env.ctx.settings.max_event_age_seconds + 60)
    client = env.client("ingest")
    for obj in uploads:
        assert post(client, finalize_event(obj, when)) == 200
        outcome = env.outcome(obj)
        assert (outcome.status, outcome.reason) == ("dropped", "event-too-old")


def drop_records(env: Env) -> dict[str, dict[str, Any]]:
    bucket = env.gcs.bucket(env.staging)
    return {
        b.name: json.loads(b.download_as_bytes())
        for b in env.gcs.list_blobs(bucket, prefix=DROPPED_PREFIX)
    }


def test_event_older_than_the_max_age_raises_one_dropped_alert_once(env: Env) -> None:
    obj = env.upload(f"old/{PATIENT_NAME}.dcm", make_instance())
    deliver_too_old(env, [obj])
    records = drop_records(env)
    assert len(records) == 1 and PATIENT_NAME not in json.dumps(
        {k: v for k, v in records.items()}, default=str
    ).replace(f"old/{PATIENT_NAME}.dcm", "")
    (record,) = records.values()
    assert record["key"] == env.key(obj) and record["objectLabel"] == env.label(obj)
    assert record["reason"] == "event-too-old"

    env.clock.advance(quarantine_close(env) + 60)
    assert env.report_tick() == 200
    got = env.pull()
    assert [(m["body"]["kind"], m["body"]["severity"]) for m in got] == [("dropped", "WARNING")]
    body = got[0]["body"]
    assert body["subject"] == f"dropped/{record['window']}"
    assert body["details"]["files"] == 1 and body["details"]["samples"] == [env.label(obj)]
    assert body["details"]["reasons"] == {"event-too-old": 1}
    assert body["details"]["sampleFiles"][0]["key"] == env.key(obj)
    assert PATIENT_NAME not in json.dumps(got)
    # A redelivery of the same event, later, and more ticks send nothing more.
    env.clock.advance(600)
    deliver_too_old(env, [obj])
    assert len(drop_records(env)) == 1
    for _ in range(3):
        env.clock.advance(60)
        assert env.report_tick() == 200
    assert env.pull() == []


def test_dropped_alert_survives_crashes_in_ingest_and_report_with_one_alert_id(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest dies before the drop record; report dies after publishing."""
    obj = env.upload("old/a.dcm", make_instance())
    gone = env.upload("gone/b.dcm", make_instance())
    env.gcs.bucket(env.landing).blob(gone.name).delete()
    real_create = objects.create

    def no_record(bucket: Any, name: str, data: dict[str, Any]) -> int | None:
        if name.startswith(DROPPED_PREFIX):
            raise TransientError("simulated: crash before the drop record")
        return real_create(bucket, name, data)

    monkeypatch.setattr(objects, "create", no_record)
    when = env.clock() - timedelta(seconds=env.ctx.settings.max_event_age_seconds + 60)
    assert post(env.client("ingest"), finalize_event(obj, when)) == 500
    assert post(env.client("ingest"), finalize_event(gone, env.clock())) == 500
    assert drop_records(env) == {}
    monkeypatch.setattr(objects, "create", real_create)
    # The platform retries both deliveries: each writes its record once.
    env.clock.advance(30)
    assert post(env.client("ingest"), finalize_event(obj, when)) == 200
    assert post(env.client("ingest"), finalize_event(gone, env.clock())) == 200
    assert sorted(r["reason"] for r in drop_records(env).values()) == [
        "event-too-old",
        "source-missing",
    ]

    crashed = crash_after_publish(monkeypatch)
    env.clock.advance(quarantine_close(env) + 60)
    statuses = [env.report_tick()]
    for _ in range(3):
        env.clock.advance(60)
        statuses.append(env.report_tick())
    assert 500 in statuses
    got = env.pull()
    assert len(got) == 2 * len(crashed), got
    assert {m["body"]["alertId"] for m in got} == set(crashed)
    assert {m["body"]["kind"] for m in got} == {"dropped"}
    reasons = Counter_of(got)
    assert reasons == {"event-too-old": 1, "source-missing": 1}


def Counter_of(got: list[dict[str, Any]]) -> dict[str, int]:
    """Files per reason over distinct alerts."""
    seen: dict[str, dict[str, int]] = {}
    for m in got:
        seen[m["body"]["alertId"]] = m["body"]["details"]["reasons"]
    total: dict[str, int] = {}
    for reasons in seen.values():
        for reason, n in reasons.items():
            total[reason] = total.get(reason, 0) + n
    return total


def test_burst_of_50_dropped_files_in_one_window_gives_one_alert(env: Env) -> None:
    uploads = [env.upload(f"old/{i:02d}.dcm", b"x" * 200) for i in range(50)]
    deliver_too_old(env, uploads)
    assert len({r["window"] for r in drop_records(env).values()}) == 1
    env.clock.advance(quarantine_close(env) + 60)
    for _ in range(3):
        assert env.report_tick() == 200
        env.clock.advance(60)
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["dropped"]
    details = got[0]["body"]["details"]
    assert details["files"] == 50 and details["sampleTotal"] == 50
    assert len(details["samples"]) == env.ctx.settings.alert_sample_files
    assert set(details["samples"]) <= {env.label(o) for o in uploads}


# --- one SOP Instance UID, other bytes, two batches: verdicts in any order --------------------


@dataclass
class Pair:
    a: Uploaded
    b: Uploaded
    batch_a: str
    batch_b: str


def conflicting_pair(env: Env) -> Pair:
    """File a in one window, file b (same UIDs, other bytes) in the next; both sealed."""
    study, series, sop = (pydicom.uid.generate_uid() for _ in range(3))
    seconds = env.ctx.settings.batch_window_seconds
    a = env.upload("p/a.dcm", make_instance(study, series, sop))
    env.ingest([a])
    env.clock.advance(seconds)
    b = env.upload("p/b.dcm", make_instance(study, series, sop, rows=6))
    env.ingest([b])
    env.clock.advance(seconds + env.ctx.settings.seal_grace_seconds)
    sealed = batches.seal_due(env.ctx, env.clock())
    assert len(sealed) == 2, sealed
    return Pair(a, b, *sorted(sealed))


def start_and_wait(env: Env, batch: str) -> None:
    bucket = env.gcs.bucket(env.staging)
    assert batches.start(env.ctx, batch, None, env.clock()) == "started"
    deadline = time.monotonic() + 30
    while True:
        record = objects.read_json(bucket, staging.operation_name(batch))
        assert record is not None
        if batches.poll(env.ctx, batch, record).get("done"):
            return
        assert time.monotonic() < deadline
        time.sleep(0.1)


def verify_in(env: Env, order: list[str]) -> None:
    for batch in order:
        outcome = report.check_batch(env.ctx, batch, env.clock())
        assert outcome is not None and "counts" in outcome, outcome


def assert_one_imported_one_conflict(env: Env, pair: Pair, winner: Uploaded) -> None:
    loser = pair.b if winner is pair.a else pair.a
    assert (env.status(winner), env.status(loser)) == ("imported", "conflict")
    lost = env.outcome(loser)
    assert lost.reason == "checksum-mismatch" and lost.window is not None
    # The conflict keeps its staging copy for inspection and retry.
    assert env.gcs.bucket(env.staging).blob(staging.staged_name(lost.window, lost.key)).exists()
    got = env.pull()
    assert [m["body"]["kind"] for m in got] == ["conflict"], got
    assert got[0]["body"]["details"]["samples"] == [env.label(loser)]
    for _ in range(2):
        env.clock.advance(60)
        assert env.report_tick() == 200
    assert env.pull() == []


def test_conflict_found_when_the_later_batch_is_verified_first(env: Env) -> None:
    """The earlier batch waits (as behind a killed tick); the later one goes first."""
    pair = conflicting_pair(env)
    start_and_wait(env, pair.batch_a)
    start_and_wait(env, pair.batch_b)
    verify_in(env, [pair.batch_b, pair.batch_a])
    assert_one_imported_one_conflict(env, pair, winner=pair.a)


def test_conflict_found_when_the_later_import_finishes_first(env: Env) -> None:
    pair = conflicting_pair(env)
    start_and_wait(env, pair.batch_b)
    start_and_wait(env, pair.batch_a)
    verify_in(env, [pair.batch_a, pair.batch_b])
    assert_one_imported_one_conflict(env, pair, winner=pair.b)


def test_conflict_found_when_the_earlier_verification_raises_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = conflicting_pair(env)
    start_and_wait(env, pair.batch_a)
    start_and_wait(env, pair.batch_b)
    real = verify.verify_batch
    raised: list[int] = []

    def flaky(ctx: Any, records: list[staging.FileRecord], *args: Any) -> Any:
        if not raised and any(r.key == env.key(pair.a) for r in records):
            raised.append(1)
            raise TransientError("simulated: QIDO 503 until the deadline")
        return real(ctx, records, *args)

    monkeypatch.setattr(verify, "verify_batch", flaky)
    assert env.report_tick() == 500  # b is verified, a raises
    assert env.status(pair.b) == "conflict"
    assert env.report_tick() == 200
    assert raised == [1]
    assert_one_imported_one_conflict(env, pair, winner=pair.a)


def test_conflict_found_when_two_report_processes_verify_at_once(env: Env) -> None:
    pair = conflicting_pair(env)
    start_and_wait(env, pair.batch_a)
    start_and_wait(env, pair.batch_b)

    def tick(_: int) -> dict[str, Any]:
        try:
            return report.run_tick(env.ctx)
        finally:
            env.ctx.close_clients()  # this pool thread's API clients

    with ThreadPoolExecutor(2) as pool:
        ticks = list(pool.map(tick, range(2)))
    assert sum(len(t["verified"]) for t in ticks) >= 2
    assert_one_imported_one_conflict(env, pair, winner=pair.a)


# --- backlog -----------------------------------------------------------------------------------


def test_each_backlog_episode_raises_one_alert_with_its_own_id(
    new_env: Callable[..., Env],
) -> None:
    """A backlog recurs: the second episode is a new incident, not a repeat of the first."""
    env = new_env(DICOMFLOW_BACKLOG_SECONDS="60")
    settings = env.ctx.settings

    def sealed_waiting_batch(name: str) -> str:
        """A file ingested and its window sealed, with no ingest tick to start the import."""
        env.ingest([env.upload(name, make_instance())])
        env.clock.advance(settings.batch_window_seconds + settings.seal_grace_seconds + 1)
        (batch,) = batches.seal_due(env.ctx, env.clock())
        return batch

    episodes = []
    for name in ("first/a.dcm", "second/a.dcm"):
        batch = sealed_waiting_batch(name)
        assert env.report_tick() == 200
        assert env.pull() == []  # waiting, not yet for too long
        env.clock.advance(settings.backlog_seconds + 1)
        for _ in range(2):  # the episode goes on: one alert
            assert env.report_tick() == 200
        (alert,) = [m["body"] for m in env.pull()]
        assert (alert["kind"], alert["subject"]) == ("backlog", f"backlog/{batch}")
        assert alert["details"]["episode"] == alert["details"]["oldestBatch"] == batch
        assert alert["details"]["batches"] == alert["details"]["files"] == 1
        episodes.append(alert["alertId"])
        env.import_all()  # the import runs: the episode ends
        assert env.pull() == []
        assert not env.gcs.bucket(env.staging).blob(report.BACKLOG_MARKER).exists()
    assert len(set(episodes)) == 2


def test_a_failing_qido_is_logged_with_labels_not_uids(env: Env) -> None:
    """The report's error and its traceback (the QIDO URL holds the Study UID) reach the
    log with the UID replaced by its keyed label."""
    study = pydicom.uid.generate_uid()
    files = [env.upload(f"q/{i}.dcm", make_instance(study)) for i in range(2)]
    env.ingest(files)
    env.clock.advance(env.ctx.settings.batch_window_seconds + env.ctx.settings.seal_grace_seconds)
    env.ingest_tick()
    wait_finished(env, 30)
    records = [env.outcome(f).record for f in files]
    uids = {u for r in records if r is not None for u in (r.study, r.series, r.sop) if u}
    assert len(uids) == 5  # one study, two series, two instances
    stream = io.StringIO()
    log.configure(logging.INFO, stream)
    settings = env.ctx.settings
    log.use_labels(log.Labels(keys.load(settings), settings.is_pipeline_object))
    env.knobs(faults={"dicomWeb.search": {"rate": 1.0, "status": 400}})
    try:
        assert env.report_tick() == 200  # a 400 is logged, not raised: retrying cannot help
    finally:
        env.knobs(faults={})
        log.use_labels(None)
    text = stream.getvalue()
    assert "Traceback" in text and keys.load(settings).hash(keys.UID, study) in text
    assert [u for u in uids if u in text] == []
