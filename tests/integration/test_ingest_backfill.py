"""``python -m dicomflow backfill`` against fake-gcs-server: same path as events, safe twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow import objects
from dicomflow.ops import cli, outcomes
from dicomflow.staging import dropped_name, file_key, late_name, window_id
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

    # Another bucket is refused: ingest would record its objects as foreign, unread.
    assert cli.main(["backfill", f"gs://{staging}/old/", "--json"]) == 2
    assert f"gs://{staging} is not the landing bucket" in capsys.readouterr().err
    assert cli.main(["backfill", f"gs://{landing}/old/", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {
        "objects": 14,
        "outcomes": {"quarantined": 1, "skipped": 1, "staged": 12},
    }
    # The second run finds a record of each (listings only) and ingests nothing.
    assert cli.main(["backfill", f"gs://{landing}/old/", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["outcomes"] == {cli.RECORDED: 13, "skipped": 1}

    found = outcomes.read_all(client.bucket(staging))
    totals = outcomes.totals(found.values())
    assert totals[outcomes.STAGED] == 12 and totals[outcomes.QUARANTINED] == 1
    landed = [b for b in client.list_blobs(landing, prefix="old/") if b.name.endswith(".dcm")]
    assert set(found) == {file_key(landing, b.name, b.generation) for b in landed}
    # The event id is logged, so it names the file by key, not by object name.
    assert {o.record.event for o in found.values() if o.record} == {
        f"backfill:{key}" for key in found
    }
    # Each file went to the window of its object's creation time.
    for blob in landed:
        outcome = found[file_key(landing, blob.name, blob.generation)]
        assert outcome.record is not None
        assert outcome.record.home == window_id(blob.time_created, 60)
    staged = [
        b.name for b in client.list_blobs(staging, prefix="batches/") if b.name.endswith(".dcm")
    ]
    assert len(staged) == 12


def test_backfill_counts_a_late_claim_or_a_drop_as_a_record(
    gcs_server: StorageServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = gcs_server.client()
    landing, staging = unique("landing"), unique("staging")
    client.create_bucket(landing)
    client.create_bucket(staging)
    late = upload(client, landing, "a.dcm", make_instance())
    dropped = upload(client, landing, "b.dcm", make_instance())
    fresh = upload(client, landing, "c.dcm", make_instance())
    bucket = client.bucket(staging)
    objects.create(
        bucket, late_name(file_key(landing, late.name, late.generation)), {"window": "x"}
    )
    key = file_key(landing, dropped.name, dropped.generation)
    blob = client.bucket(landing).get_blob(dropped.name)
    assert blob is not None and blob.time_created is not None
    home = window_id(blob.time_created, 60)
    doc = {"key": key, "bucket": landing, "name": dropped.name, "generation": dropped.generation}
    doc |= {"size": dropped.size, "home": home, "window": home, "reason": "source-missing"}
    objects.create(bucket, dropped_name(home, key), doc)
    os.environ.update(settings_env(landing, staging, STORAGE_EMULATOR_HOST=gcs_server.url))

    assert cli.main(["backfill", f"gs://{landing}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outcomes"] == {cli.RECORDED: 2, "staged": 1}
    assert set(outcomes.read_all(bucket)) >= {file_key(landing, fresh.name, fresh.generation)}


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
