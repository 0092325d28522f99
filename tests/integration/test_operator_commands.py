"""The operator commands on real emulators: ``retry`` (re-drive: a new record under a retry
key, a fresh outcome that replaces the old one, no double) and ``status``, ``batches``,
``batch`` (their JSON against ``dicomflow.ops.outcomes``).

Files go through the real ingest path, the Healthcare emulator imports them,
and the report tick verifies them, all in this process with a settable clock.
A file is made ``failed`` the way a real store can lose one: its instance is
deleted after the import and before the verification.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomflow import batches, functions, header, ingest, objects, report
from dicomflow.events import StorageObject
from dicomflow.ops import cli, outcomes, redrive
from dicomflow.ops.outcomes import Outcome
from dicomflow.staging import file_key, late_name, quarantine_name, staged_name
from localcloud.pubsub import PubSubServer
from tests import browser
from tests.ingest_support import Uploaded, make_instance, upload
from tests.integration.sites import PipelineFactory, Site


class Pipeline(Site):
    """A site whose files go through ingest and report by direct calls (no events)."""

    def upload(self, name: str, data: bytes) -> Uploaded:
        return upload(self.ctx.storage, self.landing, name, data)

    def ingest(self, obj: Uploaded) -> dict[str, Any]:
        found = StorageObject(
            obj.bucket, obj.name, str(obj.generation), obj.size, obj.md5, obj.crc32c
        )
        # Event ids are opaque (Eventarc's never hold the name), and manifests carry them.
        return ingest.ingest_object(self.ctx, found, f"e-{self.key(obj)}", self.clock())

    def key(self, obj: Uploaded) -> str:
        return file_key(obj.bucket, obj.name, obj.generation)

    def outcomes(self) -> dict[str, Outcome]:
        return outcomes.read_all(self.bucket)

    def outcome(self, key: str) -> Outcome:
        return self.outcomes()[key]

    def seal_and_import(self, timeout: float = 60.0) -> None:
        """Seal every window that has copies (late windows too) and tick ingest until no
        import is running."""
        settings = self.ctx.settings
        # Past the seal of the late window that holds the seal of the current window.
        late = settings.batch_window_seconds + settings.late_window_seconds
        self.clock.advance(late + settings.seal_grace_seconds + 1)
        deadline = time.monotonic() + timeout
        while True:
            done = functions.ingest_tick(self.ctx)
            if not done["running"] and not done["queued"]:
                return
            assert time.monotonic() < deadline, "imports still running"
            time.sleep(0.2)

    def settle(self) -> None:
        """Import and verify everything staged."""
        self.seal_and_import()
        report.run_tick(self.ctx)
        assert batches.open_batches(self.bucket) == []

    def stored(self, study: str) -> list[str]:
        items = self.ctx.dicomweb().search_for_instances(study_instance_uid=study)
        return sorted(i["00080018"]["Value"][0] for i in items)

    def status(self, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
        assert cli.main(["status", "--json", *args], make_ctx=lambda: self.ctx) == 0
        doc: dict[str, Any] = json.loads(capsys.readouterr().out)
        return doc


@pytest.fixture
def p(pipeline: PipelineFactory) -> Pipeline:
    """A site on the fallback Pub/Sub (the deployment tests use the emulator where there is
    one), so that both back-ends carry the functions' alerts."""
    return pipeline(Pipeline, pubsub="fallback", settings={"DICOMFLOW_SEAL_GRACE_SECONDS": "1"})


def _lose_from_store(p: Pipeline, obj: Uploaded) -> None:
    """Import the staged files, then delete ``obj``'s instance before the report verifies."""
    p.seal_and_import()
    record = p.outcome(p.key(obj)).record
    assert record is not None and record.study and record.series and record.sop
    p.ctx.dicomweb().delete_instance(record.study, record.series, record.sop)
    report.run_tick(p.ctx)


def test_a_failed_file_is_redriven_once_and_imported_once(
    p: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    study = pydicom.uid.generate_uid()
    good = p.upload("in/good.dcm", make_instance(study))
    lost = p.upload("in/lost.dcm", make_instance(study))
    for obj in (good, lost):
        assert p.ingest(obj)["status"] == ingest.STAGED
    _lose_from_store(p, lost)
    failed = p.outcome(p.key(lost))
    assert (failed.status, failed.reason) == ("failed", "not-in-store")
    first_batch = failed.batch
    assert first_batch is not None and failed.window is not None
    assert objects.exists(p.bucket, staged_name(failed.window, failed.key))

    # Two operators re-drive it at the same time: one marks it, the other follows.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: redrive.redrive(p.ctx, failed), range(2)))
    assert sorted(r.result for r in results) == [redrive.RESTAGED, redrive.RESUMED]
    assert {r.status for r in results} == {ingest.STAGED}
    [new_key] = {r.retry_key for r in results}
    assert new_key is not None and new_key != failed.key
    staged = p.outcome(new_key)
    assert staged.status == outcomes.STAGED and staged.record is not None
    assert (staged.record.via, staged.record.event) == ("retry", f"retry:{failed.key}")
    assert staged.record.name == "in/lost.dcm" and staged.record.sop == failed.record.sop  # type: ignore[union-attr]
    # Both copies are kept: the old one is its key's claim until the lifecycle rule.
    assert objects.exists(p.bucket, staged_name(failed.window, failed.key))

    p.settle()
    found = p.outcomes()
    imported = found[new_key]
    assert imported.status == "imported", imported
    assert imported.batch not in (None, first_batch)
    assert found[failed.key].status == "failed"  # the old manifest line stays as it was
    assert found[p.key(good)].status == "imported"
    assert len(found) == 3
    assert p.stored(study) == sorted(
        o.record.sop for o in found.values() if o.record and o.record.sop and o.key != failed.key
    )
    # Each file counts once, the re-driven one by its retry's outcome.
    files = p.status(capsys)["files"]
    assert files["files"] == 2 and files["retried"] == 1
    assert files["outcomes"]["imported"] == 2 and files["outcomes"]["failed"] == 0
    assert files["reasons"] == {}

    # Nothing left to re-drive; a direct re-drive of either outcome does nothing.
    assert redrive.select(found, redrive.retried_keys(p.bucket)) == []
    again = redrive.redrive(p.ctx, found[failed.key])
    assert again.result == redrive.ALREADY and again.retry_key == new_key
    assert redrive.redrive(p.ctx, imported).result == redrive.NOT_RETRYABLE
    assert len(p.outcomes()) == 3


def test_a_crash_mid_retry_is_finished_by_the_next_retry_past_the_seal(
    p: Pipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_instance()
    real_check = header.check

    def buggy_check(read: Any, size: int, *args: Any) -> Any:
        raise header.Rejected("not-dicom", "a checker bug, fixed later")

    monkeypatch.setattr(header, "check", buggy_check)
    obj = p.upload("in/wrongly-rejected.dcm", data)
    assert p.ingest(obj)["status"] == outcomes.QUARANTINED
    quarantined = p.outcome(p.key(obj))
    assert quarantined.status == outcomes.QUARANTINED and quarantined.window
    kept = quarantine_name(quarantined.window, quarantined.key)
    assert objects.exists(p.bucket, kept)
    monkeypatch.setattr(header, "check", real_check)  # the fix is deployed

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed after the late claim, before the copy")

    monkeypatch.setattr(ingest, "copy_object", crash)
    with pytest.raises(RuntimeError):
        redrive.redrive(p.ctx, quarantined)
    monkeypatch.undo()
    assert redrive.retried_keys(p.bucket) == {quarantined.key}
    assert quarantined.record is not None
    new_key = redrive.retry_key(quarantined.record)
    # A re-drive claims its window (the operator's settings need not be the functions').
    first = objects.read_json(p.bucket, late_name(new_key))
    assert first is not None
    found = p.outcomes()
    assert [o.key for o in redrive.select(found, redrive.retried_keys(p.bucket))] == [
        quarantined.key
    ]

    # The claimed window is sealed before the next retry: the claim moves to the current one.
    p.seal_and_import()
    resumed = redrive.redrive(p.ctx, quarantined)
    assert (resumed.result, resumed.status) == (redrive.RESUMED, ingest.STAGED)
    claim = objects.read_json(p.bucket, late_name(new_key))
    assert claim is not None and resumed.window == claim["window"] != first["window"]
    p.settle()
    final = p.outcome(new_key)
    assert final.status == "imported"
    assert final.record is not None and final.record.sop
    assert p.stored(str(final.record.study)) == [final.record.sop]
    assert objects.exists(p.bucket, kept)  # left to the lifecycle rule
    files = p.status(capsys)["files"]
    assert files["files"] == 1 and files["outcomes"]["imported"] == 1
    assert files["outcomes"]["quarantined"] == 0 and files["retried"] == 1


def test_retry_cli_leaves_files_still_rejected_untouched(
    p: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = p.upload("in/broken.dcm", b"not dicom at all" * 40)
    elsewhere = p.upload("other/broken.dcm", b"still not dicom" * 40)
    for obj in (broken, elsewhere):
        assert p.ingest(obj)["status"] == outcomes.QUARANTINED

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
    assert redrive.retried_keys(p.bucket) == set()  # nothing written
    assert len(p.outcomes()) == 2

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
    # Before the seal: one open window, files staged.
    early = p.status(capsys)
    assert early["files"]["outcomes"]["in progress"] == 4
    assert early["files"]["outcomes"]["quarantined"] == 1
    [open_batch] = early["batches"]["open"]
    assert early["batches"]["counts"]["open"] == 1 and open_batch["ageSeconds"] >= 0
    assert open_batch["files"] == 4
    assert cli.main(["batch", open_batch["batch"], "--json"], make_ctx=lambda: p.ctx) == 0
    unsealed = json.loads(capsys.readouterr().out)
    assert unsealed["state"] == "open" and unsealed["fileList"]["count"] == 4

    _lose_from_store(p, lost)
    p.clock.advance(200)  # past the quarantine window's grace: its alert goes out
    report.run_tick(p.ctx)
    page = tmp_path / "status.html"
    status = p.status(capsys, "--html", str(page))
    assert status["files"]["totals"] == outcomes.totals(p.outcomes().values())
    assert status["files"]["outcomes"] == {
        "imported": 3,
        "duplicate": 0,
        "quarantined": 1,
        "conflict": 0,
        "failed": 1,
        "dropped": 0,
        "in progress": 0,
    }
    assert status["files"]["reasons"] == {
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
    assert {f["key"] for f in detail["fileList"]["files"]} == {p.key(o) for o in [*good, lost]}
    assert "in/lost.dcm" not in json.dumps(detail)
    assert cli.main(["batch", batch["batch"], "--files"], make_ctx=lambda: p.ctx) == 0
    text = capsys.readouterr().out
    assert p.key(good[0])[:20] in text and "in/" not in text
    assert cli.main(["batch", "not-a-batch"], make_ctx=lambda: p.ctx) == 2
    assert cli.main(["batch", "20000101T000000Z-0"], make_ctx=lambda: p.ctx) == 1

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


def test_dead_letters_are_counted_in_both_status_views(
    p: Pipeline, pubsub_fallback: PubSubServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Events delivery gives up on are kept in the file ``localcloud status`` counts and on
    the dead-letter topic whose subscription ``dicomflow status`` counts; neither view
    prints an object name."""
    from localcloud import __main__ as localcloud_cli
    from localcloud.delivery import Deliverer, pubsub_dead_letters, storage_event
    from localcloud.stack import StackConfig
    from tests.integration.test_delivery import Recorder

    suffix = uuid.uuid4().hex[:8]
    topic = f"projects/local/topics/dead-{suffix}"
    keep = f"projects/local/subscriptions/dead-{suffix}-keep"
    subs = p.ctx.pubsub().projects()
    subs.topics().create(name=topic, body={}).execute()
    subs.subscriptions().create(name=keep, body={"topic": topic}).execute()
    home = tmp_path / "home"
    home.mkdir()
    os.environ["LOCALCLOUD_HOME"] = str(home)  # restored after the test
    config = StackConfig.from_env()
    target = Recorder(fail_first=10**6, status=500)
    # What a running stack writes; the recorder stands in for its services.
    state = {"pid": os.getpid(), "pubsubKind": "fallback", "urls": {"ingest": target.url}}
    (home / "state.json").write_text(json.dumps({**state, "home": str(home)}))

    def views() -> tuple[int, int]:
        assert localcloud_cli.main(["status", "--json"]) == 0
        local = json.loads(capsys.readouterr().out)["deadLetters"]
        cloud = p.status(capsys, "--dead-letters", keep)["deadLetters"]
        assert cloud["subscription"] == keep
        return local, cloud["count"]

    assert views() == (0, 0)
    deliverer = Deliverer(
        workers=2,
        max_age=0.3,
        max_backoff=0.05,
        dead_letter=config.dead_letter_path,
        on_dead_letter=pubsub_dead_letters(pubsub_fallback.url, topic),
    )
    try:
        for i in range(3):
            resource = {"bucket": p.landing, "name": f"lost/患者 {i}.dcm", "generation": 1}
            deliverer.submit(storage_event(target.url, resource))
        assert deliverer.wait_idle(30)
        assert views() == (3, 3)
        assert views() == (3, 3)  # counting hands the messages back
        assert localcloud_cli.main(["status"]) == 0
        assert cli.main(["status", "--dead-letters", keep], make_ctx=lambda: p.ctx) == 0
    finally:
        deliverer.stop()
        target.close()
    text = capsys.readouterr().out
    assert "dead letters: 3 event(s) delivery gave up on" in text  # localcloud status
    assert "Dead letters: 3 event(s) delivery gave up on" in text  # dicomflow status
    assert "lost/" not in text and "患者" not in text
