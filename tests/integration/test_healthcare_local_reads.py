"""Imports that read fake-gcs-server's object files (``storage_root``) store what the API would.

The emulator reaches Cloud Storage through a counting proxy, so the tests see
which objects it asked the server for and which it read from the files.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

from localcloud.corpus import generate_studies
from localcloud.faultproxy import FaultProxy
from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.healthcare.fetch import fetch_chunk, local_object_path
from localcloud.storage import StorageServer, start_storage

PARENT = "projects/test-project/locations/us-central1"


@pytest.fixture(scope="module")
def fs_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageServer]:
    """fake-gcs-server with the filesystem backend, as ``localcloud up`` runs it."""
    server = start_storage(data_dir=tmp_path_factory.mktemp("gcs") / "root")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def counted(fs_storage: StorageServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(fs_storage.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def emulator(fs_storage: StorageServer, counted: FaultProxy) -> Iterator[HealthcareServer]:
    server = start_healthcare(
        storage_endpoint=counted.url, storage_root=fs_storage.root, import_workers=1
    )
    yield server
    server.stop()


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _import(server: HealthcareServer, uri: str) -> dict[str, Any]:
    api = build(
        "healthcare",
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": server.url},
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
    )
    datasets = api.projects().locations().datasets()
    dataset_id = f"ds-{uuid.uuid4().hex[:10]}"
    datasets.create(parent=PARENT, datasetId=dataset_id, body={}).execute()
    store = f"{PARENT}/datasets/{dataset_id}/dicomStores/s"
    datasets.dicomStores().create(
        parent=f"{PARENT}/datasets/{dataset_id}", dicomStoreId="s", body={}
    ).execute()
    operation = (
        datasets.dicomStores().import_(name=store, body={"gcsSource": {"uri": uri}}).execute()
    )
    deadline = time.monotonic() + 60
    while not operation.get("done"):
        assert time.monotonic() < deadline, operation
        time.sleep(0.02)
        operation = datasets.operations().get(name=operation["name"]).execute()
    api.close()
    return {"store": store, "operation": operation}


def test_an_import_reads_the_files_and_stores_the_listed_bytes(
    emulator: HealthcareServer, fs_storage: StorageServer, counted: FaultProxy
) -> None:
    files = {f"in/{i:02d}.dcm": g.data for i, g in enumerate(generate_studies(2, 2, 3))}
    files["in/sub dir/not-dicom.dcm"] = b"plain text, not DICOM"
    files["in/resend.dcm"] = files["in/00.dcm"]
    gcs = fs_storage.client()
    bucket = gcs.create_bucket(f"local-{uuid.uuid4().hex[:8]}")
    for name, data in files.items():
        bucket.blob(name).upload_from_string(data)
    gcs.close()
    counted.reset()

    result = _import(emulator, f"gs://{bucket.name}/in/**.dcm")

    assert result["operation"]["metadata"]["counter"] == {"success": "13", "failure": "1"}
    # One listing, and not one object read through the API: every byte came from the files.
    assert counted.snapshot()["counts"] == {"objects.list": 1}
    stored = {i.sha256 for i in emulator.repository.query_instances(result["store"])}
    valid = [d for n, d in files.items() if "not-dicom" not in n]
    assert stored == {hashlib.sha256(d).hexdigest() for d in valid}
    assert len(emulator.repository.query_instances(result["store"])) == 12


def test_bytes_that_differ_from_the_listing_are_read_through_the_endpoint(
    tmp_path: Path, gcs_server: StorageServer
) -> None:
    proxy = FaultProxy(gcs_server.url).start()
    try:
        gcs = gcs_server.client()
        bucket = gcs.create_bucket(f"local-{uuid.uuid4().hex[:8]}")
        listed = {"same.dcm": b"A" * 300, "other.dcm": b"B" * 300, "gone.dcm": b"C" * 300}
        for name, data in listed.items():
            bucket.blob(name).upload_from_string(data)
        gcs.close()
        root = tmp_path / "root"
        (root / bucket.name).mkdir(parents=True)
        (root / bucket.name / "same.dcm").write_bytes(b"A" * 300)
        (root / bucket.name / "other.dcm").write_bytes(b"b" * 300)  # same size, other bytes
        (root / bucket.name / "nomd5.dcm").write_bytes(b"A" * 300)
        sources = [(name, len(data), _md5(data)) for name, data in listed.items()]
        sources.append(("nomd5.dcm", 300, ""))  # a listing without MD5 (composite objects)

        found = fetch_chunk(proxy.url, str(root), bucket.name, sources)

        assert [c.data for c in found[:3]] == list(listed.values())
        assert found[3].error is not None and "404" in found[3].error[1]
        # Only the mismatch, the missing file and the one without an MD5 went to the server.
        assert proxy.snapshot()["counts"] == {"objects.download": 3}
    finally:
        proxy.stop()


def test_a_matching_file_needs_no_endpoint(tmp_path: Path) -> None:
    (tmp_path / "b" / "x y").mkdir(parents=True)
    (tmp_path / "b" / "x y" / "z.dcm").write_bytes(b"bytes")
    unreachable = "http://127.0.0.1:9"
    [found] = fetch_chunk(unreachable, str(tmp_path), "b", [("x y/z.dcm", 5, _md5(b"bytes"))])
    assert found.data == b"bytes"


@pytest.mark.parametrize("name", ["a/../b.dcm", "./b.dcm", "a//b.dcm", "/b.dcm", "b.dcm/"])
def test_names_that_do_not_map_to_a_file_under_the_bucket(tmp_path: Path, name: str) -> None:
    assert local_object_path(tmp_path, "bucket", name) is None
    assert local_object_path(tmp_path, "..", "b.dcm") is None
    assert local_object_path(tmp_path, "bucket", "a/b.dcm") == tmp_path / "bucket" / "a" / "b.dcm"


def test_health_says_when_the_import_workers_are_ready(emulator: HealthcareServer) -> None:
    deadline = time.monotonic() + 60
    while True:
        health = requests.get(f"{emulator.url}/_emulator/health", timeout=10).json()
        if health["importWorkersReady"] == health["importWorkers"] == 1:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
