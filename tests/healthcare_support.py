"""Shared pieces of the Healthcare API emulator tests: a fresh DICOM store and its clients."""

from __future__ import annotations

import uuid
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient


def new_store(api: Any, parent: str, prefix: str = "ds", store_id: str = "store") -> str:
    """Create a dataset with a fresh id under ``parent`` and a DICOM store in it.

    Args:
        api: a googleapiclient Healthcare API client.
        parent: ``projects/P/locations/L``.
        prefix: the start of the dataset id.
        store_id: the DICOM store's id.

    Returns:
        The store's resource name.
    """
    dataset_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    datasets = api.projects().locations().datasets()
    datasets.create(parent=parent, datasetId=dataset_id, body={}).execute()
    dataset = f"{parent}/datasets/{dataset_id}"
    datasets.dicomStores().create(parent=dataset, dicomStoreId=store_id, body={}).execute()
    return f"{dataset}/dicomStores/{store_id}"


def dicomweb_client(server_url: str, store: str, session: requests.Session) -> DICOMwebClient:
    """A dicomweb-client for ``store`` of the emulator at ``server_url``, on ``session``."""
    return DICOMwebClient(f"{server_url}/v1/{store}/dicomWeb", session=session)
