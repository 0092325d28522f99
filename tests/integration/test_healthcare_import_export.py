"""Import of every sample file, checked file by file, and export in every format."""

from __future__ import annotations

import hashlib
import io
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import data_store
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from localcloud.healthcare import HealthcareServer
from localcloud.storage import StorageServer
from tests.healthcare_support import new_store
from tests.ingest_support import value_cut_short

PARENT = "projects/test-project/locations/us-central1"
SAMPLE_DIRS = (
    Path(pydicom.__file__).parent / "data" / "test_files",
    Path(data_store.__file__).parent / "data",
)


def sample_files() -> list[Path]:
    return sorted(p for d in SAMPLE_DIRS for p in d.iterdir() if p.is_file())


def expected_uids(data: bytes) -> tuple[str, str, str] | None:
    """The (study, series, instance) UIDs if a store must accept ``data``, else None.

    Decided here with pydicom alone: a Part 10 preamble, a transfer syntax, no
    element shorter than its declared length, native pixel data as long as the
    image needs, and the three UIDs present and made of digits and periods, at
    most 64 characters (PS3.5 section 9.1).
    """
    if data[128:132] != b"DICM":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception:
            return None
        if not dataset.file_meta.get("TransferSyntaxUID"):
            return None
        if value_cut_short(dataset):
            return None
        syntax = UID(str(dataset.file_meta.TransferSyntaxUID))
        if "PixelData" in dataset and not syntax.is_compressed:
            try:
                needed = int(get_expected_length(dataset))
            except Exception:
                needed = 0
            if len(dataset.PixelData) < needed:
                return None
        uids = tuple(
            str(dataset.get(k, "") or "").strip()
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
    valid = all(len(u) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", u) for u in uids)
    return (uids[0], uids[1], uids[2]) if valid else None


def http_get(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    with requests.Session() as session:
        response = session.get(url, headers=headers or {}, timeout=30)
    response.raise_for_status()
    return response


def upload(gcs_server: StorageServer, files: dict[str, bytes]) -> str:
    bucket_name = f"imp-{uuid.uuid4().hex[:12]}"
    gcs = gcs_server.client()
    try:
        bucket = gcs.create_bucket(bucket_name)
        for name, data in files.items():
            bucket.blob(name).upload_from_string(data)
    finally:
        gcs.close()
    return bucket_name


def download_all(gcs_server: StorageServer, bucket: str, prefix: str) -> dict[str, bytes]:
    gcs = gcs_server.client()
    try:
        return {
            b.name.removeprefix(prefix): b.download_as_bytes()
            for b in gcs.list_blobs(bucket, prefix=prefix)
        }
    finally:
        gcs.close()


def run(
    api: Any, request: Any, timeout: float = 30.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute an LRO request; return the finished operation and every live snapshot seen."""
    operation = request.execute()
    snapshots = [operation]
    deadline = time.monotonic() + timeout
    while not operation.get("done"):
        assert time.monotonic() < deadline, operation
        time.sleep(0.02)
        operation = (
            api.projects().locations().datasets().operations().get(name=operation["name"]).execute()
        )
        snapshots.append(operation)
    return operation, snapshots


def run_export(
    api: Any, store: str, uri_prefix: str, mime_type: str, **body: Any
) -> dict[str, Any]:
    """Export ``store`` to ``uri_prefix`` as ``mime_type`` (more of the body in ``body``);
    the finished operation."""
    destination = {"gcsDestination": {"uriPrefix": uri_prefix, "mimeType": mime_type}}
    request = api.projects().locations().datasets().dicomStores()
    operation, _ = run(api, request.export(name=store, body={**destination, **body}))
    return operation


@pytest.fixture(scope="module")
def corpus_import(
    healthcare_server: HealthcareServer, gcs_server: StorageServer
) -> Iterator[dict[str, Any]]:
    """Every sample file imported into one store with one operation (shared by the tests)."""
    from google.auth.credentials import AnonymousCredentials
    from googleapiclient.discovery import build

    api = build(
        "healthcare",
        "v1",
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": healthcare_server.url},
        credentials=AnonymousCredentials(),
    )
    files = {
        f"corpus/{i:03d}_{p.parent.name}_{p.name}": p.read_bytes()
        for i, p in enumerate(sample_files())
    }
    # An exact re-send of one valid file, to be ignored and counted as success.
    first_valid = next(n for n, d in files.items() if expected_uids(d))
    files["corpus/zzz_resend.dcm"] = files[first_valid]
    bucket = upload(gcs_server, files)
    store = new_store(api, PARENT)
    request = (
        api.projects()
        .locations()
        .datasets()
        .dicomStores()
        .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/corpus/**"}})
    )
    operation, snapshots = run(api, request)
    result = {
        "api": api,
        "store": store,
        "files": files,
        "operation": operation,
        "snapshots": snapshots,
    }
    yield result
    api.close()


def test_corpus_import_file_by_file(
    corpus_import: dict[str, Any], healthcare_server: HealthcareServer
) -> None:
    files: dict[str, bytes] = corpus_import["files"]
    operation = corpus_import["operation"]
    store = corpus_import["store"]
    assert len(files) > 140
    # Group the valid files by instance; each group must end as exactly one stored file.
    groups: dict[tuple[str, str, str], set[bytes]] = {}
    broken = []
    for name, data in files.items():
        uids = expected_uids(data)
        if uids is None:
            broken.append(name)
        else:
            groups.setdefault(uids, set()).add(data)
    assert broken, "the sample data should hold broken files"
    assert any(len(v) > 1 for v in groups.values()), "and conflicting versions"

    root = f"{healthcare_server.url}/v1/{store}/dicomWeb"
    stored_list = http_get(f"{root}/instances?limit=50000").json()
    stored = {item["00080018"]["Value"][0] for item in stored_list}
    assert stored == {sop for (_s, _r, sop) in groups}
    expected_failures = set(broken)
    for (study, series, sop), versions in groups.items():
        raw = http_get(
            f"{root}/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        ).content
        kept = [v for v in versions if v in raw]
        assert len(kept) == 1, f"instance {sop}: one of its versions must be stored as is"
        for name, data in files.items():
            if data in versions and data != kept[0]:
                expected_failures.add(name)
    counter = operation["metadata"]["counter"]
    assert int(counter.get("failure", "0")) == len(expected_failures)
    assert int(counter.get("success", "0")) == len(files) - len(expected_failures)
    assert "pending" not in counter
    logs = http_get(operation["metadata"]["logsUrl"]).json()["entries"]
    by_source = {e["source"].split("/", 3)[3]: e["error"]["message"] for e in logs}
    assert set(by_source) == expected_failures
    for name in expected_failures:
        if name in broken:
            assert by_source[name] == "not a DICOM file" or any(
                why in by_source[name] for why in ("missing", "is not a valid UID")
            ), name
        else:
            assert "checksum mismatch" in by_source[name], name
    assert operation["error"]["code"] == 3
    assert f"{len(expected_failures)} of {len(files)}" in operation["error"]["message"]
    for snapshot in corpus_import["snapshots"]:
        for value in snapshot["metadata"].get("counter", {}).values():
            assert isinstance(value, str)


def test_round_trip_export_is_byte_for_byte(
    corpus_import: dict[str, Any], gcs_server: StorageServer
) -> None:
    api, store = corpus_import["api"], corpus_import["store"]
    valid = {d for d in corpus_import["files"].values() if expected_uids(d)}
    bucket = upload(gcs_server, {})
    operation = run_export(
        api, store, f"gs://{bucket}/backup", "application/dicom; transfer-syntax=*"
    )
    assert "error" not in operation, operation
    assert operation["response"]["@type"].endswith("ExportDicomDataResponse")
    exported = download_all(gcs_server, bucket, "backup/")
    for name, data in exported.items():
        study, series, file_name = name.split("/")
        assert file_name.endswith(".dcm")
        assert expected_uids(data) == (study, series, file_name.removesuffix(".dcm"))
        assert data in valid
    assert len(exported) == int(operation["metadata"]["counter"]["success"])
    assert {hashlib.sha256(d).hexdigest() for d in exported.values()} <= {
        hashlib.sha256(d).hexdigest() for d in valid
    }


SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture
def small_store(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    gcs_server: StorageServer,
) -> tuple[Any, str, dict[str, bytes]]:
    api = healthcare_client(healthcare_server.url)
    store = new_store(api, PARENT)
    files = {
        "in/ct.dcm": (SAMPLES / "CT_small.dcm").read_bytes(),
        "in/rgb2.dcm": (SAMPLES / "SC_rgb_rle_2frame.dcm").read_bytes(),
        "in/sr.dcm": (SAMPLES / "test-SR.dcm").read_bytes(),
    }
    bucket = upload(gcs_server, files)
    operation, _ = run(
        api,
        api.projects()
        .locations()
        .datasets()
        .dicomStores()
        .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/in/*.dcm"}}),
    )
    assert operation["metadata"]["counter"] == {"success": "3"}
    return api, store, files


def _uids(data: bytes) -> str:
    uids = expected_uids(data)
    assert uids is not None
    return "/".join(uids)


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
    ],
)
def test_export_transcodes(
    small_store: tuple[Any, str, dict[str, bytes]], gcs_server: StorageServer, syntax: str
) -> None:
    api, store, files = small_store
    bucket = upload(gcs_server, {})
    operation = run_export(
        api, store, f"gs://{bucket}/t", f"application/dicom; transfer-syntax={syntax}"
    )
    exported = download_all(gcs_server, bucket, "t/")
    ct_name = _uids(files["in/ct.dcm"]) + ".dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = pydicom.dcmread(io.BytesIO(exported[ct_name]))
        original = pydicom.dcmread(io.BytesIO(files["in/ct.dcm"]))
        assert ct.file_meta.TransferSyntaxUID == syntax
        assert ct.SOPInstanceUID == original.SOPInstanceUID
        assert (ct.pixel_array == original.pixel_array).all()
    assert int(operation["metadata"]["counter"]["success"]) == len(exported)


def test_export_unproducible_syntax_fails_per_file(
    small_store: tuple[Any, str, dict[str, bytes]], gcs_server: StorageServer
) -> None:
    api, store, _files = small_store
    bucket = upload(gcs_server, {})
    operation = run_export(
        api, store, f"gs://{bucket}/x", "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"
    )
    assert operation["metadata"]["counter"] == {"failure": "3"}
    logs = http_get(operation["metadata"]["logsUrl"]).content
    assert b"1.2.840.10008.1.2.4.50 is not supported" in logs


@pytest.mark.parametrize(
    ("mime", "ext", "fmt"), [("image/png", ".png", "PNG"), ("image/jpeg", ".jpg", "JPEG")]
)
def test_export_images_one_per_frame(
    small_store: tuple[Any, str, dict[str, bytes]],
    gcs_server: StorageServer,
    mime: str,
    ext: str,
    fmt: str,
) -> None:
    api, store, files = small_store
    bucket = upload(gcs_server, {})
    operation = run_export(api, store, f"gs://{bucket}/img/", mime)
    exported = download_all(gcs_server, bucket, "img/")
    ct, rgb = _uids(files["in/ct.dcm"]), _uids(files["in/rgb2.dcm"])
    assert set(exported) == {ct + ext, f"{rgb}/1{ext}", f"{rgb}/2{ext}"}
    for data in exported.values():
        image = Image.open(io.BytesIO(data))
        assert image.format == fmt
    assert Image.open(io.BytesIO(exported[ct + ext])).size == (128, 128)
    assert operation["metadata"]["counter"] == {
        "success": "2",
        "failure": "1",
    }  # the SR has no pixels


def test_export_raw_pixels_and_filter(
    small_store: tuple[Any, str, dict[str, bytes]], gcs_server: StorageServer
) -> None:
    api, store, files = small_store
    ct = _uids(files["in/ct.dcm"])
    study, series, _sop = ct.split("/")
    bucket = upload(gcs_server, {"paths.txt": f"/studies/{study}/series/{series}\n".encode()})
    operation = run_export(
        api,
        store,
        f"gs://{bucket}/raw",
        "application/octet-stream",
        filterConfig={"resourcePathsGcsUri": f"gs://{bucket}/paths.txt"},
    )
    exported = download_all(gcs_server, bucket, "raw/")
    assert set(exported) == {ct}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = pydicom.dcmread(io.BytesIO(files["in/ct.dcm"])).pixel_array
    assert exported[ct] == pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    assert operation["metadata"]["counter"] == {"success": "1"}
