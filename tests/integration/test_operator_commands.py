"""The operator commands on real emulators: ``retry`` (re-drive: one entry per file, a fresh
outcome, no loss) and ``status``, ``batches``, ``batch`` (their JSON against the ledger).

Files go through the real ingest path, the Healthcare emulator imports them,
and the report tick verifies them, all in this process with a settable clock.
A file is made ``failed`` the way a real store can lose one: its instance is
deleted after the import and before the verification.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

from dicomflow import batches, cli, header, ingest, ledger, redrive, report, runtime
from dicomflow.config import load_settings
from dicomflow.events import StorageObject
from localcloud.healthcare import HealthcareServer
from localcloud.pubsub import PubSubServer, start_pubsub
from localcloud.storage import StorageServer
from tests import browser
from tests.ingest_support import Clock, Uploaded, make_instance, upload

PARENT = "projects/local/locations/us-central1"


@pytest.fixture(scope="module")
def pubsub() -> Iterator[PubSubServer]:
    server = start_pubsub(kind="fallback")
    yield server
    server.stop()


@dataclass
class Pipeline:
    ctx: runtime.Context
    clock: Clock
    landing: str
    staging: str

    @property
    def bucket(self) -> Any:
        return self.ctx.storage.bucket(self.staging)

    def upload(self, name: str, data: bytes) -> Uploaded:
        return upload(self.ctx.storage, self.landing, name, data)

    def ingest(self, obj: Uploaded) -> dict[str, Any]:
        found = StorageObject(
            obj.bucket, obj.name, str(obj.generation), obj.size, obj.md5, obj.crc32c
        )
        return ingest.ingest_object(self.ctx, found, f"e-{obj.name}", self.clock())

    def key(self, obj: Uploaded) -> str:
        return ledger.ledger_key(obj.bucket, obj.name, obj.generation)

    def entry(self, obj: Uploaded) -> tuple[ledger.Entry, int]:
        found = ledger.read(self.bucket, self.key(obj))
        assert found is not None
        return found

    def seal_and_import(self, timeout: float = 60.0) -> None:
        """Seal every open batch and tick ingest until no import is running."""
        settings = self.ctx.settings
        self.clock.advance(settings.batch_window_seconds + settings.seal_grace_seconds + 1)
        deadline = time.monotonic() + timeout
        while True:
            ingest.tick(self.ctx)
            if not batches.list_ids(self.bucket, batches.ACTIVE_PREFIX):
                return
            assert time.monotonic() < deadline, "imports still running"
            time.sleep(0.2)

    def settle(self) -> None:
        """Import and verify everything staged."""
        self.seal_and_import()
        report.run_tick(self.ctx)
        assert not batches.list_ids(self.bucket, batches.FINISHED_PREFIX)

    def stored(self, study: str) -> list[str]:
        items = self.ctx.dicomweb().search_for_instances(study_instance_uid=study)
        return sorted(i["00080018"]["Value"][0] for i in items)

    def batches_holding(self, key: str) -> list[str]:
        found = []
        for batch in sorted(
            {n.split("/")[1] for n in self._names("batches/") if n.endswith("/_files.json")}
        ):
            files = batches.read_file_list(self.bucket, batch)
            if files is not None and key in files.keys:
                found.append(batch)
        return found

    def _names(self, prefix: str) -> list[str]:
        return [b.name for b in self.ctx.storage.list_blobs(self.staging, prefix=prefix)]


@pytest.fixture
def p(
    gcs_server: StorageServer, healthcare_server: HealthcareServer, pubsub: PubSubServer
) -> Iterator[Pipeline]:
    suffix = uuid.uuid4().hex[:10]
    gcs = gcs_server.client()
    landing, staging, backups = f"landing-{suffix}", f"staging-{suffix}", f"backups-{suffix}"
    for name in (landing, staging, backups):
        gcs.create_bucket(name)
    api = build(
        "healthcare",
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": healthcare_server.url + "/"},
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
    )
    datasets = api.projects().locations().datasets()
    datasets.create(parent=PARENT, datasetId=f"ds-{suffix}", body={}).execute()
    dataset = f"{PARENT}/datasets/ds-{suffix}"
    datasets.dicomStores().create(parent=dataset, dicomStoreId="store", body={}).execute()
    api.close()
    settings = load_settings(
        {
            "DICOMFLOW_DICOM_STORE": f"{dataset}/dicomStores/store",
            "DICOMFLOW_LANDING_BUCKET": landing,
            "DICOMFLOW_STAGING_BUCKET": staging,
            "DICOMFLOW_BACKUP_BUCKET": backups,
            "DICOMFLOW_ALERTS_TOPIC": f"projects/local/topics/alerts-{suffix}",
            "DICOMFLOW_HEALTHCARE_ENDPOINT": healthcare_server.url,
            "DICOMFLOW_PUBSUB_ENDPOINT": pubsub.url,
            "STORAGE_EMULATOR_HOST": gcs_server.url,
            "DICOMFLOW_SEAL_GRACE_SECONDS": "1",
        }
    )
    clock = Clock(datetime.now(UTC))
    ctx = runtime.Context(settings=settings, storage=gcs, clock=clock)
    ctx.pubsub().projects().topics().create(name=str(settings.alerts_topic), body={}).execute()
    yield Pipeline(ctx, clock, landing, staging)
    ctx.close_clients()


def _lose_from_store(p: Pipeline, obj: Uploaded) -> None:
    """Import the staged files, then delete ``obj``'s instance before the report verifies."""
    p.seal_and_import()
    uids = p.entry(obj)[0].uids
    assert uids is not None
    p.ctx.dicomweb().delete_instance(uids.study, uids.series, uids.sop)
    report.run_tick(p.ctx)


def test_a_failed_file_is_redriven_once_and_imported_once(p: Pipeline) -> None:
    study = pydicom.uid.generate_uid()
    good = p.upload("in/good.dcm", make_instance(study))
    lost = p.upload("in/lost.dcm", make_instance(study))
    for obj in (good, lost):
        assert p.ingest(obj)["status"] == ledger.STAGED
    _lose_from_store(p, lost)
    failed, _ = p.entry(lost)
    assert (failed.status, failed.reason) == (ledger.FAILED, "not-in-store")
    first_batch = failed.batch
    assert first_batch is not None
    assert batches.exists(p.bucket, batches.staged_name(first_batch, failed.key))

    # Two operators re-drive it at the same time: one resets the entry, the other follows.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: redrive.redrive(p.ctx, failed.key), range(2)))
    assert sorted(r.result for r in results) == [redrive.RESTAGED, redrive.RESUMED]
    assert {r.status for r in results} == {ledger.STAGED}
    staged, _ = p.entry(lost)
    assert staged.status == ledger.STAGED and staged.batch != first_batch
    assert [r["status"] for r in staged.detail["retries"]] == [ledger.FAILED]
    assert staged.detail["retries"][0]["batch"] == first_batch
    # The old copy is gone; the old batch's failure manifest still tells the story.
    assert not batches.exists(p.bucket, batches.staged_name(first_batch, failed.key))

    p.settle()
    imported, _ = p.entry(lost)
    assert imported.status == ledger.IMPORTED, imported
    assert imported.batch == staged.batch
    assert p.entry(good)[0].status == ledger.IMPORTED
    entries = list(ledger.list_entries(p.bucket))
    assert len(entries) == 2  # one entry per object generation, before and after
    assert p.batches_holding(failed.key) == sorted([first_batch, staged.batch or ""])
    assert p.stored(study) == sorted(e.uids.sop for e in entries if e.uids)

    # Nothing left to re-drive; a direct re-drive of the imported file does nothing.
    assert redrive.select(entries) == []
    again = redrive.redrive(p.ctx, failed.key)
    assert again.result == redrive.CHANGED and again.status == ledger.IMPORTED


def test_a_crash_after_the_reset_is_finished_by_the_next_retry(
    p: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_instance()
    real_check = header.check

    def buggy_check(read: Any, size: int, *args: Any) -> Any:
        raise header.Rejected("not-dicom", "a checker bug, fixed later")

    monkeypatch.setattr(header, "check", buggy_check)
    obj = p.upload("in/wrongly-rejected.dcm", data)
    assert p.ingest(obj)["status"] == ledger.QUARANTINED
    quarantined, _ = p.entry(obj)
    assert quarantined.quarantine and batches.exists(p.bucket, quarantined.quarantine)
    monkeypatch.setattr(header, "check", real_check)  # the fix is deployed

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed after the ledger reset")

    monkeypatch.setattr(ingest, "ingest_object", crash)
    with pytest.raises(RuntimeError):
        redrive.redrive(p.ctx, quarantined.key)
    monkeypatch.undo()
    pending, _ = p.entry(obj)
    assert pending.status == ledger.CLAIMED and redrive.is_retry_pending(pending)
    assert [e.key for e in redrive.select(list(ledger.list_entries(p.bucket)))] == [pending.key]

    resumed = redrive.redrive(p.ctx, pending.key)
    assert (resumed.result, resumed.status) == (redrive.RESUMED, ledger.STAGED)
    assert not batches.exists(p.bucket, quarantined.quarantine)
    assert not batches.exists(p.bucket, ingest.quarantine_record_name(quarantined.quarantine))
    p.settle()
    final, _ = p.entry(obj)
    assert final.status == ledger.IMPORTED
    assert final.uids is not None and p.stored(final.uids.study) == [final.uids.sop]
    assert [r["status"] for r in final.detail["retries"]] == [ledger.QUARANTINED]
    assert len(list(ledger.list_entries(p.bucket))) == 1


def test_retry_cli_leaves_files_still_rejected_untouched(
    p: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = p.upload("in/broken.dcm", b"not dicom at all" * 40)
    elsewhere = p.upload("other/broken.dcm", b"still not dicom" * 40)
    for obj in (broken, elsewhere):
        assert p.ingest(obj)["status"] == ledger.QUARANTINED
    before = {o.name: p.entry(o)[1] for o in (broken, elsewhere)}

    assert cli.main(["retry", "--json", "--dry-run"], make_ctx=lambda: p.ctx) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["selected"] == 2 and dry["results"] == {"would-retry": 2}

    code = cli.main(["retry", "--json", "--prefix", "in/"], make_ctx=lambda: p.ctx)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 1
    assert out["results"] == {redrive.STILL_REJECTED: 1}
    [line] = out["files"]
    assert line["key"] == p.key(broken) and line["reason"] == "not-dicom"
    assert "broken.dcm" not in json.dumps(out)  # object names never printed
    # No write at all: the entries keep their generation.
    assert {o.name: p.entry(o)[1] for o in (broken, elsewhere)} == before

    with pytest.raises(SystemExit) as usage:
        cli.main(["retry", "--status", "imported"], make_ctx=lambda: p.ctx)
    assert usage.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- status, batches, batch ---------------------------------------------------------------------


def test_status_batches_and_batch_json_follow_the_pipeline(
    p: Pipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    good = [p.upload(f"in/{i}.dcm", make_instance(study)) for i in range(3)]
    lost = p.upload("in/lost.dcm", make_instance(study))
    broken = p.upload("in/broken.dcm", b"no preamble here" * 30)
    for obj in [*good, lost, broken]:
        p.ingest(obj)
    # Before the seal: one open batch, files staged.
    assert cli.main(["status", "--json"], make_ctx=lambda: p.ctx) == 0
    early = json.loads(capsys.readouterr().out)
    assert early["ledger"]["outcomes"]["in progress"] == 4
    assert early["ledger"]["outcomes"]["quarantined"] == 1
    [open_batch] = early["batches"]["open"]
    assert early["batches"]["counts"]["open"] == 1 and open_batch["ageSeconds"] >= 0

    _lose_from_store(p, lost)
    p.clock.advance(200)  # past the quarantine window's grace: its alert goes out
    report.run_tick(p.ctx)
    page = tmp_path / "status.html"
    assert cli.main(["status", "--json", "--html", str(page)], make_ctx=lambda: p.ctx) == 0
    status = json.loads(capsys.readouterr().out)
    entries = list(ledger.list_entries(p.bucket))
    assert status["ledger"]["totals"] == ledger.totals(entries)
    assert status["ledger"]["outcomes"] == {
        "imported": 3,
        "duplicate": 0,
        "quarantined": 1,
        "conflict": 0,
        "failed": 1,
        "dropped": 0,
        "in progress": 0,
    }
    assert status["ledger"]["reasons"] == {
        "quarantined": {"not-dicom": 1},
        "failed": {"not-in-store": 1},
    }
    assert status["batches"]["verified"] == 1 and status["batches"]["open"] == []
    assert status["alerts"]["byKind"] == {"import_failed": 1, "quarantined": 1}
    tl = status["timeline"]
    assert tl["uploads"]["total"] == 5 and len(tl["seals"]) == 1
    assert [op["kind"] for op in tl["operations"]] == ["import"]
    assert "in/" not in json.dumps(status)  # no object names
    assert page.read_text().count('class="seal"') == 1

    assert cli.main(["batches", "--json"], make_ctx=lambda: p.ctx) == 0
    [batch] = json.loads(capsys.readouterr().out)["batches"]
    assert batch["state"] == "verified" and batch["files"] == 4
    assert batch["counts"] == {"conflict": 0, "duplicate": 0, "failed": 1, "imported": 3}

    assert cli.main(["batch", batch["batch"], "--json"], make_ctx=lambda: p.ctx) == 0
    detail = json.loads(capsys.readouterr().out)
    [failure] = detail["manifest"]["failure"]
    assert failure["key"] == p.key(lost) and failure["reason"] == "not-in-store"
    assert {line["key"] for line in detail["manifest"]["success"]} == {p.key(g) for g in good}
    assert detail["fileList"]["count"] == 4 and detail["state"] == "verified"
    assert "in/lost.dcm" not in json.dumps(detail)

    if browser.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    rendered = browser.render(
        page,
        {
            "seals": "document.querySelectorAll('#timeline .seal').length",
            "alerts": "document.querySelectorAll('#timeline .alert').length",
            "operations": "document.querySelectorAll('#timeline .operation').length",
        },
    )
    assert rendered.errors == []
    assert rendered.values == {"seals": 1, "alerts": 2, "operations": 1}
