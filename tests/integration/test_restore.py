# The export tests' fixtures are imported by name, and test functions take them as arguments.
# ruff: noqa: F811
"""Restores and restore drills on the local cloud: a backup is checked by restoring it.

Reuses the export tests' environment (fake-gcs-server, the Healthcare emulator, Pub/Sub,
functions through functions-framework). A backup is made the way the schedule makes
it: an export tick, then report's part settles it.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

import pydicom
import pytest
from rich.console import Console

from dicomflow import backup, drill, export, report, restore, store
from dicomflow.names import DicomStoreName
from dicomflow.ops import status, status_page, tables
from localcloud.corpus import Generated, generate_studies
from tests.integration.test_export import DAY, TICK, Env, make_env  # noqa: F401  (fixture)

PATIENT = "Restore^Confidential"


def seed(env: Env, studies: int = 3, series: int = 2, per_series: int = 2) -> list[Generated]:
    made = list(generate_studies(studies, series, per_series, patient_name=PATIENT))
    env.store_instances([g.data for g in made])
    return made


def make_store(env: Env, store_id: str) -> DicomStoreName:
    stores = env.ctx.healthcare().projects().locations().datasets().dicomStores()
    stores.create(parent=env.dataset, dicomStoreId=store_id, body={}).execute()
    return DicomStoreName.from_string(f"{env.dataset}/dicomStores/{store_id}")


def backed_up(env: Env, day: date = DAY) -> None:
    """Fire the export tick of ``day`` and settle its export to complete."""
    env.clock.advance(
        max(0.0, (TICK + timedelta(days=(day - DAY).days) - env.clock()).total_seconds())
    )
    assert env.tick(TICK + timedelta(days=(day - DAY).days)) == 200
    assert env.settle(day)["state"] == export.COMPLETE


def sops_in(env: Env, store: DicomStoreName) -> set[str]:
    target = restore.for_store(env.ctx, store)
    try:
        return {
            i["00080018"]["Value"][0]
            for i in target.dicomweb().search_for_instances(fields=["00080018"], limit=1000)
        }
    finally:
        target.close_clients()


def run_cli(env: Env, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    from dicomflow.ops import cli

    code = cli.main(["restore", *argv], make_ctx=lambda: env.ctx)
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else out, err


# --- dicomflow restore --------------------------------------------------------------------------


def test_restore_brings_every_instance_back_and_refuses_clearly(
    make_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env()
    made = seed(env)
    backed_up(env)
    target = make_store(env, "restored")
    day = DAY.isoformat()

    code, result, _ = run_cli(
        env, capsys, "--date", day, "--into", "restored", "--wait", "--json", "--verify-bytes", "5"
    )
    assert code == 0, result
    assert result["status"] == "restored" and result["problems"] == []
    assert result["source"] == "folder"  # the whole backup: imported from its folder
    checked = result["check"]
    assert checked["instances"] == checked["present"] == len(made)
    assert checked["series"] == 6 and checked["missing"] == 0
    assert checked["lostFromBackup"] == 0  # per-series counts of the manifest all listed
    assert checked["bytesChecked"] == 5 and checked["bytesDifferent"] == 0
    assert sops_in(env, target) == {g.sop_uid for g in made}

    # Refusals: a date without a backup, the live store, a rendered-image backup.
    code, _, err = run_cli(env, capsys, "--date", "2026-11-01", "--into", "restored")
    assert code == 1 and "no backup dated 2026-11-01" in err and day in err
    code, _, err = run_cli(env, capsys, "--date", day, "--into", "store")
    assert code == 1 and "live store" in err and "--into-live" in err
    with pytest.raises(SystemExit):
        run_cli(env, capsys, "--into", "restored")
    assert "--date" in capsys.readouterr().err
    png_day = date(2026, 11, 20)
    png = export.run_command(
        env.ctx, day=png_day, mode="full", mime_type="image/png", wait=True, poll_seconds=0.1
    )
    assert png["status"] == export.COMPLETE
    code, _, err = run_cli(env, capsys, "--date", png_day.isoformat(), "--into", "restored")
    assert code == 1 and "image/png" in err and "cannot be imported" in err

    # --into-live is the one way into the live store (identical instances: duplicates).
    code, result, _ = run_cli(
        env, capsys, "--date", day, "--into", "store", "--into-live", "--json"
    )
    assert code == 0 and result["status"] == "started" and result["operation"]

    # The text summary.
    code, text, _ = run_cli(env, capsys, "--date", day, "--into", "restored", "--wait")
    assert code == 0 and "status: restored" in text and "instances present" in text


# --- the scheduled drill ------------------------------------------------------------------------


def settle_drill(env: Env, day: date, through_report: bool = False) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        if through_report:
            report.run_tick(env.ctx)
        else:
            drill.settle_drills(env.ctx, env.clock())
        found = drill.read_record(env.ctx, day)
        assert found is not None
        if found[0]["state"] in drill.FINAL:
            return found[0]
        assert time.monotonic() < deadline, found[0]["state"]
        time.sleep(0.2)


def kinds(got: list[dict[str, Any]]) -> list[str]:
    return [a["body"]["kind"] for a in got]


def test_drill_healthy_then_corrupted_then_overdue(
    make_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomflow")
    env = make_env(DICOMFLOW_RESTORE_DRILL_DAYS="7", DICOMFLOW_RESTORE_DRILL_STUDIES="2")
    drill_store = make_store(env, "store-drill")
    made = seed(env)
    backed_up(env)  # the first tick: no complete backup yet, so no drill

    assert drill.read_record(env.ctx, DAY) is None
    # A leftover in the scratch store (a drill cut short) is cleared before the import.
    leftover = next(iter(generate_studies(1, 1, 1)))
    scratch = restore.for_store(env.ctx, drill_store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stray = pydicom.dcmread(io.BytesIO(leftover.data))
    scratch.dicomweb().store_instances(datasets=[stray])
    scratch.close_clients()
    # 1. Healthy: the next day's tick drills the latest complete backup (DAY).
    day1 = DAY + timedelta(days=1)
    backed_up(env, day1)
    assert drill.read_record(env.ctx, day1)[0]["state"] == drill.CLEARING  # type: ignore[index]
    record = settle_drill(env, day1, through_report=True)
    assert record["state"] == drill.PASSED, record["problems"]
    assert record["backupDate"] == DAY.isoformat() and len(record["studies"]) == 2
    assert record["source"] == "copy"  # a sample: copies of two studies only
    assert record["check"]["present"] == record["instances"] == 8
    assert record["check"]["bytesChecked"] == 8 and record["seconds"] >= 0
    assert drill.store_studies(env.ctx, drill_store) == []  # emptied
    assert restore.clean_up(env.ctx, record["restoreId"]) == 0  # copies gone
    assert env.alerts() == []
    shown = status.gather(env.ctx, env.clock(), env.clock() - timedelta(days=1))
    assert shown["drills"]["recent"][-1]["state"] == drill.PASSED
    assert shown["drills"]["recent"][-1]["studies"] == 2
    console = Console(file=io.StringIO(), width=140)
    console.print(tables.status_tables(shown))
    assert "Restore drills (every 7 days)" in console.file.getvalue()  # type: ignore[attr-defined]
    page = status_page.render(shown)
    assert "Restore drills (every 7 days)" in page and "passed" in page
    assert all(g.study_uid not in json.dumps(shown) + page for g in made)

    # Not due again within the week.
    assert env.tick(TICK + timedelta(days=3)) == 200
    assert drill.read_record(env.ctx, DAY + timedelta(days=3)) is None

    # 2. Corrupted: an object of the latest complete backup (day1) is deleted.
    folder = backup.dated_folder(env.ctx.settings, day1)
    victim = next(
        b for b in env.gcs.list_blobs(env.backups, prefix=folder) if b.name.endswith(".dcm")
    )
    victim.delete()
    day8 = day1 + timedelta(days=7)
    env.clock.advance(7 * 86400)
    assert env.tick(TICK + timedelta(days=8)) == 200
    record = settle_drill(env, day8)
    assert record["state"] == drill.FAILED and record["backupDate"] == day1.isoformat()
    assert "1 objects the export wrote are missing from the backup" in record["problems"]
    drill.settle_drills(env.ctx, env.clock())  # a repeat changes nothing
    failed = env.alerts()
    assert kinds(failed) == ["restore_drill_failed"]
    assert failed[0]["body"]["details"]["backupDate"] == day1.isoformat()

    # 3. Overdue: no tick for ten days, then two daily ticks; one alert.
    env.clock.advance(10 * 86400)
    assert env.tick(TICK + timedelta(days=18)) == 200
    env.clock.advance(86400)
    assert env.tick(TICK + timedelta(days=19)) == 200
    overdue = env.alerts()
    assert kinds(overdue) == ["restore_drill_overdue"]
    assert overdue[0]["body"]["details"]["lastDrill"] == day8.isoformat()

    # No PHI and no UID in any alert or log line.
    # (dicomweb-client's own request lines are quieted by ``log.configure``, as in production.)
    ours = [r for r in caplog.records if r.name.startswith("dicomflow")]
    assert any(r.getMessage() == "restore drill failed" for r in ours)
    text = json.dumps(env.received) + "\n".join(r.getMessage() for r in ours)
    text += json.dumps([getattr(r, "fields", {}) for r in ours], default=str)
    assert PATIENT not in text
    for g in made:
        assert g.study_uid not in text and g.sop_uid not in text


# --- erasure ------------------------------------------------------------------------------------


def test_an_erased_study_never_comes_back_with_a_restore(
    make_env: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomflow import keys, tombstones
    from dicomflow.errors import ConfigError
    from dicomflow.ops import cli, erase
    from tests.deployment_key import KEY_FILE

    caplog.set_level(logging.INFO, logger="dicomflow")
    env = make_env(DICOMFLOW_KEY_FILE=KEY_FILE)
    made = seed(env)
    backed_up(env)  # the backup taken before the erasure
    gone = made[0].study_uid
    kept = {g.sop_uid for g in made if g.study_uid != gone}

    argv = ["erase", "--study", gone, "--reason", "patient request 42", "--json"]
    assert cli.main(argv, make_ctx=lambda: env.ctx) == 0
    out, err = capsys.readouterr()
    erased = json.loads(out)
    key = keys.load(env.ctx.settings)
    assert erased["status"] == "erased" and erased["operation"]
    assert erased["label"] == tombstones.label_of(key, gone) and erased["keyId"] == key.key_id
    live = env.ctx.settings.dicom_store
    assert sops_in(env, live) == kept
    # studies.delete is a long-running operation of the store's dataset, followed to the end.
    op = store.get_operation(env.ctx, erased["operation"])
    assert op["name"].startswith(env.dataset + "/operations/") and op["done"]
    assert op["metadata"]["apiMethodName"].endswith("DeleteStudy") and "error" not in op
    # The tombstone: the label, the key id, the time and the reason; never the UID.
    name = tombstones.name_of(erased["label"])
    stone = env.gcs.bucket(env.staging).blob(name).download_as_text()
    assert gone not in stone and "patient request 42" in stone and key.key_id in stone
    assert tombstones.count(env.ctx) == 1
    # Without a deployment key there is no erasure, and the error names both settings.
    keyless = replace(env.ctx, settings=replace(env.ctx.settings, key_file=None))
    with pytest.raises(ConfigError, match=r"DICOMFLOW_KEY_SECRET.*DICOMFLOW_KEY_FILE"):
        erase.erase(keyless, made[1].study_uid)
    # A repeat finds it erased.
    assert cli.main(argv, make_ctx=lambda: env.ctx) == 0
    assert json.loads(capsys.readouterr().out)["repeat"] is True

    # Restore the backup from before the erasure: the study never reaches the target.
    imported: list[set[str]] = []
    real_start = restore.start_import

    def watched(ctx: Any, target: DicomStoreName, uri: str, subject: str, **kw: Any) -> str:
        prefix = uri.removeprefix(f"gs://{env.staging}/").removesuffix("**.dcm")
        imported.append({n.split("/")[0] for n in _names(env, env.staging, prefix)})
        return real_start(ctx, target, uri, subject, **kw)

    monkeypatch.setattr(restore, "start_import", watched)
    target = make_store(env, "restored")
    code, result, err2 = run_cli(
        env, capsys, "--date", DAY.isoformat(), "--into", "restored", "--wait", "--json"
    )
    assert code == 0 and result["status"] == "restored", result
    assert result["source"] == "copy" and result["studiesSkipped"] == 1
    assert imported == [{g.study_uid for g in made} - {gone}]
    assert sops_in(env, target) == kept
    assert restore.clean_up(env.ctx, result["restoreId"]) == 0
    assert status.gather(env.ctx, env.clock(), env.clock())["erasures"] == 1

    # A tombstone made with another key: the restore refuses rather than guess.
    other = keys.DeploymentKey(b"k" * 32)
    tombstones.write(env.ctx, tombstones.label_of(other, made[1].study_uid), {"keyId": "x"})
    code, _, refused = run_cli(env, capsys, "--date", DAY.isoformat(), "--into", "restored")
    assert code == 1 and other.key_id in refused and "--previous-key-file" in refused

    # No log line, alert or printed result carries the erased UID.
    ours = [r for r in caplog.records if r.name.startswith("dicomflow")]
    text = out + err + err2 + refused + json.dumps(result) + json.dumps(env.alerts())
    text += "\n".join(r.getMessage() for r in ours)
    text += json.dumps([getattr(r, "fields", {}) for r in ours], default=str)
    assert any(r.getMessage() == "study erased" for r in ours)
    assert gone not in text and PATIENT not in text


def _names(env: Env, bucket: str, prefix: str) -> list[str]:
    return [b.name[len(prefix) :] for b in env.gcs.list_blobs(bucket, prefix=prefix)]
