"""`python -m localcloud` as a user runs it: separate processes, a recording function target."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from localcloud.storage import client as storage_client

ROOT = Path(__file__).resolve().parents[2]
RECORDER = ROOT / "tests" / "e2e" / "recorder" / "main.py"

pytestmark = pytest.mark.e2e


def _run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _path_without_gcloud() -> str:
    """PATH without the folders that hold gcloud, as on a machine without the SDK."""
    keep = []
    for folder in os.environ["PATH"].split(os.pathsep):
        if folder and (Path(folder) / "gcloud").exists():
            continue
        keep.append(folder)
    return os.pathsep.join(keep)


@pytest.fixture(params=["auto", "no-gcloud"])
def cloud(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[dict[str, str], Path, dict[str, str]]]:
    """A detached local cloud serving the recorder; yields (env, record file, exported names)."""
    record = tmp_path / "events.ndjson"
    record.touch()
    env = {
        **os.environ,
        "LOCALCLOUD_HOME": str(tmp_path / "home"),
        "LOCALCLOUD_FUNCTIONS_SOURCE": str(RECORDER),
        "LOCALCLOUD_MINUTE_SECONDS": "3600",
        "RECORDER_FILE": str(record),
    }
    if request.param == "no-gcloud":
        env["PATH"] = _path_without_gcloud()
        assert shutil.which("gcloud", path=env["PATH"]) is None
    elif shutil.which("gcloud") is None:
        pytest.skip("gcloud SDK not installed: the fallback case covers this machine")
    up = _run(env, "up", "--detach")
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        printed = _run(env, "env")
        assert printed.returncode == 0, printed.stderr
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in printed.stdout.splitlines()
            if line.startswith("export ")
        )
        yield env, record, exported
    finally:
        down = _run(env, "down")
        assert down.returncode == 0, down.stderr
    assert not (tmp_path / "home" / "state.json").exists()


def _events(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def test_uploads_reach_the_function_as_finalize_cloudevents(
    cloud: tuple[dict[str, str], Path, dict[str, str]],
) -> None:
    env, record, exported = cloud
    for name in (
        "STORAGE_EMULATOR_HOST",
        "DICOMFLOW_HEALTHCARE_ENDPOINT",
        "DICOMFLOW_PUBSUB_ENDPOINT",
        "DICOMFLOW_DICOM_STORE",
        "DICOMFLOW_LANDING_BUCKET",
        "DICOMFLOW_STAGING_BUCKET",
        "DICOMFLOW_BACKUP_BUCKET",
        "DICOMFLOW_ALERTS_TOPIC",
    ):
        assert exported.get(name), name
    status = _run(env, "status", "--json")
    assert status.returncode == 0, status.stdout
    services = {s["service"]: s["up"] for s in json.loads(status.stdout)["services"]}
    assert services == {
        k: True for k in ("storage", "pubsub", "healthcare", "ingest", "report", "export")
    }
    expected_kind = "fallback" if shutil.which("gcloud", path=env["PATH"]) is None else "emulator"
    assert json.loads(status.stdout)["pubsubKind"] == expected_kind

    bucket = storage_client(exported["STORAGE_EMULATOR_HOST"]).bucket(
        exported["DICOMFLOW_LANDING_BUCKET"]
    )
    started = time.monotonic()
    uploaded = {}
    for i in range(50):
        blob = bucket.blob(f"incoming/study {i % 5}/é{i}.dcm")
        blob.upload_from_string(b"DICM" * (i + 1))
        uploaded[blob.name] = str(blob.generation)
    deadline = started + 10
    got: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(got) < 50:
        for event in _events(record):
            if event["function"] == "ingest":
                got[event["data"]["name"]] = event
        time.sleep(0.1)
    assert set(got) == set(uploaded), f"{len(got)} of 50 delivered within 10 s"
    for name, event in got.items():
        attrs, data = event["attributes"], event["data"]
        assert attrs["type"] == "google.cloud.storage.object.v1.finalized"
        assert attrs["source"] == f"//storage.googleapis.com/projects/_/buckets/{bucket.name}"
        assert attrs["subject"] == f"objects/{name}"
        # on the wire, percent-encoded as the CloudEvents HTTP binding requires
        assert event["wireSubject"] == "objects/" + quote(name, safe="/")
        assert attrs["specversion"] == "1.0" and attrs["id"] and attrs["time"]
        assert data["bucket"] == bucket.name and data["generation"] == uploaded[name]
        assert isinstance(data["size"], str) and int(data["size"]) > 0
        assert data["md5Hash"] and data["crc32c"]

    tick = _run(env, "tick", "minute")
    assert tick.returncode == 0, tick.stdout + tick.stderr
    ticks = [e for e in _events(record) if e["attributes"]["type"].endswith("messagePublished")]
    assert sorted(e["function"] for e in ticks) == ["ingest", "report"]


def test_a_taken_port_gives_one_line_naming_the_fix(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "LOCALCLOUD_HOME": str(tmp_path), "LOCALCLOUD_STORAGE_PORT": str(port)}
        result = _run(env, "up", "--detach")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0] and "LOCALCLOUD_STORAGE_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_env_without_a_running_cloud_says_how_to_start(tmp_path: Path) -> None:
    result = _run({**os.environ, "LOCALCLOUD_HOME": str(tmp_path)}, "env")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "localcloud: the local cloud is not running; start it with `make up`"
    )


def test_a_missing_bucket_setting_stops_start_up_with_one_line(tmp_path: Path) -> None:
    # An empty value reaches the functions as "not set" (the stack's own value is overridden).
    env = {
        **os.environ,
        "LOCALCLOUD_HOME": str(tmp_path),
        "LOCALCLOUD_FUNCTION_ENV": "DICOMFLOW_LANDING_BUCKET=",
    }
    result = _run(env, "up", "--detach")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DICOMFLOW_LANDING_BUCKET: is not set" in lines[0]
    assert "Fix: export DICOMFLOW_LANDING_BUCKET=" in lines[0]
    assert not (tmp_path / "state.json").exists()
