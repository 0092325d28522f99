"""``make demo``'s flow, checked against the recorded outcomes, the store and the buckets.

The package fixture ``demo_run`` (conftest) starts the local cloud as the demo
does, uploads the sample corpus and waits for every outcome, the export and
the alerts. These tests recount everything from the sources and compare with
the summary the demo printed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

from dicomflow import alerts, feeds, manifests
from dicomflow.ops import outcomes
from dicomflow.staging import failure_name, file_key, quarantine_name
from localcloud import leaks
from localcloud.demo import AWKWARD_NAMES
from tests.e2e.conftest import DemoRun

# The package fixture runs the whole demo flow; on a loaded machine that takes minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def _store_sops(run: DemoRun) -> list[str]:
    session = requests.Session()
    client = DICOMwebClient(
        f"{run.stack.urls['healthcare']}/v1/{run.stack.config.store_name}/dicomWeb",
        session=session,
    )
    found: list[str] = []
    try:
        while True:
            page = client.search_for_instances(offset=len(found), limit=500, fields=["00080018"])
            found += [i["00080018"]["Value"][0] for i in page]
            if len(page) < 500:
                return found
    finally:
        session.close()


def _import_operations(run: DemoRun) -> int:
    api = build(
        "healthcare",
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": run.stack.urls["healthcare"] + "/"},
        credentials=AnonymousCredentials(),
    )
    try:
        dataset = run.stack.config.store_name.rsplit("/dicomStores/", 1)[0]
        ops = (
            api.projects()
            .locations()
            .datasets()
            .operations()
            .list(name=dataset, pageSize=1000)
            .execute()
            .get("operations", [])
        )
    finally:
        api.close()
    return sum(1 for op in ops if op["metadata"]["apiMethodName"].endswith("ImportDicomData"))


def test_the_summary_accounts_for_every_uploaded_file(demo_run: DemoRun) -> None:
    summary = demo_run.summary
    gcs = demo_run.gcs
    config = demo_run.stack.config
    assert summary["problems"] == [], summary["problems"]

    landing = list(gcs.list_blobs(config.landing_bucket))
    assert len(landing) == summary["uploaded"] > 250
    staging = gcs.bucket(config.staging_bucket)
    found = outcomes.read_all(staging)
    keys = {file_key(b.bucket.name, b.name, b.generation) for b in landing}
    assert set(found) == keys  # one record per uploaded object generation
    totals = outcomes.totals(found.values())
    assert totals == summary["totals"]
    assert sum(totals.values()) == summary["uploaded"] == summary["records"]
    assert all(o.status in outcomes.FINAL for o in found.values())

    # The corpus holds broken files; each is quarantined, with its reason and its copy.
    quarantined = [o for o in found.values() if o.status == outcomes.QUARANTINED]
    assert len(quarantined) >= 10
    assert sum(summary["quarantineReasons"].values()) == len(quarantined)
    reasons = Counter(feeds.reason_code(o.reason) for o in quarantined)
    assert reasons == Counter(summary["quarantineReasons"])
    copies = {b.name for b in gcs.list_blobs(config.staging_bucket, prefix="quarantine/")}
    assert all(quarantine_name(str(o.window), o.key) in copies for o in quarantined)

    # Every awkward name (Unicode, spaces, #, ?, %, +, no extension) reached the store.
    by_name = {o.record.name: o.status for o in found.values() if o.record is not None}
    assert {name: by_name.get(name) for name in AWKWARD_NAMES} == dict.fromkeys(
        AWKWARD_NAMES, "imported"
    )

    # The store holds exactly the instances of the files marked imported.
    stored = _store_sops(demo_run)
    assert len(stored) == len(set(stored)) == summary["storeInstances"]
    imported = [
        o.record.sop
        for o in found.values()
        if o.status == "imported" and o.record is not None and o.record.sop
    ]
    assert sorted(imported) == sorted(stored)
    assert totals["imported"] == len(stored)

    # Few, large imports: one operation per batch, and batches are verified.
    verified = sorted(
        {
            b.name.split("/")[1]
            for b in gcs.list_blobs(config.staging_bucket, prefix="manifests/")
            if b.name.endswith("/summary.json")
        }
    )
    assert len(verified) == summary["batches"]
    assert summary["importOperations"] == len(verified)
    # A batch whose import start was interrupted may be imported again; never more.
    assert len(verified) <= _import_operations(demo_run) <= 2 * len(verified)
    batched = [o for o in found.values() if o.status != outcomes.QUARANTINED]
    assert {o.batch for o in batched} == set(verified)

    # One alert per batch with conflicts and per batch with failures, none for clean ones.
    with_status: dict[str, set[str]] = {"conflict": set(), "failed": set()}
    for batch in verified:
        for line in manifests.read_lines(staging, failure_name(batch)):
            with_status[line["status"]].add(batch)
    assert summary["alerts"].get("conflict", 0) == len(with_status["conflict"])
    assert summary["alerts"].get("import_failed", 0) == len(with_status["failed"])
    assert set(summary["alerts"]) <= set(alerts.ALERT_KINDS)
    windows = {o.window for o in quarantined}
    assert summary["alerts"]["quarantined"] == len(windows)  # one per quarantine window

    # The backup holds one object per stored instance.
    backup = summary["backup"]
    assert backup["complete"] is True
    prefix = backup["prefix"].removeprefix(f"gs://{config.backup_bucket}/")
    backed_up = [
        b.name
        for b in gcs.list_blobs(config.backup_bucket, prefix=prefix)
        if not b.name.endswith("_MANIFEST.json")
    ]
    assert len(backed_up) == backup["objects"] == len(stored)

    # Every stage is timed, and the whole flow fits the demo's budget on a small machine.
    assert set(summary["stages"]) == {
        f"upload {summary['uploaded']} files",
        "ingest, import and verify",
        "export the store",
        "alert on quarantined files",
        "restore the backup into a second store",
    }
    assert sum(summary["stages"].values()) < 170

    # No patient data in the functions' logs or the alerts: every line and alert scanned.
    scan = summary["leakScan"]
    assert scan["found"] == [] and scan["logLines"] > 100 and scan["alerts"] >= 3
    assert all(scan["markers"][kind] > 0 for kind in leaks.UID_ATTRIBUTES + leaks.PHI_ATTRIBUTES)
    assert "ingest, import and verify" in demo_run.output


def test_the_backup_restores_into_a_second_store_whole_and_byte_identical(
    demo_run: DemoRun,
) -> None:
    from dicomflow import restore, verify
    from dicomflow.config import load_settings
    from dicomflow.names import DicomStoreName
    from dicomflow.runtime import make_context
    from localcloud.demo import RESTORE_STORE

    summary = demo_run.summary["restore"]
    stored = set(_store_sops(demo_run))
    assert summary["status"] == "restored"
    assert summary["instances"] == summary["present"] == len(stored)
    assert summary["bytesChecked"] == restore.DEFAULT_VERIFY_BYTES
    assert summary["bytesDifferent"] == 0

    # Recounted here: every SOP of the live store is in the second store, and a few
    # instances fetched from it are the backup's objects byte for byte.
    ctx = make_context(load_settings(demo_run.env))
    target = DicomStoreName(ctx.settings.dicom_store.dataset, RESTORE_STORE)
    second = restore.for_store(ctx, target)
    try:
        found = {
            i["00080018"]["Value"][0]
            for i in second.dicomweb().search_for_instances(fields=["00080018"], limit=5000)
        }
        assert found == stored
        prefix = demo_run.summary["backup"]["prefix"].removeprefix(
            f"gs://{ctx.settings.backup_bucket}/"
        )
        blobs = [
            b
            for b in demo_run.gcs.list_blobs(ctx.settings.backup_bucket, prefix=prefix)
            if b.name.endswith(".dcm")
        ][::25]
        assert blobs
        for blob in blobs:
            study, series, sop = blob.name[len(prefix) :].removesuffix(".dcm").split("/")
            assert verify.retrieve_bytes(second, study, series, sop) == blob.download_as_bytes()
    finally:
        second.close_clients()
        ctx.storage.close()
