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


def gcloud_against(tmp_path: Path, url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A gcloud runner with its own configuration, pointed at the emulator at ``url``."""
    assert GCLOUD is not None
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
        ("api_endpoint_overrides/healthcare", f"{url}/"),
        ("auth/disable_credentials", "true"),
        ("core/project", "gcloud-test"),
    ):
        assert gcloud("config", "set", setting, value).returncode == 0
    return gcloud


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

    gcloud = gcloud_against(tmp_path, healthcare_server.url)
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


def test_gcloud_get_and_set_iam_policy(
    tmp_path: Path,
    healthcare_client: Callable[..., Any],
    healthcare_server: HealthcareServer,
) -> None:
    dataset_id = f"iam-{uuid.uuid4().hex[:8]}"
    api = healthcare_client(healthcare_server.url)
    parent = "projects/gcloud-test/locations/us-central1"
    api.projects().locations().datasets().create(
        parent=parent, datasetId=dataset_id, body={}
    ).execute()
    api.projects().locations().datasets().dicomStores().create(
        parent=f"{parent}/datasets/{dataset_id}", dicomStoreId="store", body={}
    ).execute()
    gcloud = gcloud_against(tmp_path, healthcare_server.url)
    where = ["--dataset", dataset_id, "--location", "us-central1", "--format=json"]

    empty = gcloud("healthcare", "dicom-stores", "get-iam-policy", "store", *where)
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout) == {"etag": "ACAB"}

    binding = {"role": "roles/healthcare.dicomViewer", "members": ["user:viewer@example.com"]}
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"bindings": [binding], "etag": "ACAB"}))
    applied = gcloud(
        "healthcare", "dicom-stores", "set-iam-policy", "store", str(policy_file), *where
    )
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["bindings"] == [binding]

    read = gcloud("healthcare", "dicom-stores", "get-iam-policy", "store", *where)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["bindings"] == [binding]
    assert json.loads(read.stdout)["etag"] != "ACAB"

    stale = gcloud(
        "healthcare", "dicom-stores", "set-iam-policy", "store", str(policy_file), *where
    )
    assert stale.returncode != 0 and "concurrent policy changes" in stale.stderr

    dataset_policy = gcloud(
        "healthcare",
        "datasets",
        "get-iam-policy",
        dataset_id,
        "--location",
        "us-central1",
        "--format=json",
    )
    assert dataset_policy.returncode == 0, dataset_policy.stderr
    assert json.loads(dataset_policy.stdout) == {"etag": "ACAB"}
