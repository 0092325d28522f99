"""The unmodified gcloud CLI against the emulator (skipped where gcloud is absent).

gcloud runs with a throwaway CLOUDSDK_CONFIG, so the user's configuration is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from localcloud.healthcare import HealthcareServer
from localcloud.storage import StorageServer

GCLOUD = shutil.which("gcloud")
pytestmark = pytest.mark.skipif(GCLOUD is None, reason="gcloud is not installed")
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def test_gcloud_import_describe_export(
    tmp_path: Path,
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
    gcs_server: StorageServer,
) -> None:
    assert GCLOUD is not None
    dataset_id = f"gc-{uuid.uuid4().hex[:8]}"
    api = healthcare_client(healthcare_server.url)
    parent = "projects/gcloud-test/locations/us-central1"
    api.projects().locations().datasets().create(
        parent=parent, datasetId=dataset_id, body={}
    ).execute()
    api.projects().locations().datasets().dicomStores().create(
        parent=f"{parent}/datasets/{dataset_id}", dicomStoreId="store", body={}
    ).execute()
    bucket = f"gcl-{uuid.uuid4().hex[:10]}"
    gcs = gcs_server.client()
    try:
        gcs.create_bucket(bucket).blob("in/ct.dcm").upload_from_filename(str(CT_SMALL))
    finally:
        gcs.close()

    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }

    def gcloud(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(GCLOUD), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    for setting, value in (
        ("api_endpoint_overrides/healthcare", f"{healthcare_server.url}/"),
        ("auth/disable_credentials", "true"),
        ("core/project", "gcloud-test"),
    ):
        assert gcloud("config", "set", setting, value).returncode == 0
    where = ["--dataset", dataset_id, "--location", "us-central1"]

    imported = gcloud(
        "healthcare",
        "dicom-stores",
        "import",
        "gcs",
        "store",
        *where,
        f"--gcs-uri=gs://{bucket}/in/*.dcm",
    )
    assert imported.returncode == 0, imported.stderr
    assert "Request issued for: [store]" in imported.stderr
    operation = next(
        line.split("[", 1)[1].split("]", 1)[0]
        for line in imported.stderr.splitlines()
        if line.startswith("Waiting for operation")
    )
    assert operation.startswith(f"{parent}/datasets/{dataset_id}/operations/")
    assert "done." in imported.stderr

    described = gcloud(
        "healthcare", "operations", "describe", operation.rsplit("/", 1)[1], *where, "--format=json"
    )
    assert described.returncode == 0, described.stderr
    body = json.loads(described.stdout)
    assert body["done"] is True and body["metadata"]["counter"] == {"success": "1"}
    assert body["metadata"]["apiMethodName"].endswith("DicomService.ImportDicomData")

    exported = gcloud(
        "healthcare",
        "dicom-stores",
        "export",
        "gcs",
        "store",
        *where,
        f"--gcs-uri-prefix=gs://{bucket}/out",
    )
    assert exported.returncode == 0, exported.stderr
    assert "done." in exported.stderr
    ct = pydicom.dcmread(CT_SMALL)
    name = f"out/{ct.StudyInstanceUID}/{ct.SeriesInstanceUID}/{ct.SOPInstanceUID}.dcm"
    gcs = gcs_server.client()
    try:
        assert gcs.bucket(bucket).blob(name).download_as_bytes() == CT_SMALL.read_bytes()
    finally:
        gcs.close()

    failing = gcloud(
        "healthcare",
        "dicom-stores",
        "import",
        "gcs",
        "store",
        *where,
        f"--gcs-uri=gs://{bucket}/in/**/x",
    )
    assert failing.returncode != 0 and "INVALID_ARGUMENT" in failing.stderr
