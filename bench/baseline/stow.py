"""The per-file STOW-RS baseline: store each uploaded object through DICOMweb (bench only).

The other common design: on every ``google.cloud.storage.object.v1.finalized``
event, download the object and POST it to the store's DICOMweb ``studies``
endpoint (STOW-RS, one ``application/dicom`` part). It never starts an import
operation, so it never meets the import concurrency quota; it pays instead one
Storage read and one Healthcare write per file, and its instance holds the
file's bytes while it sends them. A 409 whose only failure is "already stored"
is a success (a redelivery of a stored file); any other error raises, so that
the platform redelivers the event.

localcloud serves it in place of ``main.py`` (``StackConfig.functions_source``);
``report`` and ``export`` exist only because the stack starts all three.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import functions_framework
import google.auth
import requests
from cloudevents.http import CloudEvent
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage

FINALIZED = "google.cloud.storage.object.v1.finalized"
STORE = os.environ["DICOMFLOW_DICOM_STORE"]
ENDPOINT = os.environ.get("DICOMFLOW_HEALTHCARE_ENDPOINT") or "https://healthcare.googleapis.com"
# DICOM's "SOP instance already stored" failure reason (PS3.4 table GG.4-1, 0x0111).
ALREADY_STORED = 0x0111
TIMEOUT = 120
_local = threading.local()


def _clients() -> tuple[storage.Client, requests.Session]:
    """One Storage client and one HTTP session per thread, created once."""
    found = getattr(_local, "clients", None)
    if found is None:
        if os.environ.get("DICOMFLOW_HEALTHCARE_ENDPOINT"):
            anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
            client = storage.Client(project="local", credentials=anonymous)
            session: requests.Session = requests.Session()
        else:
            credentials, project = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
            client = storage.Client(project=project, credentials=credentials)
            session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        found = _local.clients = (client, session)
    return found  # type: ignore[no-any-return]


def _only_duplicates(reply: requests.Response) -> bool:
    """A 409 whose every failed instance was already stored."""
    try:
        failed = reply.json().get("00081198", {}).get("Value", [])
    except ValueError:
        return False
    reasons = [item.get("00081197", {}).get("Value", [None])[0] for item in failed]
    return bool(reasons) and all(reason == ALREADY_STORED for reason in reasons)


@functions_framework.cloud_event  # type: ignore[arg-type]
def ingest(cloud_event: CloudEvent) -> dict[str, Any]:
    """Download the uploaded object and store it; raise on failure so the event is redelivered."""
    if cloud_event["type"] != FINALIZED:
        return {"status": "ignored"}
    data = cloud_event.data
    if not str(data["name"]).lower().endswith(".dcm"):
        return {"status": "skipped"}
    client, session = _clients()
    blob = client.bucket(data["bucket"]).blob(data["name"], generation=int(data["generation"]))
    body = blob.download_as_bytes()
    reply = session.post(
        f"{ENDPOINT.rstrip('/')}/v1/{STORE}/dicomWeb/studies",
        data=body,
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
        timeout=TIMEOUT,
    )
    if reply.status_code == 409 and _only_duplicates(reply):
        return {"status": "duplicate"}
    reply.raise_for_status()
    return {"status": "stored", "bytes": len(body)}


@functions_framework.cloud_event  # type: ignore[arg-type]
def report(cloud_event: CloudEvent) -> dict[str, Any]:
    return {"status": "ignored"}


@functions_framework.cloud_event  # type: ignore[arg-type]
def export(cloud_event: CloudEvent) -> dict[str, Any]:
    return {"status": "ignored"}
