"""Shared pieces of the ingest tests: generated instances, settings, events, a fixed clock,
and a count of the Cloud Storage requests a client makes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomflow.config import Settings, load_settings
from dicomflow.events import FINALIZED, MESSAGE_PUBLISHED
from localcloud.faultproxy import storage_operation
from tests.deployment_key import KEY_FILE

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
    meta.MediaStorageSOPClassUID = UID(sop_class or SECONDARY_CAPTURE)
    sop = sop or generate_uid()
    meta.MediaStorageSOPInstanceUID = UID(sop)
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
        "DICOMFLOW_KEY_FILE": KEY_FILE,
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
    time_created: datetime | None = None


def upload(
    client: storage.Client, bucket: str, name: str, data: bytes, created: datetime | None = None
) -> Uploaded:
    """Upload ``data``; ``created`` stands in for the object's ``timeCreated`` in its events
    (tests on a settable clock), else the server's."""
    blob = client.bucket(bucket).blob(name)
    blob.upload_from_string(data, content_type="application/dicom")
    assert blob.generation is not None
    md5 = blob.md5_hash or base64.b64encode(hashlib.md5(data).digest()).decode()
    return Uploaded(
        bucket,
        name,
        int(blob.generation),
        len(data),
        md5,
        blob.crc32c,
        created or blob.time_created,
    )


def finalize_event(obj: Uploaded, time: datetime, event_id: str | None = None) -> CloudEvent:
    """The Eventarc event of ``obj``'s upload, sent at ``time``; ``timeCreated`` only when
    the object has one (the function falls back to the event's time)."""
    data = {
        "bucket": obj.bucket,
        "name": obj.name,
        "generation": str(obj.generation),
        "metageneration": "1",
        "size": str(obj.size),
        "md5Hash": obj.md5,
        "crc32c": obj.crc32c,
        "contentType": "application/dicom",
    }
    if obj.time_created is not None:
        data["timeCreated"] = obj.time_created.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return CloudEvent(
        {
            "type": FINALIZED,
            "source": f"//storage.googleapis.com/projects/_/buckets/{obj.bucket}",
            "subject": f"objects/{obj.name}",
            "id": event_id or f"{obj.bucket}/{obj.name}/{obj.generation}",
            "time": time.isoformat(),
        },
        data,
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


# ---- Cloud Storage requests, counted at the client ------------------------------------------


@dataclass(frozen=True)
class Call:
    """One Cloud Storage request: its operation (``objects.rewrite``...), the object or
    listing prefix it names (the destination, for a copy), its headers and status."""

    operation: str
    bucket: str
    name: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int


# google-cloud-storage's bucket metadata cache (_bucket_metadata_cache) runs these.
_LIBRARY_THREADS = ("(_fetch_background)", "(_verify_existence_background)")
_MULTIPART_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _target(path: str, query: dict[str, list[str]]) -> tuple[str, str]:
    for lead in ("/upload/storage/v1/b/", "/download/storage/v1/b/", "/storage/v1/b/"):
        if path.startswith(lead):
            rest = path[len(lead) :]
            break
    else:
        return "", ""
    for marker in ("/rewriteTo/b/", "/copyTo/b/"):
        if marker in rest:
            rest = rest.split(marker, 1)[1]
    bucket, _, tail = rest.partition("/o/")
    name = unquote(tail) if tail else (query.get("name") or query.get("prefix") or [""])[0]
    return unquote(bucket.strip("/")), name


class StorageCalls:
    """Every request a ``storage.Client`` sends, recorded at its HTTP session.

    fake-gcs-server honours preconditions on simple uploads only. Unless the server in
    front of the client enforces ``ifGenerationMatch=0`` on ``objects.rewrite`` itself
    (``enforced``), this front does: the rewrites of one destination are serialised in
    this process, and one whose destination exists is answered 412 without reaching the
    server. Every test delivery runs in this process, so that is the service's
    compare-and-swap as far as the tests can tell.

    Not counted: the library's bucket metadata cache reads each bucket once per client,
    from a thread of its own (``buckets.get``), whatever the number of requests.
    """

    def __init__(self, client: storage.Client, enforced: bool) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._destinations: dict[str, threading.Lock] = {}
        session = client._http
        self._send = session.request
        self._enforced = enforced
        session.request = self._request

    def _request(self, *args: Any, **kwargs: Any) -> requests.Response:
        method = kwargs.get("method") or args[0]
        url = kwargs.get("url") or args[1]
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        operation = storage_operation(method, parts.path, parts.query)
        bucket, name = _target(parts.path, query)
        body = kwargs.get("data")
        if not name and isinstance(body, bytes):
            found = _MULTIPART_NAME.search(body[:4096])
            name = json.loads(b'"' + found.group(1) + b'"') if found else ""
        headers = {k: str(v) for k, v in (kwargs.get("headers") or {}).items()}
        if operation == "objects.rewrite" and query.get("ifGenerationMatch") == ["0"]:
            response = self._rewrite_if_absent(bucket, name, args, kwargs)
        else:
            response = self._forward(args, kwargs)
        if threading.current_thread().name.endswith(_LIBRARY_THREADS):
            return response
        with self._lock:
            self.calls.append(Call(operation, bucket, name, query, headers, response.status_code))
        return response

    def _rewrite_if_absent(
        self, bucket: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> requests.Response:
        if self._enforced:
            return self._forward(args, kwargs)
        with self._lock:
            lock = self._destinations.setdefault(f"{bucket}/{name}", threading.Lock())
        with lock:
            url = kwargs.get("url") or args[1]
            base = url.split("/storage/v1/", 1)[0]
            meta = f"{base}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
            if self._forward((), {"method": "GET", "url": meta}).status_code == 200:
                return _precondition_failed(url)
            return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> requests.Response:
        response: requests.Response = self._send(*args, **kwargs)
        return response

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def taken(self) -> list[Call]:
        """The calls so far, and a fresh count from here."""
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    def counts(self, calls: list[Call] | None = None) -> Counter[str]:
        """Calls per operation."""
        with self._lock:
            chosen = list(self.calls if calls is None else calls)
        return Counter(c.operation for c in chosen)


def _precondition_failed(url: str) -> requests.Response:
    response = requests.Response()
    response.status_code = 412
    response.url = url
    response.headers["Content-Type"] = "application/json"
    response._content = json.dumps(
        {"error": {"code": 412, "message": "Precondition Failed", "errors": []}}
    ).encode()
    response.request = requests.Request("POST", url).prepare()
    return response


_ENFORCED: dict[str, bool] = {}


def rewrite_precondition_enforced(client: storage.Client) -> bool:
    """Whether the server behind ``client`` answers 412 to a rewrite onto a live object
    with ``ifGenerationMatch=0`` (checked once per endpoint)."""
    endpoint = client._connection.API_BASE_URL
    if endpoint not in _ENFORCED:
        bucket = client.create_bucket(unique("probe"))
        source = bucket.blob("source")
        source.upload_from_string(b"probe")
        enforced = False
        for _ in range(2):
            try:
                bucket.blob("target").rewrite(source, if_generation_match=0)
            except PreconditionFailed:
                enforced = True
        _ENFORCED[endpoint] = enforced
    return _ENFORCED[endpoint]


def counted_client(endpoint: str) -> tuple[storage.Client, StorageCalls]:
    """A Storage client for ``endpoint`` whose requests are counted (``StorageCalls``)."""
    from localcloud.storage import client as storage_client

    made = storage_client(endpoint)
    calls = StorageCalls(made, rewrite_precondition_enforced(storage_client(endpoint)))
    return made, calls
