"""Where the emulator answers as the real service does, pinned through real clients.

Each test names the behaviour and its source (docs/emulator.md has the table):
google-api-python-client for REST, dicomweb-client for DICOMweb, plain
``requests`` where a client hides the status or the media type.
"""

from __future__ import annotations

import io
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from googleapiclient.errors import HttpError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from localcloud.corpus import generate_instance
from localcloud.healthcare import HealthcareServer
from tests.healthcare_support import dicomweb_client, new_store

PARENT = "projects/fidelity/locations/us-central1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def dicom_bytes(
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    syntax: str = ExplicitVRLittleEndian,
) -> bytes:
    """A small valid instance; pass UIDs to override (an empty string leaves one out)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = UID(syntax)
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    values = {
        "StudyInstanceUID": generate_uid() if study is None else study,
        "SeriesInstanceUID": generate_uid() if series is None else series,
        "SOPInstanceUID": generate_uid() if sop is None else sop,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs are the point of some callers
        for keyword, value in values.items():
            if value:
                setattr(dataset, keyword, value)
        dataset.file_meta.MediaStorageSOPInstanceUID = UID(values["SOPInstanceUID"] or "1.2.3")
        dataset.PatientName, dataset.PatientID, dataset.Modality = "Fidelity^Test", "FID", "OT"
        dataset.Rows = dataset.Columns = 4
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated = dataset.BitsStored = 8
        dataset.HighBit, dataset.PixelRepresentation = 7, 0
        dataset.PixelData = bytes(range(16))
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    return body + f"--{boundary}--\r\n".encode(), (
        f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


@pytest.fixture
def store(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    http_session: requests.Session,
) -> Iterator[tuple[Any, str, DICOMwebClient]]:
    """(googleapiclient Healthcare API, store name, dicomweb-client) on a fresh store."""
    api = healthcare_client(healthcare_server.url)
    name = new_store(api, PARENT, prefix="fid", store_id="s")
    client = dicomweb_client(healthcare_server.url, name, http_session)
    yield api, name, client


def test_an_empty_search_is_204_no_content_and_dicomweb_client_reads_it_as_empty(
    store: tuple[Any, str, DICOMwebClient], http_session: requests.Session
) -> None:
    # Google's DICOMweb samples and gcloud expect 204 for a search without results.
    _api, _name, client = store
    client.store_instances([pydicom.dcmread(io.BytesIO(dicom_bytes()))])
    unknown = generate_uid()
    for path in (
        "studies?PatientName=Nobody",
        f"studies/{unknown}/instances",
        f"studies/{unknown}/series",
        "instances?SOPInstanceUID=1.2.3",
    ):
        response = http_session.get(f"{client.base_url}/{path}", timeout=30)
        assert response.status_code == 204, path
        assert response.content == b""
    assert client.search_for_studies(search_filters={"PatientName": "Nobody"}) == []
    assert client.search_for_instances(study_instance_uid=unknown) == []
    assert len(client.search_for_studies()) == 1  # a search with results is still 200


def test_iam_policies_of_datasets_and_stores_have_etags(
    store: tuple[Any, str, DICOMwebClient],
) -> None:
    api, name, _client = store
    dataset = name.rsplit("/dicomStores/", 1)[0]
    datasets = api.projects().locations().datasets()
    for resources, resource in ((datasets, dataset), (datasets.dicomStores(), name)):
        empty = resources.getIamPolicy(resource=resource).execute()
        assert empty == {"etag": "ACAB"}  # what Google gives a resource with no policy
        binding = {"role": "roles/healthcare.dicomViewer", "members": ["user:a@example.com"]}
        stored = resources.setIamPolicy(
            resource=resource, body={"policy": {"bindings": [binding], "etag": "ACAB"}}
        ).execute()
        assert stored["bindings"] == [binding] and stored["version"] == 1
        assert stored["etag"] != "ACAB"
        assert resources.getIamPolicy(resource=resource).execute() == stored

        with pytest.raises(HttpError) as stale:  # a read-modify-write that lost the race
            resources.setIamPolicy(
                resource=resource, body={"policy": {"bindings": [], "etag": "ACAB"}}
            ).execute()
        assert stale.value.status_code == 409 and "concurrent policy changes" in str(stale.value)
        with pytest.raises(HttpError) as bad:
            resources.setIamPolicy(
                resource=resource, body={"policy": {"bindings": [{"role": "viewer"}]}}
            ).execute()
        assert bad.value.status_code == 400

        cleared = resources.setIamPolicy(
            resource=resource, body={"policy": {"etag": stored["etag"]}}
        ).execute()
        assert set(cleared) == {"etag"} and cleared["etag"] != stored["etag"]

        asked = ["healthcare.dicomStores.get", "healthcare.datasets.get"]
        granted = resources.testIamPermissions(
            resource=resource, body={"permissions": asked}
        ).execute()
        assert granted == {"permissions": asked}  # nothing is enforced locally

    missing = f"{dataset}/dicomStores/none"
    with pytest.raises(HttpError) as not_found:
        datasets.dicomStores().getIamPolicy(resource=missing).execute()
    assert not_found.value.status_code == 404


def test_retrieve_instance_as_single_part_dicom(
    store: tuple[Any, str, DICOMwebClient], http_session: requests.Session
) -> None:
    # The conformance statement lists single-part application/dicom for RetrieveInstance.
    _api, _name, client = store
    data = dicom_bytes(syntax=ImplicitVRLittleEndian)
    stored = pydicom.dcmread(io.BytesIO(data))
    body, content_type = multipart([data])
    response = http_session.post(
        f"{client.base_url}/studies", data=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200
    url = (
        f"{client.base_url}/studies/{stored.StudyInstanceUID}/series/"
        f"{stored.SeriesInstanceUID}/instances/{stored.SOPInstanceUID}"
    )
    single = http_session.get(
        url, headers={"Accept": "application/dicom; transfer-syntax=*"}, timeout=30
    )
    assert single.status_code == 200
    assert single.headers["Content-Type"] == (
        f"application/dicom; transfer-syntax={ImplicitVRLittleEndian}"
    )
    assert single.content == data  # the file as stored, not a MIME document

    explicit = http_session.get(
        url, headers={"Accept": f"application/dicom; transfer-syntax={EXPLICIT_LE}"}, timeout=30
    )
    assert explicit.headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert pydicom.dcmread(io.BytesIO(explicit.content)).file_meta.TransferSyntaxUID == EXPLICIT_LE

    # A whole series stays multipart, as the statement lists single part for instances only.
    series = http_session.get(
        url.rsplit("/instances/", 1)[0],
        headers={"Accept": "application/dicom; transfer-syntax=*"},
        timeout=30,
    )
    assert series.headers["Content-Type"].startswith("multipart/related")


def test_retrieve_defaults_to_explicit_vr_little_endian(
    store: tuple[Any, str, DICOMwebClient], http_session: requests.Session
) -> None:
    # The conformance statement marks 1.2.840.10008.1.2.1 as the default transfer syntax.
    _api, _name, client = store
    data = dicom_bytes(syntax=ImplicitVRLittleEndian)
    stored = pydicom.dcmread(io.BytesIO(data))
    body, content_type = multipart([data])
    http_session.post(
        f"{client.base_url}/studies", data=body, headers={"Content-Type": content_type}
    ).raise_for_status()
    uids = (stored.StudyInstanceUID, stored.SeriesInstanceUID, stored.SOPInstanceUID)
    url = f"{client.base_url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"

    bare = requests.get(url, headers={"Accept": ""}, timeout=30)  # no Accept at all
    assert bare.status_code == 200
    assert f"transfer-syntax={EXPLICIT_LE}" in bare.content.split(b"\r\n\r\n", 1)[0].decode()

    untyped = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert f"transfer-syntax={EXPLICIT_LE}" in untyped.content.split(b"\r\n\r\n", 1)[0].decode()

    # dicomweb-client asks for transfer-syntax=* unless told otherwise.
    kept = client.retrieve_instance(*uids)
    assert kept.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    explicit = client.retrieve_instance(*uids, media_types=(("application/dicom", EXPLICIT_LE),))
    assert explicit.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert explicit.PixelData == stored.PixelData


def test_datasets_patch_and_501_for_unserved_methods(
    store: tuple[Any, str, DICOMwebClient], http_session: requests.Session
) -> None:
    api, name, client = store
    dataset = name.rsplit("/dicomStores/", 1)[0]
    datasets = api.projects().locations().datasets()
    patched = datasets.patch(
        name=dataset, updateMask="timeZone", body={"timeZone": "Europe/Paris"}
    ).execute()
    assert patched == {"name": dataset, "timeZone": "Europe/Paris"}
    assert datasets.get(name=dataset).execute()["timeZone"] == "Europe/Paris"
    with pytest.raises(HttpError) as immutable:
        datasets.patch(name=dataset, updateMask="name", body={"name": "x"}).execute()
    assert immutable.value.status_code == 400

    calls = [
        (
            "datasets.deidentify",
            datasets.deidentify(
                sourceDataset=dataset,
                body={"destinationDataset": f"{dataset}-deid", "config": {}},
            ),
        ),
        (
            "dicomStores.deidentify",
            datasets.dicomStores().deidentify(
                sourceStore=name, body={"destinationStore": f"{name}-deid", "config": {}}
            ),
        ),
        (
            "dicomStores.getDICOMStoreMetrics",
            datasets.dicomStores().getDICOMStoreMetrics(name=name),
        ),
        ("fhirStores", datasets.fhirStores().list(parent=dataset)),
    ]
    for method, request in calls:
        with pytest.raises(HttpError) as unserved:
            request.execute()
        assert unserved.value.status_code == 501, method
        assert f"{method} is not implemented" in str(unserved.value)
    metrics = http_session.get(
        f"{client.base_url}/studies/{generate_uid()}:getStudyMetrics", timeout=30
    )
    assert metrics.status_code == 501 and metrics.json()["error"]["status"] == "UNIMPLEMENTED"


def test_store_and_import_reject_missing_and_malformed_uids(
    store: tuple[Any, str, DICOMwebClient], gcs_server: Any, http_session: requests.Session
) -> None:
    api, name, client = store
    hex_uid = "05fa52f0e599f17b8186ff18fcdf2b5570a52206a75c4d03afebf5c475dc8758"  # as in
    # pydicom-data's bad_sequence.dcm
    bad = {
        "hex study": dicom_bytes(study=hex_uid),
        "no series": dicom_bytes(series=""),
        "too long": dicom_bytes(sop="1." + "2" * 64),
    }
    good = dicom_bytes()
    body, content_type = multipart([*bad.values(), good])
    stowed = http_session.post(
        f"{client.base_url}/studies", data=body, headers={"Content-Type": content_type}
    )
    assert stowed.status_code == 202
    assert len(stowed.json()["00081198"]["Value"]) == 3
    assert len(stowed.json()["00081199"]["Value"]) == 1

    bucket = f"fid-{uuid.uuid4().hex[:10]}"
    gcs = gcs_server.client()
    try:
        target = gcs.create_bucket(bucket)
        for label, data in bad.items():
            target.blob(f"in/{label.replace(' ', '-')}.dcm").upload_from_string(data)
    finally:
        gcs.close()
    operations = api.projects().locations().datasets().operations()
    operation = (
        api.projects()
        .locations()
        .datasets()
        .dicomStores()
        .import_(name=name, body={"gcsSource": {"uri": f"gs://{bucket}/in/*.dcm"}})
        .execute()
    )
    while not operation.get("done"):
        operation = operations.get(name=operation["name"]).execute()
    assert operation["metadata"]["counter"] == {"failure": "3"}
    logs = requests.get(operation["metadata"]["logsUrl"], timeout=30).json()["entries"]
    messages = {e["source"].rsplit("/", 1)[1]: e["error"]["message"] for e in logs}
    assert messages == {
        "hex-study.dcm": "invalid DICOM instance: StudyInstanceUID is not a valid UID",
        "no-series.dcm": "invalid DICOM instance: missing SeriesInstanceUID",
        "too-long.dcm": "invalid DICOM instance: SOPInstanceUID is not a valid UID",
    }
    assert len(client.search_for_instances()) == 1


def test_bulkdata_uris_from_metadata_can_be_retrieved(
    store: tuple[Any, str, DICOMwebClient], http_session: requests.Session
) -> None:
    _api, _name, client = store
    made = generate_instance(generate_uid(), generate_uid(), 1, rows=64, columns=64)
    body, content_type = multipart([made.data])
    http_session.post(
        f"{client.base_url}/studies", data=body, headers={"Content-Type": content_type}
    ).raise_for_status()
    metadata = client.retrieve_instance_metadata(made.study_uid, made.series_uid, made.sop_uid)
    uri = metadata["7FE00010"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/7FE00010")
    assert client.retrieve_bulkdata(uri) == [pydicom.dcmread(io.BytesIO(made.data)).PixelData]
