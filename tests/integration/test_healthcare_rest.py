"""The emulator's REST resources through google-api-python-client (static discovery)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from googleapiclient.errors import HttpError

from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.storage import StorageServer

PARENT = "projects/test-project/locations/us-central1"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
MR_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def datasets(api: Any) -> Any:
    return api.projects().locations().datasets()


def new_store(api: Any) -> tuple[str, str]:
    dataset_id = unique("ds")
    datasets(api).create(parent=PARENT, datasetId=dataset_id, body={}).execute()
    dataset = f"{PARENT}/datasets/{dataset_id}"
    datasets(api).dicomStores().create(parent=dataset, dicomStoreId="store", body={}).execute()
    return dataset, f"{dataset}/dicomStores/store"


def wait_done(api: Any, name: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        operation: dict[str, Any] = datasets(api).operations().get(name=name).execute()
        if operation.get("done"):
            return operation
        assert time.monotonic() < deadline, f"operation {name} not done: {operation}"
        time.sleep(0.05)


def set_knobs(server: HealthcareServer, **values: object) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.url}/_emulator/knobs",
        data=json.dumps(values).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        result: dict[str, Any] = json.load(response)
    return result


def upload(gcs_server: StorageServer, files: dict[str, bytes]) -> str:
    bucket_name = unique("rest")
    gcs = gcs_server.client()
    try:
        bucket = gcs.create_bucket(bucket_name)
        for name, data in files.items():
            bucket.blob(name).upload_from_string(data)
    finally:
        gcs.close()
    return bucket_name


def test_datasets_create_get_list_page_delete(
    healthcare_client: Callable[..., Any], healthcare_server: HealthcareServer
) -> None:
    api = healthcare_client(healthcare_server.url)
    parent = f"projects/{unique('p')}/locations/europe-west4"
    ids = [f"ds{i}" for i in range(5)]
    for dataset_id in ids:
        operation = datasets(api).create(parent=parent, datasetId=dataset_id, body={}).execute()
        assert operation["name"].startswith(f"{parent}/datasets/{dataset_id}/operations/")
        assert operation["done"] is True
        assert operation["response"]["name"] == f"{parent}/datasets/{dataset_id}"
        assert operation["response"]["@type"].endswith("healthcare.v1.Dataset")
    got = datasets(api).get(name=f"{parent}/datasets/ds3").execute()
    assert got == {"name": f"{parent}/datasets/ds3"}

    seen, token, pages = [], None, 0
    while True:
        page = datasets(api).list(parent=parent, pageSize=2, pageToken=token).execute()
        seen += [d["name"].rsplit("/", 1)[1] for d in page["datasets"]]
        pages += 1
        token = page.get("nextPageToken")
        if not token:
            break
    assert seen == ids and pages == 3

    assert datasets(api).delete(name=f"{parent}/datasets/ds3").execute() == {}
    with pytest.raises(HttpError) as missing:
        datasets(api).get(name=f"{parent}/datasets/ds3").execute()
    assert missing.value.status_code == 404
    assert json.loads(missing.value.content)["error"]["status"] == "NOT_FOUND"


def test_errors_use_google_json(
    healthcare_client: Callable[..., Any], healthcare_server: HealthcareServer
) -> None:
    api = healthcare_client(healthcare_server.url)
    dataset, store = new_store(api)
    dataset_id = dataset.rsplit("/", 1)[1]
    cases = [
        (datasets(api).create(parent=PARENT, datasetId=dataset_id, body={}), 409, "ALREADY_EXISTS"),
        (
            datasets(api).create(parent=PARENT, datasetId="bad id!", body={}),
            400,
            "INVALID_ARGUMENT",
        ),
        (datasets(api).get(name=f"{PARENT}/datasets/{unique('none')}"), 404, "NOT_FOUND"),
        (
            datasets(api).dicomStores().create(parent=dataset, dicomStoreId="store", body={}),
            409,
            "ALREADY_EXISTS",
        ),
        (
            datasets(api).dicomStores().create(parent=dataset, dicomStoreId="x", body={"bogus": 1}),
            400,
            "INVALID_ARGUMENT",
        ),
        (datasets(api).dicomStores().get(name=f"{dataset}/dicomStores/none"), 404, "NOT_FOUND"),
        (
            datasets(api)
            .dicomStores()
            .import_(name=store, body={"gcsSource": {"uri": "gs://b/a/**/x"}}),
            400,
            "INVALID_ARGUMENT",
        ),
        (datasets(api).dicomStores().export(name=store, body={}), 400, "INVALID_ARGUMENT"),
        (
            datasets(api)
            .dicomStores()
            .export(
                name=store,
                body={"gcsDestination": {"uriPrefix": "gs://b/x", "mimeType": "text/plain"}},
            ),
            400,
            "INVALID_ARGUMENT",
        ),
        (datasets(api).operations().get(name=f"{dataset}/operations/123"), 404, "NOT_FOUND"),
        (datasets(api).operations().list(name=dataset, filter="nonsense"), 400, "INVALID_ARGUMENT"),
        (datasets(api).list(parent=PARENT, pageToken="%%%"), 400, "INVALID_ARGUMENT"),
    ]
    for request, status, name in cases:
        with pytest.raises(HttpError) as caught:
            request.execute()
        error = json.loads(caught.value.content)["error"]
        assert (caught.value.status_code, error["code"], error["status"]) == (status, status, name)
        assert error["message"]


def test_dicom_stores_crud_and_patch(
    healthcare_client: Callable[..., Any], healthcare_server: HealthcareServer
) -> None:
    api = healthcare_client(healthcare_server.url)
    dataset, store = new_store(api)
    stores = datasets(api).dicomStores()
    created = stores.create(
        parent=dataset, dicomStoreId="labelled", body={"labels": {"team": "imaging"}}
    ).execute()
    assert created == {"name": f"{dataset}/dicomStores/labelled", "labels": {"team": "imaging"}}
    patched = stores.patch(
        name=created["name"],
        updateMask="labels,notificationConfig",
        body={
            "labels": {"team": "ops"},
            "notificationConfig": {"pubsubTopic": "projects/p/topics/t"},
        },
    ).execute()
    assert patched["labels"] == {"team": "ops"}
    assert stores.get(name=created["name"]).execute() == patched
    cleared = stores.patch(name=created["name"], updateMask="labels", body={}).execute()
    assert "labels" not in cleared and "notificationConfig" in cleared
    with pytest.raises(HttpError) as caught:
        stores.patch(name=created["name"], updateMask="name", body={"name": "x"}).execute()
    assert caught.value.status_code == 400
    with pytest.raises(HttpError):
        stores.patch(name=created["name"], body={"labels": {}}).execute()

    page1 = stores.list(parent=dataset, pageSize=1).execute()
    page2 = stores.list(parent=dataset, pageSize=1, pageToken=page1["nextPageToken"]).execute()
    assert [s["name"] for s in page1["dicomStores"] + page2["dicomStores"]] == [
        store,
        created["name"],
    ]
    assert "nextPageToken" not in page2
    assert stores.delete(name=created["name"]).execute() == {}
    assert [s["name"] for s in stores.list(parent=dataset).execute()["dicomStores"]] == [store]


def test_import_operation_counters_and_logs(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    gcs_server: StorageServer,
) -> None:
    api = healthcare_client(healthcare_server.url, "v1beta1")
    _dataset, store = new_store(api)
    bucket = upload(
        gcs_server,
        {"in/a.dcm": CT_SMALL.read_bytes(), "in/b.dcm": b"not dicom", "in/skip.txt": b"x"},
    )
    operation = (
        datasets(api)
        .dicomStores()
        .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/in/*.dcm"}})
        .execute()
    )
    assert operation["metadata"]["apiMethodName"].endswith(
        "v1beta1.dicom.DicomService.ImportDicomData"
    )
    done = wait_done(api, operation["name"])
    assert done["metadata"]["counter"] == {"success": "1", "failure": "1"}
    assert done["error"]["code"] == 3 and "1 of 2" in done["error"]["message"]
    assert "response" not in done
    with urllib.request.urlopen(done["metadata"]["logsUrl"]) as response:
        entries = json.load(response)["entries"]
    assert [(e["source"], e["error"]["message"]) for e in entries] == [
        (f"gs://{bucket}/in/b.dcm", "not a DICOM file")
    ]
    again = (
        datasets(api)
        .dicomStores()
        .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/in/a.dcm"}})
        .execute()
    )
    finished = wait_done(api, again["name"])
    assert finished["metadata"]["counter"] == {"success": "1"}
    assert finished["response"]["@type"].endswith("v1beta1.dicom.ImportDicomDataResponse")
    missing = (
        datasets(api)
        .dicomStores()
        .import_(name=store, body={"gcsSource": {"uri": f"gs://{unique('nobucket')}/x/*.dcm"}})
        .execute()
    )
    assert wait_done(api, missing["name"])["error"]["code"] == 5


def test_operations_list_filter_page_and_cancel(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    gcs_server: StorageServer,
) -> None:
    api = healthcare_client(healthcare_server.url)
    dataset, store = new_store(api)
    bucket = upload(gcs_server, {"a.dcm": CT_SMALL.read_bytes()})
    source = {"gcsSource": {"uri": f"gs://{bucket}/*.dcm"}}
    finished = datasets(api).dicomStores().import_(name=store, body=source).execute()
    wait_done(api, finished["name"])
    set_knobs(healthcare_server, operation_latency=30.0)
    try:
        slow = datasets(api).dicomStores().import_(name=store, body=source).execute()
        operations = datasets(api).operations()
        listed = operations.list(name=dataset).execute()["operations"]
        assert [o["name"] for o in listed][1:] == [finished["name"], slow["name"]]
        running = operations.list(name=dataset, filter="done=false").execute()["operations"]
        assert [o["name"] for o in running] == [slow["name"]]
        done = operations.list(name=dataset, filter="done=true").execute()["operations"]
        assert slow["name"] not in [o["name"] for o in done] and finished["name"] in [
            o["name"] for o in done
        ]
        first = operations.list(name=dataset, pageSize=2).execute()
        rest = operations.list(name=dataset, pageSize=2, pageToken=first["nextPageToken"]).execute()
        assert len(first["operations"]) == 2 and len(rest["operations"]) == 1
        assert operations.cancel(name=slow["name"], body={}).execute() == {}
        cancelled = wait_done(api, slow["name"], timeout=5)
    finally:
        set_knobs(healthcare_server, operation_latency=0.0)
    assert cancelled["error"]["code"] == 1
    assert cancelled["metadata"]["cancelRequested"] is True


def test_knobs_quota_faults_and_latency(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    gcs_server: StorageServer,
) -> None:
    api = healthcare_client(healthcare_server.url)
    dataset, store = new_store(api)
    bucket = upload(gcs_server, {"a.dcm": CT_SMALL.read_bytes()})
    source = {"gcsSource": {"uri": f"gs://{bucket}/*.dcm"}}
    set_knobs(healthcare_server, operation_latency=30.0, max_concurrent_ops=1)
    try:
        first = datasets(api).dicomStores().import_(name=store, body=source).execute()
        with pytest.raises(HttpError) as caught:
            datasets(api).dicomStores().import_(name=store, body=source).execute()
        assert caught.value.status_code == 429
        assert json.loads(caught.value.content)["error"]["status"] == "RESOURCE_EXHAUSTED"
        datasets(api).operations().cancel(name=first["name"], body={}).execute()
        wait_done(api, first["name"], timeout=5)
        second = datasets(api).dicomStores().import_(name=store, body=source).execute()
        datasets(api).operations().cancel(name=second["name"], body={}).execute()

        shown = set_knobs(
            healthcare_server,
            operation_latency=0.0,
            max_concurrent_ops=0,
            faults="dicomStores.get=1.0:503",
            latency={"datasets.get": 0.3},
        )
        assert shown["faults"] == {"dicomStores.get": {"rate": 1.0, "status": 503}}
        with pytest.raises(HttpError) as fault:
            datasets(api).dicomStores().get(name=store).execute()
        assert fault.value.status_code == 503
        assert json.loads(fault.value.content)["error"]["status"] == "UNAVAILABLE"
        started = time.monotonic()
        datasets(api).get(name=dataset).execute()
        assert time.monotonic() - started >= 0.3
    finally:
        set_knobs(
            healthcare_server, operation_latency=0.0, max_concurrent_ops=0, faults="", latency=""
        )
    assert datasets(api).dicomStores().get(name=store).execute()["name"] == store


def test_state_survives_restart(
    healthcare_client: Callable[..., Any], tmp_path: Path, gcs_server: StorageServer
) -> None:
    server = start_healthcare(data_dir=tmp_path, storage_endpoint=gcs_server.url)
    try:
        api = healthcare_client(server.url)
        _dataset, store = new_store(api)
        bucket = upload(gcs_server, {"a.dcm": CT_SMALL.read_bytes()})
        operation = (
            datasets(api)
            .dicomStores()
            .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/a.dcm"}})
            .execute()
        )
        wait_done(api, operation["name"])
    finally:
        server.stop()
    assert (tmp_path / "index.sqlite3").exists()
    again = start_healthcare(data_dir=tmp_path, storage_endpoint=gcs_server.url)
    try:
        api = healthcare_client(again.url)
        assert datasets(api).dicomStores().get(name=store).execute()["name"] == store
        assert datasets(api).operations().get(name=operation["name"]).execute()["done"] is True
        sop = str(pydicom.dcmread(CT_SMALL).SOPInstanceUID)
        url = f"{again.url}/v1/{store}/dicomWeb/instances?SOPInstanceUID={sop}"
        with urllib.request.urlopen(url) as response:
            assert len(json.load(response)) == 1
    finally:
        again.stop()


def test_command_line_ready_sigterm_and_taken_port(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "localcloud.healthcare", "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("ready http://127.0.0.1:")
        url = line.split(" ", 1)[1]
        with urllib.request.urlopen(f"{url}/v1/{PARENT}/datasets") as response:
            assert json.load(response) == {}
        port = int(url.rsplit(":", 1)[1])
        taken = subprocess.run(
            [sys.executable, "-m", "localcloud.healthcare", "--port", str(port)],
            capture_output=True,
            env=env,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 2
        assert len(taken.stderr.strip().splitlines()) == 1 and str(port) in taken.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    with socket.socket() as probe:
        # SO_REUSEADDR tolerates TIME_WAIT leftovers but still fails while anyone listens.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
