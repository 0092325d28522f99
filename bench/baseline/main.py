"""The per-file baseline: one ``dicomStores.import`` per finalize event (bench only).

This is the Cloud Function found in Google's samples and blog posts: on every
``google.cloud.storage.object.v1.finalized`` event, import that one object's
``gs://`` URI and return. It has no batching, no header check and no ledger.
On an error (a 429 from the concurrency quota, a 5xx) it raises, so that the
platform redelivers the event, which is how such a function gets retried.

localcloud serves it in place of ``main.py`` (``StackConfig.functions_source``);
``report`` and ``export`` exist only because the stack starts all three.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import functions_framework
from cloudevents.http import CloudEvent
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

FINALIZED = "google.cloud.storage.object.v1.finalized"
STORE = os.environ["DICOMFLOW_DICOM_STORE"]
ENDPOINT = os.environ.get("DICOMFLOW_HEALTHCARE_ENDPOINT")
_local = threading.local()


def _healthcare() -> Any:
    """One client per thread (googleapiclient is not thread-safe), created once."""
    client = getattr(_local, "client", None)
    if client is None:
        options = {"api_endpoint": ENDPOINT.rstrip("/") + "/"} if ENDPOINT else None
        client = _local.client = build(
            "healthcare",
            "v1",
            static_discovery=True,
            cache_discovery=False,
            client_options=options,
            credentials=AnonymousCredentials() if ENDPOINT else None,  # type: ignore[no-untyped-call]
        )
    return client


@functions_framework.cloud_event  # type: ignore[arg-type]
def ingest(cloud_event: CloudEvent) -> dict[str, Any]:
    """Start one import for the uploaded object; raise on failure so the event is redelivered."""
    if cloud_event["type"] != FINALIZED:
        return {"status": "ignored"}
    data = cloud_event.data
    if not str(data["name"]).lower().endswith(".dcm"):
        return {"status": "skipped"}
    uri = f"gs://{data['bucket']}/{data['name']}"
    operation = (
        _healthcare()
        .projects()
        .locations()
        .datasets()
        .dicomStores()
        .import_(name=STORE, body={"gcsSource": {"uri": uri}})
        .execute(num_retries=0)
    )
    return {"status": "started", "operation": operation["name"]}


@functions_framework.cloud_event  # type: ignore[arg-type]
def report(cloud_event: CloudEvent) -> dict[str, Any]:
    return {"status": "ignored"}


@functions_framework.cloud_event  # type: ignore[arg-type]
def export(cloud_event: CloudEvent) -> dict[str, Any]:
    return {"status": "ignored"}
