"""DICOM store Pub/Sub notifications, from STOW-RS and import to a localcloud topic.

The store's settings are the v1 discovery document's ``notificationConfig``
(``pubsubTopic``, ``sendForBulkImport``) and ``notificationConfigs[]``
(``pubsubTopic``); messages are pulled through google-api-python-client's Pub/Sub v1.
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
import requests

from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.pubsub import PubSubServer
from localcloud.storage import StorageServer
from tests.integration.test_healthcare_fidelity import dicom_bytes, multipart

PROJECT = "notify"
DATASET = f"projects/{PROJECT}/locations/us-central1/datasets/d"


@pytest.fixture(scope="module")
def notifying_healthcare(
    gcs_server: StorageServer, pubsub_fallback: PubSubServer
) -> Iterator[HealthcareServer]:
    server = start_healthcare(storage_endpoint=gcs_server.url, pubsub_endpoint=pubsub_fallback.url)
    yield server
    server.stop()


@pytest.fixture
def pubsub_api(pubsub_fallback: PubSubServer, pubsub_client: Callable[[str], Any]) -> Any:
    return pubsub_client(pubsub_fallback.url)


def _topic_with_subscription(api: Any, name: str) -> tuple[str, str]:
    topic = f"projects/{PROJECT}/topics/{name}"
    subscription = f"projects/{PROJECT}/subscriptions/{name}"
    api.projects().topics().create(name=topic, body={}).execute()
    api.projects().subscriptions().create(
        name=subscription, body={"topic": topic, "ackDeadlineSeconds": 60}
    ).execute()
    return topic, subscription


def _pull_all(api: Any, subscription: str) -> list[dict[str, Any]]:
    """Every message waiting on ``subscription``, acknowledged."""
    messages: list[dict[str, Any]] = []
    subscriptions = api.projects().subscriptions()
    while True:
        got = subscriptions.pull(
            subscription=subscription, body={"maxMessages": 100, "returnImmediately": True}
        ).execute()
        received = got.get("receivedMessages", [])
        if not received:
            return messages
        subscriptions.acknowledge(
            subscription=subscription, body={"ackIds": [r["ackId"] for r in received]}
        ).execute()
        messages += [r["message"] for r in received]


def _path(store: str, data: bytes) -> str:
    dataset = pydicom.dcmread(io.BytesIO(data))
    return (
        f"{store}/dicomWeb/studies/{dataset.StudyInstanceUID}/series/"
        f"{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}"
    )


def _paths(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(base64.b64decode(m["data"]).decode() for m in messages)


def test_stow_and_import_publish_exactly_the_expected_messages(
    notifying_healthcare: HealthcareServer,
    gcs_server: StorageServer,
    healthcare_client: Callable[..., Any],
    pubsub_api: Any,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    legacy_topic, legacy_sub = _topic_with_subscription(pubsub_api, f"legacy-{suffix}")
    topic, sub = _topic_with_subscription(pubsub_api, f"configs-{suffix}")
    api = healthcare_client(notifying_healthcare.url)
    datasets = api.projects().locations().datasets()
    datasets.create(
        parent=DATASET.rsplit("/datasets/", 1)[0], datasetId=f"d{suffix}", body={}
    ).execute()
    dataset = f"{DATASET}{suffix}"
    store = (
        datasets.dicomStores()
        .create(
            parent=dataset,
            dicomStoreId="s",
            body={
                "notificationConfig": {"pubsubTopic": legacy_topic, "sendForBulkImport": False},
                "notificationConfigs": [{"pubsubTopic": topic}],
            },
        )
        .execute()["name"]
    )
    web = f"{notifying_healthcare.url}/v1/{store}/dicomWeb"

    # STOW-RS: both destinations, one message per new instance; a re-send publishes nothing.
    stowed = [dicom_bytes() for _ in range(2)]
    body, content_type = multipart([*stowed, b"not dicom"])
    response = requests.post(
        f"{web}/studies", data=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert response.status_code == 202
    body, content_type = multipart(stowed[:1])
    response = requests.post(
        f"{web}/studies", data=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert response.status_code == 200
    legacy = _pull_all(pubsub_api, legacy_sub)
    assert _paths(legacy) == sorted(_path(store, d) for d in stowed)
    assert all("attributes" not in m for m in legacy)  # the legacy config sends none
    with_attributes = _pull_all(pubsub_api, sub)
    assert _paths(with_attributes) == sorted(_path(store, d) for d in stowed)
    first = pydicom.dcmread(io.BytesIO(stowed[0]))
    attributes = next(
        m["attributes"]
        for m in with_attributes
        if m["attributes"]["sopInstanceUID"] == first.SOPInstanceUID
    )
    assert set(attributes) == {
        "action",
        "lastUpdatedTime",
        "storeName",
        "studyInstanceUID",
        "seriesInstanceUID",
        "sopInstanceUID",
        "modality",
        "storageClass",
    }
    assert attributes["action"] == "StoreInstances" and attributes["storeName"] == store
    assert attributes["studyInstanceUID"] == first.StudyInstanceUID
    assert attributes["seriesInstanceUID"] == first.SeriesInstanceUID
    assert attributes["modality"] == "OT"

    # Import without sendForBulkImport: only notificationConfigs hears of it.
    bucket = f"notify-{suffix}"
    imported = [dicom_bytes() for _ in range(3)]
    more = [dicom_bytes() for _ in range(2)]
    gcs = gcs_server.client()
    try:
        target = gcs.create_bucket(bucket)
        for index, data in enumerate(imported):
            target.blob(f"first/{index}.dcm").upload_from_string(data)
        for index, data in enumerate(more):
            target.blob(f"second/{index}.dcm").upload_from_string(data)
        target.blob("second/stowed.dcm").upload_from_string(stowed[1])  # already stored
    finally:
        gcs.close()

    def run_import(prefix: str) -> None:
        operation = (
            datasets.dicomStores()
            .import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket}/{prefix}/*.dcm"}})
            .execute()
        )
        while not operation.get("done"):
            operation = datasets.operations().get(name=operation["name"]).execute()
        assert "error" not in operation, operation

    run_import("first")
    assert _pull_all(pubsub_api, legacy_sub) == []
    bulk = _pull_all(pubsub_api, sub)
    assert _paths(bulk) == sorted(_path(store, d) for d in imported)
    assert {m["attributes"]["action"] for m in bulk} == {"ImportDicomData"}

    # With sendForBulkImport, the legacy topic hears of imports too; the duplicate is silent.
    datasets.dicomStores().patch(
        name=store,
        updateMask="notificationConfig",
        body={"notificationConfig": {"pubsubTopic": legacy_topic, "sendForBulkImport": True}},
    ).execute()
    run_import("second")
    assert _paths(_pull_all(pubsub_api, legacy_sub)) == sorted(_path(store, d) for d in more)
    assert _paths(_pull_all(pubsub_api, sub)) == sorted(_path(store, d) for d in more)
