"""``python -m dicomflow backfill`` against fake-gcs-server: same path as events, safe twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow import cli, ledger
from localcloud.storage import StorageServer
from tests.ingest_support import make_instance, settings_env, unique, upload

ROOT = Path(__file__).resolve().parents[2]


def test_backfill_twice_gives_one_outcome_per_object(
    gcs_server: StorageServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = gcs_server.client()
    landing, staging = unique("landing"), unique("staging")
    client.create_bucket(landing)
    client.create_bucket(staging)
    for i in range(12):
        upload(client, landing, f"old/{i}.dcm", make_instance())
    upload(client, landing, "old/broken.dcm", b"not dicom" * 50)
    upload(client, landing, "old/readme.txt", b"skip me")
    upload(client, landing, "elsewhere/x.dcm", make_instance())
    os.environ.update(settings_env(landing, staging, STORAGE_EMULATOR_HOST=gcs_server.url))

    assert cli.main(["backfill", f"gs://{landing}/old/", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {
        "objects": 14,
        "outcomes": {"quarantined": 1, "skipped": 1, "staged": 12},
    }
    assert cli.main(["backfill", f"gs://{landing}/old/", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["outcomes"] == {"quarantined (again)": 1, "skipped": 1, "staged (again)": 12}

    entries = list(ledger.list_entries(client.bucket(staging)))
    assert ledger.totals(entries)[ledger.STAGED] == 12
    assert ledger.totals(entries)[ledger.QUARANTINED] == 1
    assert len(entries) == 13
    # The event id is logged, so it names the entry by key, not by object name.
    assert {e.eventId for e in entries} == {f"backfill:{e.key}" for e in entries}
    staged = [
        b.name for b in client.list_blobs(staging, prefix="batches/") if b.name.endswith(".dcm")
    ]
    assert len(staged) == 12


def test_backfill_usage_and_settings_errors(
    gcs_server: StorageServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backfill", "s3://nope"]) == 2
    assert "expected gs://BUCKET/PREFIX" in capsys.readouterr().err
    os.environ.pop("DICOMFLOW_DICOM_STORE", None)
    assert cli.main(["backfill", "gs://bucket/x"]) == 2
    assert "DICOMFLOW_DICOM_STORE" in capsys.readouterr().err


def test_python_dash_m_dicomflow_backfill_shows_progress(gcs_server: StorageServer) -> None:
    client = gcs_server.client()
    landing, staging = unique("landing"), unique("staging")
    client.create_bucket(landing)
    client.create_bucket(staging)
    for i in range(3):
        upload(client, landing, f"{i}.dcm", make_instance())
    env = {**os.environ, **settings_env(landing, staging, STORAGE_EMULATOR_HOST=gcs_server.url)}
    done = subprocess.run(
        [sys.executable, "-m", "dicomflow", "backfill", f"gs://{landing}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "3 objects" in done.stdout and "staged: 3" in done.stdout
    assert "backfill" in done.stdout  # the progress bar's label
