"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS, deletes) through dicomweb-client."""

from __future__ import annotations

import io
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from localcloud.healthcare import HealthcareServer
from tests.healthcare_support import dicomweb_client, new_store

PARENT = "projects/test-project/locations/us-central1"


def make_instance(
    study: str, series: str, patient: str, modality: str, date: str, accession: str
) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
    dataset.PatientName, dataset.PatientID = patient, "PID-" + patient[:3]
    dataset.Modality, dataset.StudyDate, dataset.AccessionNumber = modality, date, accession
    dataset.StudyDescription = "research"
    dataset.Rows = dataset.Columns = 8
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit, dataset.PixelRepresentation = 7, 0
    dataset.PixelData = bytes(range(64))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.fixture
def web(
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    http_session: requests.Session,
) -> Iterator[tuple[DICOMwebClient, Any, str]]:
    api = healthcare_client(healthcare_server.url)
    store = new_store(api, PARENT, store_id="web")
    client = dicomweb_client(healthcare_server.url, store, http_session)
    yield client, api, store


def sop(item: dict[str, Any]) -> str:
    return str(item["00080018"]["Value"][0])


def test_store_search_retrieve_delete(
    web: tuple[DICOMwebClient, Any, str], http_session: requests.Session
) -> None:
    client, _api, _store = web
    study_a, study_b = generate_uid(), generate_uid()
    series_a1, series_a2, series_b = generate_uid(), generate_uid(), generate_uid()
    instances = [
        make_instance(study_a, series_a1, "Doe^Jane", "CT", "20240105", "ACC1"),
        make_instance(study_a, series_a1, "Doe^Jane", "CT", "20240105", "ACC1"),
        make_instance(study_a, series_a2, "Doe^Jane", "MR", "20240105", "ACC1"),
        make_instance(study_b, series_b, "Roe^Richard", "US", "20231224", "ACC2"),
    ]
    result = client.store_instances(instances)
    assert len(result.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in result

    # A conflicting version and a non-DICOM part fail; an identical re-send is accepted.
    conflicting = make_instance(study_a, series_a1, "Doe^Jane", "CT", "20240105", "ACC9")
    conflicting.SOPInstanceUID = instances[0].SOPInstanceUID
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in (_bytes(instances[1]), _bytes(conflicting), b"garbage")
        )
        + f"--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    mixed = http_session.post(
        f"{client.base_url}/studies", data=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert mixed.status_code == 202
    failed = mixed.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0x0111, 0xC000]
    assert len(mixed.json()["00081199"]["Value"]) == 1

    assert {s["0020000D"]["Value"][0] for s in client.search_for_studies()} == {study_a, study_b}
    by_name = client.search_for_studies(search_filters={"PatientName": "doe*"})
    assert [s["0020000D"]["Value"][0] for s in by_name] == [study_a]
    assert by_name[0]["00201208"]["Value"] == [3] and by_name[0]["00080061"]["Value"] == [
        "CT",
        "MR",
    ]
    assert client.search_for_studies(search_filters={"PatientName": "Ro?^*"})[0]["0020000D"][
        "Value"
    ] == [study_b]
    assert client.search_for_studies(search_filters={"PatientID": "PID-Roe"})[0]["0020000D"][
        "Value"
    ] == [study_b]
    assert [
        s["0020000D"]["Value"][0]
        for s in client.search_for_studies(search_filters={"StudyDate": "20240101-"})
    ] == [study_a]
    assert [
        s["0020000D"]["Value"][0]
        for s in client.search_for_studies(search_filters={"StudyDate": "-20231231"})
    ] == [study_b]
    assert [
        s["0020000D"]["Value"][0]
        for s in client.search_for_studies(search_filters={"Modality": "MR"})
    ] == [study_a]
    assert [
        s["0020000D"]["Value"][0]
        for s in client.search_for_studies(search_filters={"AccessionNumber": "ACC2"})
    ] == [study_b]
    assert len(client.search_for_studies(limit=1)) == 1
    assert len(client.search_for_studies(offset=1)) == 1
    with_field = client.search_for_studies(
        search_filters={"StudyInstanceUID": study_b}, fields=["StudyDescription"]
    )
    assert with_field[0]["00081030"]["Value"] == ["research"]
    rows = client.search_for_studies(search_filters={"StudyInstanceUID": study_b}, fields=["Rows"])
    assert rows[0]["00280010"]["Value"] == [8]  # not indexed at study level: read from the file

    series = client.search_for_series(study_a)
    assert {s["0020000E"]["Value"][0] for s in series} == {series_a1, series_a2}
    assert [
        s["0020000E"]["Value"][0]
        for s in client.search_for_series(search_filters={"Modality": "US"})
    ] == [series_b]
    found = client.search_for_instances(study_a, series_a1)
    assert {sop(i) for i in found} == {instances[0].SOPInstanceUID, instances[1].SOPInstanceUID}
    assert len(client.search_for_instances(study_a)) == 3
    assert (
        len(
            client.search_for_instances(
                search_filters={"SOPInstanceUID": instances[3].SOPInstanceUID}
            )
        )
        == 1
    )

    retrieved = client.retrieve_instance(study_a, series_a1, instances[0].SOPInstanceUID)
    assert retrieved.PatientName == "Doe^Jane" and retrieved.PixelData == instances[0].PixelData
    assert len(client.retrieve_series(study_a, series_a1)) == 2
    assert len(client.retrieve_study(study_a)) == 3
    metadata = client.retrieve_instance_metadata(study_a, series_a2, instances[2].SOPInstanceUID)
    assert metadata["00080060"]["Value"] == ["MR"] and "00100010" in metadata
    assert len(client.retrieve_series_metadata(study_a, series_a1)) == 2
    assert len(client.retrieve_study_metadata(study_a)) == 3
    rendered = client.retrieve_instance_rendered(
        study_a, series_a1, instances[0].SOPInstanceUID, media_types=("image/png",)
    )
    assert Image.open(io.BytesIO(rendered)).size == (8, 8)
    frames = client.retrieve_instance_frames(
        study_a, series_a1, instances[0].SOPInstanceUID, frame_numbers=[1]
    )
    assert frames == [instances[0].PixelData]

    client.delete_instance(study_a, series_a1, instances[1].SOPInstanceUID)
    assert len(client.search_for_instances(study_a, series_a1)) == 1
    series_delete = http_session.delete(
        f"{client.base_url}/studies/{study_a}/series/{series_a2}", timeout=30
    )
    assert series_delete.json()["name"].split("/operations/")[0] in _store_dataset(web)
    study_delete = http_session.delete(f"{client.base_url}/studies/{study_b}", timeout=30)
    assert "operations/" in study_delete.json()["name"]
    deadline = time.monotonic() + 10
    while len(client.search_for_studies()) != 1 or len(client.search_for_series(study_a)) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    missing = http_session.get(f"{client.base_url}/studies/{study_b}", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


def _store_dataset(web: tuple[DICOMwebClient, Any, str]) -> str:
    return web[2].split("/dicomStores/")[0]


def _bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
