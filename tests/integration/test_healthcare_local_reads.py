"""Imports that read fake-gcs-server's object files (``storage_root``) store what the API would.

The emulator reaches Cloud Storage through a counting proxy, so the tests see
which objects it asked the server for and which it read from the files.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from localcloud.corpus import generate_studies
from localcloud.faultproxy import FaultProxy
from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.healthcare.fetch import close_readers, fetch_chunk, local_object_path
from localcloud.storage import StorageServer, start_storage
from tests.healthcare_support import new_store
from tests.integration.test_healthcare_import_export import PARENT, run


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


def test_an_import_reads_the_files_and_stores_the_listed_bytes(
    emulator: HealthcareServer,
    fs_storage: StorageServer,
    counted: FaultProxy,
    healthcare_client: Callable[..., Any],
) -> None:
    files = {f"in/{i:02d}.dcm": g.data for i, g in enumerate(generate_studies(2, 2, 3))}
    files["in/sub dir/not-dicom.dcm"] = b"plain text, not DICOM"
    files["in/resend.dcm"] = files["in/00.dcm"]
    gcs = fs_storage.client()
    bucket = gcs.create_bucket(f"local-{uuid.uuid4().hex[:8]}")
    for name, data in files.items():
        bucket.blob(name).upload_from_string(data)
    # Stored compressed, read decoded: its file's bytes are not what a read returns.
    compressed = bucket.blob("in/gzip.dcm")
    compressed.content_encoding = "gzip"
    compressed.upload_from_string(gzip.compress(files["in/01.dcm"]))
    gcs.close()
    counted.reset()

    api = healthcare_client(emulator.url)
    store = new_store(api, PARENT)
    body = {"gcsSource": {"uri": f"gs://{bucket.name}/in/**.dcm"}}
    operation, _ = run(
        api, api.projects().locations().datasets().dicomStores().import_(name=store, body=body)
    )

    assert operation["metadata"]["counter"] == {"success": "14", "failure": "1"}
    # One listing and one read through the API, of the gzip object; the rest came from files.
    assert counted.snapshot()["counts"] == {"objects.list": 1, "objects.download": 1}
    stored = {i.sha256 for i in emulator.repository.query_instances(store)}
    valid = [d for n, d in files.items() if "not-dicom" not in n]
    assert stored == {hashlib.sha256(d).hexdigest() for d in valid}
    assert len(emulator.repository.query_instances(store)) == 12


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
        close_readers()
        proxy.stop()


def test_a_matching_file_needs_no_endpoint(tmp_path: Path) -> None:
    (tmp_path / "b" / "x y").mkdir(parents=True)
    (tmp_path / "b" / "x y" / "z.dcm").write_bytes(b"bytes")
    unreachable = "http://127.0.0.1:9"
    [found] = fetch_chunk(unreachable, str(tmp_path), "b", [("x y/z.dcm", 5, _md5(b"bytes"))])
    close_readers()
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
