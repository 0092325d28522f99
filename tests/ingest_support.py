"""Shared pieces of the ingest tests: generated instances, settings, events, a fixed clock."""

from __future__ import annotations

import base64
import hashlib
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from google.cloud import storage
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomflow.config import Settings, load_settings
from dicomflow.events import FINALIZED, MESSAGE_PUBLISHED

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_NAME = "Doe^Confidential"


def make_instance(
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    *,
    rows: int = 4,
    pixel_bytes: int | None = None,
    sop_class: str | None = SECONDARY_CAPTURE,
    private_blob: int = 0,
    omit: tuple[str, ...] = (),
    overrides: dict[str, str] | None = None,
) -> bytes:
    """A small valid DICOM Part 10 file (or an invalid one, by leaving parts out)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or SECONDARY_CAPTURE
    sop = sop or generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PID-0001"
    if sop_class:
        ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    if private_blob:
        # A large element before the UIDs, so the header check must read further.
        ds.add_new(0x00090010, "LO", "DICOMFLOW TEST")
        ds.add_new(0x00091000, "OB", b"\0" * private_blob)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "OT"
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    size = pixel_bytes if pixel_bytes is not None else rows * rows
    ds.PixelData = b"\x7f" * size
    for keyword in omit:
        delattr(ds, keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        for keyword, value in (overrides or {}).items():
            setattr(ds, keyword, value)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings_env(landing: str, staging: str, **extra: str) -> dict[str, str]:
    env = {
        "DICOMFLOW_DICOM_STORE": "projects/p/locations/l/datasets/d/dicomStores/s",
        "DICOMFLOW_LANDING_BUCKET": landing,
        "DICOMFLOW_STAGING_BUCKET": staging,
        "DICOMFLOW_BACKUP_BUCKET": "backups-bucket",
        "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
    }
    env.update(extra)
    return env


def make_settings(landing: str, staging: str, **extra: str) -> Settings:
    return load_settings(settings_env(landing, staging, **extra))


class Clock:
    """A settable clock for Context.clock."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 25, 12, 53, 5, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@dataclass
class Uploaded:
    bucket: str
    name: str
    generation: int
    size: int
    md5: str
    crc32c: str | None


def upload(client: storage.Client, bucket: str, name: str, data: bytes) -> Uploaded:
    blob = client.bucket(bucket).blob(name)
    blob.upload_from_string(data, content_type="application/dicom")
    assert blob.generation is not None
    md5 = blob.md5_hash or base64.b64encode(hashlib.md5(data).digest()).decode()
    return Uploaded(bucket, name, int(blob.generation), len(data), md5, blob.crc32c)


def finalize_event(obj: Uploaded, time: datetime, event_id: str | None = None) -> CloudEvent:
    return CloudEvent(
        {
            "type": FINALIZED,
            "source": f"//storage.googleapis.com/projects/_/buckets/{obj.bucket}",
            "subject": f"objects/{obj.name}",
            "id": event_id or f"{obj.bucket}/{obj.name}/{obj.generation}",
            "time": time.isoformat(),
        },
        {
            "bucket": obj.bucket,
            "name": obj.name,
            "generation": str(obj.generation),
            "metageneration": "1",
            "size": str(obj.size),
            "md5Hash": obj.md5,
            "crc32c": obj.crc32c,
            "contentType": "application/dicom",
        },
    )


def tick_event(time: datetime) -> CloudEvent:
    return CloudEvent(
        {
            "type": MESSAGE_PUBLISHED,
            "source": "//pubsub.googleapis.com/projects/p/topics/dicomflow-tick",
            "id": uuid.uuid4().hex,
            "time": time.isoformat(),
        },
        {
            "subscription": "projects/p/subscriptions/tick",
            "message": {"data": base64.b64encode(b"tick").decode(), "messageId": "1"},
        },
    )


def post(client: Any, event: CloudEvent) -> int:
    """Deliver ``event`` through a functions-framework test client; the HTTP status."""
    headers, body = to_binary(event)
    response = client.post("/", headers=headers, data=body)
    return int(response.status_code)


def names(client: storage.Client, bucket: str, prefix: str) -> list[str]:
    return sorted(b.name for b in client.list_blobs(bucket, prefix=prefix))


def iter_staged(client: storage.Client, bucket: str) -> Iterator[str]:
    for name in names(client, bucket, "batches/"):
        if name.endswith(".dcm"):
            yield name


def value_cut_short(ds: Dataset) -> bool:
    """True when an element holds fewer bytes than its declared length.

    pydicom reads a value cut by the end of the file as a shorter one, quietly
    (pydicom's own rtplan_truncated.dcm). Compared before any value is decoded.
    """
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset decodes its elements)
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != 0xFFFFFFFF
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            return True
    return False
