"""Ingest's finalize path through functions-framework against fake-gcs-server.

These need no Healthcare API: they stop at staging, quarantine and sealing.
"""

from __future__ import annotations

import io
import json
import logging
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import functions_framework
import pytest
from cloudevents.http import CloudEvent
from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from dicomflow import alerts, batches, ingest, ledger, log, runtime
from dicomflow.config import Settings
from localcloud.storage import StorageServer
from tests.ingest_support import (
    PATIENT_NAME,
    Clock,
    Uploaded,
    finalize_event,
    make_instance,
    make_settings,
    names,
    post,
    unique,
    upload,
)

MAIN = str(Path(__file__).resolve().parents[2] / "main.py")


class Crash(BaseException):
    """Stands for the process dying at a chosen line (not caught by the code under test)."""


@pytest.fixture(scope="module")
def app() -> Any:
    return functions_framework.create_app("ingest", MAIN, "cloudevent")


@dataclass
class Env:
    client: storage.Client
    settings: Settings
    clock: Clock
    app: Any

    @property
    def landing(self) -> str:
        return self.settings.landing_bucket

    @property
    def staging(self) -> str:
        return self.settings.staging_bucket

    def deliver(self, obj: Uploaded, event_id: str | None = None) -> int:
        return post(self.app.test_client(), finalize_event(obj, self.clock(), event_id))

    def entries(self) -> list[ledger.Entry]:
        return list(ledger.list_entries(self.client.bucket(self.staging)))

    def staged(self) -> list[str]:
        return [n for n in names(self.client, self.staging, "batches/") if n.endswith(".dcm")]


def make_env(gcs: StorageServer, app: Any, shared: bool = False, **extra: str) -> Env:
    client = gcs.client()
    landing = unique("landing")
    staging = landing if shared else unique("staging")
    for bucket in {landing, staging}:
        client.create_bucket(bucket)
    settings = make_settings(landing, staging, **extra)
    clock = Clock()
    runtime.set_context(runtime.Context(settings=settings, storage=client, clock=clock))
    return Env(client, settings, clock, app)


@pytest.fixture
def env(gcs_server: StorageServer, app: Any) -> Iterator[Env]:
    yield make_env(gcs_server, app)
    runtime.set_context(None)


def test_ingest_stages_each_file_once_under_duplicate_and_concurrent_deliveries(env: Env) -> None:
    files = [
        upload(env.client, env.landing, f"study/{i:03d}.dcm", make_instance()) for i in range(24)
    ]
    deliveries = [f for f in files for _ in range(3)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(env.deliver, deliveries))
    assert set(statuses) == {200}
    for f in files[:5]:  # and once more, later, with another event id
        assert env.deliver(f, event_id="redelivery") == 200
    entries = env.entries()
    assert len(entries) == len(files)
    assert {e.status for e in entries} == {ledger.STAGED}
    staged = env.staged()
    assert len(staged) == len(files)
    assert sorted(e.staged or "" for e in entries) == staged
    for entry in entries:
        assert entry.uids is not None and entry.batch is not None
        assert entry.staged == batches.staged_name(entry.batch, entry.key)
        assert PATIENT_NAME not in entry.to_json()
    # Staged copies are byte-identical to their sources.
    source = env.client.bucket(env.landing).blob(files[0].name).download_as_bytes()
    key = ledger.ledger_key(env.landing, files[0].name, files[0].generation)
    copy = next(n for n in staged if key in n)
    assert env.client.bucket(env.staging).blob(copy).download_as_bytes() == source


def test_bad_files_go_to_quarantine_with_their_reason(env: Env) -> None:
    bad = {
        "notdicom.dcm": b"this is not a DICOM file at all" * 20,
        "nostudy.dcm": make_instance(omit=("StudyInstanceUID",)),
        "badsop.DCM": make_instance(overrides={"SOPInstanceUID": "1.2.x"}),
        "truncated.dcm": make_instance()[:150],
    }
    uploaded = [upload(env.client, env.landing, f"in/{n}", d) for n, d in bad.items()]
    for obj in uploaded:
        assert env.deliver(obj) == 200
        assert env.deliver(obj) == 200
    entries = {e.source.name: e for e in env.entries()}
    assert len(entries) == 4
    assert {e.status for e in entries.values()} == {ledger.QUARANTINED}
    assert entries["in/notdicom.dcm"].reason is not None
    assert entries["in/notdicom.dcm"].reason.startswith("not-dicom")
    assert entries["in/nostudy.dcm"].reason == "missing-uid: missing StudyInstanceUID"
    assert (entries["in/badsop.DCM"].reason or "").startswith("invalid-uid")
    assert env.staged() == []
    stored = names(env.client, env.staging, "quarantine/")
    assert len([n for n in stored if n.endswith(".dcm")]) == 4
    records = [n for n in stored if n.endswith(".json")]
    assert len(records) == 4
    for name in records:
        text = env.client.bucket(env.staging).blob(name).download_as_text()
        record = json.loads(text)
        entry = entries[record["source"]["name"]]
        assert record["reason"] == entry.reason
        assert record["object"] == entry.quarantine
        assert PATIENT_NAME not in text


def test_a_damaged_vr_is_quarantined_not_retried(env: Env) -> None:
    """A VR byte of StudyInstanceUID damaged: pydicom raises on reading the value."""
    data = make_instance()
    tag = b"\x20\x00\x0d\x00UI"
    i = data.index(tag)
    data = data[: i + 4] + b"U\xfd" + data[i + 6 :]
    obj = upload(env.client, env.landing, "p/corrupt.dcm", data)
    assert env.deliver(obj) == 200  # not 500: a retry cannot repair the bytes
    assert env.deliver(obj) == 200
    (entry,) = env.entries()
    assert entry.status == ledger.QUARANTINED
    assert entry.reason == "unreadable: header values could not be read (NotImplementedError)"
    assert entry.quarantine is not None
    stored = names(env.client, env.staging, "quarantine/")
    assert sorted(stored) == sorted(
        [entry.quarantine, ingest.quarantine_record_name(entry.quarantine)]
    )
    assert env.staged() == []


def test_logs_never_name_the_object(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Object names can be patient names: every log line names objects by hash and key."""
    stream = io.StringIO()
    log.configure(logging.INFO, stream)  # as the functions run
    good = upload(env.client, env.landing, "incoming/DOE^JOHN_19700101.dcm", make_instance())
    bad = upload(env.client, env.landing, "incoming/DOE^JOHN_19700101b.dcm", b"x" * 500)
    text = upload(env.client, env.landing, "incoming/DOE^JOHN_19700101.txt", b"notes")
    for i, obj in enumerate((good, bad, text, good)):
        assert env.deliver(obj, event_id=f"90000{i}") == 200
    # A storage error whose message quotes the request URL, as google-cloud-storage's do.
    failing = upload(env.client, env.landing, "incoming/DOE^JOHN_19700101c.dcm", make_instance())
    original = storage.Blob.download_as_bytes

    def forbidden(self: storage.Blob, *args: Any, **kwargs: Any) -> bytes:
        if self.bucket.name == env.landing:
            raise api_exceptions.Forbidden(
                f"GET {env.client._connection.API_BASE_URL}/download/storage/v1/b/"
                f"{env.landing}/o/{quote(self.name, safe='')}?alt=media: no access to {self.name}"
            )
        result: bytes = original(self, *args, **kwargs)
        return result

    monkeypatch.setattr(storage.Blob, "download_as_bytes", forbidden)
    assert env.deliver(failing, event_id="900009") == 500
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
        "ingest failed; the event will be retried",
    }
    label = alerts.object_label(env.settings, env.landing, good.name)
    assert label.startswith("sha256:")
    key = ledger.ledger_key(env.landing, good.name, good.generation)
    assert any(r.get("object") == label and r.get("key") == key for r in records)
    failed = next(r for r in records if r["message"].startswith("ingest failed"))
    assert (failed["errorType"], failed["httpStatus"]) == ("Forbidden", 403)
    assert any("exception" in r for r in records)  # the platform's log of the 500


def test_loop_guard_pipeline_prefixes_in_the_landing_bucket(
    gcs_server: StorageServer, app: Any
) -> None:
    env = make_env(gcs_server, app, shared=True)
    try:
        good = upload(env.client, env.landing, "upload/a.dcm", make_instance())
        assert env.deliver(good) == 200
        before = names(env.client, env.landing, "")
        # Every object the pipeline wrote, plus planted ones under each of its prefixes.
        planted = [
            upload(env.client, env.landing, f"{p}planted.dcm", make_instance())
            for p in ("batches/x/", "ledger/", "quarantine/w/", "manifests/", "state/")
        ]
        own = [
            Uploaded(env.landing, n, 1, 10, "", None) for n in before if not n.startswith("upload/")
        ]
        for obj in planted + own:
            assert env.deliver(obj) == 200
        after = names(env.client, env.landing, "")
        assert sorted(set(after) - {p.name for p in planted}) == before
        assert len(env.entries()) == 1
    finally:
        runtime.set_context(None)


def test_old_events_are_recorded_and_dropped(env: Env) -> None:
    obj = upload(env.client, env.landing, "late.dcm", make_instance())
    env.clock.advance(env.settings.max_event_age_seconds + 5)
    event = finalize_event(obj, env.clock.now.replace(year=2025))
    assert post(env.app.test_client(), event) == 200
    (entry,) = env.entries()
    assert (entry.status, entry.reason) == (ledger.DROPPED, "event-too-old")
    assert env.staged() == []


def test_skipped_objects_leave_no_trace(env: Env) -> None:
    empty = upload(env.client, env.landing, "empty.dcm", b"")
    other = upload(env.client, env.landing, "notes.txt", b"hello")
    assert env.deliver(empty) == 200
    assert env.deliver(other) == 200
    assert env.entries() == []
    assert names(env.client, env.staging, "") == []


def test_batches_close_on_size_without_exceeding_it(gcs_server: StorageServer, app: Any) -> None:
    env = make_env(gcs_server, app, DICOMFLOW_BATCH_MAX_FILES="10")
    try:
        files = [upload(env.client, env.landing, f"s/{i}.dcm", make_instance()) for i in range(60)]
        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(env.deliver, files)) == {200}
        entries = env.entries()
        assert {e.status for e in entries} == {ledger.STAGED}
        per_batch: dict[str, int] = {}
        for e in entries:
            per_batch[e.batch or ""] = per_batch.get(e.batch or "", 0) + 1
        assert max(per_batch.values()) <= 10
        assert 6 <= len(per_batch) <= 12
        staging = env.client.bucket(env.staging)
        sealed = [b for b in per_batch if batches.exists(staging, batches.seal_name(b))]
        assert len(sealed) >= len(per_batch) - 2  # all but the still open ones
        listed: set[str] = set()
        for b in sealed:
            files_list = batches.read_file_list(staging, b)
            assert files_list is not None and files_list.count <= 10
            assert not (files_list.keys & listed)
            listed |= files_list.keys
        # Every file is in exactly one sealed file list or in a batch still open.
        for e in entries:
            assert (e.key in listed) == (e.batch in sealed)
    finally:
        runtime.set_context(None)


def test_tick_seals_aged_batches_and_lists_their_files(env: Env) -> None:
    files = [upload(env.client, env.landing, f"a/{i}.dcm", make_instance()) for i in range(5)]
    for f in files:
        env.deliver(f)
    ctx = runtime.context()
    assert batches.seal_due(ctx, env.clock()) == []  # window not over yet
    env.clock.advance(env.settings.batch_window_seconds + env.settings.seal_grace_seconds)
    (sealed,) = batches.seal_due(ctx, env.clock())
    staging = env.client.bucket(env.staging)
    file_list = batches.read_file_list(staging, sealed)
    assert file_list is not None and file_list.count == 5
    assert file_list.keys == {e.key for e in env.entries()}
    assert batches.list_ids(staging, batches.ACTIVE_PREFIX) == [sealed]
    assert batches.list_ids(staging, batches.OPEN_PREFIX) == []
    assert batches.seal_due(ctx, env.clock()) == []


def test_a_file_copied_after_the_seal_is_restaged(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    early = upload(env.client, env.landing, "early.dcm", make_instance())
    late = upload(env.client, env.landing, "late.dcm", make_instance())
    assert env.deliver(early) == 200
    original = ingest.copy_object
    ctx = runtime.context()

    sealed: list[str] = []

    def copy_then_seal_first(c: runtime.Context, source: Any, target: str) -> None:
        # The tick seals the batch while this (first) copy is in flight.
        if not sealed:
            sealed.append(target.split("/")[1])
            batches.seal(ctx, sealed[0], env.clock(), reason="age")
        original(c, source, target)

    monkeypatch.setattr(ingest, "copy_object", copy_then_seal_first)
    assert env.deliver(late) == 200
    monkeypatch.setattr(ingest, "copy_object", original)
    entries = {e.source.name: e for e in env.entries()}
    first, second = entries["early.dcm"], entries["late.dcm"]
    assert first.status == second.status == ledger.STAGED
    assert second.restaged == 1 and second.batch != first.batch
    staging = env.client.bucket(env.staging)
    sealed = batches.read_file_list(staging, first.batch or "")
    assert sealed is not None and sealed.keys == {first.key}
    assert sorted(env.staged()) == sorted([first.staged or "", second.staged or ""])


def test_crash_after_claim_then_replay_completes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = upload(env.client, env.landing, "c.dcm", make_instance())
    original = ingest.copy_object

    def crash(*args: Any) -> None:
        raise Crash

    monkeypatch.setattr(ingest, "copy_object", crash)
    with pytest.raises(Crash):
        env.deliver(obj)
    (entry,) = env.entries()
    assert entry.status == ledger.CLAIMED and env.staged() == []
    monkeypatch.setattr(ingest, "copy_object", original)
    assert env.deliver(obj) == 200
    (entry,) = env.entries()
    assert entry.status == ledger.STAGED and len(env.staged()) == 1


def _tick(env: Env) -> dict[str, Any]:
    return ingest.tick(runtime.context(), "tick")


STUCK = ingest.CLAIM_WINDOW_SECONDS + ingest.STUCK_CLAIM_SECONDS


def test_delivered_files_leave_no_claim_markers(env: Env) -> None:
    files = [upload(env.client, env.landing, f"m/{i}.dcm", make_instance()) for i in range(3)]
    files.append(upload(env.client, env.landing, "m/bad.dcm", b"junk" * 100))
    for f in files:
        assert env.deliver(f) == 200
    assert names(env.client, env.staging, ingest.CLAIMS_PREFIX) == []
    assert {e.status for e in env.entries()} == {ledger.STAGED, ledger.QUARANTINED}


@pytest.mark.parametrize(
    ("name", "data", "crash_at", "outcome"),
    [
        ("s/staged.dcm", make_instance(), "copy", ledger.STAGED),
        ("s/quarantined.dcm", b"not dicom" * 100, "copy", ledger.QUARANTINED),
        ("s/unclaimed.dcm", make_instance(), "claim", ledger.STAGED),
    ],
)
def test_tick_resumes_a_claim_no_delivery_comes_back_to(
    env: Env, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes, crash_at: str, outcome: str
) -> None:
    """Claim (or not yet), crash, the platform gives up: a later tick finishes the file."""
    obj = upload(env.client, env.landing, name, data)
    original_copy, original_create = ingest.copy_object, ledger.create

    def crash(*args: Any) -> None:
        raise Crash

    if crash_at == "copy":
        monkeypatch.setattr(ingest, "copy_object", crash)
    else:  # after the marker, before the ledger entry
        monkeypatch.setattr(ledger, "create", crash)
    with pytest.raises(Crash):
        env.deliver(obj)
    monkeypatch.setattr(ingest, "copy_object", original_copy)
    monkeypatch.setattr(ledger, "create", original_create)
    expected = [] if crash_at == "claim" else [ledger.CLAIMED]
    assert [e.status for e in env.entries()] == expected
    (marker,) = names(env.client, env.staging, ingest.CLAIMS_PREFIX)

    # Too recent: a delivery may still be at work; the tick leaves it alone.
    env.clock.advance(ingest.STUCK_CLAIM_SECONDS / 2)
    assert _tick(env)["resumed"] == []
    assert [e.status for e in env.entries()] == expected
    env.clock.advance(STUCK)
    result = _tick(env)
    key = ledger.ledger_key(obj.bucket, obj.name, obj.generation)
    assert [(r["key"], r["status"]) for r in result["resumed"]] == [(key, outcome)]
    (entry,) = env.entries()
    assert entry.status == outcome
    if outcome == ledger.STAGED:
        assert env.staged() == [entry.staged]
    else:
        assert entry.quarantine in names(env.client, env.staging, "quarantine/")
    assert names(env.client, env.staging, ingest.CLAIMS_PREFIX) == []
    assert marker.startswith(ingest.CLAIMS_PREFIX)
    # A late redelivery (or tick) changes nothing.
    assert env.deliver(obj) == 200
    assert _tick(env)["resumed"] == []
    assert [e.status for e in env.entries()] == [outcome]


def test_tick_reads_no_entries_while_claims_are_recent(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = upload(env.client, env.landing, "r/a.dcm", make_instance())

    def crash(*args: Any) -> None:
        raise Crash

    monkeypatch.setattr(ingest, "copy_object", crash)
    with pytest.raises(Crash):
        env.deliver(obj)
    reads: list[str] = []
    original = ledger.read

    def counting(bucket: storage.Bucket, key: str) -> Any:
        reads.append(key)
        return original(bucket, key)

    monkeypatch.setattr(ledger, "read", counting)
    assert _tick(env)["resumed"] == []
    assert reads == []


def test_a_stuck_claim_that_fails_again_keeps_its_marker(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = upload(env.client, env.landing, "f/a.dcm", make_instance())

    def crash(*args: Any) -> None:
        raise Crash

    def unavailable(*args: Any) -> None:
        raise ingest.TransientError("storage unavailable")

    monkeypatch.setattr(ingest, "copy_object", crash)
    with pytest.raises(Crash):
        env.deliver(obj)
    monkeypatch.setattr(ingest, "copy_object", unavailable)
    env.clock.advance(STUCK)
    assert _tick(env)["resumed"] == []  # logged, not raised: the tick goes on
    assert len(names(env.client, env.staging, ingest.CLAIMS_PREFIX)) == 1
    monkeypatch.undo()
    # The failed attempt re-staged the file into a new batch: that counts as a touch.
    env.clock.advance(60)
    assert _tick(env)["resumed"] == []
    env.clock.advance(STUCK)
    (resumed,) = _tick(env)["resumed"]
    assert resumed["status"] == ledger.STAGED
    assert names(env.client, env.staging, ingest.CLAIMS_PREFIX) == []


def test_header_check_uses_ranged_reads_on_a_50_mb_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_instance(rows=4096, pixel_bytes=50 * 1024 * 1024)
    obj = upload(env.client, env.landing, "big/ct.dcm", data)
    del data
    downloaded: list[int] = []
    original = storage.Blob.download_as_bytes

    def counting(self: storage.Blob, *args: Any, **kwargs: Any) -> bytes:
        result: bytes = original(self, *args, **kwargs)
        if self.bucket.name == env.landing:
            downloaded.append(len(result))
        return result

    monkeypatch.setattr(storage.Blob, "download_as_bytes", counting)
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
    (entry,) = env.entries()
    assert entry.status == ledger.STAGED
    assert sum(downloaded) <= 64 * 1024
    assert peak < 8 * 1024 * 1024, peak


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
        # name: (bytes, (ledger status, reason code), or ("skipped", skip reason))
        "in/NASTY*?[a-z]\\x.dcm": (bytes(range(256)) * 12, (ledger.QUARANTINED, "not-dicom")),
        "../NASTY up.dcm": (preamble + b"\xff" * 64, (ledger.QUARANTINED, "no-file-meta")),
        "in/../../NASTY\nline.dcm": (good[:300], (ledger.QUARANTINED, "truncated")),
        "in/**/NASTY\r.dcm": (good[:-1], (ledger.QUARANTINED, "truncated")),
        "in/NASTY Müller Ωmega 患者\u2028.DCM": (good, (ledger.STAGED, None)),
        "in/%2e%2e/NASTY.dcm": (b"", ("skipped", "empty")),
        "in/NASTY.dcm\n": (good, ("skipped", "pattern")),
    }
    client = env.app.test_client()

    def deliver(data: dict[str, Any]) -> int:
        # The name only in the payload: HTTP headers cannot carry a newline (nor can a real
        # object name; fake-gcs-server accepts one all the same).
        attributes = finalize_event(Uploaded(env.landing, "x", 1, 9, "", None), env.clock())
        return post(client, CloudEvent(attributes.get_attributes(), data))

    for name, (data, _) in corpus.items():
        obj = upload(env.client, env.landing, name, data)
        assert deliver(finalize_event(obj, env.clock()).get_data()) == 200
    # Payloads no upload can produce: a lone surrogate (JSON carries it, UTF-8 cannot),
    # a null name, a generation that is not a number.
    for data in (
        {"bucket": env.landing, "name": "in/NASTY\ud800.dcm", "generation": "1", "size": "9"},
        {"bucket": env.landing, "name": None, "generation": "1", "size": "9"},
        {"bucket": env.landing, "name": "in/NASTY.dcm", "generation": "NASTY", "size": "9"},
    ):
        assert deliver(data) == 200

    outcomes = {
        e.source.name: (e.status, e.reason.split(":")[0] if e.reason else None)
        for e in env.entries()
    }
    expected = {name: outcome for name, (_, outcome) in corpus.items() if outcome[0] != "skipped"}
    assert outcomes == expected
    records = [json.loads(line) for line in stream.getvalue().rstrip("\n").split("\n")]
    for record in records:
        assert "NASTY" not in json.dumps(record, ensure_ascii=False), record
    assert sum(r["message"] == "skipped" for r in records) == 2
    assert sum(r["message"].startswith("permanent error: ") for r in records) == 3
